"""Calibration and evaluation data: text sources -> token documents -> fixed-length samples, with a fingerprint.

Sources:
  * a text file: one token stream, cut into consecutive samples of `length` tokens;
  * a folder of `.txt` files (sorted by name) or a `.jsonl` file with a "text" field: one document per file/line;
  * a Hugging Face dataset name, when `datasets` is installed and the hub (or its cache) is reachable.
Documents are taken in order. A document shorter than a sample is skipped (`short="skip"`, the reference protocol)
or concatenated with the following documents, separated by EOS (`short="concat"`).

Tokenizers: `transformers.AutoTokenizer` from the model directory, a hub id or a path (`--tokenizer`), or
"bytes": a built-in UTF-8 byte tokenizer (ids 0-255, no BOS) for tiny test models with vocab_size >= 256.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator

import numpy as np

SHORT_POLICIES = ("skip", "concat")
_STREAM_BLOCK_CHARS = 1 << 20  # tokenize a large text file in ~1 MB blocks cut at line ends


class DataError(ValueError):
  """The data cannot give the samples asked for; the message says what was found and what to change."""


class ByteTokenizer:
  """UTF-8 bytes as token ids 0-255. No special tokens: the first token of a sample is not scored."""

  name_or_path = "bytes"
  bos_token_id = None
  eos_token_id = None
  vocab_size = 256

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    del add_special_tokens
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_tokenizer(spec: str | None, model_dir: str | os.PathLike | None = None):
  """The tokenizer named by `spec` ("bytes", a directory or a hub id), else the one saved with the model."""
  if spec == "bytes":
    return ByteTokenizer()
  from transformers import AutoTokenizer  # noqa: PLC0415

  source = spec if spec is not None else model_dir
  if source is None:
    raise DataError("no tokenizer: pass --tokenizer (a directory, a hub id, or 'bytes')")
  advice = (
    "Pass --tokenizer with a directory or hub id (e.g. EleutherAI/gpt-neox-20b), or --tokenizer bytes for "
    "byte-level tiny models"
  )
  hint = "" if spec is not None else " (the model directory has no tokenizer files)"
  try:
    tok = AutoTokenizer.from_pretrained(str(source))
  except Exception as e:  # transformers raises OSError, ValueError or others depending on what is missing
    raise DataError(
      f"could not load a tokenizer from {source}{hint}: {e.__class__.__name__}: {str(e).splitlines()[0]}. {advice}"
    ) from e
  # transformers may build an empty tokenizer from a config.json alone; it would turn every text into nothing.
  if not _encode(tok, "The quick brown fox jumps over the lazy dog."):
    raise DataError(f"the tokenizer loaded from {source}{hint} produces no tokens. {advice}")
  return tok


def bos_id(tokenizer) -> int | None:
  """The id to put before each sample: BOS, else EOS (GPT-NeoX's <|endoftext|> is both), else none."""
  for name in ("bos_token_id", "eos_token_id"):
    i = getattr(tokenizer, name, None)
    if i is not None:
      return int(i)
  return None


def _looks_like_path(source: str) -> bool:
  """A missing source that is clearly a path (not a hub dataset name such as "emozilla/pg19")."""
  return pathlib.Path(source).suffix in (".txt", ".jsonl", ".json") or source.startswith(("/", ".", "~"))


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


def _iter_text_blocks(path: pathlib.Path) -> Iterator[str]:
  with open(path, encoding="utf-8", errors="replace") as f:
    block: list[str] = []
    size = 0
    for line in f:
      block.append(line)
      size += len(line)
      if size >= _STREAM_BLOCK_CHARS:
        yield "".join(block)
        block, size = [], 0
    if block:
      yield "".join(block)


def _iter_documents(source: str, text_field: str, split: str) -> Iterator[str]:
  path = pathlib.Path(source)
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
      raise DataError(f"data folder {path} has no .txt files")
    for p in files:
      yield p.read_text(encoding="utf-8", errors="replace")
    return
  if path.suffix == ".jsonl":
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{i} is not valid JSON: {e}") from e
        if text_field not in record:
          raise DataError(f"{path}:{i} has no {text_field!r} field (fields: {sorted(record)})")
        yield str(record[text_field])
    return
  yield from _iter_hf_dataset(source, text_field, split)


def _iter_hf_dataset(name: str, text_field: str, split: str) -> Iterator[str]:
  try:
    import datasets  # noqa: PLC0415
  except ImportError as e:
    raise DataError(
      f"{name} is not a file or folder, and the `datasets` package is not installed, so it cannot be read as a "
      "Hugging Face dataset name; pass a .txt file, a folder of .txt files or a .jsonl file"
    ) from e
  config = None
  if ":" in name:  # "name:config", e.g. "wikitext:wikitext-103-raw-v1"
    name, config = name.split(":", 1)
  try:
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
  except Exception as e:  # the hub is unreachable, or the name is wrong
    raise DataError(f"could not open Hugging Face dataset {name!r} (split {split!r}): {e}") from e
  for record in ds:
    if text_field not in record:
      raise DataError(f"dataset {name!r} has no {text_field!r} field (fields: {sorted(record)})")
    yield str(record[text_field])


@dataclasses.dataclass
class Samples:
  """Fixed-length token samples.

  Attributes:
    ids: (s, l) int32, each row [BOS] + document tokens when the tokenizer has a BOS/EOS, else document tokens.
    found: usable documents (or stream pieces) seen; equals s unless more were available than asked for.
    source: what they came from, for the metadata.
  """

  ids: np.ndarray
  found: int
  source: str

  def fingerprint(self) -> str:
    """sha256 of the token ids and their shape: equal fingerprints mean the same samples."""
    h = hashlib.sha256()
    h.update(np.asarray(self.ids.shape, np.int64).tobytes())
    h.update(np.ascontiguousarray(self.ids, np.int32).tobytes())
    return h.hexdigest()


def load_samples(
  source: str | os.PathLike,
  tokenizer,
  length: int,
  samples: int,
  *,
  short: str = "skip",
  text_field: str = "text",
  split: str = "validation",
) -> Samples:
  """Reads `samples` samples of `length` tokens from `source` (see the module docstring).

  Raises:
    DataError: the source is missing or empty, or has fewer usable documents than `samples` (the message says
      how many were found).
  """
  if short not in SHORT_POLICIES:
    raise ValueError(f"short={short!r} is not one of {SHORT_POLICIES}")
  if length < 2:
    raise DataError(f"length={length} is too short: a sample needs at least 2 tokens")
  source = str(source)
  path = pathlib.Path(source)
  bos = bos_id(tokenizer)
  need = length - (bos is not None)  # document tokens per sample
  prefix = [] if bos is None else [bos]
  rows: list[list[int]] = []
  if not path.exists() and _looks_like_path(source):
    raise DataError(f"data {source} does not exist")
  if path.is_file() and path.stat().st_size == 0:
    raise DataError(f"data file {source} is empty")

  if path.is_file() and path.suffix != ".jsonl":
    # One stream: consecutive, non-overlapping pieces of `need` tokens.
    buf: list[int] = []
    for block in _iter_text_blocks(path):
      buf.extend(_encode(tokenizer, block))
      while len(buf) >= need and len(rows) < samples:
        rows.append(prefix + buf[:need])
        buf = buf[need:]
      if len(rows) >= samples:
        break
    if len(rows) < samples:
      total = len(rows) * need + len(buf)
      raise DataError(
        f"{source} holds {total} tokens, enough for {len(rows)} samples of {length} tokens, but --samples is "
        f"{samples}; lower --samples or --length, or add text"
      )
    return Samples(np.asarray(rows, np.int32), len(rows), source)

  seen = 0
  carry: list[int] = []
  sep = [] if getattr(tokenizer, "eos_token_id", None) is None else [int(tokenizer.eos_token_id)]
  for text in _iter_documents(source, text_field, split):
    seen += 1
    toks = _encode(tokenizer, text)
    if short == "skip":
      if len(toks) >= need:
        rows.append(prefix + toks[:need])
    else:  # concat: documents too short for a sample are joined with the following ones
      carry = carry + (sep if carry else []) + toks
      if len(carry) >= need:
        rows.append(prefix + carry[:need])
        carry = []
    if len(rows) >= samples:
      break
  if seen == 0:
    raise DataError(f"data {source} has no documents")
  if len(rows) < samples:
    policy = "" if short == "concat" else " or use --short concat"
    raise DataError(
      f"{source}: found only {len(rows)} usable documents with at least {need} tokens (of {seen} documents) "
      f"for samples of {length} tokens, but --samples is {samples}; lower --samples or --length{policy}"
    )
  return Samples(np.asarray(rows, np.int32), len(rows), source)


def load_documents(
  source: str | os.PathLike, tokenizer, *, text_field: str = "text", split: str = "validation", max_docs: int = 0
) -> list[np.ndarray]:
  """Token documents for evaluation at several lengths: one per file/line; a single text file is one document."""
  source = str(source)
  path = pathlib.Path(source)
  if path.is_file() and path.suffix != ".jsonl":
    if path.stat().st_size == 0:
      raise DataError(f"data file {source} is empty")
    return [np.asarray(_encode(tokenizer, path.read_text(encoding="utf-8", errors="replace")), np.int32)]
  if not path.exists() and _looks_like_path(source):
    raise DataError(f"data {source} does not exist")
  docs = []
  for text in _iter_documents(source, text_field, split):
    docs.append(np.asarray(_encode(tokenizer, text), np.int32))
    if max_docs and len(docs) >= max_docs:
      break
  if not docs:
    raise DataError(f"data {source} has no documents")
  return docs


def split_samples(ids: np.ndarray, calib_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(calibration, held-out) rows: the first round(s * fraction) samples calibrate, the rest choose the best step.

  The held-out rows are different documents from the calibration rows, and neither is evaluation data.
  """
  s = ids.shape[0]
  if calib_fraction >= 1.0:
    return ids, ids[:0]
  n_cal = int(round(s * calib_fraction))
  if n_cal < 1 or n_cal >= s:
    raise DataError(
      f"--calib-split {calib_fraction} of {s} samples leaves {n_cal} for calibration and {s - n_cal} held out; "
      "each needs at least one (raise --samples or change --calib-split)"
    )
  return ids[:n_cal], ids[n_cal:]


def check_vocab(ids: np.ndarray, vocab_size: int, tokenizer_name: str) -> None:
  """Refuses token ids the model has no embedding row for (a tokenizer made for another model)."""
  if ids.size and int(ids.max()) >= vocab_size:
    raise DataError(
      f"tokenizer {tokenizer_name} produced id {int(ids.max())}, but the model's vocabulary has {vocab_size} "
      "entries; use the model's own tokenizer"
    )
