"""The scores inside the `music21` package's corpus, as note lists with their ground truth.

`list_pieces` enumerates pieces without parsing them: one per score file, and one per tune (`X:`
number) in ABC files that hold many (the Essen folk songs, O'Neill's, Aird's, ...). `load_piece`
parses one piece with music21 (never through music21's pickle cache), expands repeats, merges ties
and returns its notes (onset and duration in quarter notes, MIDI pitch, part, metrical accent), its
meter and beat, and its key:

- the score's own key, key_source "score": an ABC `K:` that names a mode (`K:Em`, `K:Ador`), or a
  MusicXML / Humdrum key that is minor or whose tonic is the final (editors write "major" by
  default, so a major key that does not end the piece is not trusted);
- else an ABC `K:` without a mode (Essen's `K:` names the tonic only), key_source "tonic+third";
- else the final note of the lowest voice, key_source "final+third";
in both latter cases with the mode from the third above the tonic: major when the major third sounds
longer than the minor third, else minor. The Bach chorales' stated keys end on their tonic in 51 of
the first 60 files; Palestrina's modal masses get their final as tonic, the modal theory's own rule.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from typing import Iterable

import numpy as np

# Collections that are not music to learn from, and file kinds that are not scores.
EXCLUDED_COLLECTIONS = {"demos": "notation test files", "theoryExercises": "theory exercises"}
EXCLUDED_SUFFIXES = {".rntxt": "roman-numeral analyses, not scores"}

PITCH_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MINOR_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")
MAJOR_MODES = ("major", "ionian", "lydian", "mixolydian")
MINOR_MODES = ("minor", "aeolian", "dorian", "phrygian", "locrian")

NOTE_FIELDS = ("onset_q", "duration_q", "pitch", "part", "accent")  # columns of Piece.notes_nf


class PieceError(ValueError):
  """A piece that cannot be parsed or has nothing to render; the message is the reason."""


@dataclasses.dataclass(frozen=True, order=True)
class PieceRef:
  """Where a piece lives: `path` under the corpus root, `number` its ABC `X:` (None: the file)."""
  path: str
  number: int | None = None
  fields: tuple = ()           # ABC header fields ((letter, text), ...) read while listing, else ()

  @property
  def collection(self) -> str:
    return self.path.split("/")[0]

  @property
  def piece_id(self) -> str:
    return self.path if self.number is None else f"{self.path}#{self.number}"

  def field(self, letter: str) -> str:
    return next((v for k, v in self.fields if k == letter), "")


@dataclasses.dataclass(frozen=True)
class Piece:
  """One parsed piece. notes_nf: float64 [N, 5] with columns NOTE_FIELDS, sorted by onset."""
  ref: PieceRef
  title: str
  composer: str
  notes_nf: np.ndarray
  meter: str                   # "6/8"; "" when the score has none
  beat_q: float                # the meter's beat in quarters: 1, 1.5 (6/8) or 2 (2/2); see _beat
  tonic_pc: int                # 0 = C
  mode: str                    # "major", "minor", "dorian", ...
  key_source: str              # "score" | "tonic+third" | "final+third"
  num_parts: int

  @property
  def mode_family(self) -> str:
    return mode_family(self.mode)


def mode_family(mode: str) -> str:
  """'major' or 'minor': the major/minor key that a church mode's third belongs to."""
  return "major" if mode in MAJOR_MODES else "minor"


def tonic_name(pc: int, mode: str) -> str:
  """The usual spelling of a key's tonic: flats for F, Bb, Eb major, sharps for F#, C#, G# minor."""
  return (PITCH_NAMES if mode_family(mode) == "major" else MINOR_NAMES)[pc % 12]


def corpus_root() -> str:
  import music21
  return os.fspath(music21.common.getCorpusFilePath())


def _abc_tunes(text: str) -> list[tuple[int, tuple]]:
  """(X: number, header fields) of each tune in an ABC file, first occurrence of each number."""
  tunes, seen, current = [], set(), None
  for line in text.splitlines():
    m = re.match(r"^([A-Za-z]):\s*(.*?)\s*$", line)
    if m and m.group(1) == "X":
      num = re.match(r"\d+", m.group(2))
      current = None
      if num and int(num.group()) not in seen:
        seen.add(int(num.group()))
        current = [int(num.group()), []]
        tunes.append(current)
    elif m and current is not None and m.group(1) in "TRONMKB" and len(current[1]) < 16:
      current[1].append((m.group(1), m.group(2)))
  return [(n, tuple(f)) for n, f in tunes]


