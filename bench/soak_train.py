"""Soak test of the training loop: kill and restart a run many times, compare with an uninterrupted run.

    python bench/soak_train.py --runs 3 --steps 40 --seed 0 [--json out.json]

Each run trains the tiny config to --steps in a fresh work directory, and is stopped again and again at
a random moment (SIGKILL mostly, some SIGTERM and SIGINT; during start-up, compilation, steps and
asynchronous saves alike) and restarted with the same command until it finishes. Counted per run:
restarts, crashes (an exit that is neither success nor the signal we sent, or a traceback on stderr),
hangs (a process that does not finish within --timeout), and whether the final parameters, optimizer
state, RNG and step are bit-identical to an uninterrupted run's. Not a CI test (minutes); the figures
go in docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def flags(workdir: str, steps: int) -> list[str]:
  return [sys.executable, "train.py", "--config", "configs/musicgen.py:tiny", "--workdir", workdir,
          f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=3",
          "--config.train.log_every=2", "--config.train.eval_every=10",
          "--config.train.keep_checkpoints=2", "--config.train.progress=False"]


def final_state(workdir: str, step: int):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def same(a, b) -> bool:
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def run_once(cmd, env, timeout) -> tuple[int, str, float]:
  t0 = time.time()
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stderr, time.time() - t0


def interrupted_run(workdir: str, steps: int, rng: random.Random, env: dict, timeout: float,
                    max_delay: float) -> dict:
  stats = {"restarts": 0, "crashes": 0, "hangs": 0, "signals": {}, "notes": []}
  while True:
    p = subprocess.Popen(flags(workdir, steps), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    delay = rng.uniform(0.5, max_delay)
    sig = rng.choices([signal.SIGKILL, signal.SIGTERM, signal.SIGINT], [0.7, 0.2, 0.1])[0]
    try:
      _, err = p.communicate(timeout=delay)
      sent = None
    except subprocess.TimeoutExpired:
      p.send_signal(sig)
      sent = sig
      try:
        _, err = p.communicate(timeout=timeout)
      except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        stats["hangs"] += 1
        stats["notes"].append(f"hang after {signal.Signals(sig).name}")
    rc = p.returncode
    if sent is None and rc == 0:
      return stats
    expected = {None: {0}, signal.SIGKILL: {-9}, signal.SIGTERM: {143, -15, 0},
                signal.SIGINT: {130, -2, 0}}[sent]
    if rc not in expected or "Traceback" in (err or ""):
      stats["crashes"] += 1
      stats["notes"].append(f"rc {rc} after {signal.Signals(sent).name if sent else 'no signal'}: "
                            f"{(err or '').strip().splitlines()[-1:]}")
    if sent is not None:
      name = signal.Signals(sent).name
      stats["signals"][name] = stats["signals"].get(name, 0) + 1
    if rc == 0:
      return stats
    stats["restarts"] += 1
    if stats["restarts"] > 200:
      stats["notes"].append("gave up after 200 restarts")
      return stats


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout", type=float, default=300.0)
  p.add_argument("--max-delay", type=float, default=0.9,
                 help="kill after uniform(0.5 s, this x the reference run's seconds): below 1, most "
                      "attempts are killed and progress comes from checkpoints")
  p.add_argument("--json")
  a = p.parse_args()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  rng = random.Random(a.seed)
  with tempfile.TemporaryDirectory() as tmp:
    ref_dir = os.path.join(tmp, "reference")
    rc, err, ref_seconds = run_once(flags(ref_dir, a.steps), env, a.timeout)
    if rc:
      sys.exit(f"the uninterrupted reference run failed: {err.strip().splitlines()[-1:]}")
    reference = final_state(ref_dir, a.steps)
    print(f"reference: {a.steps} steps in {ref_seconds:.0f} s")
    results = []
    for i in range(a.runs):
      wd = os.path.join(tmp, f"run{i}")
      t0 = time.time()
      stats = interrupted_run(wd, a.steps, rng, env, a.timeout, max_delay=a.max_delay * ref_seconds)
      try:
        stats["identical"] = same(final_state(wd, a.steps), reference)
      except Exception as e:  # noqa: BLE001 -- a run that left no final checkpoint is a finding
        stats["identical"] = False
        stats["notes"].append(f"no final state: {type(e).__name__}: {e}")
      stats["seconds"] = round(time.time() - t0)
      results.append(stats)
      print(f"run {i}: {stats}")
  total = {k: sum(r[k] for r in results) for k in ("restarts", "crashes", "hangs")}
  total["identical"] = sum(r["identical"] for r in results)
  print(f"\n{a.runs} runs of {a.steps} steps: {total['restarts']} kills/restarts, "
        f"{total['crashes']} crashes, {total['hangs']} hangs, {total['identical']}/{a.runs} final "
        "states bit-identical to the uninterrupted run")
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"runs": results, "total": total, "args": vars(a)}, f, indent=2)


if __name__ == "__main__":
  main()
