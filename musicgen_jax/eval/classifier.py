"""An instrument-family classifier trained on the rendered corpus, to judge generated audio.

    features(audio, sr)  -> float32 [2 * N_MELS]: per-band mean and standard deviation over time of
                            the log mel spectrogram (librosa), which separate the General-MIDI
                            families by their spectral envelope and its movement
    Classifier.fit(x, labels, classes) -> a standardising two-layer MLP trained with optax (Adam,
                            full batch, weight decay); .probabilities(x), .embed(x) (the hidden layer,
                            for Fréchet distances), .accuracy(x, labels), .save(path) / .load(path)
                            (an .npz of arrays only, read with allow_pickle=False)

Trained on the corpus's train split and measured on its test split (`corpus_data`), so the
figures it gives for generated audio come with its ceiling on real recordings.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

N_MELS = 64
N_FFT, HOP = 2048, 512


def features(audio: np.ndarray, sample_rate: int) -> np.ndarray:
  """Log-mel statistics of mono audio ([N], float) -> float32 [2 * N_MELS]."""
  import librosa
  mel = librosa.feature.melspectrogram(y=np.asarray(audio, np.float32), sr=sample_rate,
                                       n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS)
  log = np.log(mel + 1e-6)
  return np.concatenate([log.mean(axis=1), log.std(axis=1)]).astype(np.float32)


def _forward(params, x):
  h = jax.nn.gelu(x @ params["w1"] + params["b1"])
  return h, h @ params["w2"] + params["b2"]


@dataclasses.dataclass
class Classifier:
  classes: tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray
  params: dict

  @classmethod
  def fit(cls, x: np.ndarray, labels: list[str], classes: tuple[str, ...] | None = None, *,
          hidden: int = 128, steps: int = 1500, learning_rate: float = 3e-3,
          weight_decay: float = 1e-3, seed: int = 0) -> "Classifier":
    classes = tuple(classes or sorted(set(labels)))
    y = np.array([classes.index(s) for s in labels], np.int32)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    xs = jnp.asarray((x - mean) / std)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    d = x.shape[1]
    params = {"w1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d), "b1": jnp.zeros(hidden),
              "w2": jax.random.normal(k2, (hidden, len(classes))) / np.sqrt(hidden),
              "b2": jnp.zeros(len(classes))}
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss_fn(p):
      _, logits = _forward(p, xs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

    @jax.jit
    def train(p, opt):
      def step(carry, _):
        p, opt = carry
        grads = jax.grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), None
      (p, opt), _ = jax.lax.scan(step, (p, opt), None, length=steps)
      return p
    params = train(params, tx.init(params))
    return cls(classes, mean, std, jax.tree.map(np.asarray, params))

  def _standard(self, x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray((np.atleast_2d(x) - self.mean) / self.std)

  def probabilities(self, x: np.ndarray) -> np.ndarray:
    """[N, len(classes)] class probabilities."""
    return np.asarray(jax.nn.softmax(_forward(self.params, self._standard(x))[1], axis=-1))

  def predict(self, x: np.ndarray) -> list[str]:
    return [self.classes[i] for i in self.probabilities(x).argmax(axis=-1)]

  def embed(self, x: np.ndarray) -> np.ndarray:
    """The hidden layer's activations [N, hidden]."""
    return np.asarray(_forward(self.params, self._standard(x))[0])

  def accuracy(self, x: np.ndarray, labels: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(self.predict(x), labels)]))

  def save(self, path: str) -> None:
    np.savez(path, classes=np.frombuffer(json.dumps(list(self.classes)).encode(), np.uint8),
             mean=self.mean, std=self.std, **{f"param_{k}": v for k, v in self.params.items()})

  @classmethod
  def load(cls, path: str) -> "Classifier":
    with np.load(path, allow_pickle=False) as f:
      classes = tuple(json.loads(f["classes"].tobytes().decode()))
      params = {k[len("param_"):]: f[k] for k in f.files if k.startswith("param_")}
      return cls(classes, f["mean"], f["std"], params)
