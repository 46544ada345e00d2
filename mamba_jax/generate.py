"""Autoregressive generation: the prompt in parallel, then one recurrent step per token, all in one jit."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.model import MambaLM


def _filter_logits(logits: jax.Array, vocab_size: int, top_k: int | None, top_p: float | None) -> jax.Array:
  """Masks padded-vocabulary rows, then everything outside the top-k / nucleus. logits (b, v) float32."""
  neg = jnp.finfo(logits.dtype).min
  if vocab_size < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, neg)
  if top_k is not None and top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is below top_p (the most likely token is always kept).
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return logits


def _next_token(logits, key, temperature, vocab_size, top_k, top_p):
  logits = _filter_logits(logits.astype(jnp.float32), vocab_size, top_k, top_p)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "vocab_size", "top_k", "top_p")
)
def _generate(graphdef, state, input_ids, key, *, max_new_tokens, temperature, vocab_size, top_k, top_p):
  model = nnx.merge(graphdef, state)
  sample = functools.partial(_next_token, temperature=temperature, vocab_size=vocab_size, top_k=top_k, top_p=top_p)
  keys = jax.random.split(key, max_new_tokens)
  logits, cache = model.prefill(input_ids)
  first = sample(logits[:, -1], keys[0])

  def body(carry, step_key):
    token, cache = carry
    logits, cache = model.step(token, cache)
    return (sample(logits, step_key), cache), token

  (last, _), tokens = jax.lax.scan(body, (first, cache), keys[1:])  # tokens (max_new_tokens - 1, b)
  new = jnp.concatenate([tokens.T, last[:, None]], axis=1)
  return jnp.concatenate([input_ids, new], axis=1)


def generate(
  model: MambaLM,
  input_ids,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  seed: int = 0,
) -> jax.Array:
  """Generates `max_new_tokens` tokens after each prompt.

  Args:
    model: a MambaLM.
    input_ids: int prompt (b, l) or (l,); every row has the same length (no padding).
    max_new_tokens: tokens to add.
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_k: sample only among the k most likely tokens.
    top_p: nucleus sampling mass.
    seed: PRNG seed for sampling.

  Returns:
    (b, l + max_new_tokens) int32: the prompt followed by the generated tokens. Padded-vocabulary rows
    (ids >= the config's vocab_size) are never produced.
  """
  ids = jnp.asarray(input_ids, jnp.int32)
  squeeze = ids.ndim == 1
  ids = ids[None] if squeeze else ids
  if ids.ndim != 2 or ids.shape[1] == 0:
    raise ValueError(f"input_ids must be a non-empty (batch, length) array, got shape {ids.shape}")
  if max_new_tokens < 1:
    return ids[0] if squeeze else ids
  graphdef, state = nnx.split(model)
  out = _generate(
    graphdef,
    state,
    ids,
    jax.random.key(seed),
    max_new_tokens=int(max_new_tokens),
    temperature=float(temperature),
    vocab_size=min(model.cfg.vocab_size, model.cfg.padded_vocab_size),
    top_k=top_k,
    top_p=None if top_p is None else float(top_p),
  )
  return out[0] if squeeze else out
