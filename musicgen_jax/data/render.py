"""A parsed piece -> seeded performance choices -> MIDI (music21.midi) -> audio (FluidSynth CLI).

Choices per rendering: a General MIDI instrument (family drawn uniformly, then a program in it), a
tempo in beats of the piece's meter per minute, a transposition of -5..+6 semitones (every key
equally likely) plus whole octaves that bring the piece into the instrument's range, and a base
loudness. The MIDI file has one track, one channel per part (unisons between voices stay two notes)
and metrical accents (downbeats louder). FluidSynth renders it offline at the codec's rate; the
audio is mixed to mono, cut at `max_seconds` with a short fade, its silent tail trimmed and its peak
set to -1 dBFS.

The melody line is the skyline of the notes (the highest MIDI pitch sounding, -1 when none) sampled
at a fixed frame rate (default 50 Hz, the codec's): exact where a chroma of rendered audio would be
an estimate, one int16 per frame, and the argmax-chroma MusicGen conditions on is `pitch % 12`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import tempfile

import numpy as np

from musicgen_jax.data import manifest, scores

# (GM program 0-based, caption name, GM family, lowest, highest comfortable MIDI pitch)
INSTRUMENTS = (
    (0, "piano", "piano", 33, 96), (4, "electric piano", "piano", 36, 91),
    (6, "harpsichord", "piano", 41, 89),
    (11, "vibraphone", "chromatic percussion", 53, 89),
    (12, "marimba", "chromatic percussion", 45, 96),
    (8, "celesta", "chromatic percussion", 60, 108),
    (19, "church organ", "organ", 36, 96), (21, "accordion", "organ", 53, 89),
    (22, "harmonica", "organ", 60, 84),
    (24, "classical guitar", "guitar", 40, 83), (25, "acoustic guitar", "guitar", 40, 83),
    (26, "jazz guitar", "guitar", 40, 84), (27, "clean electric guitar", "guitar", 40, 86),
    (40, "violin", "strings", 55, 100), (41, "viola", "strings", 48, 88),
    (42, "cello", "strings", 36, 76),
    (46, "harp", "strings", 36, 96),
    (48, "string ensemble", "ensemble", 36, 96), (52, "choir", "ensemble", 41, 81),
    (56, "trumpet", "brass", 55, 84), (57, "trombone", "brass", 40, 72),
    (60, "French horn", "brass", 41, 77), (61, "brass section", "brass", 40, 84),
    (64, "soprano saxophone", "reed", 56, 87), (65, "alto saxophone", "reed", 49, 81),
    (68, "oboe", "reed", 58, 91), (70, "bassoon", "reed", 34, 72), (71, "clarinet", "reed", 50, 91),
    (72, "piccolo", "pipe", 74, 103), (73, "flute", "pipe", 60, 96),
    (74, "recorder", "pipe", 60, 91),
    (75, "pan flute", "pipe", 60, 91), (79, "ocarina", "pipe", 60, 86),
    (80, "square-wave synth lead", "synth lead", 48, 96),
    (81, "sawtooth synth lead", "synth lead", 48, 96),
    (89, "warm synth pad", "synth pad", 36, 90), (91, "choir-like synth pad", "synth pad", 36, 90),
    (105, "banjo", "ethnic", 48, 84), (104, "sitar", "ethnic", 48, 84),
    (107, "koto", "ethnic", 48, 91), (108, "kalimba", "ethnic", 55, 88),
    (109, "bagpipe", "ethnic", 55, 81), (110, "fiddle", "ethnic", 55, 100),
    (114, "steel drums", "percussive", 52, 88),
)
FAMILIES = tuple(dict.fromkeys(f for _, _, f, _, _ in INSTRUMENTS))
_BY_PROGRAM = {p: (name, fam, lo, hi) for p, name, fam, lo, hi in INSTRUMENTS}

# Tempo ranges in beats per minute, by the length of the meter's beat in quarter notes.
TEMPO_RANGES = {1.0: (56, 152), 1.5: (54, 126), 2.0: (48, 112)}
TRANSPOSE_RANGE = (-5, 6)
TAIL_SECONDS = 1.5        # rendered after the last note-off, for release and reverb
FADE_SECONDS = 0.5        # fade-out where a rendering is cut at max_seconds
TICKS_PER_QUARTER = 960

SOUNDFONTS = {  # name -> (path, Debian package)
    "timgm6mb": ("/usr/share/sounds/sf2/TimGM6mb.sf2", "timgm6mb-soundfont"),
    "fluidr3": ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "fluid-soundfont-gm"),
}


class RenderError(ValueError):
  """A rendering that failed (FluidSynth error, silent output); the message is the reason."""


@dataclasses.dataclass(frozen=True)
class Choices:
  """How one rendering performs a piece."""
  program: int          # General MIDI program, 0-based
  bpm: int              # beats of the meter per minute
  transpose: int        # semitones, in TRANSPOSE_RANGE: what the key moves by
  octaves: int          # whole octaves added to fit the instrument's range (the key does not move)
  velocity: int         # MIDI velocity of downbeats

  @property
  def instrument(self) -> str:
    return _BY_PROGRAM[self.program][0]

  @property
  def family(self) -> str:
    return _BY_PROGRAM[self.program][1]


def choose(piece: scores.Piece, rng: np.random.Generator) -> Choices:
  """Draws a rendering's choices for `piece` from `rng` (family, program, tempo, key, loudness)."""
  family = FAMILIES[int(rng.integers(len(FAMILIES)))]
  options = [i for i in INSTRUMENTS if i[2] == family]
  program, _, _, lo, hi = options[int(rng.integers(len(options)))]
  low_bpm, high_bpm = TEMPO_RANGES[piece.beat_q]
  bpm = int(rng.integers(low_bpm, high_bpm + 1))
  transpose = int(rng.integers(TRANSPOSE_RANGE[0], TRANSPOSE_RANGE[1] + 1))
  velocity = int(rng.integers(76, 111))
  pitches = piece.notes_nf[:, 2] + transpose
  # The octave shift that leaves the fewest notes outside the range, the smallest such shift.
  outside = [(np.sum((pitches + 12 * k < lo) | (pitches + 12 * k > hi)), abs(k), k)
             for k in range(-3, 4)]
  return Choices(program=int(program), bpm=bpm, transpose=transpose, octaves=min(outside)[2],
                 velocity=velocity)


