"""The optimizer of a training run, built from `config.train`.

    grads -> [frozen leaves: zero, no optimizer state]
          -> [trainable leaves: clip by global norm -> AdamW (decoupled weight decay on matrices only)
              with a linear-warmup + cosine schedule]
    wrapped in optax.MultiSteps when `grad_accum` > 1: the update is applied every `grad_accum` micro-steps
    with the mean of their gradients, so k micro-batches of b equal one batch of k * b.

Which leaves train is decided by name: `frozen` (the frozen T5 encoder) and `config.train.freeze`
(regular expressions over '/'-joined parameter paths, e.g. 'lm/embed_tokens'). Frozen leaves get no Adam
moments, so freezing saves memory as well as compute.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import ml_collections
import optax


def path_name(path) -> str:
  """'lm/layers/fc1/kernel' for a jax tree path (boxes and dict keys alike)."""
  parts = []
  for p in path:
    if isinstance(p, jax.tree_util.GetAttrKey) and p.name == "value":
      continue   # the `value` field of a flax LogicallyPartitioned box (a dict key 'value' is kept)
    key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", None)))
    if key is None:
      continue
    parts.append(str(key))
  return "/".join(parts)


def schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to learning_rate, then cosine decay to 0 at the last optimizer update."""
  updates = max(1, t.num_steps // max(1, t.grad_accum))
  warmup = min(max(1, t.warmup_steps // max(1, t.grad_accum)), updates - 1) if updates > 1 else 0
  return optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, warmup, max(updates, warmup + 1))


def trainable_fn(frozen_prefixes: Sequence[str], patterns: Sequence[str]) -> Callable[[str], bool]:
  """name -> trainable? Frozen when the name starts with a frozen prefix or matches a pattern."""
  regexes = []
  for p in patterns:
    try:
      regexes.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"train.freeze pattern {p!r} is not a regular expression: {e}") from None

  def trainable(name: str) -> bool:
    if any(name == f or name.startswith(f + "/") for f in frozen_prefixes):
      return False
    return not any(r.search(name) for r in regexes)
  return trainable


def check_freeze(patterns: Sequence[str], params: Any) -> None:
  """ValueError naming a train.freeze pattern that matches no parameter of `params` (a typo would
  otherwise train everything), with examples of the names patterns are matched against."""
  names = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for p in patterns:
    if not any(re.search(p, n) for n in names):
      shown = ", ".join(sorted({"/".join(n.split("/")[:2]) for n in names})[:8])
      raise ValueError(f"train.freeze pattern {p!r} matches no parameter; names look like "
                       f"{shown}, ...")


def labels(tree: Any, trainable: Callable[[str], bool]) -> Any:
  """'train' / 'frozen' per leaf of a (possibly boxed) parameter tree."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if trainable(path_name(path)) else "frozen", tree)


def make_optimizer(t: ml_collections.ConfigDict, trainable: Callable[[str], bool]
                   ) -> optax.GradientTransformation:
  """AdamW (b1, b2, weight decay on ndim >= 2), warmup + cosine, clipping, freezing, accumulation."""
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  adamw = optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))
  tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                             lambda params: labels(params, trainable))
  if t.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=t.grad_accum)
  return tx


def count_params(tree: Any, trainable: Callable[[str], bool]) -> tuple[int, int]:
  """-> (trainable, total) parameter counts of a (possibly abstract) tree."""
  n_train = n_all = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    size = int(getattr(leaf, "size", 0))
    n_all += size
    n_train += size if trainable(path_name(path)) else 0
  return n_train, n_all
