"""LM training: state, optimizer, loss and a sharded train step.

    codes [B, K, T] -> pattern.build -> steps [B, K, S]
    texts -> text encoder (trained with the LM when it is the learned one) -> condition dropout (CFG)
    -> LM(steps) -> logits [B, K, S, card] -> pattern.revert_logits -> masked CE per codebook.

Parameters and optimizer state are sharded by their logical axis names (config.logical_axis_rules over
the mesh); the batch is sharded over the batch axes. The step is one jax.jit with in/out shardings and
the state donated.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from jax.sharding import Mesh

from musicgen_jax import lm as lm_lib, sharding
from musicgen_jax.conditioners.dropout import drop_condition


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any        # {'lm': ..., 'text': ...}
  opt_state: Any
  rng: jax.Array


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warmup, cosine decay and global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, max(1, t.warmup_steps),
                                                max(t.num_steps, t.warmup_steps + 1))
  return optax.chain(optax.clip_by_global_norm(t.grad_clip),
                     optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))


class Trainer:
  """Owns the static pieces (model, pattern, text conditioner, optimizer, mesh) of one run."""

  def __init__(self, config: ml_collections.ConfigDict, pattern, text, mesh: Mesh):
    self.config = config
    self.lm_cfg = lm_lib.LMConfig.from_dict(config.model)
    self.model = lm_lib.MusicGenLM(self.lm_cfg, deterministic=False)
    self.pattern = pattern
    self.text = text
    self.mesh = mesh
    self.rules = sharding.rules_from_config(config.logical_axis_rules)
    self.tx = make_optimizer(config.train)
    self.train_text = config.text.kind == "learned"

  # --- state ------------------------------------------------------------------------------------
  def _init(self, rng):
    k_lm, k_text, k_state = jax.random.split(rng, 3)
    params = {"lm": lm_lib.init_params(self.lm_cfg, k_lm)["params"], "text": self.text.init(k_text)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), rng=k_state)

  def state_sharding(self):
    """NamedShardings of the train state from the logical names of its (boxed) leaves."""
    abstract = jax.eval_shape(self._init, jax.random.key(0))
    with nn.logical_axis_rules(self.rules):
      return sharding.logical_sharding(abstract, self.mesh, self.rules)

  def init_state(self, seed: int) -> TrainState:
    """Sharded init: every leaf is created directly with its sharding (nothing materialised whole)."""
    shardings = self.state_sharding()
    init = jax.jit(lambda r: nn.unbox(self._init(r)), out_shardings=shardings)
    with self.mesh:
      return init(jax.random.key(seed))

  # --- loss and step ----------------------------------------------------------------------------
  def loss_fn(self, params, batch, rng):
    """-> (mean CE over valid (k, t), metrics). batch: codes [B, K, T], input_ids / attention_mask."""
    k_drop, k_model = jax.random.split(rng)
    text_params = params["text"] if self.train_text else jax.lax.stop_gradient(params["text"])
    hidden, mask = self.text.encode(text_params, {"input_ids": batch["input_ids"],
                                                  "attention_mask": batch["attention_mask"]})
    hidden, mask = drop_condition(k_drop, hidden, mask, self.config.train.cond_dropout)
    melody = batch.get("chroma")
    conds = lm_lib.Conditions(text=hidden, text_mask=mask, melody=melody)
    codes = batch["codes"]
    steps = self.pattern.build(codes, self.lm_cfg.special_token)
    logits = self.model.apply({"params": params["lm"]}, steps, conds, rngs={"dropout": k_model})
    logits_bktc, mask_kt = self.pattern.revert_logits(logits, codes.shape[-1])
    ce_bkt = optax.softmax_cross_entropy_with_integer_labels(logits_bktc.astype(jnp.float32), codes)
    w_kt = jnp.asarray(mask_kt, jnp.float32)
    ce_k = jnp.sum(ce_bkt * w_kt[None], axis=(0, 2)) / (codes.shape[0] * jnp.maximum(w_kt.sum(-1), 1))
    loss = ce_k.mean()
    return loss, {"loss": loss, "ce_per_codebook": ce_k, "perplexity": jnp.exp(ce_k)}

  def _step(self, state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    (_, metrics), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(state.params, batch, step_rng)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  def make_step(self):
    """The jitted, sharded, state-donating train step: (state, batch) -> (state, metrics)."""
    state_sh = self.state_sharding()
    batch_sh = {k: sharding.batch_sharding(self.mesh, self.rules, 2 if k != "codes" else 3)
                for k in ("codes", "input_ids", "attention_mask")}
    step = jax.jit(self._step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(self.mesh)), donate_argnums=(0,))

    def run(state, batch):
      with self.mesh, nn.logical_axis_rules(self.rules):
        return step(state, batch)
    return run
