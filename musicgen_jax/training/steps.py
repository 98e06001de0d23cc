"""The compiled train step of a task, built once: shardings, on-device metric sums, donation.

`build_train_step(task, mesh, rules, batch_size)` returns what the loop runs and what ahead-of-time
compilation (musicgen_jax/aot.py) lowers for a TPU topology it does not have: one function, so the
program whose memory and FLOPs `aot` reports is the program `train` runs.

    step(state, acc, batch) -> (state, acc, done)
      state: the task's train state (donated), sharded by its leaves' logical axis names
      acc:   {'sum': metric sums, 'n': int32 [] steps summed, 'first_bad': int32 [] first step whose
             loss was not finite (NO_BAD_STEP if none)}, replicated (donated)
      batch: one global batch, the batch axis over the mesh's data axes
      done:  int32 [], ready when the step has finished: the one output that is not donated to the
             next step, so the loop can wait for an earlier step while later ones are queued

Metrics never leave the devices inside the step; the loop fetches `acc` at log intervals.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from musicgen_jax import sharding as shd
from musicgen_jax.training import optim

NO_BAD_STEP = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class TrainStep:
  fn: Callable            # jitted (state, acc, batch) -> (state, acc, done); state, acc donated
  state_shardings: Any    # NamedShardings of the (unboxed) state tree
  acc_sharding: Any
  batch_shardings: dict
  abstract_state: Any     # ShapeDtypeStructs of the unboxed state, with their shardings
  abstract_batch: dict    # ShapeDtypeStructs of one global batch, with their shardings
  metrics_abstract: Any   # shapes of the step's metrics
  mesh: Mesh
  rules: Any              # the logical axis rules the step is traced under

  def zero_acc(self) -> dict:
    """Fresh metric sums (host arrays; device_put them with `acc_sharding`)."""
    return {"sum": jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), self.metrics_abstract),
            "n": jnp.zeros((), jnp.int32), "first_bad": jnp.int32(NO_BAD_STEP)}

  def abstract_args(self) -> tuple:
    """(state, acc, batch) as ShapeDtypeStructs with shardings: what `fn.lower` takes."""
    acc = jax.eval_shape(self.zero_acc)
    acc = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.acc_sharding),
                       acc)
    return self.abstract_state, acc, self.abstract_batch

  def trace(self):
    """`fn` traced for the abstract arguments as the loop traces it (mesh and rules set); `.jaxpr`
    is the step's program."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn.trace(*self.abstract_args())

  def lower(self, traced=None):
    """`fn` lowered for the abstract arguments (or from `traced`): `.compile()` it for the mesh's
    devices, which need not be this host's."""
    traced = self.trace() if traced is None else traced
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return traced.lower()


def accumulate(train_step: Callable) -> Callable:
  """(state, batch) -> (state, metrics) becomes (state, acc, batch) -> (state, acc, done): metrics
  summed in float32 on the devices, the first step with a non-finite loss remembered, and `done` (the
  steps summed, a scalar) to wait on."""

  def step_fn(state, acc, batch):
    new_state, m = train_step(state, batch)
    finite = jnp.isfinite(m["loss"])
    acc = {"sum": jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc["sum"], m),
           "n": acc["n"] + 1,
           "first_bad": jnp.where(finite, acc["first_bad"], jnp.minimum(acc["first_bad"], state.step))}
    return new_state, acc, acc["n"]

  return step_fn


def build_train_step(task, mesh: Mesh, rules, batch_size: int) -> TrainStep:
  """The task's train step jitted for `mesh`: no device memory is touched (shapes only)."""
  abstract = jax.eval_shape(task.init_state, jax.random.key(0))
  optim.check_freeze(tuple(task.config.train.get("freeze") or ()), abstract.params)
  state_sh = shd.logical_sharding(abstract, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(abstract), state_sh)
  batch_sh = task.batch_shardings(task.batch_keys())
  batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
                    for k, v in task.batch_spec(batch_size).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    metrics_abstract = jax.eval_shape(lambda s, b: task.train_step(s, b)[1], abstract, batch_abstract)
  acc_sh = shd.replicated(mesh)
  fn = jax.jit(accumulate(task.train_step), in_shardings=(state_sh, acc_sh, batch_sh),
               out_shardings=(state_sh, acc_sh, acc_sh), donate_argnums=(0, 1))
  return TrainStep(fn, state_sh, acc_sh, batch_sh, abstract, batch_abstract, metrics_abstract,
                   mesh, rules)