def collection_names() -> list[str]:
  """The music21 corpus's collections (top directories), excluded ones included, sorted."""
  from music21 import corpus
  root = corpus_root()
  return sorted({os.path.relpath(os.fspath(p), root).replace(os.sep, "/").split("/")[0]
                 for p in corpus.getCorePaths()})


def list_pieces(names: Iterable[str] | None = None
                ) -> tuple[dict[str, list[PieceRef]], collections.Counter]:
  """Pieces of the corpus by collection (directory), sorted; and the excluded files by reason."""
  from music21 import corpus
  root = corpus_root()
  wanted = None if names is None else set(names)
  pieces: dict[str, list[PieceRef]] = {}
  excluded: collections.Counter = collections.Counter()
  for path in sorted(os.path.relpath(os.fspath(p), root).replace(os.sep, "/")
                     for p in corpus.getCorePaths()):
    name = path.split("/")[0]
    if wanted is not None and name not in wanted:
      continue
    suffix = os.path.splitext(path)[1].lower()
    reason = EXCLUDED_COLLECTIONS.get(name) or EXCLUDED_SUFFIXES.get(suffix)
    if reason:
      excluded[f"{name}: {reason}"] += 1
      continue
    refs = pieces.setdefault(name, [])
    if suffix == ".abc":
      with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
        tunes = _abc_tunes(f.read())
      refs.extend(PieceRef(path, n if len(tunes) > 1 else None, fields) for n, fields in tunes)
      if not tunes:  # no `X:` line: the file is one tune
        refs.append(PieceRef(path))
    else:
      refs.append(PieceRef(path))
  if wanted and wanted - set(pieces):
    raise ValueError(f"no pieces in music21 corpus collection(s) {sorted(wanted - set(pieces))}: "
                     f"choose from {collection_names()}")
  return pieces, excluded


def _parse(ref: PieceRef):
  from music21 import converter, stream
  path = os.path.join(corpus_root(), ref.path)
  kwargs = {} if ref.number is None else {"number": ref.number}
  try:
    score = converter.parse(path, forceSource=True, **kwargs)
  except Exception as e:  # music21 raises many kinds of errors on files it cannot read.
    raise PieceError(f"cannot parse: {type(e).__name__}") from e
  if isinstance(score, stream.Opus):
    scores = list(score.scores)
    if not scores:
      raise PieceError("empty opus")
    score = scores[0]
  if not isinstance(score, stream.Score):
    wrapped = stream.Score()
    wrapped.insert(0, score)
    score = wrapped
  return score


def _beat(beat_q: float) -> float:
  """The meter's beat (music21's beatDuration) as a quarter, dotted quarter or half note: the
  nearest of the three (in ratio) for the rare meters with other beats (3/1, 6/4, 2/8)."""
  return min((1.0, 1.5, 2.0), key=lambda b: abs(math.log(beat_q / b)))


def _accent(position_q: float, beat_q: float) -> float:
  """Metrical accent of an onset `position_q` quarter notes after its barline: 1 on the downbeat,
  0.5 on other beats, 0.25 on half beats, 0.125 elsewhere."""
  pos = position_q / beat_q
  if abs(pos) < 1e-6:
    return 1.0
  if abs(pos - round(pos)) < 1e-6:
    return 0.5
  if abs(2 * pos - round(2 * pos)) < 1e-6:
    return 0.25
  return 0.125


