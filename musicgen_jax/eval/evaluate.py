"""One model, every metric: what `python -m musicgen_jax.eval MODEL_DIR --data DATA_DIR` computes.

  ce        validation cross-entropy and perplexity per codebook, teacher-forced through the model's
            own pattern (its valid mask: the pattern's empty slots and a short item's padding are left
            out), over the whole validation split of the token cache in DATA_DIR
  model     `samples` clips generated from the captions of held-out test renderings, scored against
            those renderings (eval/reference.py: Fréchet distances over the classifier's and the
            codec encoder's embeddings, KL of the classifier's labels, key / tempo / family accuracy)
  floor     unconditional samples (the null condition), scored the same way
  baselines real audio (a second excerpt of each test rendering: the ceiling), real audio with the
            captions shuffled, real validation audio and noise; with `random_baseline`, the samples
            of a model of the same shape with random LM and text weights (and the model's codec)
  melody    (melody models) chroma cosine similarity between a test rendering's melody and the
            audio generated with it, against text-only samples of the same captions
  speed     decode steps and wall seconds to generate `speed_seconds` of audio at batch 1 (warm: a
            first call compiles), for the model's pattern

DATA_DIR is the data directory of the model's training run (config.data.cache_dir, e.g.
runs/demo-data): the rendered corpus and the token cache live there; a missing token cache for the
model's codec is built (the corpus is never re-rendered here).
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Log = Callable[[str], None]
FLOOR = "unconditional (floor)"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  samples: int = 32          # generated clips per set (test renderings used)
  duration: float = 0.0      # seconds per clip (0: the model's sampling.duration, at most its window)
  seed: int = 0
  speed_seconds: float = 30.0   # 0: no speed measurement
  batch: int = 16            # prompts per generate call (one compiled shape)
  min_samples: int = 8       # below this the attribute rates mean nothing: refused
  random_baseline: bool = False  # also score a model of the same shape with random LM weights


def check_settings(s: EvalSettings) -> None:
  if s.samples < s.min_samples:
    raise ValueError(f"--samples {s.samples} is too few to compare rates: use at least "
                     f"{s.min_samples}")
  for name, value in (("duration", s.duration), ("speed-seconds", s.speed_seconds)):
    if not (math.isfinite(value) and value >= 0):
      raise ValueError(f"--{name} must be a finite number >= 0, got {value}")
  if s.seed < 0:
    raise ValueError(f"--seed must be >= 0, got {s.seed}")
  if s.batch < 1:
    raise ValueError(f"EvalSettings.batch must be >= 1, got {s.batch}")


def check_model_dir(model_config: ml_collections.ConfigDict, model_dir: str, data_dir: str) -> None:
  """ValueError (one line) for a model directory or data directory that cannot be evaluated: no
  codec, no audio training data, no data directory."""
  if not (model_config.get("codec") and model_config.codec.get("encodec")):
    raise ValueError(f"{model_dir} has no codec, so nothing can be listened to: evaluate a model "
                     "directory trained with data.codec (or converted with its EnCodec)")
  if not os.path.isdir(data_dir):
    raise ValueError(f"--data {data_dir} is not a directory: pass the data directory the model was "
                     "trained with (its config.data.cache_dir)")
  corpus_root(data_config(model_config, model_dir, data_dir), data_dir)


def data_config(model_config: ml_collections.ConfigDict, model_dir: str, data_dir: str
                ) -> ml_collections.ConfigDict:
  """The model's training data settings, reading DATA_DIR; the token cache from the codec the run
  used (data.codec) when that directory still exists, else from the model's own codec."""
  if "data" not in model_config or model_config.data.get("kind") not in ("corpus", "manifest"):
    raise ValueError(f"{model_dir} records no audio training data (config.data.kind is "
                     f"{model_config.get('data', {}).get('kind', None)!r}): the evaluation needs "
                     "the corpus the model was trained on")
  c = ml_collections.ConfigDict(model_config.to_dict())
  c.data.cache_dir = os.path.abspath(data_dir)
  if not (c.data.get("codec") and os.path.isdir(c.data.codec)):
    c.data.codec = model_dir
  c.init_from = ""
  return c


