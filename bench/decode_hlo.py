"""Kernels and bytes copied per decode step, read from the compiled HLO of our sampler.

Compiles `sampling.make_generate_fn` ahead of time (random weights are never materialised: the program is
lowered from shapes) at one shape and reads the optimised HLO of the compiled program:
  * the step loops: the top-level `while` loops made by the sampler's `lax.scan` over the steps (one per
    segment); each reports its trip count and the HLO instructions its body runs per iteration;
  * kernels per step: instructions that launch work (fusions, custom calls, dots, copies, sorts, ...;
    not parameters, tuples, bitcasts or constants), with nested loops counted trip-count times;
  * bytes copied per step: output bytes of copies and of fusions that only copy or transpose (a
    weight re-laid out inside the loop, a cache copied to protect a read), and separately of dynamic
    slices (a stacked weight or cache sliced per layer), and the bytes every kernel writes (a cache
    rewritten at every step shows here);
  * the AOT compile time (`jit(...).lower(...).compile()`).
Kernel counts are per backend: run it on the GPU for the GPU's program.

    python bench/decode_hlo.py --layers 4 --dim 256 --heads 4 --steps 100
    python bench/decode_hlo.py ... --against /tmp/baseline     # the same figures for another source tree

`--against DIR` runs this script again in a subprocess with DIR (a checkout of this repository, e.g. an
older commit from `git archive`) first on PYTHONPATH, and prints both and the ratio (theirs / ours).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("DECODE_HLO_SOURCE"):   # --against: the other tree's package comes first
  sys.path.insert(0, os.environ["DECODE_HLO_SOURCE"])
else:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "s8": 1,
          "u8": 1, "pred": 1, "s16": 2, "u16": 2, "s4": 1, "u4": 1}
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
         "opt-barrier", "partition-id", "replica-id"}
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def _shape_bytes(type_str: str) -> int:
  """Bytes of an HLO type string: 'f32[2,3]{1,0}' or a tuple of such."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", type_str):
    if dtype in _BYTES:
      total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
  return total


