"""Next-token NLL and perplexity, with the LM head applied to slices of positions so that the (l, v) logits of a
64K-token sample never exist at once.

Shape legend: b batch, l length, d model width, v padded vocabulary, c positions per logits slice.
"""

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32
OBJECTIVES = ("nll", "ppl")


def token_nll(model, ids: jax.Array, chunk: int = 2048, stacked_layers=None) -> jax.Array:
  """Per-sample mean next-token NLL.

  Position t predicts ids[:, t+1]; all l-1 targets are scored (a BOS at position 0, if the data has one, makes
  every document token a target). Logits over the whole padded vocabulary, as the reference evaluations do.

  Args:
    model: a MambaLM.
    ids: (b, l) int token ids.
    chunk: positions per LM-head slice; the backward pass recomputes each slice's logits instead of storing them.
    stacked_layers: the model's `stack_layers()`, computed once outside the step (layer scan only), or None.

  Returns:
    (b,) float32 mean NLL of each sample.
  """
  b, l = ids.shape
  h = model.hidden_states(ids, stacked_layers)[:, :-1]  # (b, l-1, d): the last position predicts nothing
  targets = ids[:, 1:]  # (b, l-1)
  n = l - 1
  c = max(1, min(chunk, n))
  pad = (-n) % c
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  valid = jnp.arange(n + pad) < n  # (l-1+pad,)
  k = (n + pad) // c
  # (k, b, c, ...): slices along positions, scanned so only one (b, c, v) logits block is live.
  h_k = h.reshape(b, k, c, -1).swapaxes(0, 1)
  t_k = targets.reshape(b, k, c).swapaxes(0, 1)
  m_k = valid.reshape(k, c)

  @jax.checkpoint
  def slice_nll(h_c, t_c, m_c):  # (b, c, d), (b, c), (c,) -> (b,)
    logits = model.logits_from_hidden(h_c).astype(F32)  # (b, c, v)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(m_c, lse - picked, 0.0), axis=-1)

  def body(total, xs):
    return total + slice_nll(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((b,), F32), (h_k, t_k, m_k))
  return total / n


def mean_nll(model, ids: jax.Array, batch_size: int = 1, chunk: int = 2048, stacked_layers=None) -> jax.Array:
  """Mean over samples of each sample's mean NLL; ids (s, l) run `batch_size` samples per forward.

  The mean of per-document means, then exp, is the perplexity of the reference protocol.
  """
  s, l = ids.shape
  if s % batch_size:
    raise ValueError(f"{s} samples are not a multiple of batch_size={batch_size}")
  batches = ids.reshape(s // batch_size, batch_size, l)
  # The model is rebuilt inside the scan body, so that no Variable is closed over from outside the scan's trace.
  graphdef, state = nnx.split(model)

  def body(total, batch):
    return total + jnp.sum(token_nll(nnx.merge(graphdef, state), batch, chunk, stacked_layers)), None

  total, _ = jax.lax.scan(body, jnp.zeros((), F32), batches)
  return total / s


def objective_value(nll: jax.Array, objective: str) -> jax.Array:
  """The quantity a calibrator minimises: the mean NLL itself, or the perplexity exp(mean NLL)."""
  if objective == "nll":
    return nll
  if objective == "ppl":
    return jnp.exp(nll)
  raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")


def scale_loss(graphdef, batch_size: int = 1, chunk: int = 2048):
  """fn(scales, rest, ids (s, l), stacked_layers=None) -> mean NLL of the model `nnx.merge(graphdef, scales, rest)`.

  `graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)`: only `scales` is ever differentiated or
  perturbed; `rest` carries the frozen weights through unchanged. `stacked_layers` (`frozen_layers`) is the
  blocks' weights stacked once for the layer scan, so that no step stacks them again.
  """

  def loss(scales, rest, ids, stacked_layers=None):
    return mean_nll(nnx.merge(graphdef, scales, rest), ids, batch_size, chunk, stacked_layers)

  return loss


def frozen_layers(model):
  """`model.stack_layers()` when the model runs the layer scan (`uses_layer_scan`; the calibrators'
  `stacked_layers`), else None.

  The frozen weights do not change between steps, so stacking them once saves a copy of every block weight per
  step; the stacked copy stays on the device next to the model's own arrays.
  """
  return model.stack_layers() if model.uses_layer_scan else None
