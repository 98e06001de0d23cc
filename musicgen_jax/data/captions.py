"""Captions for rendered corpus pieces: what the piece is (from its collection and metadata) and how
this rendering performs it (instrument, key, tempo, meter), in phrasings drawn from a seeded rng.

Every attribute a caption names is the ground truth of that rendering; a caption may leave out the
key, the tempo or the meter (never the instrument), so a model also sees prompts that do not name
them.
"""
from __future__ import annotations

import re

import numpy as np

from musicgen_jax.data import render, scores

# Essen `O:` (origin) keywords -> adjective, first match wins.
_ORIGINS = (("China", "Chinese"), ("Taiwan", "Chinese"), ("Luxemburg", "Luxembourgish"),
            ("Lothringen", "Lorraine"), ("Elsass", "Alsatian"), ("Irland", "Irish"),
            ("Oesterreich", "Austrian"), ("Schweiz", "Swiss"), ("Niederlande", "Dutch"),
            ("Ungarn", "Hungarian"), ("Polen", "Polish"), ("Jugoslawien", "Gottschee"),
            ("Deutschland", "German"))
_COMPOSERS = {
    "beethoven": "Beethoven", "mozart": "Mozart", "haydn": "Haydn", "chopin": "Chopin",
    "schumann_robert": "Robert Schumann", "schumann_clara": "Clara Schumann",
    "cpebach": "C. P. E. Bach", "handel": "Handel", "corelli": "Corelli", "weber": "Weber",
    "schubert": "Schubert", "verdi": "Verdi", "webern": "Webern", "schoenberg": "Schoenberg",
    "joplin": "Scott Joplin", "beach": "Amy Beach", "johnson_j_r": "J. Rosamond Johnson",
    "liliuokalani": "Liliuokalani", "josquin": "Josquin des Prez", "luca": "Luca Marenzio",
    "lusitano": "Vicente Lusitano", "ciconia": "Johannes Ciconia"}
_QUARTETS = ("beethoven", "mozart", "haydn")
_DANCES = ("slip jig", "jig", "reel", "hornpipe", "strathspey", "highland fling", "fling",
           "clog", "polka", "waltz", "march", "walkaround", "slide", "set dance", "schottische",
           "quickstep")
_MASS = {"kyrie": "Kyrie", "gloria": "Gloria", "credo": "Credo", "sanctus": "Sanctus",
         "benedictus": "Benedictus", "agnus": "Agnus Dei"}
_GROUPS = ("string ensemble", "choir", "brass section")   # not "solo"


def _dance(piece: scores.Piece) -> str:
  """The dance type named by an ABC R: field or the title ('reel', 'jig', ...), else ''."""
  text = f"{piece.ref.field('R')} {piece.title}".lower().replace("slipjig", "slip jig")
  return next((d for d in _DANCES if re.search(rf"\b{d}s?\b", text)), "")


