"""Token streams for fine-tuning: a text or JSONL file, or the stdlib corpus.

Tokens are bytes by default (ids 0-255, any model with ``vocab_size >= 256``
takes them); a tokenizer (a callable ``str -> list[int]``, such as a Hugging
Face tokenizer's ``encode``) gives the checkpoint's own ids instead. Without a
file, the corpus is the running interpreter's standard library sources, read
and split by file exactly as the comparison reads them
(:func:`microadam_compare.data.stdlib_corpus`). Batches are
:func:`microadam_compare.data.lm_batch`: pure functions of ``(seed, step)``,
so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Optional

import numpy as np

from microadam_compare import data as compare_data

Tokenizer = Callable[[str], list]


@dataclasses.dataclass(frozen=True)
class TokenStreams:
  """Training and validation tokens.

  Attributes:
    train: 1-D integer token ids (``uint8`` for bytes, else ``int32``).
    val: 1-D held-out token ids.
    source: where they come from (for the log).
  """
  train: np.ndarray
  val: np.ndarray
  source: str


def _texts(path: str, text_field: str) -> list[str]:
  if not path.endswith((".jsonl", ".json")):
    with open(path, encoding="utf-8", errors="replace") as f:
      return [f.read()]
  texts = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      record = json.loads(line)
      if text_field not in record:
        raise ValueError(
            f"{path}:{lineno} has no field {text_field!r} (its fields: "
            f"{sorted(record)}); set text_field to the one holding the text.")
      texts.append(str(record[text_field]))
  if not texts:
    raise ValueError(f"{path} holds no records.")
  return texts


def encode(texts: list[str], tokenizer: Optional[Tokenizer] = None,
           separator_id: Optional[int] = None) -> np.ndarray:
  """One token stream of ``texts``: UTF-8 bytes joined by
  :data:`microadam_compare.data.FILE_SEPARATOR`, or the tokenizer's ids
  joined by ``separator_id`` (an end-of-sequence id) when given."""
  if tokenizer is None:
    joined = compare_data.FILE_SEPARATOR.join(t.encode("utf-8")
                                              for t in texts)
    return np.frombuffer(joined, np.uint8).copy()
  ids: list[int] = []
  for i, text in enumerate(texts):
    if i and separator_id is not None:
      ids.append(separator_id)
    ids.extend(int(t) for t in tokenizer(text))
  return np.asarray(ids, np.int32)


def load_tokens(path: Optional[str] = None, *, text_field: str = "text",
                tokenizer: Optional[Tokenizer] = None,
                separator_id: Optional[int] = None,
                val_percent: float = 5.0,
                max_files: Optional[int] = None) -> TokenStreams:
  """The training and validation tokens of a file or of the stdlib corpus.

  Args:
    path: a ``.jsonl`` file (one JSON object per line, its text under
      ``text_field``), any other text file, or ``None`` for the standard
      library's sources.
    text_field: the JSONL field holding the text.
    tokenizer: ``str -> ids``; ``None``: bytes.
    separator_id: the id placed between JSONL records (tokenizer only).
    val_percent: share held out for validation: the last tokens of a file,
      the hashed-out files of the stdlib corpus.
    max_files: read only this many stdlib files (smoke runs).

  Returns:
    A :class:`TokenStreams`.

  Examples:
    >>> from llama_finetune import data
    >>> streams = data.load_tokens(max_files=12)
    >>> streams.train.dtype, streams.val.size > 0
    (dtype('uint8'), True)
  """
  if not 0 < val_percent < 100:
    raise ValueError(f"val_percent must be in (0, 100), got {val_percent}.")
  if path is None:
    corpus = compare_data.stdlib_corpus(val_percent=max(val_percent, 10.0),
                                        max_files=max_files)
    if tokenizer is None:
      return TokenStreams(corpus.train, corpus.val,
                          f"stdlib sources ({corpus.root})")
    decode = lambda b: [b.tobytes().decode("utf-8", "replace")]
    return TokenStreams(encode(decode(corpus.train), tokenizer),
                        encode(decode(corpus.val), tokenizer),
                        f"stdlib sources ({corpus.root})")
  tokens = encode(_texts(path, text_field), tokenizer, separator_id)
  cut = int(round(tokens.size * (1 - val_percent / 100)))
  return TokenStreams(tokens[:cut], tokens[cut:], path)
