"""Import a Hugging Face (transformers) EncodecModel state dict into musicgen_jax's EnCodec parameters.

The name table is derived from the same SEANet layer lists the Flax modules are built from:
  {prefix}{encoder|decoder}.layers.{i}.conv.weight        -> {net}/layers_{i}/kernel   [K, C_in, C_out]
  ...layers.{i}.block.{1|3}.conv.*, ...layers.{i}.shortcut.conv.*   -> layers_{i}/{block_1|block_3|shortcut}
  ...layers.{i}.norm.{weight,bias}                        -> layers_{i}/norm/{scale,bias}  (time_group_norm)
  ...layers.{i}.lstm.{weight,bias}_{ih,hh}_l{n}           -> layers_{i}/{w,b}_{ih,hh}_l{n}  (weights transposed)
  {prefix}quantizer.layers.{k}.codebook.embed             -> quantizer/embed[k]
Weight norm, saved either as parametrizations (`conv.parametrizations.weight.original0/1`, current torch)
or as `conv.weight_g` / `conv.weight_v` (older torch), is folded to w = g * v / ||v|| (norm over all
axes but the first, as torch's weight_norm with dim=0).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from musicgen_jax.codec import seanet
from musicgen_jax.codec.encodec import EncodecConfig
from musicgen_jax.interop.common import take_weight


def _get(sd: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
  return take_weight(sd, key, shape, "EnCodec")


def _torch_weight(sd: Mapping[str, np.ndarray], base: str, shape: tuple[int, ...]) -> np.ndarray:
  """Weight at `base` (e.g. 'encoder.layers.0.conv') of torch shape `shape`, weight norm folded."""
  g_shape = (shape[0],) + (1,) * (len(shape) - 1)
  for g_key, v_key in ((f'{base}.parametrizations.weight.original0', f'{base}.parametrizations.weight.original1'),
                       (f'{base}.weight_g', f'{base}.weight_v')):
    if g_key in sd or v_key in sd:
      g = _get(sd, g_key, g_shape).astype(np.float64)
      v = _get(sd, v_key, shape).astype(np.float64)
      norm = np.sqrt(np.sum(v**2, axis=tuple(range(1, v.ndim)), keepdims=True))
      return g * v / norm
  return _get(sd, f'{base}.weight', shape)


def _conv(sd, base: str, spec: seanet.LayerSpec, transposed: bool, group_norm: bool) -> dict[str, Any]:
  """Params of one (transposed) conv; torch keeps [C_out, C_in, K] ([C_in, C_out, K] if transposed)."""
  if transposed:
    w = _torch_weight(sd, f'{base}.conv', (spec.c_in, spec.c_out, spec.kernel))
    kernel = np.transpose(w, (2, 0, 1))
  else:
    w = _torch_weight(sd, f'{base}.conv', (spec.c_out, spec.c_in, spec.kernel))
    kernel = np.transpose(w, (2, 1, 0))
  out = {'kernel': kernel, 'bias': _get(sd, f'{base}.conv.bias', (spec.c_out,))}
  if group_norm:
    out['norm'] = {'scale': _get(sd, f'{base}.norm.weight', (spec.c_out,)),
                   'bias': _get(sd, f'{base}.norm.bias', (spec.c_out,))}
  return out


def _lstm(sd, base: str, dim: int, num_layers: int) -> dict[str, Any]:
  out = {}
  for n in range(num_layers):
    for kind in ('ih', 'hh'):
      out[f'w_{kind}_l{n}'] = _get(sd, f'{base}.lstm.weight_{kind}_l{n}', (4 * dim, dim)).T
      out[f'b_{kind}_l{n}'] = _get(sd, f'{base}.lstm.bias_{kind}_l{n}', (4 * dim,))
  return out


def _network(sd, cfg: EncodecConfig, base: str, layout) -> dict[str, Any]:
  group_norm = cfg.norm_type == 'time_group_norm'
  params = {}
  for spec in layout:
    key = f'{base}.layers.{spec.index}'
    if spec.kind in ('conv', 'convtr'):
      p = _conv(sd, key, spec, spec.kind == 'convtr', group_norm)
    elif spec.kind == 'resblock':
      p = {}
      for name, conv in seanet.resblock_convs(cfg, spec):
        sub = f'{key}.shortcut' if name == 'shortcut' else f'{key}.block.{conv.index}'
        p[name] = _conv(sd, sub, conv, False, group_norm)
    elif spec.kind == 'lstm':
      p = _lstm(sd, key, spec.c_in, cfg.num_lstm_layers)
    else:
      continue
    params[f'layers_{spec.index}'] = p
  return params


def encodec_params_from_hf(state_dict: Mapping[str, np.ndarray], config: EncodecConfig,
                           prefix: str = '') -> dict[str, Any]:
  """transformers EncodecModel state dict (numpy arrays, e.g. safetensors.numpy.load_file) -> params.

  prefix: prepended to every key ('audio_encoder.' inside a MusicGen checkpoint). Returns the tree
  EncodecModel(config).init would build, in float32. Raises ValueError naming the key on a missing key
  or a shape that does not match the config.
  """
  sd = state_dict
  params = {
      'encoder': _network(sd, config, f'{prefix}encoder', seanet.encoder_layout(config)),
      'decoder': _network(sd, config, f'{prefix}decoder', seanet.decoder_layout(config)),
      'quantizer': {'embed': np.stack([
          _get(sd, f'{prefix}quantizer.layers.{k}.codebook.embed',
               (config.codebook_size, config.codebook_dim))
          for k in range(config.num_quantizers)])},
  }
  return _to_jnp(params)


def _to_jnp(tree):
  if isinstance(tree, dict):
    return {k: _to_jnp(v) for k, v in tree.items()}
  return jnp.asarray(np.asarray(tree, dtype=np.float32))
