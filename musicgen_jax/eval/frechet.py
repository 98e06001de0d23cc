"""Distances between sets of audio: the Fréchet distance of embeddings (FAD-style) and the KL divergence
of classifier label distributions (the paper's KL with PaSST labels).

    frechet_distance(x [N, D], y [M, D]) -> ||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2))
    mean_kl(p_ref [N, C], p_gen [N, C])  -> mean over i of KL(p_ref[i] || p_gen[i])

Both are computed in float64 on the host. The Fréchet distance fits one Gaussian per set, so it needs
more vectors than dimensions for a full-rank covariance (`min_vectors`); with fewer it is still
defined (the covariances are singular) but noisy, and callers warn.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def min_vectors(dim: int) -> int:
  """Vectors a set needs for a full-rank covariance in `dim` dimensions."""
  return dim + 1


def gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of the rows of x [N, D] (N - 1 normalisation; zeros for N = 1)."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or len(x) == 0:
    raise ValueError(f"expected a non-empty [N, D] array of embeddings, got shape {x.shape}")
  mu = x.mean(axis=0)
  sigma = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
  return mu, np.atleast_2d(sigma)


def frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray,
                       eps: float = 1e-6) -> float:
  """The Fréchet distance between N(mu1, s1) and N(mu2, s2)."""
  diff = mu1 - mu2
  with warnings.catch_warnings():   # a singular product is handled below, not worth a warning
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
  if not np.isfinite(covmean).all():
    # A singular product: add eps to the diagonals (the usual FID / FAD fix) and take it again.
    offset = np.eye(len(s1)) * eps
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  covmean = np.real(covmean)   # imaginary parts are numerical noise of a PSD product
  return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean), 0.0))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
  """The Fréchet distance between Gaussians fitted to the rows of x [N, D] and y [M, D]."""
  if np.shape(x)[1:] != np.shape(y)[1:]:
    raise ValueError(f"embeddings of different sizes: {np.shape(x)} and {np.shape(y)}")
  return frechet_from_stats(*gaussian(x), *gaussian(y))


def mean_kl(p_ref: np.ndarray, p_gen: np.ndarray, floor: float = 1e-6) -> float:
  """Mean over pairs of KL(p_ref[i] || p_gen[i]) for label distributions [N, C] (rows are clipped at
  `floor` and renormalised, so a confident wrong label costs a bounded amount)."""
  p, q = (np.clip(np.asarray(a, np.float64), floor, None) for a in (p_ref, p_gen))
  if p.shape != q.shape:
    raise ValueError(f"label distributions of different shapes: {p.shape} and {q.shape}")
  p, q = p / p.sum(axis=1, keepdims=True), q / q.sum(axis=1, keepdims=True)
  return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
