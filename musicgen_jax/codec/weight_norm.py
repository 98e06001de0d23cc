"""Weight normalisation (Salimans & Kingma) as a reparametrisation of a parameter tree.

A kernel w is trained as a direction v and a magnitude g: w = g * v / ||v||, the norm taken over
every axis except one (torch's `weight_norm(dim=0)`: the output channel of a convolution, the
*input* channel of a transposed one, whose torch weight is [C_in, C_out, K]). g keeps the kernel's
rank with size 1 on the normalised axes, so `fold` needs no other information.

Inference never sees g and v: the codec's parameter tree (what the Hugging Face importer writes and
a codec directory holds) has plain kernels. Training splits that tree once (`split_tree`, g = ||w||,
so the folded kernel is unchanged), trains {'kernel_g', 'kernel_v'} in place of each 'kernel', and
folds back (`fold_tree`) inside the step and for export.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

G, V = 'kernel_g', 'kernel_v'


def magnitude(w: jax.Array, keep_axis: int) -> jax.Array:
  """||w|| over every axis but `keep_axis`, with those axes kept as size 1 (g of a fresh split)."""
  keep_axis %= w.ndim
  axes = tuple(i for i in range(w.ndim) if i != keep_axis)
  return jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))


def fold(g: jax.Array, v: jax.Array) -> jax.Array:
  """g * v / ||v||, the norm over the axes where g has size 1 (g and v of the same rank)."""
  if g.ndim != v.ndim:
    raise ValueError(f'weight norm: g {g.shape} and v {v.shape} must have the same rank')
  axes = tuple(i for i, n in enumerate(g.shape) if n == 1)
  return g * v / jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def split_tree(params: Any, keep_axis: Callable[[tuple[str, ...]], int | None]) -> Any:
  """Replaces each 'kernel' leaf for which keep_axis(path) is an int by {kernel_g, kernel_v}.

  params: nested dicts of arrays; path: the dict keys leading to the module holding 'kernel'.
  """
  def walk(node, path):
    if not isinstance(node, dict):
      return node
    out = {}
    for k, v in node.items():
      axis = keep_axis(path) if k == 'kernel' and not isinstance(v, dict) else None
      if axis is None:
        out[k] = walk(v, path + (k,))
      else:
        out[G], out[V] = magnitude(v, axis), v
    return out
  return walk(params, ())


def fold_tree(params: Any) -> Any:
  """Inverse of split_tree: every {kernel_g, kernel_v} pair becomes 'kernel' = fold(g, v)."""
  if not isinstance(params, dict):
    return params
  out = {k: fold_tree(v) for k, v in params.items() if k not in (G, V)}
  if V in params:
    out['kernel'] = fold(params[G], params[V])
  return out
