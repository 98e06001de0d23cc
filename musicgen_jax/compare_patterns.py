"""The paper's ablation in one command: the same LM trained with each codebook pattern, then evaluated.

    python -m musicgen_jax.compare_patterns --config configs/patterns.py:tiny --budget 200 \
        --workdir runs/patterns [--pattern delay --pattern unroll:flattening=0,1,1,2 ...]

Every run has the config's data, model, batch, learning-rate schedule and seed; only config.pattern
differs, and every run trains for --budget steps (default: the config's train.num_steps). Each run is an ordinary training
run in WORKDIR/<pattern> (resumable, on the config's mesh: run the same command again to continue), and
each finished run is evaluated by musicgen_jax.eval (eval.samples clips of eval.duration s; one set of
held-out references shared by all). WORKDIR gets compare.md and compare.json (one table), and
loss_curves.png and metrics.png.

--pattern NAME[:OPTION=V1,V2[:OPTION=...]] (repeatable; default: the five patterns with their default
options): parallel, delay (delays), unroll (flattening, delays), coarse_first (delays), musiclm
(group_by), e.g. `delay:delays=0,2,4,6`.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

import ml_collections

from musicgen_jax import patterns as patterns_lib
from musicgen_jax.eval.evaluate import FLOOR

PAPER_RANKING = ("The paper (Copet et al. 2023, Sec. 4, Table 3) compares the patterns at the same "
                 "number of training steps and finds flattening (unroll) best, delay close behind it "
                 "at a fraction of the decoding steps, and parallel worst.")


def parse_pattern(spec: str, num_codebooks: int) -> tuple[str, dict]:
  """'delay:delays=0,2,4,6' -> ('delay', {'delays': (0, 2, 4, 6)}); ValueError listing the valid
  names or options. The pattern is built once to check the options."""
  name, *opts = spec.split(":")
  if name not in patterns_lib.PATTERN_NAMES:
    raise ValueError(f"unknown pattern {name!r} in --pattern {spec!r}: valid names are "
                     f"{', '.join(patterns_lib.PATTERN_NAMES)}")
  valid = patterns_lib._OPTIONS[name]
  options = {}
  for opt in opts:
    key, sep, value = opt.partition("=")
    if not sep or key not in valid:
      raise ValueError(f"--pattern {spec!r}: {name} takes "
                       f"{', '.join(f'{v}=...' for v in valid) or 'no options'}, not {opt!r}")
    try:
      nums = tuple(int(v) for v in value.split(","))
    except ValueError:
      raise ValueError(f"--pattern {spec!r}: {key} must be integers separated by commas") from None
    options[key] = nums[0] if key == "group_by" else nums
  patterns_lib.get_pattern(name, num_codebooks, **options)   # ValueError on bad options
  return name, options


def label(name: str, options: dict) -> str:
  """A directory-safe name: 'delay', 'delay-delays_0_2_4_6'."""
  parts = [name] + [f"{k}_{'_'.join(map(str, v)) if isinstance(v, tuple) else v}"
                    for k, v in sorted(options.items())]
  return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))


def check_budget(config: ml_collections.ConfigDict, budget: int) -> None:
  """ValueError unless `budget` steps reach the warmup's end and one in-training evaluation."""
  t = config.train
  need = max(int(t.eval_every) if t.eval_every else 1, int(t.warmup_steps) + 1)
  if not isinstance(budget, int) or budget < need:
    raise ValueError(f"--budget {budget} steps is too small to finish a single evaluation: this "
                     f"recipe warms up for {t.warmup_steps} steps and evaluates every "
                     f"{t.eval_every} (train.warmup_steps, train.eval_every): give at least {need}")


def run_config(base: ml_collections.ConfigDict, name: str, options: dict, budget: int
               ) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(base.to_dict())
  c.pattern.name = name
  for key in ("delays", "flattening", "group_by"):
    if key in c.pattern:
      c.pattern[key] = options.get(key)
  c.train.num_steps = budget
  return c