def parse_hlo(text: str) -> tuple[dict[str, list[dict]], str]:
  """-> ({computation name: [instruction dicts]}, entry computation name)."""
  comps: dict[str, list[dict]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and "=" not in line.split("(")[0]:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      name, type_str, opcode, rest = m.groups()
      calls = dict(re.findall(r"\b(calls|body|condition)=%?([\w.\-]+)", rest))
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
      comps[current].append({"name": name, "type": type_str, "opcode": opcode, "calls": calls,
                             "trip": int(trip.group(1)) if trip else None,
                             "root": line.lstrip().startswith("ROOT"), "meta": rest})
  return comps, entry


def _fusion_root(comps, instr) -> str:
  body = comps.get(instr["calls"].get("calls", ""), [])
  roots = [i["opcode"] for i in body if i["root"]]
  return roots[0] if roots else ""


def _is_layout_copy(comps, instr) -> bool:
  """A fusion that only moves data: a copy or transpose, possibly behind a bitcast (XLA's
  `copy_bitcast_fusion`, `transpose_copy_fusion`)."""
  body = comps.get(instr["calls"].get("calls", ""), [])
  ops = {i["opcode"] for i in body} - _FREE
  return bool(ops) and ops <= {"copy", "transpose", "bitcast", "slice", "reshape"} and \
      bool(ops & {"copy", "transpose"})


def count(comps, comp_name: str) -> dict[str, Any]:
  """Kernels and bytes one execution of computation `comp_name` runs (nested loops expanded)."""
  out = {"kernels": 0, "copy_bytes": 0, "dynamic_slice_bytes": 0, "written_bytes": 0, "ops": {}}

  def add(other, times):
    out["kernels"] += times * other["kernels"]
    out["copy_bytes"] += times * other["copy_bytes"]
    out["dynamic_slice_bytes"] += times * other["dynamic_slice_bytes"]
    out["written_bytes"] += times * other["written_bytes"]
    for k, v in other["ops"].items():
      out["ops"][k] = out["ops"].get(k, 0) + times * v

  for instr in comps.get(comp_name, []):
    op = instr["opcode"]
    if op in _FREE:
      continue
    if op == "while":
      trip = instr["trip"] or 1
      add(count(comps, instr["calls"]["body"]), trip)
      add(count(comps, instr["calls"]["condition"]), trip + 1)
      continue
    label = op
    if op == "fusion":
      root = _fusion_root(comps, instr)
      label = f"fusion({root})"
      inner = {i["opcode"] for i in comps.get(instr["calls"].get("calls", ""), [])}
      if root == "dynamic-update-slice":    # written in place: only the update moves
        pass
      elif "dynamic-slice" in inner and root in ("dynamic-slice", "copy", "bitcast", "transpose"):
        label = "fusion(dynamic-slice)"
        out["dynamic_slice_bytes"] += _shape_bytes(instr["type"])
      elif root in ("copy", "transpose") or _is_layout_copy(comps, instr):
        label = "fusion(copy)"
        out["copy_bytes"] += _shape_bytes(instr["type"])
    elif op in ("copy", "copy-start", "transpose"):
      out["copy_bytes"] += _shape_bytes(instr["type"])
    elif op == "dynamic-slice":
      out["dynamic_slice_bytes"] += _shape_bytes(instr["type"])
    elif op == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', instr["meta"])
      label = f"custom-call({target.group(1) if target else '?'})"
    out["kernels"] += 1
    out["ops"][label] = out["ops"].get(label, 0) + 1
    if label not in ("fusion(dynamic-update-slice)", "dynamic-update-slice"):   # in place
      out["written_bytes"] += _shape_bytes(instr["type"])
  return out


def step_loops(comps, entry: str, num_layers: int = 0) -> list[dict]:
  """The sampler's step loops: top-level whiles from a scan in `generate`; not the PRNG's loops, nor
  a prefill's scan over the layers (named 'prefill', or of `num_layers` trips in older trees)."""
  loops = []
  for instr in comps.get(entry, []):
    if instr["opcode"] != "while":
      continue
    op_name = re.search(r'op_name="([^"]+)"', instr["meta"])
    op_name = op_name.group(1) if op_name else ""
    if not op_name.endswith("/while") or "jit(_" in op_name or "prefill" in op_name \
        or instr["trip"] == num_layers:
      continue
    per_iter = count(comps, instr["calls"]["body"])
    cond = count(comps, instr["calls"]["condition"])
    per_iter["kernels"] += cond["kernels"]
    loops.append(dict(per_iter, trip=instr["trip"], op_name=op_name))
  return [l for l in loops if l["trip"] and l["trip"] > 1]


def measure(a: argparse.Namespace) -> dict[str, Any]:
  from flax import linen as nn
  from musicgen_jax import lm as lm_lib
  from musicgen_jax import patterns, sampling
  k = a.codebooks
  cfg = lm_lib.LMConfig(num_codebooks=k, card=a.card, dim=a.dim, num_layers=a.layers, num_heads=a.heads,
                        ffn_dim=a.ffn or 4 * a.dim, text_dim=a.text_dim,
                        max_positions=max(2048, a.steps + 1), dtype=a.dtype)
  frames = a.steps + 1 - k
  pattern = patterns.get_pattern("delay", k)
  mode = "batch" if a.cfg > 1 else "none"
  kwargs = {} if a.segments is None else {"segments": a.segments}
  try:
    fn = sampling.make_generate_fn(cfg, pattern, frames, 0, a.top_k, False, mode, **kwargs)
  except TypeError:  # an older tree without segments
    fn = sampling.make_generate_fn(cfg, pattern, frames, 0, a.top_k, False, mode)
  params = jax.eval_shape(lambda r: nn.meta.unbox(lm_lib.init_params(cfg, r)), jax.random.key(0))
  text = jax.ShapeDtypeStruct((a.batch, a.text_len, a.text_dim), jnp.float32)
  mask = jax.ShapeDtypeStruct((a.batch, a.text_len), jnp.int32)
  conds = lm_lib.Conditions(text=text, text_mask=mask)
  prompt = jax.ShapeDtypeStruct((a.batch, k, 0), jnp.int32)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  t0 = time.perf_counter()
  lowered = fn.lower(params, conds, prompt, jax.random.key(0), scalar, scalar, scalar)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  comps, entry = parse_hlo(compiled.as_text())
  loops = step_loops(comps, entry, a.layers)
  steps = sum(l["trip"] for l in loops)
  per_step = lambda key: sum(l[key] * l["trip"] for l in loops) / max(steps, 1)
  ops: dict[str, float] = {}
  for l in loops:
    for name, n in l["ops"].items():
      ops[name] = ops.get(name, 0) + n * l["trip"] / max(steps, 1)
  return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
          "source": os.environ.get("DECODE_HLO_SOURCE", str(_ROOT)),
          "shape": {k_: getattr(a, k_) for k_ in ("layers", "dim", "heads", "ffn", "codebooks", "card",
                                                   "text_len", "text_dim", "batch", "steps", "cfg",
                                                   "top_k", "dtype", "segments")},
          "lower_s": t1 - t0, "compile_s": t2 - t1, "compile_cpu_s": c2 - c1, "scanned_steps": steps,
          "loops": [{"trip": l["trip"], "kernels": l["kernels"], "copy_bytes": l["copy_bytes"],
                     "dynamic_slice_bytes": l["dynamic_slice_bytes"], "written_bytes": l["written_bytes"]}
                    for l in loops],
          "kernels_per_step": per_step("kernels"), "copy_bytes_per_step": per_step("copy_bytes"),
          "dynamic_slice_bytes_per_step": per_step("dynamic_slice_bytes"),
          "written_bytes_per_step": per_step("written_bytes"),
          "ops_per_step": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=24)
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--ffn", type=int, default=None, help="default 4 x --dim")
  p.add_argument("--codebooks", type=int, default=4)
  p.add_argument("--card", type=int, default=2048)
  p.add_argument("--text-len", type=int, default=12)
  p.add_argument("--text-dim", type=int, default=768)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--cfg", type=float, default=3.0)
  p.add_argument("--top-k", type=int, default=250)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--segments", type=int, default=None, help="step-scan segments (default: auto)")
  p.add_argument("--ops", type=int, default=12, help="print the N most frequent kernel kinds per step")
  p.add_argument("--against", default=None, help="another source tree to measure in a subprocess")
  p.add_argument("--json", default=None, help="also write the results as JSON to this path")
  return p.parse_args(argv)


