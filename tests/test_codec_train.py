"""Codec training: losses, weight norm, balancer and discriminator against references, train steps
that overfit a batch, and the export to a codec directory that checkpoint.load_codec reads.

References: torch (STFT, weight norm), librosa + numpy (mel loss), numpy formulas (SI-SNR, hinge and
feature losses, the balancer by hand), the inference codec (codes of the exported codec directory).
"""
from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from configs.codec import get_config
from musicgen_jax import checkpoint, quantization, sharding as shd
from musicgen_jax.codec import balancer, discriminator as disc_lib, losses, weight_norm
from musicgen_jax.data import audio_crops
from musicgen_jax.training import codec_task
from musicgen_jax.training.codec_task import CodecTask

torch = pytest.importorskip("torch")


# XLA:CPU without backend optimisation compiles the train step twice as fast; same semantics.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def _signals(shape, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(shape[-1]) / 8000.0
  x = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(shape)
  y = x + 0.2 * rng.standard_normal(shape)
  return x.astype(np.float32), y.astype(np.float32)


# --- losses --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_fft,hop,win", [(128, 32, 128), (100, 30, 80)])
def test_stft_matches_torch(n_fft, hop, win):
  x, _ = _signals((2, 1, 700))
  ours = np.asarray(jax.jit(lambda a: losses.stft(a, n_fft, hop, win, normalized=True))(x))
  window = torch.hann_window(win)
  ref = torch.stft(torch.from_numpy(x.reshape(2, -1)), n_fft, hop, win, window=window, center=False,
                   return_complex=True).numpy()          # [B, F, frames]
  ref = ref / np.sqrt(np.sum(window.numpy().astype(np.float64)**2))
  np.testing.assert_allclose(ours[:, 0], np.swapaxes(ref, 1, 2), atol=2e-4, rtol=1e-4)


