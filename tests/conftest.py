"""Shared fixtures: two tiny MusicGen LMs (text cross-attention, melody prefix) with random weights.

Parameters come from `jax.eval_shape(init_params)` filled with seeded numpy noise (no init compile, and
non-trivial biases / LayerNorm affines, unlike the default init). Session scope, so test files run
together share them and the jitted full forward of each model.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import shutil
import tempfile
from typing import Any, Callable

# librosa's numba functions are compiled with cache=True into its own __pycache__: in a fresh
# virtualenv the two xdist workers compiled and wrote the same cache files at once, and one worker
# then segfaulted in librosa.beat.beat_track (a numba gufunc) and the run hung. Each worker gets its
# own numba cache for the session (set before anything imports numba).
if os.environ.get("PYTEST_XDIST_WORKER"):
  _numba_cache = tempfile.mkdtemp(prefix=f"musicgen_jax_tests_numba_{os.environ['PYTEST_XDIST_WORKER']}_")
  atexit.register(shutil.rmtree, _numba_cache, ignore_errors=True)
  os.environ["NUMBA_CACHE_DIR"] = _numba_cache

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np
import pytest
from flax import linen as nn

from musicgen_jax import lm as lm_lib

# One persistent compilation cache for the session and the processes the tests start (JAX reads
# JAX_COMPILATION_CACHE_DIR): many tests train the same tiny config, and each run builds new jitted
# closures, so without it every run compiles the same programs again. A fresh directory per session:
# nothing carries over between sessions.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _cache = tempfile.mkdtemp(prefix="musicgen_jax_tests_xla_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  jax.config.update("jax_compilation_cache_dir", _cache)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def sample(monkeypatch, capsys):
  """run(*args) -> (exit code, stdout, stderr) of sample.py in this process (cli.run_main)."""
  monkeypatch.chdir(ROOT)
  import sample as sample_py
  from musicgen_jax import cli

  def run(*args, shipped: bool = False):
    # --noprogress: one compiled program per shape, shared by the tests (--progress turns it back on).
    # Without --checkpoint or --config, sample.py uses the shipped model; tests get the random tiny
    # model there unless they ask for the shipped one.
    explicit = any(a.startswith(("--checkpoint", "--config")) for a in args)
    default = [] if shipped or explicit else ["--config=configs/musicgen.py:tiny"]
    rc = cli.run_main(sample_py.main, ["sample.py", "--compile-cache=", "--noprogress", *default,
                                       *args])
    out, err = capsys.readouterr()
    return rc, out, err
  return run


class ProgramCount:
  """Counts the programs JAX lowers inside `with ProgramCount() as c:` (c.programs), an eager op or a
  jitted function's first call alike: each one is a compilation, or a persistent-cache read."""

  def __enter__(self):
    self.programs = 0
    jax.monitoring.register_event_duration_secs_listener(self._on)
    return self

  def _on(self, event: str, duration: float, **_) -> None:
    self.programs += event == "/jax/core/compile/jaxpr_to_mlir_module_duration"

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._on)


BATCH = 2
TEXT_LEN = 4
CHROMA_LEN = 5
# Row 0 has two padded text positions, row 1 none.
TEXT_MASK = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.int32)

TEXT_CFG = lm_lib.LMConfig(num_codebooks=4, card=16, dim=32, num_layers=2, num_heads=4, ffn_dim=64,
                           text_dim=24)
MELODY_CFG = dataclasses.replace(TEXT_CFG, text_conditioning="prefix", melody=True)


@dataclasses.dataclass(frozen=True)
class TinyLM:
  cfg: lm_lib.LMConfig
  params: Any                  # unboxed {'params': ...}, float32
  conds: lm_lib.Conditions     # batch BATCH, padded text mask
  forward: Callable            # jitted MusicGenLM(cfg).apply(params, tokens [B, K, S], conds)

  @property
  def model(self) -> lm_lib.MusicGenLM:
    return lm_lib.MusicGenLM(self.cfg)


def abstract_params(cfg: lm_lib.LMConfig) -> Any:
  """The boxed (logically partitioned) parameter tree of `cfg` as ShapeDtypeStructs."""
  return jax.eval_shape(functools.partial(lm_lib.init_params, cfg), jax.random.key(0))


def random_params(cfg: lm_lib.LMConfig, seed: int, std: float = 0.25) -> Any:
  """Random float32 parameters with the structure of init_params(cfg): N(0, std) everywhere, LayerNorm
  scales 1 + N(0, 0.1) and LayerNorm biases N(0, 0.1)."""
  shapes = nn.unbox(abstract_params(cfg))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    names = [str(getattr(p, "key", p)) for p in path]
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if any("layer_norm" in n for n in names):
      noise = (1.0 if names[-1] == "scale" else 0.0) + 0.1 * noise
    else:
      noise = std * noise
    assert leaf.dtype == jnp.float32, (names, leaf.dtype)
    out.append(jnp.asarray(noise, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


def random_conditions(cfg: lm_lib.LMConfig, seed: int, batch: int = BATCH) -> lm_lib.Conditions:
  rng = np.random.default_rng(seed)
  text = jnp.asarray(rng.normal(size=(batch, TEXT_LEN, cfg.text_dim)), jnp.float32)
  mask = jnp.asarray(np.resize(TEXT_MASK, (batch, TEXT_LEN)))
  melody = None
  if cfg.melody:
    melody = jnp.asarray(rng.normal(size=(batch, CHROMA_LEN, cfg.num_chroma)), jnp.float32)
  return lm_lib.Conditions(text=text, text_mask=mask, melody=melody)


def _tiny(cfg: lm_lib.LMConfig, seed: int) -> TinyLM:
  return TinyLM(cfg, random_params(cfg, seed), random_conditions(cfg, seed + 100),
                jax.jit(lm_lib.MusicGenLM(cfg).apply))


@pytest.fixture(scope="session")
def text_lm() -> TinyLM:
  return _tiny(TEXT_CFG, 0)


@pytest.fixture(scope="session")
def melody_lm() -> TinyLM:
  return _tiny(MELODY_CFG, 1)


# Kept out of CI's 15 minutes (run them with `-m slow`; the suite took 14:38 on 2 cores with them):
# fine-tuning the converted melody model (17 s) repeats the plain one's path with a chroma input that
# the melody sampling and conversion tests cover; remat's equality of loss and gradients (19 s) is a
# memory option's check; the random-weight model's Fréchet distance (15 s) is also measured by
# `python -m musicgen_jax.eval --random-baseline` on the shipped model (models/demo/TRAINING.md).
_SLOW_VARIANTS = (
    "test_convert.py::test_fine_tune_a_converted_model_on_audio_files[melody]",
    "test_lm.py::test_remat_gives_same_loss_and_gradients",
    "test_evaluation.py::test_frechet_distance_of_real_audio_is_far_below_a_random_models_samples",
)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.nodeid.endswith(_SLOW_VARIANTS):
      item.add_marker(pytest.mark.slow)
