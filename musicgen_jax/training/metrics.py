"""Where training metrics go: TensorBoard event files, `metrics.jsonl`, and a tqdm progress bar.

Only the first process writes. Values arrive as host floats (or lists of floats, e.g. one per
codebook); the loop fetches them from the devices at log intervals only.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(v: Any) -> Any:
  a = np.asarray(v)
  return a.item() if a.ndim == 0 else a.tolist()


class MetricWriter:
  """`write(step, {'train/loss': 2.3, 'train/ce_per_codebook': [..]})` to TensorBoard and JSONL."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), flush_secs=30)
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: _plain(v) for k, v in values.items()}
    for name, v in values.items():
      if isinstance(v, list):
        for i, x in enumerate(v):
          self._tb.add_scalar(f"{name}/{i}", float(x), step)
      elif isinstance(v, (int, float)):
        self._tb.add_scalar(name, float(v), step)
    self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._jsonl.close()
      self._tb = self._jsonl = None


class Progress:
  """A tqdm bar over the run's steps (steps/s and ETA from tqdm; loss set at log intervals)."""

  def __init__(self, start: int, total: int, enabled: bool = True, out=print):
    self.bar = None
    self.out = out
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                      mininterval=1.0, smoothing=0.1, disable=None)

  def update(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def show(self, **values) -> None:
    if self.bar is not None:
      self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()},
                           refresh=False)

  def write(self, line: str) -> None:
    """A line above the bar (or through `out` without one)."""
    if self.bar is not None:
      self.bar.write(line, file=sys.stdout)
    else:
      self.out(line)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