def _numpy_msspec(est, ref, spec: losses.MelSpec) -> np.ndarray:
  """audiocraft's msspec per example, in numpy with librosa's STFT and filters."""
  import librosa
  total = np.zeros(est.shape[0])
  for n_fft in spec.scales:
    hop, p = n_fft // 4, (n_fft - n_fft // 4) // 2
    with warnings.catch_warnings():            # empty bands at small FFT sizes, as in audiocraft
      warnings.simplefilter("ignore")
      fb = librosa.filters.mel(sr=spec.sample_rate, n_fft=n_fft, n_mels=spec.n_mels,
                               fmin=spec.f_min, fmax=spec.sample_rate / 2, htk=True, norm=None)
    window = librosa.filters.get_window("hann", n_fft, fftbins=True)

    def mel(x):
      x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p)), mode="reflect")
      frames = -(-(x.shape[-1] - n_fft) // hop) + 1
      x = np.pad(x, ((0, 0), (0, 0), (0, (frames - 1) * hop + n_fft - x.shape[-1])))
      s = librosa.stft(x, n_fft=n_fft, hop_length=hop, center=False, window="hann")
      power = np.abs(s)**2 / np.sum(window**2)
      return np.einsum("mf,bcft->bcmt", fb, power)
    m_est, m_ref = mel(est), mel(ref)
    log = lambda m: np.log10(spec.floor_level + m)
    total += np.mean(np.abs(m_est - m_ref), axis=(1, 2, 3))
    total += spec.alpha(n_fft) * np.mean((log(m_est) - log(m_ref))**2, axis=(1, 2, 3))
  return total / sum(spec.alpha(n) + 1 for n in spec.scales)


def test_multiscale_mel_matches_librosa_numpy():
  x, y = _signals((2, 1, 1000))
  spec = losses.MelSpec(8000, range_start=6, range_end=9, n_mels=32, alphas=True)
  ours = np.asarray(jax.jit(lambda a, b: losses.multiscale_mel(a, b, spec))(y, x))
  np.testing.assert_allclose(ours, _numpy_msspec(y, x, spec), rtol=2e-4)
  assert np.all(ours > 0)


def test_si_snr_and_l1_match_numpy():
  x, y = _signals((3, 2, 500), seed=1)
  ours = np.asarray(losses.si_snr(jnp.asarray(y), jnp.asarray(x)))
  eps = np.finfo(np.float32).eps * x.shape[-1]
  xc = x - x.mean(-1, keepdims=True)
  yc = y - y.mean(-1, keepdims=True)
  s = np.sum(xc * yc, -1, keepdims=True) * xc / (eps + np.sum(xc**2, -1, keepdims=True))
  ref = 10 * np.log10((eps + np.sum(s**2, -1)) / (eps + np.sum((yc - s)**2, -1)))
  np.testing.assert_allclose(ours, ref.mean(-1), rtol=1e-4)
  np.testing.assert_allclose(losses.si_snr(jnp.asarray(3 * y + 0.1), jnp.asarray(x)), ours,
                             rtol=1e-4)                               # scale and offset invariant
  np.testing.assert_allclose(losses.l1(jnp.asarray(y), jnp.asarray(x)),
                             np.abs(y - x).mean(axis=(1, 2)), rtol=1e-5)
  with pytest.raises(ValueError, match="both be"):
    losses.si_snr(jnp.zeros((1, 1, 4)), jnp.zeros((1, 1, 5)))


def test_spectral_flatness_matches_librosa():
  """Per example: librosa's flatness of each channel (uncentred frames), averaged; a tone is far
  below noise."""
  rng = np.random.default_rng(2)
  t = np.arange(9000) / 8000
  x = np.stack([np.stack([np.sin(2 * np.pi * 440 * t), rng.normal(size=t.size)]),
                np.stack([0.3 * rng.normal(size=t.size), np.sin(2 * np.pi * 97 * t) ** 3])])
  x = x.astype(np.float32)                                            # [2, 2, 9000]
  ours = np.asarray(losses.spectral_flatness(jnp.asarray(x), n_fft=1024, hop=256))
  ref = [np.mean([librosa.feature.spectral_flatness(y=c, n_fft=1024, hop_length=256,
                                                    center=False).mean() for c in b]) for b in x]
  np.testing.assert_allclose(ours, ref, rtol=2e-3)
  tone, noise = (np.asarray(losses.spectral_flatness(jnp.asarray(x[:1, i:i + 1]), 1024, 256))
                 for i in (0, 1))
  assert tone < 0.01 < 0.3 < noise


# --- weight norm, discriminator, balancer --------------------------------------------------------

def test_weight_norm_folds_as_torch_for_conv_and_transposed_conv():
  from torch.nn.utils.parametrizations import weight_norm as torch_wn
  torch.manual_seed(0)
  for conv, keep in ((torch.nn.Conv1d(4, 6, 3), 2), (torch.nn.ConvTranspose1d(4, 6, 3), 1)):
    m = torch_wn(conv)
    with torch.no_grad():
      m.parametrizations.weight.original0.mul_(torch.rand_like(m.parametrizations.weight.original0))
    g_t = m.parametrizations.weight.original0.detach().numpy()
    v_t = m.parametrizations.weight.original1.detach().numpy()
    w_t = m.weight.detach().numpy()
    # ours: [K, C_in, C_out]; torch conv [C_out, C_in, K], transposed conv [C_in, C_out, K]
    perm = (2, 1, 0) if keep == 2 else (2, 0, 1)
    v = np.transpose(v_t, perm)
    g = np.transpose(g_t, perm)
    assert g.shape[keep] == v.shape[keep] and g.size == v.shape[keep]
    np.testing.assert_allclose(weight_norm.fold(g, v), np.transpose(w_t, perm), rtol=1e-5)
    np.testing.assert_allclose(weight_norm.magnitude(np.transpose(w_t, perm), keep), g, rtol=1e-5)


def test_discriminator_shapes_and_hinge_and_feature_losses():
  cfg = disc_lib.DiscriminatorConfig(filters=3, n_ffts=(64, 32), hop_lengths=(16, 8),
                                     win_lengths=(64, 32), dilations=(1, 2))
  x, _ = _signals((2, 1, 256))
  shapes = jax.eval_shape(disc_lib.MultiScaleSTFTDiscriminator(cfg).init, jax.random.key(0), x)
  params = shapes["params"]
  assert set(params["scale_0"]["conv_0"]) == {"kernel", "bias"}          # audiocraft: no norm
  assert params["scale_0"]["conv_1"]["kernel_g"].shape == (1, 1, 1, 3)
  out = jax.eval_shape(lambda p: disc_lib.MultiScaleSTFTDiscriminator(cfg).apply(p, x), shapes)
  logits, fmaps = out
  # frames = 1 + (256 - n_fft) // hop; freqs = n_fft // 2 + 1 halved (ceil) by each strided conv
  assert [lg.shape for lg in logits] == [(2, 13, 9, 1), (2, 29, 5, 1)]
  assert [len(f) for f in fmaps] == [4, 4]
  rng = np.random.default_rng(0)
  real = [rng.normal(size=(2, 3)), rng.normal(size=(4,))]
  fake = [rng.normal(size=(2, 3)), rng.normal(size=(4,))]
  want = np.mean([np.mean(np.maximum(0, 1 - r)) + np.mean(np.maximum(0, 1 + f))
                  for r, f in zip(real, fake)])
  np.testing.assert_allclose(disc_lib.discriminator_loss(real, fake), want, rtol=1e-6)
  np.testing.assert_allclose(disc_lib.generator_loss(fake), np.mean([-f.mean() for f in fake]),
                             rtol=1e-6)
  fr = [[rng.normal(size=(3,)), rng.normal(size=(5,))], [rng.normal(size=(2,))]]
  ff = [[rng.normal(size=(3,)), rng.normal(size=(5,))], [rng.normal(size=(2,))]]
  per = lambda rel: [np.mean([np.mean(np.abs(f - r)) / (np.mean(np.abs(r)) + 1e-8 if rel else 1)
                              for f, r in zip(fs, rs)]) for fs, rs in zip(ff, fr)]
  np.testing.assert_allclose(disc_lib.feature_loss(ff, fr), np.mean(per(False)), rtol=1e-6)
  np.testing.assert_allclose(disc_lib.feature_loss(ff, fr, relative=True), np.mean(per(True)),
                             rtol=1e-6)


@pytest.mark.parametrize("kernel,stride,dilation,hw", [
    ((3, 9), (1, 2), (1, 1), (11, 33)), ((3, 9), (1, 2), (2, 1), (11, 34)),
    ((3, 9), (1, 2), (4, 1), (13, 35)), ((3, 9), (2, 1), (1, 2), (12, 17)),
    ((3, 8), (1, 3), (1, 1), (9, 31)), ((3, 3), (1, 1), (1, 1), (5, 6)),
    ((5, 4), (1, 1), (3, 1), (10, 12)), ((3, 9), (1, 2), (1, 2), (9, 31))])
def test_discriminator_conv_equals_the_strided_dilated_conv(kernel, stride, dilation, hw):
  """conv2d (phases in the batch, strides in the channels, one plain convolution) against
  lax.conv_general_dilated with the stride and dilation, values and both gradients; the rewritten
  cases really lose their stride and dilation (the last case, both on one axis, keeps them)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2,) + hw + (3,)), jnp.float32)
  k = jnp.asarray(rng.normal(size=kernel + (3, 4)), jnp.float32)
  direct = lambda x, k: jax.lax.conv_general_dilated(
      x, k, stride, disc_lib._padding(kernel, dilation), rhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = lambda x, k: disc_lib.conv2d(x, k, stride, dilation)
  np.testing.assert_allclose(ours(x, k), direct(x, k), atol=2e-5)
  grads = [jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1))(x, k)
           for f in (ours, direct)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, atol=1e-4)
  convs = [e for e in jax.make_jaxpr(ours)(x, k).eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 1
  plain = all(v == 1 for v in convs[0].params["window_strides"] + convs[0].params["rhs_dilation"])
  assert plain == (not any(s > 1 and d > 1 for s, d in zip(stride, dilation)))


def test_balancer_gives_each_loss_its_weight_share():
  """Two losses whose gradients w.r.t. y differ 10x in norm get equal shares of the output gradient
  (equal weights); the moving average follows flashy's bias-corrected EMA."""
  rng = np.random.default_rng(0)
  b, n = 3, 16
  a = rng.normal(size=(b, n))
  c = rng.normal(size=(b, n))
  c *= 10 * np.linalg.norm(a, axis=1, keepdims=True) / np.linalg.norm(c, axis=1, keepdims=True)
  y = jnp.asarray(rng.normal(size=(b, n)), jnp.float32)
  groups = [lambda y: {"a": jnp.mean(y * a)}, lambda y: {"c": jnp.mean(y * c)}]
  weights = {"a": 1.0, "c": 1.0}
  state = balancer.init(weights)
  g, eff, state, metrics = balancer.balanced_grad(groups, y, state, weights, total_norm=2.0)
  ga, gc = a / (b * n), c / (b * n)                             # the gradients of the two means
  na = np.mean(np.linalg.norm(ga, axis=1))
  nc = np.mean(np.linalg.norm(gc, axis=1))
  np.testing.assert_allclose(nc / na, 10.0, rtol=1e-6)
  sa, sc = 0.5 * 2.0 / na, 0.5 * 2.0 / nc
  np.testing.assert_allclose(g, sa * ga + sc * gc, rtol=1e-5)
  # each loss now contributes half of the total norm, per batch item
  np.testing.assert_allclose(np.mean(np.linalg.norm(sa * ga, axis=1)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.mean(np.linalg.norm(sc * gc, axis=1)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(eff, sa * np.mean(y * a) + sc * np.mean(y * c), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_c"], 10 / 11, rtol=1e-5)
  # second step: loss c's gradient doubles; its average is (0.999 * nc + 2 nc) / (0.999 + 1)
  groups[1] = lambda y: {"c": 2 * jnp.mean(y * c)}
  g2, _, state, _ = balancer.balanced_grad(groups, y, state, weights)
  avg_c = (0.999 * nc + 2 * nc) / 1.999
  np.testing.assert_allclose(g2, 0.5 / na * ga + 0.5 / avg_c * 2 * gc, rtol=1e-5)
  plain, _, _, _ = balancer.balanced_grad(groups, y, balancer.init(weights), {"a": 0.1, "c": 4.0},
                                          balance_grads=False)
  np.testing.assert_allclose(plain, 0.1 * ga + 4.0 * 2 * gc, rtol=1e-5)


# --- data ----------------------------------------------------------------------------------------

def test_audio_crops_resume_and_padded_eval_pass(tmp_path):
  c = get_config("tiny")
  c.data.num_examples = 32                  # validation: max(batch, 32 // 8) = 4 items
  it = audio_crops.make_iterator(c, "train", workdir=str(tmp_path))
  first = next(it)
  assert first["audio"].shape == (4, 1, audio_crops.segment_samples(c))
  assert first["audio"].dtype == np.float32 and np.all(first["weight"] == 1)
  saved = it.get_state()
  want = [next(it)["audio"] for _ in range(3)]
  again = audio_crops.make_iterator(c, "train", workdir=str(tmp_path))
  again.set_state(saved)
  for w in want:
    np.testing.assert_array_equal(next(again)["audio"], w)
  c.train.batch_size = 3                    # 4 items in 2 batches of 3: two padding examples
  batches = list(audio_crops.make_iterator(c, "validation", workdir=str(tmp_path), shuffle=False,
                                           num_epochs=1))
  weights = np.concatenate([b["weight"] for b in batches])
  np.testing.assert_array_equal(weights, [1, 1, 1, 1, 0, 0])
  assert not np.any(batches[-1]["audio"][1:])


def test_config_errors_are_one_line(tmp_path):
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  c = get_config("tiny")
  c.train.segment_seconds = 0.01
  with pytest.raises(ValueError, match="fewer than the largest STFT window"):
    CodecTask(c, mesh)
  c = get_config("tiny")
  c.codec_train.losses.mse = 1.0
  with pytest.raises(ValueError, match="unknown losses"):
    CodecTask(c, mesh)
  with pytest.raises(ValueError, match="unknown codec config variant"):
    get_config("huge")


# --- train steps and export ----------------------------------------------------------------------

def _numpy_state(task: CodecTask, seed: int):
  """init_state's structure with numpy-random networks (no init compile: tests stay fast); the
  codebooks, optimizers and balancer fresh (zeros), as init_state makes them."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(task.init_state, jax.random.key(seed))

  def noise(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name.startswith("b_") or name == "bias":
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if name != "kernel_g" else 1
    return (rng.normal(size=leaf.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

  def networks(tree):
    tree = jax.tree_util.tree_map_with_path(noise, tree)

    def fresh_norm(d):          # g = ||v|| over the axes where g has size 1, as a fresh split
      if not isinstance(d, dict):
        return d
      d = {k: fresh_norm(v) for k, v in d.items()}
      if weight_norm.V in d:
        axes = tuple(i for i, n in enumerate(d[weight_norm.G].shape) if n == 1)
        d[weight_norm.G] = np.sqrt(np.sum(d[weight_norm.V]**2, axis=axes, keepdims=True))
      return d
    return fresh_norm(tree)

  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  generator = networks(abstract.generator)
  disc = networks(abstract.disc)
  return zeros.replace(generator=generator, disc=disc,
                       params=CodecTask._export(weight_norm.fold_tree(generator), zeros.codebooks),
                       rng=np.asarray(jax.random.key_data(jax.random.key(seed))))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The tiny codec after 12 steps on one fixed batch: (task, first metrics, states, batch)."""
  c = get_config("tiny")
  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  task = CodecTask(c, mesh)
  batch = next(task.make_iterator("train", str(tmp_path_factory.mktemp("wd"))))
  state = _numpy_state(task, 0)
  step = _compile(task.train_step, state, batch)
  history, states = [], [state]
  for _ in range(12):
    state, m = step(state, batch)
    history.append(jax.device_get(m))
    states.append(state)
  return task, history, states, batch


def test_train_steps_overfit_a_batch(trained):
  task, history, states, _ = trained
  mel = [float(m["msspec"]) for m in history]
  assert np.all(np.isfinite(mel)) and np.all([np.isfinite(float(m["loss"])) for m in history])
  assert np.mean(mel[-3:]) < 0.75 * mel[0], mel
  first, last = states[1], states[-1]
  assert bool(np.all(first.codebooks.initialized))            # k-means on the first batch
  np.testing.assert_allclose(last.balancer.weight_sum, sum(0.999**i for i in range(12)), rtol=1e-5)
  assert set(history[0]) >= {"l1", "msspec", "adv", "feat", "commit", "d_loss", "g_loss",
                             "ratio_msspec", "grad_norm", "codebook_usage", "n_q"}
  disc0, disc1 = jax.tree.leaves(states[0].disc), jax.tree.leaves(first.disc)
  assert any(not np.array_equal(a, b) for a, b in zip(disc0, disc1))   # the discriminator trains
  assert int(last.step) == 12


def test_export_is_a_codec_directory_with_the_training_codes(trained, tmp_path):
  task, _, states, batch = trained
  state = states[-1]
  d = str(tmp_path / "codec")
  checkpoint.save_model(d, task.config, jax.device_get(task.export_params(state)))
  codec, params = checkpoint.load_codec(d)
  assert codec.config == task.codec_cfg
  x = jnp.asarray(batch["audio"])

  def training_codes(generator, codebooks, x):
    latents = task.model.encode_latents(weight_norm.fold_tree(generator), jnp.swapaxes(x, 1, 2))
    return quantization.quantize(codebooks, latents).codes_bkt

  want = _compile(training_codes, state.generator, state.codebooks, x)(state.generator,
                                                                      state.codebooks, x)
  got = _compile(codec.encode, params, x)(params, x)
  assert got.shape == (4, task.codec_cfg.num_quantizers, task.frames)
  np.testing.assert_array_equal(got, want)
  # eval_step's sums are those of the exported codec's round trip
  batch = dict(batch, weight=np.array([1, 1, 1, 0], np.float32))
  sums = jax.device_get(_compile(task.eval_step, state, batch)(state, batch))
  y = np.asarray(_compile(codec.decode, params, got)(params, got))[..., :x.shape[-1]]
  sisnr = np.asarray(losses.si_snr(jnp.asarray(y), x))
  np.testing.assert_allclose(sums["sisnr_sum"], sisnr[:3].sum(), rtol=1e-4, atol=1e-4)
  assert float(sums["count"]) == 3.0
  n_fft = codec_task.flatness_fft(x.shape[-1])
  assert n_fft == 1024 == x.shape[-1] and codec_task.flatness_fft(32000) == 2048
  flat = lambda a: np.mean([librosa.feature.spectral_flatness(
      y=c, n_fft=n_fft, hop_length=n_fft // 4, center=False).mean() for c in np.asarray(a)[:3, 0]])
  summary = task.summarize_eval(sums)
  np.testing.assert_allclose(summary["flatness"], flat(y), rtol=2e-3)
  np.testing.assert_allclose(summary["flatness_real"], flat(x), rtol=2e-3)
  np.testing.assert_allclose(summary["loss"], summary["mel_distance"])
  assert summary["loss"] > 0
  # A damaged codec directory is refused before its weights are used (the token cache reads codecs).
  weights = os.path.join(d, checkpoint.PARAMS_FILE)
  with open(weights, "r+b") as f:
    f.seek(os.path.getsize(weights) - 8)
    f.write(b"\x7f" * 8)
  with pytest.raises(checkpoint.CheckpointError, match="checksum differs"):
    checkpoint.load_codec(d)


def test_codec_work_directory_is_a_codec_source(trained, tmp_path):
  """load_codec of a codec run's work directory (no export yet) reads the newest checkpoint's
  exported params, as the token cache does with data.codec=<codec workdir>."""
  import grain.python as grain
  from musicgen_jax.training.checkpoints import CheckpointStore
  task, _, states, _ = trained
  wd = str(tmp_path / "run")
  checkpoint.write_config(wd, task.config)
  store = CheckpointStore(wd, keep=2, async_save=False)
  for step in (3, 12):
    store.save(step, jax.device_get(states[step]), iter(grain.MapDataset.range(4)))
  store.wait()
  store.close()
  codec, params = checkpoint.load_codec(wd)
  assert codec.config == task.codec_cfg
  want = jax.tree.leaves(jax.device_get(task.export_params(states[12]))["codec"])
  got = jax.tree.leaves(params)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(
      got, jax.tree.leaves(jax.device_get(task.export_params(states[3]))["codec"])))


@pytest.mark.slow
def test_codec_trains_through_the_loop_and_resumes_exactly(tmp_path):
  """loop.train runs the codec task: held-out SI-SNR and mel distance, best/ is a codec directory, and
  a run stopped at step 3 and resumed ends bit-identical to an uninterrupted one (codebooks, balancer,
  discriminator, data position and RNG are all in the checkpoint)."""
  import orbax.checkpoint as ocp
  from musicgen_jax.training import loop
  c = get_config("tiny")
  c.train.update(num_steps=6, checkpoint_every=3, eval_every=3)
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  metrics = loop.train(c, full, task_factory=CodecTask, out=lambda _: None)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["eval_sisnr"])
  assert metrics["eval_loss"] == metrics["eval_mel_distance"] > 0
  codec, params = checkpoint.load_codec(os.path.join(full, "best"))
  assert codec.config.codebook_size == c.codec.encodec.codebook_size
  first = get_config("tiny")
  first.train.update(num_steps=3, checkpoint_every=3, eval_every=3)
  loop.train(first, part, task_factory=CodecTask, out=lambda _: None)
  loop.train(c, part, task_factory=CodecTask, out=lambda _: None)
  with ocp.StandardCheckpointer() as ckptr:
    a, b = (ckptr.restore(os.path.join(d, "checkpoints", "6", "state")) for d in (full, part))
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert len(la) == len(lb)
  diff = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(la, lb) if not np.array_equal(x, y)]
  assert not diff, diff[:5]