def curves(workdir: str) -> dict:
  """{'train': [(step, loss)], 'eval': [(step, loss, ce per codebook)], 'train_seconds'} from a
  run's metrics.jsonl (the training time summed from the logged rates, so resumed runs add up)."""
  out = {"train": [], "eval": [], "train_seconds": 0.0}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return out
  last = 0
  with open(path) as f:
    for line in f:
      m = json.loads(line)
      if "train/loss" in m:
        out["train"].append((m["step"], m["train/loss"]))
        if m.get("train/steps_per_s"):
          out["train_seconds"] += max(m["step"] - last, 0) / m["train/steps_per_s"]
        last = m["step"]
      if "eval/loss" in m:
        out["eval"].append((m["step"], m["eval/loss"], m.get("eval/ce_per_codebook", [])))
  return out


def compare(base: ml_collections.ConfigDict, specs: list[str], budget: int, workdir: str,
            log=print) -> dict:
  """Trains and evaluates every pattern (module docstring); -> the comparison as a dict."""
  from musicgen_jax.eval import evaluate as ev
  from musicgen_jax.training import loop
  k = int(base.model.num_codebooks)
  runs = [parse_pattern(s, k) for s in (specs or patterns_lib.PATTERN_NAMES)]
  labels = [label(n, o) for n, o in runs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"--pattern names the same pattern twice: {labels}")
  check_budget(base, budget)
  e = base.get("eval", ml_collections.ConfigDict())
  settings = ev.EvalSettings(samples=int(e.get("samples", 32)), duration=float(e.get("duration", 0)),
                             seed=int(e.get("seed", 0)),
                             speed_seconds=float(e.get("speed_seconds", 30.0)))
  ev.check_settings(settings)
  data_dir = os.path.abspath(base.data.get("cache_dir") or os.path.join(workdir, "data"))
  base.data.cache_dir = data_dir
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  results, reference = {}, None
  for (name, options), lab in zip(runs, labels):
    run_dir = os.path.join(workdir, lab)
    log(f"== {lab}: training for {budget} steps in {run_dir}")
    loop.train(run_config(base, name, options, budget), run_dir)
    cached = os.path.join(run_dir, "eval", "eval.json")
    if os.path.isfile(cached):
      with open(cached) as f:
        prior = json.load(f)
      if prior.get("step") == budget and prior.get("settings") == settings.__dict__:
        results[lab] = prior
        log(f"== {lab}: evaluated before ({cached})")
        continue
    log(f"== {lab}: evaluating")
    from musicgen_jax.pipeline import MusicGen
    model = MusicGen.load(run_dir)
    if reference is None:
      reference = ev.build_reference(model, ev.data_config(model.config, run_dir, data_dir),
                                     data_dir, settings, (model.codec, model.params["codec"]), log)
    result = ev.evaluate(run_dir, data_dir, settings, model=model, reference=reference, log=log)
    result.update(step=budget, settings=settings.__dict__, label=lab)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    from musicgen_jax.data.manifest import write_json
    write_json(cached, result)
    results[lab] = result
  curve = {lab: curves(os.path.join(workdir, lab)) for lab in labels}
  for lab in labels:
    results[lab]["train_seconds"] = round(curve[lab]["train_seconds"], 1)
  baselines = {n: r for n, r in next(iter(results.values()))["rows"].items()
               if n not in ("model", FLOOR)}
  out = {"budget": budget, "batch_size": int(base.train.batch_size),
         "segment_seconds": float(base.train.segment_seconds), "seed": int(base.train.seed),
         "config": base.get("variant", ""), "patterns": results, "baselines": baselines,
         "seconds": round(time.time() - t0, 1)}
  from musicgen_jax.data.manifest import write_json
  from musicgen_jax.eval import plots
  plots.loss_curves(curve, os.path.join(workdir, "loss_curves.png"))
  plots.metric_bars(results, os.path.join(workdir, "metrics.png"), baselines)
  write_json(os.path.join(workdir, "compare.json"), out)
  with open(os.path.join(workdir, "compare.md"), "w") as f:
    f.write(markdown(out))
  return out


