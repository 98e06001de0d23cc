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
# The sampler's per-layer KV caches [B, H, S, Dh] (lm_decode.py).
CACHE_BATCH = "cache_batch"
CACHE_HEADS = "cache_heads"
CACHE_SEQUENCE = "cache_sequence"
CACHE_KV = "cache_kv"

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
    (CACHE_BATCH, ("data", "fsdp")),
    (CACHE_HEADS, "tensor"),
    (CACHE_SEQUENCE, None),
    (CACHE_KV, None),
)


def _resolve_shape(shape: Sequence[int], n: int, what: str) -> list[int]:
  """Fills one -1 in `shape` so that its product is n; ValueError if impossible."""
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1:
    raise ValueError(f"{what} {shape} has more than one -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"{what} {shape} must hold positive sizes (and at most one -1)")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if n % known:
      raise ValueError(f"{what} {shape} does not divide {n} devices: use sizes whose product divides {n}")
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f"{what} {shape} needs {int(np.prod(shape))} devices, but {n} are available: "
                     "make the product of the sizes equal the device count (or use one -1)")
  return shape


def make_mesh(shape: Sequence[int] | None = None, axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None,
              dcn_shape: Sequence[int] | None = None) -> Mesh:
  """A mesh over `devices` (default all), laid out by the hardware topology.

  `shape` may contain one -1, filled from the device count; the default puts every device on the first
  axis. On TPU and GPU `mesh_utils.create_device_mesh` orders devices so that each mesh axis maps onto
  fast interconnect. With `dcn_shape` (multi-slice, or multi-host GPU), `shape` is the per-slice (ICI)
  mesh and `dcn_shape` the mesh across slices (data-center network); the mesh is their product, built
  by `mesh_utils.create_hybrid_device_mesh`: put only the data axis (or fsdp) across slices.
  """
  from jax.experimental import mesh_utils
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if shape is None:
    shape = [-1] + [1] * (len(axes) - 1)
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {tuple(shape)} does not match mesh axes {tuple(axes)}")
  if dcn_shape is not None:
    if len(dcn_shape) != len(axes):
      raise ValueError(f"mesh dcn_shape {tuple(dcn_shape)} does not match mesh axes {tuple(axes)}")
    slices = len({getattr(d, "slice_index", d.process_index) for d in devices})
    dcn = _resolve_shape(dcn_shape, slices, "mesh dcn_shape (over slices)")
    ici = _resolve_shape(shape, n // slices, "mesh shape (per slice)")
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                process_is_granule=not hasattr(devices[0], "slice_index"))
    return Mesh(grid, tuple(axes))
  shape = _resolve_shape(shape, n, "mesh shape")
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)   # no topology information (e.g. CPU): device order
  return Mesh(grid, tuple(axes))


def data_parallel_size(mesh: Mesh, rules) -> int:
  """How many ways the batch axis is split on `mesh` under `rules`."""
  spec = nn.logical_to_mesh_axes((BATCH,), rules)[0]
  names = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return int(np.prod([mesh.shape[a] for a in names])) if names else 1


def rules_from_config(rules) -> tuple[tuple[str, object], ...]:
  """Normalises a rules table from a config (lists of [name, mesh axes]) to tuples."""
  out = []
  for name, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((name, target))
  return tuple(out)


def logical_sharding(tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a pytree of logically partitioned values (e.g. from jax.eval_shape(init)).

  Leaves without names are replicated. Empty pytree nodes (optax's MaskedNode for frozen parameters,
  boxed or not) stay empty nodes, as `nn.unbox` leaves them: flax's logical_to_mesh_sharding would read
  an empty tuple as a spec."""
  from flax.core import meta

  def one(x):
    if isinstance(x, meta.AxisMetadata) and not jax.tree.leaves(x.value):
      return x.value      # a box around an empty node (a frozen leaf's optimizer state)
    if isinstance(x, meta.AxisMetadata):
      return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(x.get_partition_spec()), rules))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def logical_named_sharding(mesh: Mesh, rules, axes: Sequence[str | None]) -> NamedSharding:
  """The NamedSharding of an array whose axes have the logical names `axes` (None = replicated)."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Sharding of an array whose leading axis is the batch and the rest replicated."""
  spec = nn.logical_to_mesh_axes((BATCH,) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
