"""The generic training loop: work directory, mesh, data, state, compiled step, checkpoints, evaluation.

`train(config, workdir)` runs a task (the LM today; the codec task plugs in the same way) to
`config.train.num_steps`, resuming from the newest complete checkpoint in `workdir`. It reads top to
bottom in sections. What it guarantees:

* one writer per work directory (a lock naming the holder); the config is written only once the
  checkpoint is known to restore, and a config the checkpoint cannot absorb is refused naming the fields;
* no host sync per step: metrics are summed on the devices and fetched at log intervals only, and
  the host waits only for the step `train.max_steps_ahead` back, so the devices always have the next
  step queued while a stop signal is acted on within that many steps (unbounded, asynchronous
  dispatch would run a whole log interval ahead: minutes of steps on a pod, past a preemption notice);
* SIGTERM / SIGINT (and, on multi-host jobs, the cluster's preemption notice) save a checkpoint and stop
  with one line; a run killed at any moment resumes from its newest complete checkpoint, and in both
  cases the continued run is bit-identical to an uninterrupted one (state, RNG and data position are all
  in the checkpoint);
* a non-finite loss stops the run naming the step; checkpoints are saved only from finite states, so the
  last good one is never overwritten.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from musicgen_jax import checkpoint, sharding as shd
from musicgen_jax.training import distributed, metrics as metrics_lib, optim, steps as steps_lib
from musicgen_jax.training import workdir as workdir_lib
from musicgen_jax.training.checkpoints import CheckpointStore



class Stopped(Exception):
  """Training stopped early on purpose (a signal or a preemption notice) after saving."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class NonFiniteLoss(ValueError):
  """The loss became NaN or infinite; the run stopped without saving the bad state."""


# ---- configuration checks (cheap, before anything compiles) ---------------------------------------
def check_config(config: ml_collections.ConfigDict) -> None:
  t = config.train
  for name in ("batch_size", "num_steps", "log_every", "checkpoint_every", "grad_accum",
               "keep_checkpoints"):
    if not isinstance(t[name], int) or t[name] < 1:
      raise ValueError(f"train.{name} must be an integer >= 1, got {t[name]!r}")
  stop_at = t.get("stop_at", 0)
  if not isinstance(stop_at, int) or not 0 <= stop_at <= t.num_steps:
    raise ValueError(f"train.stop_at must be an integer in [0, train.num_steps={t.num_steps}] "
                     f"(0 = num_steps), got {stop_at!r}")
  if not isinstance(t.max_steps_ahead, int) or t.max_steps_ahead < 0:
    raise ValueError(f"train.max_steps_ahead must be an integer >= 0 (0 = unbounded), "
                     f"got {t.max_steps_ahead!r}")
  init_fresh_parts(config)
  if t.eval_every < 0 or t.eval_batches < 0:
    raise ValueError("train.eval_every and train.eval_batches must be >= 0 (0 = off / whole split)")
  if not 0.0 <= t.ema_decay < 1.0:
    raise ValueError(f"train.ema_decay must be in [0, 1) (0 = no EMA), got {t.ema_decay}")
  for name in ("cond_dropout", "melody_dropout"):
    if not 0.0 <= t.get(name, 0.0) <= 1.0:
      raise ValueError(f"train.{name} must be in [0, 1], got {t[name]}")
  if not t.learning_rate > 0 or not np.isfinite(t.learning_rate):
    raise ValueError(f"train.learning_rate must be a positive number, got {t.learning_rate}")
  if not t.segment_seconds > 0:
    raise ValueError(f"train.segment_seconds must be > 0, got {t.segment_seconds}")
  if config.get("data") is not None:
    from musicgen_jax.data import loader
    loader.check_caption_settings(config.data)
  from musicgen_jax.eval import hook
  hook.check(config)


TASKS = {"lm": "musicgen_jax.training.lm_task:LMTask",
         "codec": "musicgen_jax.training.codec_task:CodecTask"}