def seconds_per_quarter(piece: scores.Piece, choices: Choices) -> float:
  return 60.0 / (choices.bpm * piece.beat_q)


def first_beat_seconds(piece: scores.Piece, choices: Choices) -> float | None:
  """Where the beat grid starts in a rendering: the time of the first beat at or after the first
  note (in [0, 60 / bpm)), or None when no note falls on a beat. The grid is continued from the
  first note that the score puts on a beat (metrical accent >= 0.5), so a pickup of an eighth
  before the barline of 4/4 gives an eighth's time. Meter changes later in the piece are not
  followed (the grid keeps the first meter's beat)."""
  on_beat = piece.notes_nf[piece.notes_nf[:, 4] >= 0.5, 0]
  if on_beat.size == 0:
    return None
  return float(on_beat[0] % piece.beat_q) * seconds_per_quarter(piece, choices)


def performed_notes(piece: scores.Piece, choices: Choices, max_seconds: float) -> np.ndarray:
  """-> float64 [N, 5] (onset s, duration s, MIDI pitch, part, accent) of the notes that start
  before `max_seconds`, transposed, shortened to end by `max_seconds`."""
  notes = piece.notes_nf.copy()
  spq = seconds_per_quarter(piece, choices)
  notes[:, 0:2] *= spq
  notes[:, 2] += choices.transpose + 12 * choices.octaves
  notes = notes[(notes[:, 0] < max_seconds) & (notes[:, 2] >= 0) & (notes[:, 2] <= 127)]
  notes[:, 1] = np.minimum(notes[:, 0] + notes[:, 1], max_seconds) - notes[:, 0]
  return notes