def _print(r: dict[str, Any], label: str, n_ops: int) -> None:
  print(f"{label:6s} | {r['source']} | {r['backend']} ({r['device']}) | lower {r['lower_s']:.2f} s, "
        f"compile {r['compile_s']:.2f} s ({r['compile_cpu_s']:.2f} s CPU) | step loops (trip, kernels/iter): "
        f"{[(l['trip'], l['kernels']) for l in r['loops']]}")
  print(f"{'':6s} | per step: {r['kernels_per_step']:.1f} kernels, "
        f"{r['copy_bytes_per_step'] / 1e6:.3f} MB copied, "
        f"{r['dynamic_slice_bytes_per_step'] / 1e6:.3f} MB dynamic-sliced, "
        f"{r['written_bytes_per_step'] / 1e6:.3f} MB written (outputs of all kernels but in-place updates)")
  top = list(r["ops_per_step"].items())[:n_ops]
  print(f"{'':6s} | kinds: " + ", ".join(f"{k} {v:.0f}" for k, v in top))


def main(argv=None) -> dict[str, Any]:
  a = parse_args(argv)
  if a.steps < a.codebooks + 2:
    raise ValueError(f"--steps {a.steps} must be >= --codebooks + 2")
  if os.environ.get("DECODE_HLO_CHILD"):
    print("RESULT " + json.dumps(measure(a)))
    return {}
  s = a
  print(f"shape  | layers={s.layers} dim={s.dim} heads={s.heads} ffn={s.ffn or 4 * s.dim} "
        f"codebooks={s.codebooks}x{s.card} text={s.text_len}x{s.text_dim} batch={s.batch} "
        f"steps={s.steps} cfg={s.cfg} top_k={s.top_k} dtype={s.dtype} segments={s.segments or 'auto'}",
        flush=True)
  ours = measure(a)
  _print(ours, "ours", a.ops)
  payload = {"ours": ours, "argv": sys.argv[1:] if argv is None else list(argv)}
  if a.against:
    child_argv = [x for x in (sys.argv[1:] if argv is None else list(argv))]
    i = child_argv.index("--against")
    del child_argv[i:i + 2]
    env = dict(os.environ, DECODE_HLO_SOURCE=os.path.abspath(a.against), DECODE_HLO_CHILD="1")
    proc = subprocess.run([sys.executable, __file__] + child_argv, env=env, capture_output=True,
                          text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      raise RuntimeError(f"--against {a.against} failed: {proc.stderr[-2000:]}")
    theirs = json.loads(lines[-1][len("RESULT "):])
    _print(theirs, "other", a.ops)
    payload["other"] = theirs
    for key in ("kernels_per_step", "copy_bytes_per_step", "dynamic_slice_bytes_per_step", "compile_s",
                "compile_cpu_s"):
      ratio = (f"{theirs[key] / ours[key]:.2f}" if ours[key] > 1e-3 * theirs[key]
               else f"n/a (ours {ours[key]:.4g}, other {theirs[key]:.4g})")
      print(f"ratio  | {key}: other / ours = {ratio}")
  if a.json:
    from bench import common
    common.write_json(a.json, payload)
  return payload


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    sys.exit(f"error: {e}")