def task_class(config: ml_collections.ConfigDict):
  """The Task class that `config.task` names ('lm' when absent)."""
  import importlib
  name = config.get("task", "lm")
  if name not in TASKS:
    raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {name!r}")
  module, cls = TASKS[name].split(":")
  return getattr(importlib.import_module(module), cls)


@dataclasses.dataclass(frozen=True)
class FreshPart:
  """A part of init_from's model that `init_fresh` starts anew: the config fields it takes from this
  config rather than from init_from's (dotted), and which parameters (by path) it initialises."""
  fields: tuple[str, ...]
  params: Callable[[tuple[str, ...]], bool]


INIT_FRESH = {
    # a new text encoder, e.g. another tokenizer or depth
    "text": FreshPart(("text",), lambda path: path[0] == "text"),
    # text read by cross-attention in every layer (new weights) instead of as a prefix: the LM's
    # other weights are kept
    "cross": FreshPart(("model.text_conditioning",),
                       lambda path: path[0] == "lm" and any(n.startswith("encoder_attn") for n in path)),
    # a beat clock on the audio frames (model.beat_clock_rate, conditioners/tempo.py): a new
    # projection, every other weight kept
    "beat": FreshPart(("model.beat_clock_rate",), lambda path: path[:2] == ("lm", "beat_proj")),
}