def midi_bytes(piece: scores.Piece, choices: Choices, max_seconds: float) -> bytes:
  """A Standard MIDI File (built with music21.midi) of the performed notes, tempo and meter."""
  from music21 import midi
  notes = performed_notes(piece, choices, max_seconds)
  spq = seconds_per_quarter(piece, choices)
  tick = lambda seconds: int(round(seconds / spq * TICKS_PER_QUARTER))  # noqa: E731
  channels = [c for c in range(16) if c != 9]  # channel 10 (index 9) is percussion in GM
  track = midi.MidiTrack(1)
  timed = []  # (tick, order, event); note-offs sort before note-ons at the same tick

  def event(kind, channel=0, **fields):
    e = midi.MidiEvent(track, type=kind, channel=channel + 1)
    for k, v in fields.items():
      setattr(e, k, v)
    return e

  usec = int(round(spq * 1e6))
  timed.append((0, 0, event(midi.MetaEvents.SET_TEMPO, data=usec.to_bytes(3, "big"))))
  if piece.meter and "/" in piece.meter:
    num, den = (int(x) for x in piece.meter.split("/")[:2])
    if 0 < num < 256 and den > 0 and den & (den - 1) == 0:
      data = bytes([num, den.bit_length() - 1, 24, 8])
      timed.append((0, 0, event(midi.MetaEvents.TIME_SIGNATURE, data=data)))
  parts = sorted({int(p) for p in notes[:, 3]})
  for part in parts:
    ch = channels[part % len(channels)]
    timed.append((0, 1, event(midi.ChannelVoiceMessages.PROGRAM_CHANGE, ch, data=choices.program)))
  for onset, dur, pitch, part, accent in notes:
    ch = channels[int(part) % len(channels)]
    vel = int(np.clip(round(choices.velocity * (0.7 + 0.3 * accent)), 1, 127))
    on, off = tick(onset), max(tick(onset + dur), tick(onset) + 1)
    note_on, note_off = midi.ChannelVoiceMessages.NOTE_ON, midi.ChannelVoiceMessages.NOTE_OFF
    timed.append((on, 3, event(note_on, ch, pitch=int(pitch), velocity=vel)))
    timed.append((off, 2, event(note_off, ch, pitch=int(pitch), velocity=0)))
  end = max(t for t, _, _ in timed) + tick(TAIL_SECONDS)
  timed.append((end, 4, event(midi.MetaEvents.END_OF_TRACK, data=b"")))
  timed.sort(key=lambda x: (x[0], x[1]))
  now = 0
  for t, _, e in timed:
    track.events.append(midi.DeltaTime(track, time=t - now))
    track.events.append(e)
    now = t
  mf = midi.MidiFile()
  mf.ticksPerQuarterNote = TICKS_PER_QUARTER
  mf.tracks.append(track)
  return mf.writestr()


def find_fluidsynth() -> str:
  """The fluidsynth executable on PATH, or ValueError naming the Debian package to install."""
  path = shutil.which("fluidsynth")
  if path is None:
    raise ValueError("fluidsynth not found on PATH: install the Debian package `fluidsynth` "
                     "(apt-get install -y --no-install-recommends fluidsynth)")
  return path


def find_soundfont(soundfont: str) -> str:
  """A SoundFont path from a SOUNDFONTS name or a path; ValueError naming the package if absent."""
  path, package = SOUNDFONTS.get(soundfont, (soundfont, None))
  if not os.path.isfile(path):
    if package:
      raise ValueError(f"SoundFont {path} not found: install the Debian package `{package}` "
                       f"(apt-get install -y --no-install-recommends {package})")
    raise ValueError(f"SoundFont {path!r} not found: pass a .sf2 file or one of "
                     f"{sorted(SOUNDFONTS)}")
  return path


