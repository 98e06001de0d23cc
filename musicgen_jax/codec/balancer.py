"""audiocraft's loss Balancer as pure functions: losses weighted by their share of the gradient.

All balanced losses depend on the model only through its output y (the decoded waveform). With
g_i = d loss_i / d y, the gradient sent back into the model is

    G = sum_i total_norm * (w_i / sum_j w_j) * g_i / (eps + avg_i)

where avg_i is a bias-corrected exponential moving average (decay `ema_decay`) of ||g_i||: per batch
item (the norm over every axis but the first, then the mean over the batch) when `per_batch_item`,
else over the whole array. So w_i is the share of the gradient that loss i contributes, whatever its
scale. With balance_grads=False, G = sum_i w_i g_i (a plain weighted sum). The "effective loss"
sum_i scale_i * loss_i is what G is the gradient of, for logging.

The moving averages are state (`BalancerState`, kept in the train state), so a resumed run balances
exactly as an uninterrupted one. Usage inside a jitted step:

    y, gen_vjp = jax.vjp(generator, params)
    grad_y, effective, bal_state, metrics = balanced_grad([l1_fn, mel_fn], y, bal_state, weights)
    (param_grads,) = gen_vjp(grad_y)
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class BalancerState:
  """Bias-corrected EMA of each loss's gradient norm: avg_i = norm_sum[i] / weight_sum."""
  norm_sum: dict            # {name: float32 []}
  weight_sum: jax.Array     # float32 []


def init(names) -> BalancerState:
  return BalancerState(norm_sum={n: jnp.zeros((), jnp.float32) for n in sorted(names)},
                       weight_sum=jnp.zeros((), jnp.float32))


def grad_norm(g: jax.Array, per_batch_item: bool) -> jax.Array:
  """||g||: per item over all axes but the first, then the batch mean; or over the whole array."""
  g = g.astype(jnp.float32)
  if per_batch_item:
    return jnp.mean(jnp.sqrt(jnp.sum(g**2, axis=tuple(range(1, g.ndim)))))
  return jnp.sqrt(jnp.sum(g**2))


def balance(state: BalancerState, grads: Mapping[str, jax.Array], losses: Mapping[str, jax.Array],
            weights: Mapping[str, float], *, balance_grads: bool = True, total_norm: float = 1.0,
            ema_decay: float = 0.999, per_batch_item: bool = True, epsilon: float = 1e-12):
  """Combines per-loss output gradients -> (G, effective loss [], new state, metrics).

  grads: {name: d loss / d y}, all of y's shape; losses: {name: []}; weights: {name: w >= 0}, the
  same names. metrics: 'ratio_<name>' = avg_i / sum_j avg_j (the share of loss i before balancing).
  """
  names = sorted(grads)
  if set(names) != set(weights) or set(names) != set(losses) or set(names) != set(state.norm_sum):
    raise ValueError(f'balancer: losses {sorted(losses)}, gradients {names}, weights '
                     f'{sorted(weights)} and state {sorted(state.norm_sum)} must name the same '
                     'losses')
  total_weight = float(sum(weights.values()))
  if balance_grads and not total_weight > 0:
    raise ValueError(f'balancer weights {dict(weights)} must sum to > 0')
  beta = ema_decay or 1.0     # audiocraft: a decay of 0 (or None) means a plain running mean
  norms = {n: grad_norm(grads[n], per_batch_item) for n in names}
  norm_sum = {n: state.norm_sum[n] * beta + norms[n] for n in names}
  weight_sum = state.weight_sum * beta + 1.0
  avg = {n: norm_sum[n] / weight_sum for n in names}
  total_avg = sum(avg.values())
  out = jnp.zeros_like(grads[names[0]], jnp.float32)
  effective = jnp.zeros((), jnp.float32)
  metrics = {}
  for n in names:
    if balance_grads:
      scale = (weights[n] / total_weight) * (total_norm or 1.0) / (epsilon + avg[n])
    else:
      scale = jnp.float32(weights[n])
    out = out + scale * grads[n].astype(jnp.float32)
    effective = effective + scale * jax.lax.stop_gradient(losses[n]).astype(jnp.float32)
    metrics[f'ratio_{n}'] = avg[n] / total_avg
  return out.astype(grads[names[0]].dtype), effective, BalancerState(norm_sum, weight_sum), metrics


def balanced_grad(loss_groups: Sequence[Callable[[jax.Array], dict]], y: jax.Array,
                  state: BalancerState, weights: Mapping[str, float], **kwargs):
  """Per-loss gradients w.r.t. y, then balance(...) -> (G, effective loss, new state, metrics).

  loss_groups: functions y -> {name: []}; losses that share work (the adversarial and feature
  losses share one discriminator forward) belong in one group. Each group runs forward once and
  backward once per loss (batched with vmap), as audiocraft's autograd.grad per loss. The loss
  values are added to metrics.
  """
  grads, values = {}, {}
  for fn in loss_groups:
    vals, vjp = jax.vjp(fn, y)
    names = sorted(vals)
    if len(names) == 1:
      grads[names[0]] = vjp({names[0]: jnp.ones_like(vals[names[0]])})[0]
    else:
      eye = jnp.eye(len(names), dtype=vals[names[0]].dtype)
      stacked = jax.vmap(lambda ct: vjp(ct)[0])({n: eye[i] for i, n in enumerate(names)})
      grads.update({n: stacked[i] for i, n in enumerate(names)})
    values.update(vals)
  g, effective, state, metrics = balance(state, grads, values, weights, **kwargs)
  metrics.update(values)
  return g, effective, state, metrics