def init_fresh_parts(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The parts named by `init_fresh` (comma-separated), checked against INIT_FRESH and init_from."""
  parts = tuple(p.strip() for p in str(config.get("init_fresh") or "").split(",") if p.strip())
  bad = [p for p in parts if p not in INIT_FRESH]
  if bad:
    raise ValueError(f"init_fresh names {', '.join(map(repr, bad))}: the parts that can start "
                     f"anew are {', '.join(INIT_FRESH)}")
  if parts and not config.get("init_from"):
    raise ValueError("init_fresh needs init_from: it names the parts of init_from's model that "
                     "start from a fresh initialisation instead")
  if "cross" in parts and config.get("model", {}).get("text_conditioning") != "cross":
    raise ValueError("init_fresh=cross starts text cross-attention layers: set "
                     "model.text_conditioning=cross as well")
  return parts


def is_fresh(path, parts: tuple[str, ...]) -> bool:
  """Whether the parameter at `path` (a key path of the {'lm', 'text'} tree) starts anew."""
  names = tuple(str(getattr(k, "key", k)) for k in path)
  return any(INIT_FRESH[p].params(names) for p in parts)


def _get_field(config: ml_collections.ConfigDict, field: str):
  value = config
  for name in field.split("."):
    value = value[name]
  return ml_collections.ConfigDict(value.to_dict()) if isinstance(value, ml_collections.ConfigDict) else value


def _data_codec(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The codec architecture of an LM run's `data.codec` (the codec its token cache comes from),
  or None: no LM, no data.codec, or a directory without a trained codec's config."""
  data = config.get("data")
  if "model" not in config or data is None or not data.get("codec"):
    return None
  source = checkpoint.read_config(data.codec)
  if source.get("codec") is None or not source.codec.get("encodec"):
    return None
  return ml_collections.ConfigDict(source.codec.to_dict())


def resolve_init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """With `init_from`, the architecture (model shape, text encoder, pattern, codec) is the model
  directory's; numerics (dtype, dropout, remat, scan_unroll) and everything else stay the config's.
  In both cases an LM run whose token cache comes from `data.codec` takes that codec's
  architecture (without init_from, unless the config names one itself), so its work directory is
  a whole model (LM, text encoder and codec) that sample.py reads."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.init_from:
    token_codec = None if config.get("codec", {}).get("encodec") else _data_codec(config)
    if token_codec is not None:
      config.codec = token_codec
    return config
  token_codec = _data_codec(config)
  source = checkpoint.read_config(config.init_from)
  has_model = "model" in config
  numerics = ("dtype", "dropout", "remat", "scan_unroll")
  sections = ("model", "text", "pattern", "codec") if has_model else ("codec",)
  # This config's own values: the numerics, and the settings of the parts init_fresh starts anew.
  kept = [f"model.{k}" for k in numerics if k in config.model] if has_model else []
  kept += [f for p in init_fresh_parts(config) for f in INIT_FRESH[p].fields]
  own = {f: _get_field(config, f) for f in kept}
  for section in sections:
    if section in source:
      config[section] = ml_collections.ConfigDict(source[section].to_dict())
  if token_codec is not None:   # the token cache's codec, not init_from's
    config.codec = token_codec
  for field, value in own.items():
    *parents, name = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  if has_model:
    if config.text.kind == "learned":
      config.model.text_dim = config.text.dim
  return config


# ---- the loop ---------------------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str, task_factory: Callable | None = None,
          *, out: Callable[[str], None] | None = None) -> dict:
  """Trains to config.train.num_steps; returns the last logged (and evaluated) metrics as floats."""
  out = out or (lambda line: print(line, flush=True))
  check_config(config)
  distributed.initialize(config.distributed)
  workdir = os.path.abspath(workdir)
  created = not os.path.exists(workdir)
  lock = workdir_lib.WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
  try:
    return _Run(resolve_init_from(config), workdir, task_factory, out).run()
  finally:
    if lock is not None:
      lock.release(remove_directory=created)   # a refused start leaves no directory of its own


@dataclasses.dataclass
class _Run:
  config: ml_collections.ConfigDict
  workdir: str
  task_factory: Callable | None
  out: Callable[[str], None]

  def run(self) -> dict:
    c, t = self.config, self.config.train
    primary = jax.process_index() == 0
    # --- work directory: a checkpoint of another config is refused before anything is written ---
    stored_path = os.path.join(self.workdir, checkpoint.CONFIG_FILE)
    if os.path.isfile(stored_path) and os.path.isdir(os.path.join(self.workdir, "checkpoints")):
      diff = workdir_lib.incompatible_fields(checkpoint.read_config(self.workdir), c)
      if diff:
        raise workdir_lib.WorkdirError(
            f"{self.workdir} holds a run of another configuration ({'; '.join(diff)}): use another "
            "--workdir, or the same settings to resume")
    # --- mesh ---
    mesh = shd.make_mesh(c.mesh.shape, c.mesh.axes, dcn_shape=c.mesh.get("dcn_shape"))
    rules = shd.rules_from_config(c.logical_axis_rules)
    ways = shd.data_parallel_size(mesh, rules)
    if t.batch_size % ways or t.batch_size % jax.process_count():
      raise ValueError(f"train.batch_size {t.batch_size} must be divisible by the {ways} data-parallel "
                       f"ways of the mesh {dict(mesh.shape)} and by the {jax.process_count()} processes")
    # --- task ---
    # The text encoder's vocabulary: the run's own, else init_from's unless its text starts anew.
    text_dir = None
    if os.path.isfile(os.path.join(self.workdir, checkpoint.TOKENIZER_FILE)):
      text_dir = self.workdir
    elif c.init_from and "text" not in init_fresh_parts(c):
      text_dir = c.init_from
    task = (self.task_factory or task_class(c))(c, mesh, text_dir)
    # A train.freeze typo is refused before the data caches are built (hours for a large manifest).
    optim.check_freeze(tuple(t.get("freeze") or ()), task.abstract_params())
    # --- input pipeline ---
    pc = jax.process_count()
    if not t.progress:   # train.progress=False (logs to files): no bars while the data is built
      import tensorflow_datasets as tfds
      tfds.disable_progress_bar()
    summary = task.prepare_data(self.workdir)
    if primary and summary:
      self.out(f"data: {summary}")
    train_iter = task.make_iterator("train", self.workdir)
    # --- compiled step (shapes only: nothing is allocated yet) ---
    ts = steps_lib.build_train_step(task, mesh, rules, t.batch_size)
    state_sh, batch_sh, acc_sh = ts.state_shardings, ts.batch_shardings, ts.acc_sharding
    # --- state: restored, or initialised directly with its shardings ---
    store = CheckpointStore(self.workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoints,
                            checksums=t.checksums)
    try:
      restored = store.restore_latest(ts.abstract_state, train_iter)
      if restored is not None:
        state, start = restored
        self.out(f"resumed from step {start} ({os.path.join(store.root, str(start))})")
        if primary and summary and summary.get("previous_cache"):
          self.out(f"note: the training data changed since step {start} was saved (the token cache "
                   f"was {summary['previous_cache']}, now {summary['cache']}): the run goes on "
                   "with the new data, from the saved position of its order, so it does not "
                   "repeat the uninterrupted run")
      else:
        start = 0
        state = self._init_state(task, state_sh)
      # Only now is the directory known to be this config's: write the config and the model files.
      if primary:
        checkpoint.write_config(self.workdir, c)
        task.write_model_files(self.workdir)
    except BaseException:
      store.close()   # Orbax's threads finish before the error ends the interpreter (a bad init_from)
      raise
    # --- the loop ---
    writer = metrics_lib.MetricWriter(self.workdir, enabled=primary)
    end = t.get("stop_at") or t.num_steps   # the schedule is num_steps' whatever the end
    progress = metrics_lib.Progress(start, end, enabled=primary and t.progress,
                                    out=self.out if primary else (lambda _: None))
    stop = _StopSignals(install=pc == 1)
    acc = jax.device_put(ts.zero_acc(), acc_sh)
    queued: collections.deque = collections.deque()    # `done` of the dispatched, unfinished steps
    ahead = t.max_steps_ahead                          # 0: unbounded, nothing is kept
    last: dict[str, Any] = {}
    frames = task.frames * t.batch_size
    t_log, s_log, cur = time.time(), start, start
    evaluator = _Evaluator(task, mesh, rules, state_sh, batch_sh, self.workdir)
    generative = None
    if t.get("generate_every", 0):
      from musicgen_jax.eval import hook
      data_dir = c.data.get("cache_dir") or os.path.join(self.workdir, "data")
      generative = hook.GenerativeHook(c, os.path.abspath(data_dir), task.text, self.out)
    try:
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        while cur < end:
          batch = _global_batch(next(train_iter), batch_sh)
          state, acc, done = ts.fn(state, acc, batch)
          cur += 1
          if ahead:
            queued.append(done)
            while len(queued) > ahead:
              queued.popleft().block_until_ready()
          progress.update()
          if cur % t.log_every == 0 or cur == end:
            host = jax.device_get(acc)
            acc = jax.device_put(ts.zero_acc(), acc_sh)
            _raise_if_bad(host, store)
            dt = max(time.time() - t_log, 1e-9)
            last = _train_metrics(host, (cur - s_log) / dt, frames * (cur - s_log) / dt)
            t_log, s_log = time.time(), cur
            writer.write(cur, {f"train/{k}": v for k, v in last.items()})
            progress.show(loss=last["loss"])
            progress.write(_line(cur, last))
          if t.eval_every and (cur % t.eval_every == 0 or cur == end):
            ev = evaluator.run(state, c, t.eval_batches)
            if ev:
              writer.write(cur, {f"eval/{k}": v for k, v in ev.items()})
              progress.write(f"step {cur}: eval " + _summary(ev))
              last.update({f"eval_{k}": v for k, v in ev.items()})
              if t.keep_best and primary:
                evaluator.keep_if_best(cur, ev["loss"], task.export_params(state), c)
          if generative is not None and generative.due(cur, end):
            from musicgen_jax.eval import hook
            params = hook.gather(task.export_params(state))
            if primary:
              gen = generative.run(params)
              writer.write(cur, {f"generate/{k}": v for k, v in gen.items()})
              progress.write(f"step {cur}: generated " + _summary(gen))
              last.update({f"generate_{k}": v for k, v in gen.items()})
          signum = stop.signum if pc == 1 else (signal.SIGTERM if store.reached_preemption(cur) else 0)
          if cur % t.checkpoint_every == 0 or cur == end or signum:
            _raise_if_bad(jax.device_get(acc), store)
            store.save(cur, state, train_iter)
          if signum:
            store.wait()
            name = signal.Signals(signum).name
            raise Stopped(f"stopped by {name} at step {cur}: checkpoint saved in "
                          f"{os.path.join(store.root, str(cur))}; run the same command to resume",
                          128 + signum)
      store.wait()
    finally:
      stop.restore()
      progress.close()
      writer.close()
      store.close()
    return last

  def _init_state(self, task, state_sh):
    c = self.config
    key = jax.random.key(c.train.seed)
    if not c.init_from:
      init = jax.jit(lambda r: nn.unbox(task.init_state(r)), out_shardings=state_sh)
      return init(key)
    fresh = init_fresh_parts(c)
    params = load_init_params(c.init_from, task, fresh=fresh)

    def start(p, r):
      if fresh:   # the parts named by init_fresh: a random initialisation, as without init_from
        new = nn.unbox(task.init_params(jax.random.fold_in(r, 1)))
        p = jax.tree.map(lambda n, loaded: n if loaded is None else loaded, new, p)
      return nn.unbox(task.init_state(r, params=p))

    return jax.jit(start, out_shardings=state_sh)(params, key)


def load_init_params(directory: str, task, fresh: tuple[str, ...] = ()) -> Any:
  """The {'lm', 'text'} parameters of a model directory, placed on the devices with the task's
  shardings (each device gets only its shard); the parameters of the init_fresh parts in `fresh`
  are None. ValueError naming the first mismatching leaf."""
  if hasattr(task, "load_params"):
    params = task.load_params(directory)
  else:
    _, params = checkpoint.load_model(directory)
  flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])

  def place(path, e, s):
    if is_fresh(path, fresh):
      return None
    name = jax.tree_util.keystr(path)
    if path not in flat_p:
      raise ValueError(f"init_from {directory} has no parameter {name}: it is not a model of this shape")
    x = flat_p[path]
    if tuple(np.shape(x)) != tuple(e.shape):
      raise ValueError(f"init_from {directory}: parameter {name} has shape {np.shape(x)}, "
                       f"this config needs {tuple(e.shape)}")
    return jax.make_array_from_callback(e.shape, s, lambda idx: np.asarray(x, e.dtype)[idx])

  expected = nn.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
  return jax.tree_util.tree_map_with_path(place, expected, task.param_shardings())


def _tokenizer_file(workdir: str) -> str | None:
  path = os.path.join(workdir, checkpoint.TOKENIZER_FILE)
  return path if os.path.isfile(path) else None


def _global_batch(local: dict, shardings: dict) -> dict:
  """Per-process numpy batches -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local[k]))
          for k in shardings}


