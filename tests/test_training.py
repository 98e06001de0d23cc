"""The training loop and the LM task: exact resume, safe work directories, sharding, accumulation.

References: an uninterrupted run (for interrupted, damaged and partial-save runs), one batch of k * b
(for k accumulated micro-batches of b), a single-device mesh (for sharded meshes, on 8 fake CPU devices
in a subprocess).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec

from configs.musicgen import get_config
from musicgen_jax import checkpoint, sharding as shd
from musicgen_jax.conditioners import melody as melody_lib
from musicgen_jax.data import synthetic
from musicgen_jax.training import loop, optim, workdir as workdir_lib
from musicgen_jax.training.lm_task import LMTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def tiny(**train) -> ml_collections.ConfigDict:
  c = get_config("tiny")
  c.train.update(dict(num_steps=STEPS, log_every=1, checkpoint_every=2, eval_every=3,
                      eval_batches=1, keep_checkpoints=5, progress=False))
  c.train.update(train)
  c.data.num_examples = 32
  return c


def final_state(workdir: str, step: int = STEPS) -> dict:
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def assert_same_tree(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert len(la) == len(lb)
  diff = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(la, lb)
          if not np.array_equal(np.asarray(x), np.asarray(y))]
  assert not diff, f"{len(diff)} of {len(la)} leaves differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted tiny run of STEPS steps: its work directory and returned metrics."""
  wd = str(tmp_path_factory.mktemp("uninterrupted"))
  lines = []
  metrics = loop.train(tiny(), wd, out=lines.append)
  return wd, metrics, lines


def test_uninterrupted_run_writes_a_model_directory(reference):
  wd, metrics, _ = reference
  assert np.isfinite(metrics["loss"]) and len(metrics["perplexity"]) == 4
  assert "eval_loss" in metrics
  records = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in records if "train/loss" in r] == list(range(1, STEPS + 1))
  assert any("eval/loss" in r for r in records)
  assert os.listdir(os.path.join(wd, "tensorboard"))
  assert sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints"))) == [2, 4, 6]
  # The work directory and the best-by-eval export are model directories.
  for d in (wd, os.path.join(wd, "best")):
    config, params = checkpoint.load_model(d)
    assert config.model.dim == 32 and "lm" in params


def test_sigterm_saves_and_resume_is_bit_identical(reference, tmp_path):
  wd = str(tmp_path / "run")

  def out(line):
    if line.startswith("step 3: loss"):
      os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(loop.Stopped, match="stopped by SIGTERM at step 3: checkpoint saved") as e:
    loop.train(tiny(), wd, out=out)
  assert e.value.exit_code == 128 + signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handlers restored
  loop.train(tiny(), wd, out=lambda _: None)
  assert_same_tree(final_state(wd), final_state(reference[0]))


def test_stop_at_ends_early_on_the_same_path(reference, tmp_path):
  """stop_at cuts a run short without changing its schedule: the checkpoint at the stop is the
  uninterrupted run's at that step, and a resume without stop_at ends where that run ends."""
  wd = str(tmp_path / "run")
  metrics = loop.train(tiny(stop_at=3), wd, out=lambda _: None)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "3"]
  assert "eval_loss" in metrics   # the last step is evaluated, as at num_steps
  loop.train(tiny(), wd, out=lambda _: None)
  assert_same_tree(final_state(wd), final_state(reference[0]))


def test_the_host_waits_for_the_step_max_steps_ahead_back(tmp_path, monkeypatch):
  """Each step does ~0.1 s of extra device work and nothing else syncs (one log, one checkpoint, no
  eval), so asynchronous dispatch would queue every step at once; with max_steps_ahead=2 at most 2
  dispatched steps are unfinished whenever the next one is dispatched, so a stop signal is acted on
  within 2 steps rather than after a whole queued log interval."""

  class SlowTask(LMTask):
    def train_step(self, state, batch):
      new, m = super().train_step(state, batch)
      x = jnp.full((256, 256), state.step.astype(jnp.float32) * 1e-3)
      x = jax.lax.fori_loop(0, 100, lambda _, x: jnp.tanh(x @ x), x)
      return new, {**m, "loss": m["loss"] + 0.0 * x[0, 0]}

  done, unfinished = [], []
  build = loop.steps_lib.build_train_step

  def build_watched(*args, **kwargs):
    ts = build(*args, **kwargs)

    def fn(*step_args):
      unfinished.append(sum(not d.is_ready() for d in done))
      out = ts.fn(*step_args)
      done.append(out[2])
      return out
    return dataclasses.replace(ts, fn=fn)
  monkeypatch.setattr(loop.steps_lib, "build_train_step", build_watched)
  loop.train(tiny(log_every=STEPS, eval_every=0, checkpoint_every=STEPS, max_steps_ahead=2),
             str(tmp_path), task_factory=SlowTask)
  assert len(unfinished) == STEPS and max(unfinished) <= 2, unfinished


