"""The LM training task: state, loss, train and eval steps of the MusicGen LM.

    codes [B, K, T] -> pattern.build -> steps [B, K, S]
    texts (tokenised by the data pipeline) -> text encoder (learned: trained with the LM; T5: frozen,
    inside the step, sharded like the LM) -> condition dropout (CFG)
    -> LM(steps, conditions) -> logits [B, K, S, card] -> pattern.revert_logits
    -> cross-entropy per codebook over the valid (k, t): the pattern's mask, the frame mask of short
       items and the example weights of padded eval batches.

The generic loop (training/loop.py) runs this task: it asks for the state's shardings, initialises or
restores the state, and jits `train_step` / `eval_step` with the mesh's shardings. Nothing here names a
mesh axis: parameters and activations carry logical axis names mapped by `config.logical_axis_rules`.
"""
from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from musicgen_jax import checkpoint, lm as lm_lib, sampling, sharding as shd
from musicgen_jax.conditioners import melody as melody_lib
from musicgen_jax.conditioners.dropout import drop_condition
from musicgen_jax.pipeline import (WORD_TOKENIZER, lm_config, pattern_from_config,
                                   text_conditioner_from_config)
from musicgen_jax.training import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 []: micro-steps taken (optimizer updates = step // grad_accum)
  params: Any          # {'lm': ..., 'text': ...} float32
  opt_state: Any
  ema: Any             # exponential moving average of params, or None
  rng: jax.Array       # uint32 [2]: raw PRNG key data (plain arrays checkpoint and shard everywhere)


# Logical axes of every batch entry (the first axis is the batch).
BATCH_AXES = {
    "codes": (shd.BATCH, shd.CODEBOOKS, shd.LENGTH),
    "frame_mask": (shd.BATCH, shd.LENGTH),
    "input_ids": (shd.BATCH, None),
    "attention_mask": (shd.BATCH, None),
    "chroma": (shd.BATCH, None, None),
    "weight": (shd.BATCH,),
    "beat": (shd.BATCH, None),
}


class LMTask:
  """The static pieces of one LM run (model, pattern, text conditioner, optimizer) and its steps."""

  name = "lm"

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, directory: str | None = None):
    self.config = config
    self.mesh = mesh
    self.rules = shd.rules_from_config(config.logical_axis_rules)
    self.lm_cfg = lm_config(config)
    self.model = lm_lib.MusicGenLM(self.lm_cfg, deterministic=False)
    self.eval_model = lm_lib.MusicGenLM(self.lm_cfg, deterministic=True)
    self.pattern = pattern_from_config(config)
    self.tokenizer_file = config.text.get("tokenizer") or None
    if directory and os.path.isfile(os.path.join(directory, checkpoint.TOKENIZER_FILE)):
      self.tokenizer_file = os.path.join(directory, checkpoint.TOKENIZER_FILE)
    # A word vocabulary still to be fitted (text.tokenizer='words'): prepare_data fits it on the
    # training captions and builds the text conditioner then.
    self.text = (None if self.tokenizer_file == WORD_TOKENIZER
                 else text_conditioner_from_config(config, directory))
    self.train_text = config.text.kind == "learned"
    frozen = () if self.train_text else ("text",)
    self.trainable = optim.trainable_fn(frozen, tuple(config.train.freeze))
    self.tx = optim.make_optimizer(config.train, self.trainable)
    self.frames = int(round(config.train.segment_seconds * config.codec.frame_rate))

  # --- state ------------------------------------------------------------------------------------
  def init_params(self, rng: jax.Array, text=None) -> Any:
    """Random parameters {'lm', 'text'}, boxed with their logical axis names (`text`: another
    text conditioner than the run's)."""
    text = text or self.text
    if text is None:
      raise ValueError(f"text.tokenizer={WORD_TOKENIZER!r}: the vocabulary, and so the text "
                       "encoder's shape, is known only after prepare_data has fitted it")
    k_lm, k_text = jax.random.split(rng)
    return {"lm": lm_lib.init_params(self.lm_cfg, k_lm)["params"], "text": text.init(k_text)}

  def abstract_params(self) -> Any:
    """Shapes of init_params, known before the data is prepared: a word vocabulary still to be
    fitted sizes the text encoder's embedding, not its parameter names, so the byte-level
    vocabulary stands in for it (what train.freeze is checked against at start-up)."""
    text = self.text
    if text is None:
      stand_in = self.config.copy_and_resolve_references()
      stand_in.text.tokenizer = None
      text = text_conditioner_from_config(stand_in)
    return jax.eval_shape(lambda k: self.init_params(k, text), jax.random.key(0))

  def init_state(self, rng: jax.Array, params: Any = None) -> TrainState:
    """A fresh state around `params` (default: random). Leaves keep their logical-axis boxes, so
    `jax.eval_shape(init_state)` yields the shardings of every leaf, optimizer moments included."""
    k_params, k_state = jax.random.split(rng)
    if params is None:
      params = self.init_params(k_params)
    ema = jax.tree.map(lambda x: x, params) if self.config.train.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      ema=ema, rng=jax.random.key_data(k_state))

  def param_shardings(self) -> Any:
    """NamedShardings of {'lm', 'text'} (what a fine-tuning start restores into)."""
    abstract = jax.eval_shape(self.init_params, jax.random.key(0))
    return shd.logical_sharding(abstract, self.mesh, self.rules)

  def batch_shardings(self, keys) -> dict:
    return {k: shd.logical_named_sharding(self.mesh, self.rules, BATCH_AXES[k]) for k in keys}

  def batch_keys(self) -> tuple[str, ...]:
    keys = ("codes", "frame_mask", "input_ids", "attention_mask", "weight")
    return (keys + (("chroma",) if self.lm_cfg.melody else ())
            + (("beat",) if self.lm_cfg.beat_clock_rate else ()))

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch (ahead-of-time compilation, benchmarks)."""
    c = self.lm_cfg
    spec = {"codes": ((batch_size, c.num_codebooks, self.frames), jnp.int32),
            "frame_mask": ((batch_size, self.frames), jnp.bool_),
            "input_ids": ((batch_size, self.config.text.max_length), jnp.int32),
            "attention_mask": ((batch_size, self.config.text.max_length), jnp.int32),
            "weight": ((batch_size,), jnp.float32),
            "beat": ((batch_size, 2), jnp.float32),
            "chroma": ((batch_size, c.chroma_length, c.num_chroma), jnp.float32)}
    return {k: jax.ShapeDtypeStruct(*spec[k]) for k in self.batch_keys()}

  # --- data ---------------------------------------------------------------------------------------
  def prepare_data(self, workdir: str) -> dict:
    """Builds or reuses the data caches (audio, tokens) this run reads; returns counts to print."""
    from musicgen_jax.data import loader
    counts = loader.prepare_data(self.config, workdir, process_index=jax.process_index(),
                                 process_count=jax.process_count())
    if self.text is None:
      self._fit_words(workdir, counts)
    return counts

  def _fit_words(self, workdir: str, counts: dict) -> None:
    """Fits the word vocabulary on the training split's captions into <workdir>/tokenizer.json
    (process 0; the others wait for it) and builds the text conditioner on it."""
    from musicgen_jax.conditioners.tokenizer import fit_word_tokenizer
    from musicgen_jax.data import loader
    path = os.path.join(workdir, checkpoint.TOKENIZER_FILE)
    if "cache" not in counts:
      raise ValueError(f"text.tokenizer={WORD_TOKENIZER!r} fits a vocabulary on the training "
                       f"captions of audio data; data.kind={self.config.data.kind!r} has none")
    if jax.process_index() == 0:
      source = loader.TokenSource(counts["cache"], "train")
      merge = loader.merge_attributes(self.config)
      texts = []
      for i in range(len(source)):   # one item at a time: only the texts are kept, not the codes
        item = source[i]
        texts.append(item["caption"])
        if merge is not None:   # the words that merged metadata brings are in the vocabulary too
          texts.append(", ".join(loader.attribute_phrases(item.get("metadata"), merge.fields)))
      fit_word_tokenizer(texts, path + ".tmp")
      os.replace(path + ".tmp", path)
    else:
      loader.wait_for(lambda: True if os.path.isfile(path) else None, path)
    self.tokenizer_file = path
    self.text = text_conditioner_from_config(self.config, workdir)

  def make_iterator(self, split: str, workdir: str, *, shuffle: bool = True,
                    num_epochs: int | None = None):
    """This process's batches of `split` (see musicgen_jax/data/loader.py), checkpointable."""
    from musicgen_jax.data import loader
    return loader.make_iterator(self.config, split, self.text, workdir=workdir,
                                process_index=jax.process_index(),
                                process_count=jax.process_count(), shuffle=shuffle,
                                num_epochs=num_epochs)

  # --- loss ---------------------------------------------------------------------------------------
  def _conditions(self, params, batch, rng, train: bool) -> lm_lib.Conditions:
    text_params = params["text"] if self.train_text else jax.lax.stop_gradient(params["text"])
    hidden, mask = self.text.encode(text_params, {"input_ids": batch["input_ids"],
                                                  "attention_mask": batch["attention_mask"]})
    melody = batch.get("chroma")
    beat = batch.get("beat") if self.lm_cfg.beat_clock_rate else None
    k_text, k_melody = jax.random.split(rng)
    null_melody = None if melody is None else jnp.asarray(
        melody_lib.null_chroma(*melody.shape), melody.dtype)
    if train and self.config.train.cond_dropout > 0:
      # Text and melody are dropped together per example (the null condition of sampling).
      drop_b = jax.random.uniform(k_text, (hidden.shape[0],)) < self.config.train.cond_dropout
      hidden, mask = drop_condition(k_text, hidden, mask, self.config.train.cond_dropout)
      if melody is not None:
        melody = jnp.where(drop_b[:, None, None], null_melody, melody)
      if beat is not None:   # the tempo is read from the text, so the clock goes with it
        beat = jnp.where(drop_b[:, None], 0.0, beat)
    if train and melody is not None and self.config.train.melody_dropout > 0:
      # The melody alone is dropped too, independently (audiocraft's attribute dropout, 0.5 for
      # its melody models): so the LM also learns text with no melody, the input of sampling
      # without --melody, where the key and tempo can only come from the text.
      keep_b = jax.random.uniform(k_melody, (melody.shape[0],)) >= self.config.train.melody_dropout
      melody = jnp.where(keep_b[:, None, None], melody, null_melody)
    return lm_lib.Conditions(text=hidden, text_mask=mask, melody=melody, beat=beat)

  @property
  def conditioned(self) -> bool:
    """Whether the LM takes any condition (text or melody) that the null condition can replace."""
    return bool(self.lm_cfg.text_dim or self.lm_cfg.melody)

  def token_losses(self, params, batch, rng, train: bool, null: bool = False,
                   no_melody: bool = False):
    """-> (ce_sum [K], count [K]): summed cross-entropy and the number of valid tokens per codebook.
    `null`: every example gets the null condition of sampling (sampling.null_conditions), the
    unconditional prediction that classifier-free guidance contrasts against. `no_melody`: the
    text with the null melody (sampling without --melody)."""
    k_cond, k_model = jax.random.split(rng)
    conds = self._conditions(params, batch, k_cond, train)
    if null:
      conds = sampling.null_conditions(conds)
    elif no_melody and conds.melody is not None:
      conds = conds.replace(melody=sampling.null_conditions(conds).melody)
    if null or no_melody:
      # The null condition is a compile-time constant; behind the barrier XLA does not try to
      # constant-fold the cross-attention over it (seconds at compile time, logged as errors).
      conds = jax.lax.optimization_barrier(conds)
    codes = batch["codes"]
    steps = self.pattern.build(codes, self.lm_cfg.special_token)
    model = self.model if train else self.eval_model
    logits = model.apply({"params": params["lm"]}, steps, conds, rngs={"dropout": k_model})
    logits_bktc, mask_kt = self.pattern.revert_logits(logits, codes.shape[-1])
    ce_bkt = optax.softmax_cross_entropy_with_integer_labels(logits_bktc.astype(jnp.float32), codes)
    w_bkt = (jnp.asarray(mask_kt, jnp.float32)[None]
             * batch["frame_mask"].astype(jnp.float32)[:, None, :]
             * batch["weight"].astype(jnp.float32)[:, None, None])
    return jnp.sum(ce_bkt * w_bkt, axis=(0, 2)), jnp.sum(w_bkt, axis=(0, 2))

  def loss_fn(self, params, batch, rng):
    ce_sum_k, count_k = self.token_losses(params, batch, rng, train=True)
    ce_k = ce_sum_k / jnp.maximum(count_k, 1.0)
    loss = ce_k.mean()
    return loss, {"loss": loss, "ce_per_codebook": ce_k}

  # --- steps --------------------------------------------------------------------------------------
  def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One micro-step: gradients of the masked CE, the optimizer (and EMA) update."""
    key = jax.random.wrap_key_data(state.rng)
    key, step_key = jax.random.split(key)
    step_key = jax.random.fold_in(step_key, state.step)
    (_, metrics), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(state.params, batch, step_key)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      d = self.config.train.ema_decay
      applied = (state.step + 1) % max(1, self.config.train.grad_accum) == 0
      ema = jax.tree.map(lambda e, p: jnp.where(applied, d * e + (1 - d) * p, e), ema, params)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = optim.schedule(self.config.train)(
        state.step // max(1, self.config.train.grad_accum))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                         rng=jax.random.key_data(key)), metrics

  def eval_step(self, state: TrainState, batch: dict) -> dict:
    """Sums over one held-out batch (the loop adds them up): CE and token counts per codebook, and
    for conditioned models the CE of the same tokens under the null condition."""
    params = state.ema if state.ema is not None else state.params
    return self.eval_sums(params, batch)

  def eval_sums(self, params, batch: dict) -> dict:
    ce_sum_k, count_k = self.token_losses(params, batch, jax.random.key(0), train=False)
    sums = {"ce_sum": ce_sum_k, "count": count_k}
    if self.conditioned:
      sums["ce_sum_null"] = self.token_losses(params, batch, jax.random.key(0), train=False,
                                              null=True)[0]
    if self.lm_cfg.melody and self.lm_cfg.text_dim:
      sums["ce_sum_no_melody"] = self.token_losses(params, batch, jax.random.key(0), train=False,
                                                   no_melody=True)[0]
    return sums

  @staticmethod
  def summarize_eval(sums: dict) -> dict[str, Any]:
    """Mean CE ('loss'), per codebook and as perplexity; for conditioned models also
    'loss_unconditioned' (the CE under the null condition) and 'condition_gain', the nats per token
    that the conditions save (how much the LM uses its text and melody: 0 when it ignores them).
    Melody models with text also get 'loss_no_melody' (the text with the null melody, as sampling
    without --melody), 'text_gain' (what the text alone saves: unconditioned - no_melody) and
    'melody_gain' (what the melody adds to the text: no_melody - loss)."""
    count_k = np.maximum(np.asarray(sums["count"]), 1.0)
    ce_k = np.asarray(sums["ce_sum"]) / count_k
    out = {"loss": float(ce_k.mean()), "ce_per_codebook": ce_k.tolist(),
           "perplexity": np.exp(ce_k).tolist(), "tokens": float(np.sum(sums["count"]))}
    if "ce_sum_null" in sums:
      null = float((np.asarray(sums["ce_sum_null"]) / count_k).mean())
      out.update(loss_unconditioned=null, condition_gain=null - out["loss"])
    if "ce_sum_no_melody" in sums:
      text_only = float((np.asarray(sums["ce_sum_no_melody"]) / count_k).mean())
      out.update(loss_no_melody=text_only, text_gain=out["loss_unconditioned"] - text_only,
                 melody_gain=text_only - out["loss"])
    return out

  def write_model_files(self, workdir: str) -> None:
    """What sample.py needs in the work directory besides the params: the tokenizer and, when the run
    starts from a model that has one, its codec (`<workdir>/codec/`, a model directory of its own)."""
    import shutil
    dst = os.path.join(workdir, checkpoint.TOKENIZER_FILE)
    if self.tokenizer_file and os.path.abspath(self.tokenizer_file) != dst:
      shutil.copyfile(self.tokenizer_file, dst)
    codec_dir = os.path.join(workdir, checkpoint.CODEC_DIR)
    from musicgen_jax.data import loader
    source = loader.token_codec_dir(self.config)
    if source and self.config.codec.get("encodec") and not os.path.isdir(codec_dir):
      _, params = checkpoint.load_codec(source)
      checkpoint.save_model(codec_dir, self.config, {"codec": params})

  def export_params(self, state: TrainState) -> Any:
    """The parameters a model directory holds (EMA when it is kept)."""
    return state.ema if state.ema is not None else state.params

  def flops_per_step(self, batch_size: int) -> float:
    """Model FLOPs of one train step (forward + backward = 3x forward), counted analytically."""
    return 3.0 * forward_flops(self.lm_cfg, batch_size, self.pattern.num_steps(self.frames),
                               self.config.text.max_length)


def forward_flops(c: lm_lib.LMConfig, batch: int, steps: int, text_len: int) -> float:
  """Matmul FLOPs of one forward pass of the LM over [batch, steps] (2 per multiply-add).

  Multiply-adds per token and layer: self-attention projections 4 D^2 (q, k, v, out); causal scores
  and weighted values N D (on average N / 2 keys, for q.k and for p.v); cross-attention q and out 2 D^2
  and attention over the L text states 2 L D; FFN 2 D F. Per sequence and layer, the condition's keys
  and values 2 L D^2. Per token, the K heads D * card * K. Embeddings and norms are left out.
  """
  d, f, layers, k = c.dim, c.ffn_dim, c.num_layers, c.num_codebooks
  n = steps + (c.chroma_length if c.melody else 0)
  per_token = 4 * d * d + n * d + 2 * d * f
  if c.cross_attention:
    per_token += 2 * d * d + 2 * text_len * d
  macs = batch * (n * layers * per_token + steps * d * c.card * k)
  if c.cross_attention:
    macs += batch * layers * text_len * 2 * d * d
  return 2.0 * macs
