"""Shared helpers for the benchmarks: a one-line machine description, wall-clock timing, result tables.

Benches are scripts (`python bench/<name>.py ...`); they import this module as `bench.common` when run
from the repository root, or as `common` when run from inside bench/.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import platform
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo (Linux), else platform.processor(), else 'unknown'."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _version(module_name: str) -> str | None:
  try:
    module = __import__(module_name)
  except ImportError:
    return None
  return getattr(module, "__version__", "?")


def machine_info(with_torch: bool = True) -> dict[str, Any]:
  """What the numbers were measured on: CPU, cores, accelerator, JAX backend and library versions.

  torch is imported only when `with_torch` (benches that compare against a PyTorch peer).
  """
  import jax
  dev = jax.devices()[0]
  info: dict[str, Any] = {
      "cpu": cpu_model(),
      "cores": os.cpu_count(),
      "jax_backend": jax.default_backend(),
      "jax_device": getattr(dev, "device_kind", str(dev)),
      "jax_device_count": jax.device_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
  }
  if with_torch:
    info["torch"] = _version("torch")
    info["transformers"] = _version("transformers")
    try:
      import torch
      info["torch_device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
      info["torch_threads"] = torch.get_num_threads()
    except ImportError:
      pass
  return info


def machine_line(info: dict[str, Any]) -> str:
  """One printable line summarising `machine_info()`."""
  parts = [f"cpu: {info['cpu']} x{info['cores']}",
           f"jax {info['jax']} backend={info['jax_backend']} "
           f"({info['jax_device']} x{info['jax_device_count']})",
           f"flax {info['flax']}"]
  if info.get("torch"):
    parts.append(f"torch {info['torch']} ({info.get('torch_device', '?')}, "
                 f"{info.get('torch_threads', '?')} threads)")
  if info.get("transformers"):
    parts.append(f"transformers {info['transformers']}")
  return "machine | " + " | ".join(parts)


def time_interleaved(fns: Sequence[Callable[[int], Any]], repeats: int) -> list[list[float]]:
  """Wall-clock seconds of each fn(i), run in turn (f0(0), f1(0), f0(1), f1(1), ...) so that every
  implementation sees the same machine load; returns one list of `repeats` timings per fn."""
  out: list[list[float]] = [[] for _ in fns]
  for i in range(repeats):
    for fn, times in zip(fns, out):
      t0 = time.perf_counter()
      fn(i + 1)
      times.append(time.perf_counter() - t0)
  return out


def summarize(seconds: Sequence[float]) -> dict[str, float]:
  """Median / min / max of a list of timings."""
  return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  """A fixed-width text table of `rows` restricted to `columns` (floats with 4 significant digits)."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
  lines.append("  ".join("-" * w for w in widths))
  lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
  """Writes `payload` as indented JSON to `path` (parent folders created)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")


# Dense bf16 peak FLOP/s per chip, by device_kind substring (vendor datasheets; sparse figures excluded).
_PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
              ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v4", 275e12))


def peak_flops(device_kind: str | None = None) -> float | None:
  """Peak dense bf16 FLOP/s of one device (the first local JAX device by default); None if unknown."""
  if device_kind is None:
    import jax
    device_kind = getattr(jax.devices()[0], "device_kind", "")
  for name, flops in _PEAK_BF16:
    if name.lower() in device_kind.lower():
      return flops
  return None


# --- kernel profiles ---------------------------------------------------------------------------------
_CONTROL_THUNKS = {"while", "conditional", "call"}
_NUMBERED = re.compile(r"(\.\d+)+$|(_\d+)+$")


def kernel_profile(run_once: Callable[[], Any], units: int, top: int = 40) -> dict[str, Any]:
  """Device time by kernel over one `run_once()` (which must block until its work is done), traced
  with jax.profiler and divided by `units` (decode steps, train steps).

  On a GPU each event of a stream is a kernel, named as it ran (inside a CUDA graph too); on the CPU
  each XLA thunk, named by its HLO op (loops left out: their bodies' thunks are counted). Numbered
  names are folded together (every `loop_add_fusion.N` is one row). Returns the wall and busy
  (summed kernel) microseconds per unit, kernels per unit and the `top` rows by time.
  """
  import jax
  from jax.profiler import ProfileData
  total: dict[str, float] = collections.defaultdict(float)
  count: dict[str, int] = collections.defaultdict(int)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      t0 = time.perf_counter()
      run_once()
      wall = time.perf_counter() - t0
    data = ProfileData.from_file(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[-1])
    gpu = [p for p in data.planes if p.name.startswith("/device:GPU")]
    for plane in gpu or [p for p in data.planes if p.name == "/host:CPU"]:
      for line in plane.lines:
        if gpu and not line.name.lower().startswith("stream"):
          continue
        for ev in line.events:
          if gpu:
            key = ev.name
          else:
            stats = {k: v for k, v in ev.stats}
            if "hlo_op" not in stats:
              continue   # not an XLA thunk
            key = str(stats["hlo_op"])
          key = _NUMBERED.sub("", key.split(":")[0])
          if not gpu and key in _CONTROL_THUNKS:
            continue
          total[key] += ev.duration_ns / 1e3
          count[key] += 1
  rows = sorted(total, key=lambda k: -total[k])
  return {"source": "gpu" if gpu else "cpu", "units": units, "wall_us": wall * 1e6 / units,
          "busy_us": sum(total.values()) / units, "kernels": sum(count.values()) / units,
          "top": [{"kernel": k, "us": total[k] / units, "count": count[k] / units} for k in rows[:top]]}


def format_kernel_profile(profile: dict[str, Any], title: str, unit: str, rows: int = 25) -> str:
  """A kernel_profile as printable lines: the totals, then the `rows` costliest kernels."""
  lines = [f"{title} ({profile['source']}): {profile['kernels']:.0f} kernels/{unit}, busy "
           f"{profile['busy_us']:.0f} us/{unit} of {profile['wall_us']:.0f} us wall (traced)"]
  for r in profile["top"][:rows]:
    lines.append(f"    {r['us']:10.1f} us {r['count']:7.1f}x  {r['kernel'][:110]}")
  return "\n".join(lines)
