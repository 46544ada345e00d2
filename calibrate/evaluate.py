"""Perplexity per context length (each document truncated to the length, every token scored), and its plot.

PPL at length L = exp(mean over documents of each document's mean NLL), over the first `samples` documents that
have at least L tokens (with BOS: L-1 document tokens); a length no document reaches is reported with 0 documents.

Shape legend: s samples, l length.
"""

import math

import numpy as np
from flax import nnx

from calibrate.objective import frozen_layers, token_nll


def _nll_fn(chunk: int):
  return nnx.jit(lambda model, ids, stacked: token_nll(model, ids, chunk, stacked))


def per_sample_nll(model, ids: np.ndarray, batch_size: int = 1, chunk: int = 2048, fn=None, stacked=None) -> np.ndarray:
  """(s,) mean NLL of each sample of ids (s, l), `batch_size` samples per forward; `stacked`: `frozen_layers`."""
  fn = fn or _nll_fn(chunk)
  out = []
  for i in range(0, ids.shape[0], batch_size):
    out.append(np.asarray(fn(model, ids[i : i + batch_size], stacked)))
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def perplexity(model, ids: np.ndarray, batch_size: int = 1, chunk: int = 2048) -> float:
  """exp(mean over samples of the per-sample mean NLL)."""
  nll = per_sample_nll(model, ids, batch_size, chunk, stacked=frozen_layers(model))
  return float(math.exp(float(np.mean(nll))))


def samples_at_length(docs: list[np.ndarray], length: int, samples: int, bos: int | None) -> np.ndarray:
  """(s', l) the first `samples` documents with enough tokens, truncated; s' may be smaller, even 0."""
  need = length - (bos is not None)
  prefix = [] if bos is None else [bos]
  rows = [prefix + d[:need].tolist() for d in docs if len(d) >= need][:samples]
  return np.asarray(rows, np.int32).reshape(len(rows), length)


def stream_to_documents(tokens: np.ndarray, length: int) -> list[np.ndarray]:
  """A single token stream cut into consecutive pieces of `length` tokens (the last partial piece dropped)."""
  return [tokens[i : i + length] for i in range(0, len(tokens) - length + 1, length)]


def ppl_per_length(
  model,
  docs: list[np.ndarray],
  lengths: list[int],
  samples: int,
  bos: int | None,
  *,
  batch_size: int = 1,
  chunk: int = 2048,
  progress=None,
) -> list[dict]:
  """[{length, ppl, nll, docs}] for each length; ppl is None where no document is long enough."""
  fn = _nll_fn(chunk)
  stacked = frozen_layers(model)  # the block weights stacked once for every length and sample
  results = []
  for length in lengths:
    ids = samples_at_length(docs, length, samples, bos)
    if ids.shape[0] == 0:
      results.append({"length": length, "ppl": None, "nll": None, "docs": 0})
    else:
      nll = per_sample_nll(model, ids, batch_size, chunk, fn, stacked)
      mean = float(np.mean(nll))
      results.append({"length": length, "ppl": math.exp(mean), "nll": mean, "docs": int(ids.shape[0])})
    if progress is not None:
      progress(results[-1])
  return results