def _notes(score) -> tuple[np.ndarray, int, str, float]:
  """-> (notes_nf, num_parts, meter, beat_q) of a parsed score."""
  from music21 import harmony, stream
  parts = list(score.parts) or [score]
  rows = []
  meter, beat_q = "", 1.0
  for part_i, part in enumerate(parts):
    measures = list(part.getElementsByClass(stream.Measure))
    if not measures:  # A part with no measures: accents from the offset alone.
      measures = [part]
    ts = None
    for m in measures:
      ts = getattr(m, "timeSignature", None) or ts
      if part_i == 0 and ts is not None and not meter:
        meter, beat_q = ts.ratioString, _beat(float(ts.beatDuration.quarterLength))
      m_beat = float(ts.beatDuration.quarterLength) if ts is not None else 1.0
      m_offset = float(m.offset) if m is not part else 0.0
      pad = float(getattr(m, "paddingLeft", 0.0) or 0.0)
      for n in m.flatten().notes:
        if isinstance(n, harmony.ChordSymbol):
          continue
        dur = float(n.duration.quarterLength)
        if dur <= 0:  # Grace notes have no written duration.
          continue
        onset = m_offset + float(n.offset)
        accent = _accent(float(n.offset) + pad, m_beat)
        for p in getattr(n, "pitches", ()):  # unpitched percussion has none
          rows.append((onset, dur, float(p.midi), part_i, accent))
  if not rows:
    raise PieceError("no pitched notes")
  notes_nf = np.array(rows, np.float64)
  notes_nf = notes_nf[np.lexsort((notes_nf[:, 2], notes_nf[:, 0]))]
  notes_nf[:, 0] -= notes_nf[0, 0]   # Start at the first note, not at leading rests.
  return notes_nf, len(parts), meter, beat_q


def _third_mode(notes_nf: np.ndarray, tonic_pc: int) -> str:
  pcs = notes_nf[:, 2].astype(int) % 12
  major = notes_nf[pcs == (tonic_pc + 4) % 12, 1].sum()
  minor = notes_nf[pcs == (tonic_pc + 3) % 12, 1].sum()
  return "major" if major > minor else "minor"


def _key(score, ref: PieceRef, notes_nf: np.ndarray) -> tuple[int, str, str]:
  """-> (tonic_pc, mode, key_source) from the whole written score; see the module docstring."""
  from music21 import key
  stated = next(iter(score.recurse().getElementsByClass(key.KeySignature)), None)
  end = notes_nf[:, 0] + notes_nf[:, 1]
  final_pc = int(notes_nf[end >= end.max() - 1e-6, 2].min()) % 12
  if isinstance(stated, key.Key):
    tonic = int(stated.tonic.pitchClass)
    mode = stated.mode if stated.mode in MAJOR_MODES + MINOR_MODES else "major"
    if ref.path.endswith(".abc"):
      if re.match(r"^[A-Ga-g][#b]?\s*(m|min|maj|dor|mix|phr|lyd|loc|aeo|ion)", ref.field("K")):
        return tonic, mode, "score"
      return tonic, _third_mode(notes_nf, tonic), "tonic+third"
    if mode != "major" or tonic == final_pc:
      return tonic, mode, "score"
  return final_pc, _third_mode(notes_nf, final_pc), "final+third"


def _truncate(score, max_quarters: float) -> None:
  """Drops the measures that start at or after `max_quarters` (in place). Expanded repeats only
  revisit earlier music, so the first `max_quarters` of the performance survive."""
  from music21 import stream
  for part in score.parts:
    late = [m for m in part.getElementsByClass(stream.Measure) if float(m.offset) >= max_quarters]
    if late:
      part.remove(late)


def load_piece(ref: PieceRef, max_quarters: float | None = None) -> Piece:
  """Parses one piece; with `max_quarters`, only the first `max_quarters` quarter notes of its
  performance (repeats expanded) are kept, which bounds the time spent on long scores. The key is
  read from the whole score. Raises PieceError with the reason when the piece cannot be used."""
  score = _parse(ref)
  written_nf, num_parts, meter, beat_q = _notes(score)
  tonic_pc, mode, source = _key(score, ref, written_nf)
  if max_quarters is not None:
    _truncate(score, max_quarters)
  try:
    score = score.expandRepeats()
  except Exception:  # Inconsistent repeat marks: keep the score as written.
    pass
  try:
    score.stripTies(inPlace=True)
  except Exception as e:
    raise PieceError(f"cannot merge ties: {type(e).__name__}") from e
  notes_nf = _notes(score)[0]
  if max_quarters is not None:
    notes_nf = notes_nf[notes_nf[:, 0] < max_quarters]
  md = score.metadata
  title = (ref.field("T") or (md.title if md is not None else "") or
           (md.movementName if md is not None else "") or os.path.basename(ref.path))
  composer = (md.composer if md is not None else None) or ""
  return Piece(ref=ref, title=str(title), composer=str(composer), notes_nf=notes_nf, meter=meter,
               beat_q=beat_q, tonic_pc=tonic_pc, mode=mode, key_source=source, num_parts=num_parts)
