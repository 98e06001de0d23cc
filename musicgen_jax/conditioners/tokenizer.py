"""Text tokenizer: a `tokenizers` tokenizer.json (e.g. T5's) or a byte-level fallback.

The byte-level fallback needs no file: ids are the UTF-8 bytes shifted by 3, after the special ids
pad = 0, eos = 1, unk = 2 (T5's layout), and every sequence ends with eos. Its vocabulary has 259 ids.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, Union

import numpy as np

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
BYTE_OFFSET = 3
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET

_log = logging.getLogger(__name__)

_PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>")


def read_tokenizer_file(path: Union[str, os.PathLike]):
  """The `tokenizers.Tokenizer` of a tokenizer.json; ValueError (one line, naming the file) when it
  is missing or does not parse."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"tokenizer file {path!r} not found; pass a tokenizer.json or None for the "
                     "byte-level tokenizer")
  import tokenizers  # Imported lazily: the byte-level fallback does not need it.
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception for a bad file
    raise ValueError(f"cannot load tokenizer file {path!r} (damaged, or not a `tokenizers` "
                     f"tokenizer.json?): {' '.join(str(e).split())}") from None


class TextTokenizer:
  """Strings -> padded int32 id / mask arrays. Build with `TextTokenizer.from_file(path or None)`."""

  def __init__(self, tokenizer=None, pad_id: int = PAD_ID):
    # `tokenizer` is a `tokenizers.Tokenizer` with its own padding and truncation turned off, or
    # None for the byte-level fallback.
    self._tok = tokenizer
    self.pad_id = int(pad_id)
    self._warned = False   # truncation is reported once per tokenizer, not at every batch
    self._warned_unknown = False   # so are words outside the vocabulary
    self._unk_id = None
    if tokenizer is not None:
      unk = getattr(tokenizer.model, "unk_token", None) or "<unk>"
      self._unk_id = tokenizer.token_to_id(unk)

  @classmethod
  def from_file(cls, path: Union[str, os.PathLike, None] = None) -> "TextTokenizer":
    """Loads a tokenizer.json (the `tokenizers` format); None gives the byte-level fallback."""
    if path is None:
      return cls(None, PAD_ID)
    tok = read_tokenizer_file(path)
    pad_id = None
    if tok.padding is not None:
      pad_id = tok.padding.get("pad_id")
    for name in _PAD_TOKENS:
      if pad_id is None:
        pad_id = tok.token_to_id(name)
    tok.no_padding()
    tok.no_truncation()
    return cls(tok, PAD_ID if pad_id is None else pad_id)

  @property
  def vocab_size(self) -> int:
    if self._tok is None:
      return BYTE_VOCAB_SIZE
    return int(self._tok.get_vocab_size(with_added_tokens=True))

  def _encode_one(self, text: str, max_length: Optional[int]) -> tuple[list[int], bool, list[str]]:
    """-> (ids including the end-of-sequence token(s), whether the text was truncated, the words
    read as the unknown token)."""
    if self._tok is None:
      content = [b + BYTE_OFFSET for b in text.encode("utf-8")]
      cut = max_length is not None and len(content) + 1 > max_length
      if cut:
        content = content[:max_length - 1]
      return content + [EOS_ID], cut, []
    enc = self._tok.encode(text, add_special_tokens=False)
    unknown = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == self._unk_id]
    n_special = self._tok.num_special_tokens_to_add(False)
    cut = max_length is not None and len(enc.ids) + n_special > max_length
    if cut:
      enc.truncate(max(max_length - n_special, 0))
    ids = list(self._tok.post_process(enc, add_special_tokens=True).ids)
    return (ids[:max_length] if max_length else ids), cut, unknown

  def __call__(self, texts: Union[str, Sequence[str]],
               max_length: Optional[int] = None) -> dict[str, np.ndarray]:
    """Tokenizes a batch of strings.

    Returns {'input_ids': int32 [B, L], 'attention_mask': int32 [B, L]} (mask 1 = real token), padded
    with `pad_id` on the right to the longest sequence, or to exactly `max_length` when given (longer
    texts are truncated, keeping the end-of-sequence token, with a logged warning).
    """
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    if not texts:
      raise ValueError("cannot tokenize an empty batch of texts; pass at least one string")
    for t in texts:
      if not isinstance(t, str):
        raise ValueError(f"texts must be strings, got {type(t).__name__}")
    if max_length is not None and int(max_length) < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    encoded = [self._encode_one(t, max_length) for t in texts]
    n_cut = sum(cut for _, cut, _ in encoded)
    if n_cut and not self._warned:
      self._warned = True
      first = next(t for t, (_, cut, _) in zip(texts, encoded) if cut)
      _log.warning("truncated %d of %d texts to max_length=%d tokens (e.g. %r); raise "
                   "config.text.max_length to keep whole prompts. Further truncations by this "
                   "tokenizer are not reported", n_cut, len(texts), max_length, first[:60])
    unknown = list(dict.fromkeys(w for _, _, words in encoded for w in words))
    if unknown and not self._warned_unknown:
      self._warned_unknown = True
      shown = ", ".join(repr(w) for w in unknown[:12]) + (", ..." if len(unknown) > 12 else "")
      _log.warning("%d word(s) of the text are not in the text encoder's vocabulary of %d and are "
                   "read as unknown: %s. Further unknown words are not reported", len(unknown),
                   self.vocab_size, shown)
    length = max_length if max_length is not None else max(max(len(ids) for ids, _, _ in encoded), 1)
    ids_bl = np.full((len(texts), length), self.pad_id, np.int32)
    mask_bl = np.zeros((len(texts), length), np.int32)
    for i, (ids, _, _) in enumerate(encoded):
      ids_bl[i, :len(ids)] = ids
      mask_bl[i, :len(ids)] = 1
    return {"input_ids": ids_bl, "attention_mask": mask_bl}


SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")   # ids 0, 1, 2: the byte-level fallback's (T5's) layout


def fit_word_tokenizer(texts: Sequence[str], path: Union[str, os.PathLike],
                       min_count: int = 1) -> TextTokenizer:
  """Fits a word-level tokenizer.json on `texts` (a training split's captions) and writes it to `path`.

  Words are split at white space and punctuation ('F-sharp' -> 'F', '-', 'sharp'; '6/8' -> '6',
  '/', '8'), case kept ('A major' is not 'a'); words seen fewer than `min_count` times, and any
  word at sampling time that the captions never held, become <unk>; every sequence ends with </s>.
  A small model learning its text encoder from a few thousand captions reads whole words far
  more easily than bytes (models/demo/TRAINING.md). -> the tokenizer, as from_file(path) loads it.
  """
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
  texts = [t for t in texts if isinstance(t, str) and t.strip()]
  if not texts:
    raise ValueError("cannot fit a word tokenizer on no texts: the split holds no captions")
  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                               pre_tokenizers.Punctuation()])
  tok.train_from_iterator(texts, trainers.WordLevelTrainer(
      special_tokens=list(SPECIAL_TOKENS), min_frequency=int(min_count), show_progress=False))
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
  assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, EOS_ID, UNK_ID]
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tok.save(path)
  return TextTokenizer.from_file(path)
