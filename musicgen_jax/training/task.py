"""What the generic loop (training/loop.py) needs from a trainable task (the LM, the codec).

A task is built as `Task(config, mesh, directory)` (`directory`: where a tokenizer or other model files
may already be, or None) and owns its train-state pytree, its data and its step functions. The loop owns
everything else: distributed start-up, the work directory, shardings, initialisation or restore,
compilation, checkpoints, preemption, metrics and evaluation passes.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

import jax


class Task(Protocol):
  name: str
  frames: int          # codec frames per example (frames/s in the logs)

  def init_state(self, rng: jax.Array, params: Any = None) -> Any:
    """A fresh train state (a flax struct with an int32 `step` leaf), its leaves boxed with logical
    axis names so that `jax.eval_shape(init_state)` gives every leaf's sharding. `params`: start from
    these (fine-tuning) instead of a random init."""

  def init_params(self, rng: jax.Array) -> Any:
    """Random parameters, boxed (the structure a fine-tuning start must match)."""

  def abstract_params(self) -> Any:
    """Shapes of the train state's parameters (what train.freeze names), known before
    `prepare_data`: the loop checks the freeze patterns against them at start-up."""

  def param_shardings(self) -> Any:
    """NamedShardings of `init_params`' tree on the task's mesh."""

  def batch_keys(self) -> tuple[str, ...]:
    """The entries of a batch."""

  def batch_shardings(self, keys) -> dict:
    """NamedShardings of those entries (the batch axis over the data axes)."""

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch (ahead-of-time compilation, benchmarks)."""

  def prepare_data(self, workdir: str) -> dict:
    """Builds or reuses the data this task reads; returns counts worth printing."""

  def make_iterator(self, split: str, workdir: str, *, shuffle: bool = True,
                    num_epochs: int | None = None) -> Iterator[dict]:
    """This process's share of each global batch, as numpy arrays; a grain iterator (its position is
    saved in checkpoints). Finite splits give every process the same number of batches."""

  def train_step(self, state: Any, batch: dict) -> tuple[Any, dict]:
    """(state, batch) -> (state, metrics): means over the global batch, `loss` among them."""

  def eval_step(self, state: Any, batch: dict) -> dict:
    """Sums over one held-out batch; the loop adds them up over the split."""

  def summarize_eval(self, sums: dict) -> dict:
    """Host-side metrics from the summed eval outputs; `loss` among them (lower is better)."""

  def write_model_files(self, workdir: str) -> None:
    """Files a model directory needs besides the config and the params (a tokenizer, a codec)."""

  def export_params(self, state: Any) -> Any:
    """The parameters a model directory holds (EMA when kept)."""

  def flops_per_step(self, batch_size: int) -> float:
    """Model FLOPs of one train step (MFU)."""