def corpus_root(config: ml_collections.ConfigDict, data_dir: str) -> str:
  """The rendered corpus of `config` under DATA_DIR; ValueError when it is not there."""
  if config.data.kind != "corpus":
    raise ValueError("the generative metrics need the rendered corpus (ground-truth key, tempo and "
                     f"instrument): this model was trained on data.kind={config.data.kind!r}")
  from musicgen_jax.data import corpus, manifest
  root = corpus.prepare(config, data_dir, int(config.codec.sample_rate),
                        int(config.codec.get("channels", 1)), build=False)
  if manifest.read_counts(root) is None:
    found = sorted(glob.glob(os.path.join(data_dir, "corpus-*")))
    raise ValueError(f"{data_dir} holds no rendered corpus for this model's settings ({root} is "
                     f"missing{'; found ' + ', '.join(found) if found else ''}): pass the "
                     "data directory the model was trained with (its config.data.cache_dir)")
  return root


def validation_ce(model, config: ml_collections.ConfigDict, model_dir: str, data_dir: str,
                  log: Log = print) -> dict:
  """Teacher-forced CE per codebook over the validation split (see the module docstring)."""
  from flax import linen as nn
  from musicgen_jax import sharding as shd
  from musicgen_jax.data import loader
  from musicgen_jax.training.lm_task import LMTask
  t0 = time.time()
  loader.prepare_data(config, data_dir)
  mesh = shd.make_mesh((1, 1, 1), config.mesh.axes, devices=jax.devices()[:1])
  rules = shd.rules_from_config(config.logical_axis_rules)
  task = LMTask(config, mesh, model_dir)
  params = {"lm": model.params["lm"], "text": model.params["text"]}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(task.eval_sums)
    sums = None
    it = loader.make_iterator(config, "validation", task.text, workdir=data_dir, shuffle=False,
                              num_epochs=1)
    for batch in it:
      part = jax.tree.map(lambda x: np.asarray(x, np.float64),
                          fn(params, {k: jnp.asarray(v) for k, v in batch.items()}))
      sums = part if sums is None else jax.tree.map(np.add, sums, part)
  if sums is None:
    raise ValueError(f"the validation split under {data_dir} holds no examples")
  out = task.summarize_eval(sums)
  out.update(tokens=int(out["tokens"]), seconds=round(time.time() - t0, 1))
  gain = ""
  if "condition_gain" in out:
    gain = (f"; under the null condition {out['loss_unconditioned']:.4f} (the conditions save "
            f"{out['condition_gain']:.4f} nats per token)")
  if "loss_no_melody" in out:
    gain += (f"; with the text and no melody {out['loss_no_melody']:.4f} (the text alone saves "
             f"{out['text_gain']:.4f}, the melody {out['melody_gain']:.4f} more)")
  log(f"eval: validation CE {out['loss']:.4f} per codebook "
      f"{[round(x, 3) for x in out['ce_per_codebook']]} over {out['tokens']} tokens{gain}")
  return out


def generate_clips(model, prompts: list[str], duration: float, seed: int, batch: int,
                   chroma: np.ndarray | None = None, settings=None) -> list[np.ndarray]:
  """Mono float32 clips of `duration` s, one per prompt ('' = unconditional), `batch` per call,
  sampled with `settings` (a SamplingSettings; default: the model config's)."""
  if settings is None:
    settings = model.sampling_settings()
  clips = []
  for s in range(0, len(prompts), batch):
    part = list(prompts[s:s + batch])
    pad = batch - len(part)
    c = None
    if chroma is not None:
      c = np.concatenate([chroma[s:s + batch], np.repeat(chroma[s:s + 1], pad, axis=0)])
    codes = model.generate(part + [part[0]] * pad, duration, settings, seed=seed + s, chroma=c)
    clips += [a.mean(axis=0) for a in model.decode(codes)[:len(part)]]
  return clips


def measure_speed(model, seconds: float, log: Log = print) -> dict:
  """Decode steps and warm wall time to generate `seconds` at batch 1 (long-form past the window)."""
  settings = model.sampling_settings()
  windows, window, stride = model.long_form_plan(seconds)
  frames = model.frames_for(min(seconds, window))
  steps = model.pattern.num_steps(frames) * windows

  def run():
    t = time.time()
    jax.block_until_ready(model.generate_long(["music"], seconds, settings, seed=0))
    return time.time() - t
  cold = run()
  warm = run()
  out = {"audio_seconds": seconds, "decode_steps": int(steps), "windows": int(windows),
         "seconds": round(warm, 3), "first_call_seconds": round(cold, 3),
         "steps_per_second": round(steps / max(warm, 1e-9), 1), "device": jax.devices()[0].device_kind}
  log(f"eval: speed {steps} decode steps for {seconds:g} s in {warm:.2f} s warm "
      f"({cold:.2f} s with compilation), {out['steps_per_second']} steps/s")
  return out


