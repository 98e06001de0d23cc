"""The evaluation's pictures (matplotlib, off-screen): one model's figure, and the pattern comparison's
loss curves and metric bars."""
from __future__ import annotations

import os

import numpy as np

BAR_METRICS = (("fd_classifier", "FD, classifier embedding (lower is better)"),
               ("fd_codec", "FD, codec embedding (lower is better)"),
               ("kl", "KL of family labels (lower is better)"),
               ("key", "key accuracy"), ("tempo", "tempo accuracy"), ("family", "family accuracy"))


def _figure(width: float, height: float):
  import matplotlib
  matplotlib.use("Agg", force=False)
  from matplotlib.figure import Figure
  return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)


def evaluation_figure(result: dict, path: str) -> None:
  """CE per codebook, then one bar chart per metric over the scored sets."""
  fig = _figure(14, 6)
  axes = fig.subplots(2, 4)
  ce = result["ce"]["ce_per_codebook"]
  ax = axes[0, 0]
  ax.bar(range(len(ce)), ce, color="tab:blue")
  ax.set_xticks(range(len(ce)))
  ax.set_xlabel("codebook")
  ax.set_ylabel("validation CE (nats)")
  ax.set_title(f"pattern {result['pattern']}")
  names = list(result["rows"])
  for ax, (key, title) in zip(axes.flat[1:], BAR_METRICS):
    vals = [result["rows"][n].get(key, np.nan) for n in names]
    ax.barh(range(len(names)), vals, color=["tab:orange"] + ["tab:gray"] * (len(names) - 1))
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
  axes.flat[-1].axis("off")
  fig.suptitle(f"{result['model']}: {result['rows']['model']['clips']} clips of "
               f"{result['duration']:g} s")
  _save(fig, path)


def loss_curves(curves: dict[str, dict], path: str) -> None:
  """curves[label] = {'train': [(step, loss)], 'eval': [(step, loss, [ce per codebook])]}: the mean
  loss of every pattern, then the validation CE of each codebook."""
  num_k = max((len(e[2]) for c in curves.values() for e in c["eval"]), default=0)
  fig = _figure(4 * (2 + num_k), 3.6)
  axes = np.atleast_1d(fig.subplots(1, 2 + num_k))
  for i, (label, c) in enumerate(curves.items()):
    color = f"C{i}"
    if c["train"]:
      s, v = zip(*c["train"])
      axes[0].plot(s, v, color=color, label=label)
    if c["eval"]:
      s = [e[0] for e in c["eval"]]
      axes[1].plot(s, [e[1] for e in c["eval"]], "o-", color=color, label=label)
      for k in range(num_k):
        axes[2 + k].plot(s, [e[2][k] for e in c["eval"]], "o-", color=color, label=label)
  axes[0].set_title("train loss (mean CE over codebooks)")
  axes[1].set_title("validation CE, mean")
  for k in range(num_k):
    axes[2 + k].set_title(f"validation CE, codebook {k}")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  _save(fig, path)


def metric_bars(results: dict[str, dict], path: str, baselines: dict[str, dict] | None = None) -> None:
  """One bar chart per metric: each pattern's 'model' row, then the reference rows (grey)."""
  labels = list(results)
  fig = _figure(15, 6)
  axes = fig.subplots(2, 4)
  extra = list(baselines or {})
  panels = [("ce", "validation CE (lower is better)")] + list(BAR_METRICS) + \
      [("seconds_30", "seconds to generate 30 s (batch 1)")]
  for ax, (key, title) in zip(axes.flat, panels):
    if key == "ce":
      vals, names = [results[n]["ce"]["loss"] for n in labels], labels
    elif key == "seconds_30":
      vals = [results[n].get("speed", {}).get("seconds", np.nan) for n in labels]
      names = labels
    else:
      names = labels + extra
      vals = [results[n]["rows"]["model"].get(key, np.nan) for n in labels] + \
          [baselines[b].get(key, np.nan) for b in extra]
    colors = [f"C{i}" for i in range(len(labels))] + ["tab:gray"] * (len(names) - len(labels))
    ax.barh(range(len(names)), vals, color=colors)
    finite = [v for v in vals if np.isfinite(v) and v > 0]
    if key == "ce" and finite:        # the differences sit near ln(card): zoom in on them
      ax.set_xlim(min(finite) - 0.05, max(finite) + 0.02)
    elif key.startswith("fd_") and finite:   # noise is orders of magnitude away
      ax.set_xscale("log")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
  _save(fig, path)
