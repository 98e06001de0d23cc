"""Logical axis names, the rules that map them onto mesh axes, and mesh helpers.

Model code names axes only by the logical names below; the config's `logical_axis_rules`
table maps them onto the mesh axes ('data', 'fsdp', 'tensor'). Nothing else mentions a mesh axis.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical axis names.
BATCH = "batch"
LENGTH = "length"        # time / sequence steps of activations
KV_LENGTH = "kv_length"  # keys and values (cache, conditioning)
EMBED = "embed"          # model width
HEADS = "heads"
HEAD_DIM = "kv"
MLP = "mlp"
VOCAB = "vocab"          # codebook cardinality (+1 for the special token)
CODEBOOKS = "codebooks"
LAYERS = "layers"        # the scanned layer axis
COND_EMBED = "cond_embed"  # width of a conditioning encoder

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: batch over data x fsdp, weights fully sharded over fsdp, heads / mlp / vocab over tensor.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (KV_LENGTH, None),
    (EMBED, "fsdp"),
    (COND_EMBED, None),
    (HEADS, "tensor"),
    (HEAD_DIM, None),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (CODEBOOKS, None),
    (LAYERS, None),
)


def make_mesh(shape: Sequence[int] | None = None, axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default all). `shape` may contain one -1, filled from the device count;
  the default puts every device on the first axis."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = [n] + [1] * (len(axes) - 1) if shape is None else list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {shape} does not match mesh axes {tuple(axes)}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape} has more than one -1")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if known == 0 or n % known:
      raise ValueError(f"mesh shape {shape} does not divide {n} devices")
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {n}")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def rules_from_config(rules) -> tuple[tuple[str, object], ...]:
  """Normalises a rules table from a config (lists of [name, mesh axes]) to tuples."""
  out = []
  for name, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((name, target))
  return tuple(out)


def logical_sharding(tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a pytree of logically partitioned values (e.g. from jax.eval_shape(init))."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Sharding of an array whose leading axis is the batch and the rest replicated."""
  spec = nn.logical_to_mesh_axes((BATCH,) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