def synthesize(midi: bytes, soundfont_path: str, sample_rate: int, fluidsynth: str = "fluidsynth"
               ) -> np.ndarray:
  """Renders MIDI bytes offline with the FluidSynth CLI -> float32 [N] mono (mean of L and R)."""
  with tempfile.TemporaryDirectory(prefix="corpus_render_") as tmp:
    mid, raw = os.path.join(tmp, "in.mid"), os.path.join(tmp, "out.raw")
    with open(mid, "wb") as f:
      f.write(midi)
    cmd = [fluidsynth, "-n", "-i", "-q", "-g", "0.5", "-r", str(sample_rate),
           "-o", "synth.cpu-cores=1", "-T", "raw", "-O", "float", "-E", "little", "-F", raw,
           soundfont_path, mid]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not os.path.exists(raw):
      tail = " ".join((proc.stderr or proc.stdout or "").split())[-200:]
      raise RenderError(f"fluidsynth failed (exit {proc.returncode}): {tail}")
    stereo = np.fromfile(raw, dtype="<f4")
  return stereo[: stereo.size // 2 * 2].reshape(-1, 2).mean(axis=1).astype(np.float32)


def finish(audio_n: np.ndarray, sample_rate: int, max_seconds: float, silence_db: float = -60.0
           ) -> np.ndarray:
  """Cut at max_seconds with a fade-out, trim the silent tail, peak at -1 dBFS -> int16 [N]."""
  limit = int(round(max_seconds * sample_rate))
  audio_n = np.asarray(audio_n, np.float64)
  if audio_n.size > limit:
    audio_n = audio_n[:limit].copy()
    fade = min(limit, int(FADE_SECONDS * sample_rate))
    audio_n[limit - fade:] *= np.linspace(1.0, 0.0, fade)
  peak = float(np.max(np.abs(audio_n))) if audio_n.size else 0.0
  if peak < 1e-6:
    raise RenderError("silent rendering")
  loud = np.flatnonzero(np.abs(audio_n) > peak * 10 ** (silence_db / 20))
  audio_n = audio_n[: loud[-1] + 1] * (10 ** (-1 / 20) / peak)
  return manifest.to_int16(audio_n)


def melody_line(notes: np.ndarray, num_frames: int, frame_rate: float) -> np.ndarray:
  """Skyline of performed notes [N, >=3] (onset s, duration s, pitch) -> int16 [num_frames]: the
  highest pitch sounding at each frame's start, -1 where nothing sounds."""
  line_t = np.full(num_frames, -1, np.int16)
  for onset, dur, pitch in notes[:, :3]:
    a = max(int(math.ceil(onset * frame_rate - 1e-9)), 0)
    b = min(int(math.ceil((onset + dur) * frame_rate - 1e-9)), num_frames)
    if b > a:
      np.maximum(line_t[a:b], int(pitch), out=line_t[a:b])
  return line_t


@dataclasses.dataclass(frozen=True)
class Rendering:
  audio_n: np.ndarray     # int16 [N] mono at sample_rate
  melody_t: np.ndarray    # int16 [ceil(N * frame_rate / sample_rate)] skyline MIDI pitch, -1 = none
  tonic_pc: int           # the performed key's tonic (the piece's, transposed)
  midi: bytes


def render(piece: scores.Piece, choices: Choices, *, soundfont_path: str, sample_rate: int = 32000,
           max_seconds: float = 30.0, frame_rate: float = 50.0, fluidsynth: str = "fluidsynth"
           ) -> Rendering:
  """Performs `piece` with `choices`: MIDI, FluidSynth, finishing and the melody line."""
  midi = midi_bytes(piece, choices, max_seconds)
  raw_n = synthesize(midi, soundfont_path, sample_rate, fluidsynth)
  audio_n = finish(raw_n, sample_rate, max_seconds)
  frames = int(math.ceil(audio_n.size * frame_rate / sample_rate))
  melody_t = melody_line(performed_notes(piece, choices, max_seconds), frames, frame_rate)
  return Rendering(audio_n=audio_n, melody_t=melody_t,
                   tonic_pc=(piece.tonic_pc + choices.transpose) % 12, midi=midi)