def markdown(out: dict) -> str:
  res = out["patterns"]
  lines = ["| pattern | decoder steps for 30 s | val CE ↓ | CE per codebook | FD classifier ↓ | "
           "FD codec ↓ | KL ↓ | key ↑ | tempo ↑ | family ↑ | train min | s for 30 s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for lab, r in res.items():
    m, sp = r["rows"]["model"], r.get("speed", {})
    cell = lambda key: f"{m[key]:.3f}" if key in m else "—"  # noqa: E731
    lines.append(f"| {r['pattern']} | {sp.get('decode_steps', '—')} | {r['ce']['loss']:.4f} | "
                 f"{', '.join(f'{x:.3f}' for x in r['ce']['ce_per_codebook'])} | "
                 f"{cell('fd_classifier')} | {cell('fd_codec')} | {cell('kl')} | {cell('key')} | "
                 f"{cell('tempo')} | {cell('family')} | {r['train_seconds'] / 60:.1f} | "
                 f"{sp.get('seconds', float('nan')):.2f} |")
  for lab, r in res.items():
    row = r["rows"][FLOOR]
    cell = lambda key: f"{row[key]:.3f}" if key in row else "—"  # noqa: E731
    lines.append(f"| *{r['pattern']}, unconditional* | | | | {cell('fd_classifier')} | "
                 f"{cell('fd_codec')} | {cell('kl')} | {cell('key')} | {cell('tempo')} | "
                 f"{cell('family')} | | |")
  for name, row in out["baselines"].items():
    cell = lambda key: f"{row[key]:.3f}" if key in row else "—"  # noqa: E731
    lines.append(f"| *{name}* | | | | {cell('fd_classifier')} | {cell('fd_codec')} | {cell('kl')} | "
                 f"{cell('key')} | {cell('tempo')} | {cell('family')} | | |")
  first = next(iter(res.values()))
  order = sorted(res, key=lambda lab: res[lab]["ce"]["loss"])
  lines += ["", f"{out['budget']} steps of batch {out['batch_size']} x {out['segment_seconds']:g} s "
            f"per pattern, seed {out['seed']}; {first['rows']['model']['clips']} generated clips of "
            f"{first['duration']:g} s per pattern against held-out test renderings (italic rows: "
            "each pattern's unconditional samples (the floor), then the references, the same for "
            "every pattern). Speed: batch 1, warm, on "
            f"{first.get('speed', {}).get('device', '?')}.", "",
            "Ranking by validation cross-entropy: " + " < ".join(res[lab]["pattern"] for lab in order)
            + ".", PAPER_RANKING]
  return "\n".join(lines) + "\n"


def main(argv) -> None:
  from absl import flags
  from musicgen_jax import cli
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  with cli.friendly_errors("compare_patterns"):
    config = f.config
    budget = int(config.train.num_steps if f.budget is None else f.budget)
    out = compare(config, list(f.pattern or []), budget, f.workdir)
    print(markdown(out))
    print(f"compare_patterns: wrote {os.path.join(f.workdir, 'compare.md')}, compare.json, "
          f"loss_curves.png and metrics.png ({out['seconds'] / 60:.1f} min)")


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/patterns.py:tiny", "The LM recipe.")
  flags.DEFINE_integer("budget", None, "Training steps per pattern, the same for all (default: the "
                       "config's train.num_steps).")
  flags.DEFINE_string("workdir", "runs/patterns", "One training run per pattern is kept here.")
  flags.DEFINE_multi_string("pattern", None, "NAME[:OPTION=V1,V2...]; default: all five.")


if __name__ == "__main__":
  from absl import app, logging
  from musicgen_jax import cli
  _define_flags()
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
