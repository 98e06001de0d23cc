"""EnCodec encode / decode speed: musicgen_jax (jitted) vs transformers' EncodecModel (torch), same weights.

A random-weight codec at the shape of MusicGen's facebook/encodec_32khz (64 filters, hidden 128, ratios
[8, 5, 4, 4], 4 x 2048 codebooks). Both sides run fp32 (TF32 off in torch) on the same device type: CUDA
if torch sees a GPU, else CPU. Times are the median of --repeats warm runs (block_until_ready / cuda sync).

  python bench/codec_speed.py --seconds 30 --repeats 3 --batch 1
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # leave GPU memory for torch too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from musicgen_jax.codec.encodec import EncodecConfig, EncodecModel  # noqa: E402
from musicgen_jax.interop.encodec import encodec_params_from_hf  # noqa: E402

ENCODEC_32KHZ = dict(sampling_rate=32000, audio_channels=1, num_filters=64, hidden_size=128,
                     upsampling_ratios=[8, 5, 4, 4], norm_type='weight_norm', use_causal_conv=False,
                     pad_mode='reflect', use_conv_shortcut=False, num_lstm_layers=2,
                     num_residual_layers=1, compress=2, kernel_size=7, last_kernel_size=7,
                     residual_kernel_size=3, dilation_growth_rate=2, codebook_size=2048,
                     codebook_dim=128, target_bandwidths=[2.2], normalize=False)


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--seconds', type=float, default=30.0, help='audio length to encode/decode')
  ap.add_argument('--repeats', type=int, default=3, help='timed runs after one warm-up; median reported')
  ap.add_argument('--batch', type=int, default=1)
  args = ap.parse_args()
  if args.seconds <= 0 or args.repeats < 1 or args.batch < 1:
    ap.error('--seconds must be > 0, --repeats and --batch >= 1')

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  torch.manual_seed(0)
  hf = transformers.EncodecModel(transformers.EncodecConfig(**ENCODEC_32KHZ)).eval()
  with torch.no_grad():
    for name, b in hf.named_buffers():
      if name.endswith('codebook.embed'):
        b.copy_(torch.randn_like(b))
  sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
  hf = hf.to(device)

  cfg = EncodecConfig.from_hf_dict(ENCODEC_32KHZ)
  model = EncodecModel(cfg)
  params = jax.device_put(encodec_params_from_hf(sd, cfg))
  n = int(args.seconds * cfg.sampling_rate)
  audio = np.random.default_rng(0).standard_normal((args.batch, 1, n)).astype(np.float32) * 0.1

  print(f'machine: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs; jax {jax.__version__} '
        f'on {jax.devices()[0].device_kind}; torch {torch.__version__} on '
        f'{torch.cuda.get_device_name() if device == "cuda" else "cpu"}')
  print(f'audio: batch {args.batch} x {args.seconds:g} s at {cfg.sampling_rate} Hz ({n} samples); '
        f'codes {cfg.num_quantizers} x {-(-n // cfg.hop_length)} frames; median of {args.repeats}')

  # Ours: jitted, warmed up (compile excluded), blocked on the result.
  encode = jax.jit(model.encode)
  decode = jax.jit(model.decode)
  x = jax.device_put(jnp.asarray(audio))
  t0 = time.perf_counter()
  codes = encode(params, x).block_until_ready()
  decode(params, codes).block_until_ready()
  compile_s = time.perf_counter() - t0
  ours_enc = _median_time(lambda: encode(params, x).block_until_ready(), args.repeats)
  ours_dec = _median_time(lambda: decode(params, codes).block_until_ready(), args.repeats)

  # transformers: fp32, no_grad, same device type.
  xt = torch.from_numpy(audio).to(device)
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

  def hf_encode():
    with torch.no_grad():
      out = hf.encode(xt, bandwidth=2.2).audio_codes
    sync()
    return out

  hf_codes = hf_encode()

  def hf_decode():
    with torch.no_grad():
      out = hf.decode(hf_codes, [None]).audio_values
    sync()
    return out

  hf_wav = hf_decode()
  hf_enc = _median_time(hf_encode, args.repeats)
  hf_dec = _median_time(hf_decode, args.repeats)

  agree = float(np.mean(np.asarray(codes) == hf_codes[0].cpu().numpy()))
  wav_err = float(np.abs(np.asarray(decode(params, jnp.asarray(hf_codes[0].cpu().numpy(), jnp.int32)))
                         - hf_wav.cpu().numpy()).max())
  print(f'check: codes agree {agree:.4f}; decode(HF codes) max abs diff {wav_err:.2e}; '
        f'ours first call (compile + run) {compile_s:.1f} s')
  print(f'{"":8s}{"ours (s)":>10s}{"HF (s)":>10s}{"HF/ours":>10s}')
  for name, ours, theirs in (('encode', ours_enc, hf_enc), ('decode', ours_dec, hf_dec)):
    print(f'{name:8s}{ours:10.3f}{theirs:10.3f}{theirs / ours:10.2f}')


if __name__ == '__main__':
  main()