def test_damaged_and_partial_checkpoints_are_skipped(reference, tmp_path):
  """A checkpoint with overwritten bytes is moved aside, an unfinished save is ignored, the run resumes
  from the newest good step and ends exactly where the uninterrupted run ends."""
  wd = str(tmp_path / "run")
  shutil.copytree(reference[0], wd)
  ckpts = os.path.join(wd, "checkpoints")
  shutil.rmtree(os.path.join(ckpts, "6"))                      # as if killed before step 6 was saved
  victim = max((os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ckpts, "4", "state"))
                for f in fs), key=os.path.getsize)
  with open(victim, "r+b") as f:                               # overwrite bytes of step 4
    f.seek(os.path.getsize(victim) // 2)
    f.write(b"\xff" * 64)
  shutil.copytree(os.path.join(ckpts, "2"), os.path.join(ckpts, "5.orbax-checkpoint-tmp-1234"))
  lines = []
  loop.train(tiny(), wd, out=lines.append)
  assert any(l.startswith("resumed from step 2") for l in lines), lines
  assert len(os.listdir(os.path.join(wd, "damaged"))) == 1
  assert_same_tree(final_state(wd), final_state(reference[0]))


def test_second_run_is_refused_with_the_holder(tmp_path):
  wd = str(tmp_path)
  with workdir_lib.WorkdirLock(wd):
    with pytest.raises(workdir_lib.WorkdirError, match=rf"in use by another training run \(pid "
                       rf"{os.getpid()} on host"):
      loop.train(tiny(), wd)


def test_other_config_is_refused_and_nothing_is_rewritten(reference):
  wd = reference[0]
  before = open(os.path.join(wd, checkpoint.CONFIG_FILE)).read()
  c = tiny()
  c.model.dim = 64
  c.pattern.name = "parallel"
  with pytest.raises(workdir_lib.WorkdirError, match=r"model\.dim: 32 -> 64.*pattern\.name"):
    loop.train(c, wd)
  assert open(os.path.join(wd, checkpoint.CONFIG_FILE)).read() == before


class _NanAfter3(LMTask):
  """A task whose loss turns NaN from the 4th step on (as a diverging run would)."""

  def train_step(self, state, batch):
    new, m = super().train_step(state, batch)
    m["loss"] = jnp.where(state.step >= 3, jnp.nan, m["loss"])
    return new, m


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  wd = str(tmp_path)
  with pytest.raises(loop.NonFiniteLoss, match="non-finite at step 4; the last good checkpoint is "
                     "step 2"):
    loop.train(tiny(), wd, task_factory=_NanAfter3, out=lambda _: None)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]


def test_fine_tuning_starts_from_a_model_directory_with_frozen_embeddings(tmp_path):
  from musicgen_jax.pipeline import MusicGen
  src = MusicGen.random(get_config("tiny"), seed=3)
  src.save(str(tmp_path / "model"))
  c = tiny(num_steps=2, eval_every=0, freeze=("lm/embed_tokens",))
  c.init_from = str(tmp_path / "model")
  loop.train(c, str(tmp_path / "run"), out=lambda _: None)
  params = final_state(str(tmp_path / "run"), 2)["params"]
  np.testing.assert_array_equal(params["lm"]["embed_tokens"], src.params["lm"]["embed_tokens"])
  moved = np.abs(params["lm"]["lm_heads"] - src.params["lm"]["lm_heads"]).max()
  assert moved > 0
  # The starting point really was the model directory: one update of lr <= 3e-3 moves little.
  assert moved < 0.05