def article(phrase: str) -> str:
  return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def describe(piece: scores.Piece, rng: np.random.Generator) -> str:
  """A noun phrase for the piece with its article: 'a Bach chorale', 'an Irish reel', ..."""
  c = piece.ref.collection
  pick = lambda *options: options[int(rng.integers(len(options)))]  # noqa: E731
  dance = _dance(piece)
  if c == "bach":
    if piece.num_parts == 4:
      return pick("a Bach chorale", "a chorale by J. S. Bach",
                  "a four-part chorale harmonized by Bach")
    return pick("a piece by J. S. Bach", "a Baroque piece by Bach")
  if c == "essenFolksong":
    origin = next((adj for key, adj in _ORIGINS if key in piece.ref.field("O")), "European")
    return pick(f"{article(origin)} folk song", f"a traditional {origin} song",
                f"{article(origin)} folk melody")
  if c in ("ryansMammoth", "oneills1850", "airdsAirs", "nottingham-dataset", "miscFolk"):
    where = {"oneills1850": "Irish", "airdsAirs": "Scottish",
             "nottingham-dataset": "English"}.get(c, "")
    if c == "miscFolk":
      where = "Northumbrian" if "northumbrian" in piece.ref.path else "American"
    kind = dance or ("air" if c == "airdsAirs" else "tune")
    player = ("fiddle " if c in ("ryansMammoth", "oneills1850") else
              "fife " if "fife" in piece.ref.path else "")
    return pick(article(f"{where} {kind}".strip()), article(f"traditional {kind}"),
                article(f"{where} {player}{kind}".strip()),
                article(f"{where} folk {kind}".strip()))
  if c == "palestrina":
    part = next((name for key, name in _MASS.items() if key in piece.ref.path.lower()), "")
    if part:
      return pick(f"a {part} by Palestrina", f"a Renaissance {part} by Palestrina",
                  f"the {part} of a Palestrina mass")
    return pick("a Renaissance mass movement by Palestrina", "a Palestrina motet")
  if c == "trecento":
    return pick("a fourteenth-century Italian piece", "a trecento song", "a medieval Italian piece")
  if c == "monteverdi":
    return pick("a Monteverdi madrigal", "an Italian madrigal by Monteverdi")
  if c == "leadSheet":
    return pick("an American popular song", "a song melody from an old lead sheet")
  name = _COMPOSERS.get(c, c.replace("_", " ").title())
  if c in _QUARTETS and piece.num_parts == 4:
    return pick(f"a string quartet movement by {name}", f"a movement of a {name} string quartet")
  if c == "joplin":
    return pick("a ragtime piece by Scott Joplin", "a Scott Joplin rag")
  return pick(f"a piece by {name}", f"a composition by {name}")


def long_spelling(tonic: str) -> str:
  """A tonic's spelled-out form: 'F#' -> 'F-sharp', 'Bb' -> 'B-flat', 'G' -> 'G'."""
  return tonic[0] + ("-sharp" if tonic[1] == "#" else "-flat") if len(tonic) == 2 else tonic


def key_phrase(tonic_pc: int, mode: str, rng: np.random.Generator) -> str:
  """'G major', 'F-sharp minor' or 'F# minor', 'A dorian' (spelling drawn from rng)."""
  name = scores.tonic_name(tonic_pc, mode)
  if len(name) == 2 and rng.random() < 0.5:
    name = long_spelling(name)
  return f"{name} {mode}"


def tempo_word(bpm: float) -> str:
  return "slow" if bpm < 72 else "moderate" if bpm < 100 else "lively" if bpm < 126 else "fast"


def caption(piece: scores.Piece, choices: render.Choices, tonic_pc: int,
            rng: np.random.Generator) -> str:
  """The caption of one rendering (see the module docstring)."""
  pick = lambda *options: options[int(rng.integers(len(options)))]  # noqa: E731
  what, inst = describe(piece, rng), choices.instrument
  key = key_phrase(tonic_pc, piece.mode, rng) if rng.random() < 0.85 else ""
  tempo_kind = pick("number", "word", "both", "NUMBER") if rng.random() < 0.85 else ""
  word, bpm = tempo_word(choices.bpm), choices.bpm
  tempo = {"number": f"{bpm} bpm", "word": word, "both": f"{word}, {bpm} bpm",
           "NUMBER": f"{bpm} BPM", "": ""}[tempo_kind]
  meter = pick(piece.meter, f"in {piece.meter} time") if piece.meter and rng.random() < 0.5 else ""
  in_key = f" in {key}" if key else ""
  tail = "".join(f", {x}" for x in (tempo, meter) if x)
  form = int(rng.integers(5))
  if form == 0:
    if tempo_kind == "number":  # "... played by a string ensemble at 72 bpm"
      tail = f" at {tempo}" + (f", {meter}" if meter else "")
    return f"{what}{in_key} played by {article(inst)}{tail}"
  if form == 1:
    return f"{what}{in_key} on {inst}{tail}"
  if form == 2:
    return f"{article(inst)} plays {what}{in_key}{tail}"
  if form == 3:
    return ", ".join(x for x in (what, inst, key, tempo, meter) if x)
  return f"{'' if inst in _GROUPS else 'solo '}{inst}: {what}{in_key}{tail}"