def _raise_if_bad(acc_host: dict, store: CheckpointStore) -> None:
  bad = int(acc_host["first_bad"])
  if bad != steps_lib.NO_BAD_STEP:
    good = store.steps()
    where = (f"the last good checkpoint is step {good[-1]} in {store.root} (kept)" if good
             else "no checkpoint was saved")
    raise NonFiniteLoss(f"the loss became non-finite at step {bad + 1}; {where}: lower "
                        "train.learning_rate or check the data, then run again to resume")


def _train_metrics(acc_host: dict, steps_per_s: float, frames_per_s: float) -> dict:
  n = max(int(acc_host["n"]), 1)
  mean = {k: np.asarray(v) / n for k, v in acc_host["sum"].items()}
  out = {k: (float(v) if v.ndim == 0 else v.tolist()) for k, v in mean.items()}
  if "ce_per_codebook" in mean:
    out["perplexity"] = np.exp(mean["ce_per_codebook"]).tolist()
  out["steps_per_s"] = steps_per_s
  out["frames_per_s"] = frames_per_s
  return out


def _summary(m: dict) -> str:
  """'loss 2.3456 perplexity [..] ...': every number of a metrics dict, rounded."""
  def fmt(v):   # small figures (flatness, condition gain) keep 3 significant digits
    if isinstance(v, float):
      return f"{v:.3g}" if 0 < abs(v) < 0.01 else f"{v:.4f}"
    return str([round(float(x), 3) for x in v])
  return " ".join(f"{k} {fmt(v)}" for k, v in m.items() if isinstance(v, (float, list)))