def test_unreadable_init_from_closes_the_checkpoint_store(tmp_path, monkeypatch):
  """A damaged init_from stops the run with its one-line error; the checkpoint store (Orbax's
  background threads) is closed first, so no thread traceback follows at interpreter exit."""
  from musicgen_jax.pipeline import MusicGen
  from musicgen_jax.training.checkpoints import CheckpointStore
  MusicGen.random(get_config("tiny"), seed=3).save(str(tmp_path / "model"))
  os.remove(tmp_path / "model" / "integrity.json")
  with open(tmp_path / "model" / checkpoint.PARAMS_FILE, "r+b") as f:
    f.truncate(1000)
  closed, close = [], CheckpointStore.close
  monkeypatch.setattr(CheckpointStore, "close", lambda self: (closed.append(self), close(self)))
  c = tiny(num_steps=2, eval_every=0)
  c.init_from = str(tmp_path / "model")
  with pytest.raises(checkpoint.CheckpointError, match="cannot read the weights"):
    loop.train(c, str(tmp_path / "run"), out=lambda _: None)
  assert [store.root for store in closed] == [str(tmp_path / "run" / "checkpoints")]
  # Orbax's clean-up thread (started with the manager) was waited for; its close() alone does not.
  assert getattr(closed[0].manager, "_cleanup_tmp_directory_future", None) is None


def test_init_fresh_text_starts_a_new_text_encoder_beside_the_models_lm(tmp_path):
  """init_fresh='text': the LM comes from init_from, the text encoder is new and built from this
  config's text settings (here 2 layers where the model directory's has 1)."""
  from musicgen_jax.pipeline import MusicGen
  src = MusicGen.random(get_config("tiny"), seed=3)
  src.save(str(tmp_path / "model"))
  c = tiny(num_steps=1, eval_every=0, learning_rate=1e-5, warmup_steps=1)
  c.init_from, c.init_fresh = str(tmp_path / "model"), "text"
  c.text.num_layers = 2
  loop.train(c, str(tmp_path / "run"), out=lambda _: None)
  params = final_state(str(tmp_path / "run"), 1)["params"]
  leaves = zip(jax.tree.leaves(params["lm"]), jax.tree.leaves(src.params["lm"]))
  assert max(float(np.abs(np.asarray(a) - b).max()) for a, b in leaves) < 1e-3
  assert checkpoint.read_config(str(tmp_path / "run")).text.num_layers == 2
  assert len(jax.tree.leaves(params["text"])) > len(jax.tree.leaves(src.params["text"]))
  # Without init_fresh the text encoder is the model directory's, and its architecture with it.
  c.init_fresh, c.text.num_layers = "", 2
  loop.train(c, str(tmp_path / "run2"), out=lambda _: None)
  params = final_state(str(tmp_path / "run2"), 1)["params"]
  assert checkpoint.read_config(str(tmp_path / "run2")).text.num_layers == 1
  leaves = zip(jax.tree.leaves(params["text"]), jax.tree.leaves(src.params["text"]))
  assert max(float(np.abs(np.asarray(a) - b).max()) for a, b in leaves) < 1e-3


def test_init_fresh_cross_adds_text_cross_attention_to_a_prefix_models_lm(tmp_path):
  """init_fresh='cross': a model that read its text as a prefix gets new cross-attention layers;
  every other weight (the LM's self-attention, FFN, embeddings, heads; the text encoder) is kept."""
  from musicgen_jax.pipeline import MusicGen
  src_config = get_config("tiny")
  src_config.model.text_conditioning = "prefix"
  src = MusicGen.random(src_config, seed=3)
  src.save(str(tmp_path / "model"))
  c = tiny(num_steps=1, eval_every=0, learning_rate=1e-5, warmup_steps=1)
  c.init_from, c.init_fresh = str(tmp_path / "model"), "cross"
  c.model.text_conditioning = "cross"
  loop.train(c, str(tmp_path / "run"), out=lambda _: None)
  assert checkpoint.read_config(str(tmp_path / "run")).model.text_conditioning == "cross"
  params = final_state(str(tmp_path / "run"), 1)["params"]
  flat = {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  before = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(src.params)[0]}
  new = sorted(set(flat) - set(before))
  assert new and all("encoder_attn" in name for name in new), new
  assert set(before) <= set(flat)
  assert max(float(np.abs(flat[n] - before[n]).max()) for n in before) < 1e-3
  # The new layers are a fresh initialisation, not zeros: the LM reads the text from step 0.
  kernels = [flat[n] for n in new if n.endswith("['kernel']")]
  assert len(kernels) == 4 and all(float(np.abs(x).max()) > 0 for x in kernels)