def evaluate(model_dir: str, data_dir: str, settings: EvalSettings = EvalSettings(), *,
             model=None, reference=None, log: Log = print) -> dict:
  """Every metric of the module docstring for the model in `model_dir` -> a JSON-able dict.
  `model` / `reference`: already loaded ones (compare_patterns shares one reference)."""
  from musicgen_jax.pipeline import MusicGen
  check_settings(settings)
  t0 = time.time()
  if model is None:
    model = MusicGen.load(model_dir)
  if model.codec is None or "codec" not in model.params:
    raise ValueError(f"{model_dir} has no codec, so nothing can be listened to: evaluate a model "
                     "directory trained with data.codec (or converted with its EnCodec)")
  config = data_config(model.config, model_dir, data_dir)
  duration = clip_seconds(model, settings)
  result: dict = {"model": model_dir, "data": data_dir, "pattern": _pattern_name(model.config),
                  "duration": duration, "seed": settings.seed}
  result["ce"] = validation_ce(model, config, model_dir, data_dir, log)
  if reference is None:
    reference = build_reference(model, config, data_dir, settings,
                                (model.codec, model.params["codec"]), log)
  result["warnings"] = reference.warnings(
      {"classifier": reference.classifier.params["w1"].shape[1],
       "codec": int(reference.codec_embeddings(reference.validation[:1]).shape[-1])})
  for w in result["warnings"]:
    log(w)
  result["classifier"] = reference.classifier_info
  captions = [it["caption"] for it in reference.items]
  log(f"eval: generating {len(captions)} clips of {duration:g} s from held-out captions, and as "
      "many unconditional ones")
  t = time.time()
  generated = generate_clips(model, captions, duration, settings.seed, settings.batch)
  unconditional = generate_clips(model, [""] * len(captions), duration, settings.seed + 7919,
                                 settings.batch)
  result["generation_seconds"] = round(time.time() - t, 1)
  rows = {"model": reference.score(generated), FLOOR: reference.score(unconditional)}
  rows.update(reference.baselines(settings.seed))
  if settings.random_baseline:
    from musicgen_jax.pipeline import MusicGen as _MusicGen
    rand = _MusicGen.random(model.config, seed=settings.seed, text=model.text)
    rand = _MusicGen(model.config, dict(rand.params, codec=model.params["codec"]), model.text,
                     model.codec)
    rows["random weights (same codec)"] = reference.score(
        generate_clips(rand, captions, duration, settings.seed, settings.batch))
  result["rows"] = rows
  if model.lm_cfg.melody:
    result["melody"] = melody_following(model, reference, generated, duration, settings)
  if settings.speed_seconds:
    result["speed"] = measure_speed(model, settings.speed_seconds, log)
  result["seconds"] = round(time.time() - t0, 1)
  return result


def clip_seconds(model, settings: EvalSettings) -> float:
  """Seconds per evaluated clip: settings.duration, else the model's sampling duration; at most the
  model's window."""
  return min(settings.duration or float(model.config.sampling.duration), model.max_duration())


def build_reference(model, config: ml_collections.ConfigDict, data_dir: str,
                    settings: EvalSettings, codec, log: Log = print):
  """The held-out references (eval/reference.py) of `config`'s corpus under DATA_DIR, in clips of
  clip_seconds; `codec`: (EncodecModel, params) for the codec embeddings."""
  from musicgen_jax.eval.reference import Reference
  return Reference.from_corpus(corpus_root(config, data_dir), model.sample_rate,
                               clip_seconds(model, settings), settings.samples, settings.seed,
                               codec=codec, log=log)


def melody_following(model, reference, text_only: list[np.ndarray], duration: float,
                     settings: EvalSettings) -> dict:
  """Chroma cosine similarity of the generated audio with the melody it was given, against the
  text-only samples of the same captions (the paper's melody measure)."""
  from musicgen_jax.conditioners import melody as melody_lib
  from musicgen_jax.eval.control import melody_similarity
  sr = model.sample_rate
  clip = int(round(duration * sr))
  frames = melody_lib.num_chroma_frames(clip)
  chroma = np.stack([melody_lib.melody_condition(it["first"][None], sr, frames, sr)
                     for it in reference.items])
  captions = [it["caption"] for it in reference.items]
  with_melody = generate_clips(model, captions, duration, settings.seed, settings.batch, chroma)
  sims = [[melody_similarity(c, a, sr) for c, a in zip(chroma, clips)]
          for clips in (with_melody, text_only)]
  return {"samples": len(captions), "with_melody": float(np.mean(sims[0])),
          "with_melody_std": float(np.std(sims[0])), "text_only": float(np.mean(sims[1])),
          "text_only_std": float(np.std(sims[1]))}