def _line(step: int, m: dict) -> str:
  """The log line of a step: the LM's perplexity per codebook, or the codec's loss terms."""
  if len(m.get("perplexity", [])):
    detail = f"ppl/codebook {[round(float(x), 2) for x in m['perplexity']]}"
  else:
    detail = " ".join(f"{k} {float(m[k]):.4f}" for k in ("l1", "commit", "d_loss") if k in m)
  return (f"step {step}: loss {m['loss']:.4f} grad_norm {m.get('grad_norm', float('nan')):.3f} "
          f"{detail} ({m['steps_per_s']:.2f} steps/s)")


class _Evaluator:
  """The held-out pass: summed CE and token counts per codebook over the validation split."""

  def __init__(self, task, mesh, rules, state_sh, batch_sh, workdir: str):
    self.task, self.mesh, self.batch_sh, self.workdir = task, mesh, batch_sh, workdir
    self.best = np.inf
    add = lambda state, sums, batch: jax.tree.map(jnp.add, sums, task.eval_step(state, batch))
    self._step = jax.jit(add, in_shardings=(state_sh, shd.replicated(mesh), batch_sh),
                         out_shardings=shd.replicated(mesh), donate_argnums=(1,))

  def run(self, state, config, max_batches: int) -> dict | None:
    it = self.task.make_iterator("validation", self.workdir, shuffle=False, num_epochs=1)
    sums = None
    for i, local in enumerate(it):
      if max_batches and i >= max_batches:
        break
      batch = _global_batch(local, self.batch_sh)
      if sums is None:
        shapes = jax.eval_shape(self.task.eval_step, state, batch)
        sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      sums = self._step(state, sums, batch)
    if sums is None:
      return None
    return self.task.summarize_eval(jax.device_get(sums))

  def keep_if_best(self, step: int, loss: float, params, config) -> None:
    """Writes <workdir>/best/ (a model directory) when the held-out loss improves."""
    if not loss < self.best:
      return
    self.best = loss
    import json
    import shutil
    best, tmp = os.path.join(self.workdir, "best"), os.path.join(self.workdir, "best.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.save_model(tmp, config, jax.device_get(params),
                          tokenizer_file=_tokenizer_file(self.workdir), overwrite=True)
    with open(os.path.join(tmp, "best.json"), "w") as f:
      json.dump({"step": step, "eval_loss": loss}, f)
    # The previous best stays whole until the new one is complete.
    old = best + ".old"
    if os.path.isdir(best):
      os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


class _StopSignals:
  """SIGTERM / SIGINT set a flag that the loop turns into a save and a clean stop; a second signal
  of the same kind stops at once."""

  def __init__(self, install: bool):
    self.signum = 0
    self._old = {}
    if install:
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)

  def _handle(self, signum, frame):
    if self.signum:
      self.restore()
      signal.raise_signal(signum)
      return
    self.signum = signum
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
          "(send it again to stop at once)", file=sys.stderr, flush=True)

  def restore(self) -> None:
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old = {}