def _batch(config, examples: range) -> dict:
  frames = int(round(config.train.segment_seconds * config.codec.frame_rate))
  texts, codes = zip(*(synthetic.example(0, i, 4, config.model.card, frames) for i in examples))
  task = LMTask(config, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  toks = task.text.tokenize(list(texts))
  n = len(texts)
  return {"codes": np.stack(codes), "frame_mask": np.ones((n, frames), bool),
          "weight": np.ones((n,), np.float32), **toks}


def _init_state(task: LMTask):
  """The task's initial train state (seed 0), unboxed, on the default device."""
  return jax.jit(lambda r: nn.unbox(task.init_state(r)))(jax.random.key(0))


def test_gradient_accumulation_equals_one_big_batch():
  """4 micro-batches of 2 with grad_accum 4 give the params of batches of 8 (two updates each)."""
  big = tiny(batch_size=8, cond_dropout=0.0, warmup_steps=1, num_steps=2)
  small = tiny(batch_size=2, cond_dropout=0.0, warmup_steps=4, num_steps=8, grad_accum=4)
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  results = []
  for config, batches in ((big, [range(0, 8), range(8, 16)]),
                          (small, [range(i, i + 2) for i in range(0, 16, 2)])):
    task = LMTask(config, mesh)
    state = _init_state(task)
    step = jax.jit(task.train_step)
    for r in batches:
      state, _ = step(state, _batch(config, r))
    results.append(state.params)
  leaves = zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]))
  err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in leaves)
  assert err < 2e-6, err


def _melody_task(**train):
  config = get_config("tiny_melody")
  config.train.update(dict(progress=False, cond_dropout=0.0), **train)
  return LMTask(config, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])), config


@pytest.mark.parametrize("cond_dropout", [0.0, 0.5])
def test_melody_dropout_drops_the_melody_alone_per_example(cond_dropout):
  """train.melody_dropout (audiocraft's attribute dropout of the melody) gives each example either
  its own melody or the null one of sampling, while its text stays; independently of the dropout of
  every condition (cond_dropout), whose examples stay as they were. Not at evaluation."""
  n = 64
  tasks = {p: _melody_task(cond_dropout=cond_dropout, melody_dropout=p) for p in (0.0, 0.5, 1.0)}
  task, config = tasks[0.0]
  batch = _batch(config, range(n))
  chroma = np.random.default_rng(0).random((n, config.model.chroma_length, 12), np.float32)
  batch["chroma"] = chroma
  params = _init_state(task).params
  null = melody_lib.null_chroma(n, config.model.chroma_length)
  out = {p: t._conditions(params, batch, jax.random.key(3), train=True) for p, (t, _) in tasks.items()}
  base = out[0.0]
  text_kept = np.asarray(base.text_mask).any(axis=1)
  assert text_kept.mean() == (1.0 if cond_dropout == 0 else pytest.approx(0.5, abs=0.15))
  np.testing.assert_array_equal(np.asarray(base.melody)[text_kept], chroma[text_kept])
  np.testing.assert_array_equal(np.asarray(base.melody)[~text_kept], null[~text_kept])
  for p, conds in out.items():
    # The text and its dropout do not depend on melody_dropout.
    np.testing.assert_array_equal(np.asarray(conds.text), np.asarray(base.text))
    np.testing.assert_array_equal(np.asarray(conds.text_mask), np.asarray(base.text_mask))
    got = np.asarray(conds.melody)
    own = (got == chroma).all(axis=(1, 2))
    nulled = (got == null).all(axis=(1, 2))
    assert (own ^ nulled).all()                 # per example: all of its melody or none
    assert nulled[~text_kept].all()
    share = nulled[text_kept].mean()
    assert share == ({0.0: 0.0, 1.0: 1.0}.get(p) if p != 0.5 else pytest.approx(0.5, abs=0.2))
  # Evaluation keeps every melody.
  ev = tasks[1.0][0]._conditions(params, batch, jax.random.key(3), train=False)
  np.testing.assert_array_equal(np.asarray(ev.melody), chroma)


def test_melody_dropout_reaches_the_loss_as_the_null_melody():
  """With every melody dropped, the training loss is the loss of the batch with the null melody and
  its text (an independent reference: the evaluation pass on a batch holding null_chroma)."""
  task, config = _melody_task(melody_dropout=1.0)
  batch = _batch(config, range(4))
  batch["chroma"] = np.random.default_rng(1).random((4, config.model.chroma_length, 12), np.float32)
  params = _init_state(task).params
  rng = jax.random.key(5)
  dropped = task.token_losses(params, batch, rng, train=True)
  nulled = dict(batch, chroma=melody_lib.null_chroma(4, config.model.chroma_length))
  ref = task.token_losses(params, nulled, rng, train=False)
  kept = task.token_losses(params, batch, rng, train=False)
  # Exactly: the same operations on the same inputs (a random LM reads the melody only faintly).
  np.testing.assert_array_equal(np.asarray(dropped[0]), np.asarray(ref[0]))
  assert not np.array_equal(np.asarray(kept[0]), np.asarray(ref[0]))