def _pattern_name(config) -> str:
  p = config.pattern
  opts = [f"{k}={list(p[k])}" if isinstance(p[k], (list, tuple)) else f"{k}={p[k]}"
          for k in ("delays", "flattening", "group_by") if k in p and p[k] is not None]
  return p.name + (f" ({', '.join(opts)})" if opts else "")


# --- reports ------------------------------------------------------------------------------------

ROW_COLUMNS = (("fd_classifier", "FD classifier ↓"), ("fd_codec", "FD codec ↓"), ("kl", "KL ↓"),
               ("key", "key ↑"), ("tempo", "tempo ↑"), ("family", "family ↑"))


def _cell(row: dict, key: str) -> str:
  return f"{row[key]:.3f}" if key in row else "—"


def markdown(result: dict) -> str:
  ce = result["ce"]
  lines = [f"# Evaluation of {result['model']}", "",
           f"Pattern {result['pattern']}; data {result['data']}.", "",
           "## Validation cross-entropy (teacher-forced, the pattern's valid mask)", "",
           "| codebook | CE (nats) | perplexity |", "|---|---|---|"]
  for k, (c, p) in enumerate(zip(ce["ce_per_codebook"], ce["perplexity"])):
    lines.append(f"| {k} | {c:.4f} | {p:.1f} |")
  lines += [f"| mean | {ce['loss']:.4f} | {np.exp(ce['loss']):.1f} |", "",
            f"{ce['tokens']} validation tokens.", "",
            f"## Generated audio against held-out audio ({result['duration']:g} s clips)", "",
            "| set | clips | " + " | ".join(h for _, h in ROW_COLUMNS) + " |",
            "|---|---|" + "---|" * len(ROW_COLUMNS)]
  for name, row in result["rows"].items():
    lines.append(f"| {name} | {row['clips']} | " + " | ".join(_cell(row, k) for k, _ in ROW_COLUMNS)
                 + " |")
  first = next(iter(result["rows"].values()))
  c = result["classifier"]
  lines += ["", "Each set is compared with the first excerpt of the same held-out test renderings: "
            "Fréchet distances (FD) of the family classifier's hidden layer (one vector per "
            f"{c['window_seconds']:g} s window: {first['fd_classifier_vectors'][1]} reference vectors) "
            "and of the codec encoder's latents pooled over 0.5 s"
            + (f" ({first['fd_codec_vectors'][1]} reference vectors)" if "fd_codec_vectors" in first
               else "") + "; KL of the classifier's family labels per pair; the share of clips whose "
            "key (chroma profiles), tempo (beat tracker, within 8%) and instrument family (the "
            "classifier) match the caption's. 'real' is a second excerpt of each rendering (the "
            "ceiling), 'real validation' the validation split (the FD baseline).",
            f"Family classifier: {c['test_accuracy']:.3f} accuracy on {c['test_windows']} held-out "
            f"windows (chance {c['chance']:.3f})."]
  if "melody" in result:
    m = result["melody"]
    lines += ["", f"Melody: chroma cosine similarity {m['with_melody']:.3f} ± {m['with_melody_std']:.3f}"
              f" with the melody against {m['text_only']:.3f} ± {m['text_only_std']:.3f} text only "
              f"({m['samples']} held-out melodies)."]
  if "speed" in result:
    s = result["speed"]
    lines += ["", f"Speed: {s['decode_steps']} decode steps for {s['audio_seconds']:g} s of audio "
              f"({s['windows']} window{'s' if s['windows'] > 1 else ''}), {s['seconds']:.2f} s warm "
              f"at batch 1 on {s['device']} ({s['steps_per_second']} steps/s)."]
  for w in result.get("warnings", []):
    lines += ["", w]
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
  """One figure: CE per codebook, the Fréchet distances and the attribute rates of every set."""
  from musicgen_jax.eval import plots
  plots.evaluation_figure(result, path)
