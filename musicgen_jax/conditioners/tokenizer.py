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


class TextTokenizer:
  """Strings -> padded int32 id / mask arrays. Build with `TextTokenizer.from_file(path or None)`."""

  def __init__(self, tokenizer=None, pad_id: int = PAD_ID):
    # `tokenizer` is a `tokenizers.Tokenizer` with its own padding and truncation turned off, or
    # None for the byte-level fallback.
    self._tok = tokenizer
    self.pad_id = int(pad_id)
    self._warned = False   # truncation is reported once per tokenizer, not at every batch

  @classmethod
  def from_file(cls, path: Union[str, os.PathLike, None] = None) -> "TextTokenizer":
    """Loads a tokenizer.json (the `tokenizers` format); None gives the byte-level fallback."""
    if path is None:
      return cls(None, PAD_ID)
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer file {path!r} not found; pass a tokenizer.json or None for the "
                       "byte-level tokenizer")
    import tokenizers  # Imported lazily: the byte-level fallback does not need it.
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:
      raise ValueError(f"cannot load tokenizer file {path!r}: {' '.join(str(e).split())}") from e
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

  def _encode_one(self, text: str, max_length: Optional[int]) -> tuple[list[int], bool]:
    """-> (ids including the end-of-sequence token(s), whether the text was truncated)."""
    if self._tok is None:
      content = [b + BYTE_OFFSET for b in text.encode("utf-8")]
      cut = max_length is not None and len(content) + 1 > max_length
      if cut:
        content = content[:max_length - 1]
      return content + [EOS_ID], cut
    enc = self._tok.encode(text, add_special_tokens=False)
    n_special = self._tok.num_special_tokens_to_add(False)
    cut = max_length is not None and len(enc.ids) + n_special > max_length
    if cut:
      enc.truncate(max(max_length - n_special, 0))
    ids = list(self._tok.post_process(enc, add_special_tokens=True).ids)
    return (ids[:max_length] if max_length else ids), cut

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
    n_cut = sum(cut for _, cut in encoded)
    if n_cut and not self._warned:
      self._warned = True
      first = next(t for t, (_, cut) in zip(texts, encoded) if cut)
      _log.warning("truncated %d of %d texts to max_length=%d tokens (e.g. %r); raise "
                   "config.text.max_length to keep whole prompts. Further truncations by this "
                   "tokenizer are not reported", n_cut, len(texts), max_length, first[:60])
    length = max_length if max_length is not None else max(max(len(ids) for ids, _ in encoded), 1)
    ids_bl = np.full((len(texts), length), self.pad_id, np.int32)
    mask_bl = np.zeros((len(texts), length), np.int32)
    for i, (ids, _) in enumerate(encoded):
      ids_bl[i, :len(ids)] = ids
      mask_bl[i, :len(ids)] = 1
    return {"input_ids": ids_bl, "attention_mask": mask_bl}