_SHARDED = r"""
import json, os, sys, tempfile
import jax, numpy as np
from flax import linen as nn
import grain.python as grain
sys.path.insert(0, os.getcwd())
from tests.test_training import tiny, _batch
from musicgen_jax import sharding as shd
from musicgen_jax.training.lm_task import LMTask
from musicgen_jax.training.checkpoints import CheckpointStore

config = tiny(batch_size=8, cond_dropout=0.0)
batch = _batch(config, range(8))
out = {}
ref = None
states = {}
for shape in [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]:
  devices = jax.devices()[:int(np.prod(shape))]
  mesh = shd.make_mesh(shape, devices=devices)
  rules = shd.rules_from_config(config.logical_axis_rules)
  task = LMTask(config, mesh)
  abstract = jax.eval_shape(task.init_state, jax.random.key(0))
  sh = shd.logical_sharding(abstract, mesh, rules)
  bsh = task.batch_shardings(batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda r: nn.unbox(task.init_state(r)), out_shardings=sh)(jax.random.key(0))
    step = jax.jit(task.train_step, in_shardings=(sh, bsh), out_shardings=(sh, None))
    b = jax.device_put(batch, bsh)
    for _ in range(2):
      state, m = step(state, b)
  params = jax.device_get(state.params)
  if ref is None:
    ref = (float(m["loss"]), params)
  err = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref[1])))
  out[str(shape)] = {"loss": float(m["loss"]), "param_err": err,
                     "fc1": str(state.params["lm"]["layers"]["fc1"]["kernel"].sharding.spec)}
  states[shape] = (state, sh, mesh)

# A checkpoint saved on the (2, 2, 2) mesh restores onto (1, 4, 2).
with tempfile.TemporaryDirectory() as d:
  state, _, _ = states[(2, 2, 2)]
  store = CheckpointStore(d, keep=1, async_save=True)
  store.save(1, state, iter(grain.MapDataset.range(4)))
  store.wait()
  target, sh, mesh = states[(1, 4, 2)]
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, sh)
  restored, step = CheckpointStore(d, keep=1).restore_latest(abstract, iter(grain.MapDataset.range(4)))
  same = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
  out["restore"] = {"same": same, "step": step,
                    "spec": str(restored.params["lm"]["layers"]["fc1"]["kernel"].sharding.spec),
                    "mesh": dict(restored.params["lm"]["layers"]["fc1"]["kernel"].sharding.mesh.shape)}
print("RESULT " + json.dumps(out))
"""


def test_sharded_training_matches_one_device_and_restores_across_meshes():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  ref = res["(1, 1, 1)"]["loss"]
  for shape in ("(8, 1, 1)", "(2, 2, 2)", "(1, 4, 2)"):
    assert abs(res[shape]["loss"] - ref) < 1e-5, res
    assert res[shape]["param_err"] < 1e-5, res
  fc1_spec = str(PartitionSpec(None, "fsdp", "tensor"))   # [L, D, ffn]: embed on fsdp, mlp on tensor
  assert res["(2, 2, 2)"]["fc1"] == fc1_spec
  assert res["restore"] == {"same": True, "step": 1, "spec": fc1_spec,
                            "mesh": {"data": 1, "fsdp": 4, "tensor": 2}}, res


@pytest.mark.parametrize("change, match", [
    (dict(mesh=(3, -1, 1)), r"mesh shape \[3, -1, 1\] does not divide 1 devices"),
    (dict(mesh=(2, 1, 1)), r"mesh shape \[2, 1, 1\] needs 2 devices, but 1 are available"),
    (dict(batch_size=0), r"train.batch_size must be an integer >= 1"),
    (dict(ema_decay=1.5), r"train.ema_decay must be in \[0, 1\)"),
    (dict(melody_dropout=1.5), r"train.melody_dropout must be in \[0, 1\], got 1.5"),
    (dict(freeze=("lm/(",)), r"train.freeze pattern 'lm/\(' is not a regular expression"),
    (dict(freeze=("lm/embed_tokens", "nope/x")), r"train.freeze pattern 'nope/x' matches no "
     r"parameter; names look like lm/embed_tokens, "),
    (dict(stop_at=7), r"train.stop_at must be an integer in \[0, train.num_steps=6\]"),
    (dict(init_fresh="text"), r"init_fresh needs init_from"),
    (dict(init_fresh="lm", init_from="models/demo"), r"init_fresh names 'lm': the parts that can "
     r"start anew are text, cross"),
    (dict(init_fresh="cross", init_from="models/demo", model=dict(text_conditioning="prefix")),
     r"init_fresh=cross starts text "
     r"cross-attention layers: set model.text_conditioning=cross"),
])
def test_bad_settings_fail_before_anything_is_written(change, match, tmp_path):
  mesh = change.pop("mesh", None)
  top = {k: change.pop(k) for k in ("init_fresh", "init_from") if k in change}
  model = change.pop("model", {})
  c = tiny(**change)
  c.update(top)
  c.model.update(model)
  if mesh:
    c.mesh.shape = mesh
  with pytest.raises(ValueError, match=match):
    loop.train(c, str(tmp_path / "run"), out=lambda _: None)
  assert not os.path.exists(tmp_path / "run" / checkpoint.CONFIG_FILE)


@pytest.mark.parametrize("tokenizer", ["", "words"])
def test_freeze_typo_is_refused_before_the_data_is_prepared(tokenizer, monkeypatch, tmp_path):
  """Preparing a manifest's data can take hours; a freeze pattern that names nothing is refused
  before it starts, also when the text encoder's vocabulary is fitted on that data."""
  c = tiny(freeze=("lm/embed_tokens", "text/token_embedding", "nope/x"))
  c.text.tokenizer = tokenizer

  def prepare(self, workdir):
    raise AssertionError("prepare_data ran before the freeze check")
  monkeypatch.setattr(LMTask, "prepare_data", prepare)
  with pytest.raises(ValueError, match=r"train.freeze pattern 'nope/x' matches no parameter"):
    loop.train(c, str(tmp_path / "run"), out=lambda _: None)
  assert not (tmp_path / "run").exists()       # the refused start left no directory behind
  (tmp_path / "mine").mkdir()                  # ... but never removes one it did not create
  with pytest.raises(ValueError, match=r"matches no parameter"):
    loop.train(c, str(tmp_path / "mine"), out=lambda _: None)
  assert (tmp_path / "mine").is_dir()
  c.train.freeze = ("lm/embed_tokens", "text/token_embedding")   # real names (the text's too): data comes next
  with pytest.raises(AssertionError, match="prepare_data ran"):
    loop.train(c, str(tmp_path / "run"), out=lambda _: None)


def test_freeze_patterns_see_value_dict_keys():
  """A parameter dict key named 'value' (the text encoder's attention) is part of the name that
  train.freeze matches; only the `value` field of a flax box is left out."""
  tree = {"attn": {"value": {"kernel": nn.LogicallyPartitioned(np.zeros((2, 2)), ("a", "b"))}}}
  trainable = optim.trainable_fn((), ("attn/value/",))
  assert optim.path_name(jax.tree_util.tree_flatten_with_path(tree)[0][0][0]) == "attn/value/kernel"
  assert jax.tree.leaves(optim.labels(tree, trainable)) == ["frozen"]
  optim.check_freeze(("attn/value/",), tree)   # the parameter exists: no error


def _train_py(*args):
  return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("fresh, allowed, refused", [
    ("", None, "--config.model.dim=64"),
    ("text", "--config.text.num_layers=0", "--config.model.dim=64"),
    ("cross", "--config.model.text_conditioning=cross", "--config.model.text_dim=64"),
])
def test_init_from_refuses_architecture_overrides(fresh, allowed, refused, tmp_path):
  init = ["--config.init_from", str(tmp_path), f"--config.init_fresh={fresh}"]
  r = _train_py("--workdir", str(tmp_path / "run"), *init, refused)
  assert r.returncode == 2
  flag = refused.split("=")[0]
  assert r.stderr.strip().splitlines()[-1].startswith(
      f"error: {flag} cannot be combined with --config.init_from"), r.stderr
  if allowed:
    # The settings of the parts that init_fresh starts anew may change: the run gets past this
    # check (and stops at the empty init_from directory instead).
    r = _train_py("--workdir", str(tmp_path / "run"), *init, allowed)
    assert r.returncode == 2 and "cannot be combined" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("train.py: error: "), r.stderr
