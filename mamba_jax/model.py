"""The language model: embedding -> pre-norm residual blocks -> final norm -> LM head.

Shape legend: b batch, l length, d model width, v padded vocabulary.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax import ops
from mamba_jax.cache import MixerCache
from mamba_jax.config import MambaConfig
from mamba_jax.layers import F32, RMSNorm
from mamba_jax.mamba1 import Mamba1Mixer
from mamba_jax.mamba2 import Mamba2Mixer
from mamba_jax.ops.add_norm.reference import add_residual


def _stack(states):
  """Per-layer States of one structure -> one State, each leaf stacked over layers (leading axis L)."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def _traced(x: jax.Array) -> bool:
  return isinstance(x, jax.core.Tracer)


class _BlockPrograms:
  """The blocks of one forward, prefill or decode step as one jitted pure function per block structure, shared by
  every block of that structure: JAX traces and lowers a block once and XLA inlines the calls. Traced one by one,
  the 48 inlined blocks of mamba-1.4b's SPSA pair took 39.1 s to trace and 28.7 s to lower on a 2-core CPU, 1.1 s
  and 1.1 s this way (benchmarks/lower_time.py); its `generate` (2048-token prompt) 23.2 s and 23.9 s, 0.5 s and 0.6 s.

  Made anew for every call, so that each trace reads the settings of its time (the kernels' module-level
  configuration, a block attribute changed in between), as tracing the blocks one by one did. Outside a trace
  (`traced` false: an eager call, e.g. a decode loop in Python) the blocks run op by op as before: a program made
  anew would compile on every call.

  name: "forward" ((residual, previous output), (state,)) -> ((residual, output), None), as in the layer scan;
    "prefill" (state, residual) -> (residual, cache); "step" (state, residual, cache) -> (residual, cache).
  traced: whether the call is being traced (its residual stream is a `jax.core.Tracer`).
  """

  def __init__(self, name: str, compute_dtype, remat: bool = False, *, traced: bool):
    if name not in ("forward", "prefill", "step"):
      raise ValueError(f"unknown block program {name!r}")
    self.name, self.compute_dtype, self.remat, self.traced = name, compute_dtype, remat, traced
    self._programs = {}

  def __call__(self, layer: "Block"):
    """The program for this block's structure and the block's state."""
    graphdef, state = nnx.split(layer)
    if graphdef not in self._programs:
      pure = self._pure(graphdef)
      self._programs[graphdef] = jax.jit(pure) if self.traced else pure
    return self._programs[graphdef], state

  def _pure(self, graphdef):
    dtype = self.compute_dtype
    if self.name == "forward":
      return _block_fn(graphdef, dtype, self.remat)
    if self.name == "prefill":
      return lambda state, residual: nnx.merge(graphdef, state)(residual, dtype, return_cache=True)
    return lambda state, residual, cache: nnx.merge(graphdef, state).step(residual, cache, dtype)


def _block_fn(graphdef: nnx.GraphDef, compute_dtype, remat: bool):
  """A pure ((residual, previous output), block state) -> ((residual, output), None) function; the block's
  norm and mixer are rematerialised when `remat` is set (the add needs nothing saved for its gradient).

  Pure functions of the state (rather than calls on the live modules) work at any trace level: inside jax.grad,
  lax.scan or vmap over a model closed over from outside.
  """
  if not remat:
    # The add and the norm as one kernel on GPU (`ops.add_rms_norm`): XLA runs them as two passes, the second
    # reading back the float32 sum (calibrate.md, round 22).
    def fused(carry, states):
      block = nnx.merge(graphdef, *states)
      residual, normed = block.norm.add_and_norm(*carry, compute_dtype, impl=block.mixer.scan_impl)
      return (residual, block.mixer(normed)), None

    return fused

  # Rematerialised: the checkpoint's input is the sum alone (the add stays outside it, in XLA), so the
  # backward keeps one float32 array per block, as without the fused kernel; the norm is recomputed inside.
  def mix(residual, states):  # states: a tuple of States that together hold the block's variables
    return nnx.merge(graphdef, *states).mix(residual, compute_dtype)

  # The policy keeps a few small named results of the forward pass (ops.REMAT_SAVED: the selective scan's
  # segment states) instead of recomputing them in the backward pass.
  mix = jax.checkpoint(mix, policy=ops.remat_policy())

  def block(carry, states):
    residual = add_residual(*carry)
    return (residual, mix(residual, states)), None

  return block


class Block(nnx.Module):
  """x + Mixer(RMSNorm(x)), the residual stream kept in float32 when `residual_in_fp32`."""

  def __init__(self, cfg: MambaConfig, *, dtype, param_dtype, scan_impl: str, rngs: nnx.Rngs):
    self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_epsilon)
    mixer_cls = Mamba1Mixer if cfg.arch == "mamba1" else Mamba2Mixer
    self.mixer = mixer_cls(cfg, dtype=dtype, param_dtype=param_dtype, scan_impl=scan_impl, rngs=rngs)

  def mix(self, residual: jax.Array, compute_dtype, *, return_cache: bool = False):
    """Mixer(RMSNorm(residual)): what the block adds to the residual stream (and the cache with `return_cache`)."""
    return self.mixer(self.norm(residual, compute_dtype), return_cache=return_cache)

  def __call__(self, residual: jax.Array, compute_dtype, *, return_cache: bool = False):
    out = self.mix(residual, compute_dtype, return_cache=return_cache)
    hidden, cache = out if return_cache else (out, None)
    return add_residual(residual, hidden), cache

  def step(self, residual: jax.Array, cache: MixerCache, compute_dtype):
    hidden, cache = self.mixer.step(self.norm(residual, compute_dtype), cache)
    return add_residual(residual, hidden), cache


class Backbone(nnx.Module):
  """mamba_ssm `MixerModel`: embedding, blocks, final RMSNorm."""

  def __init__(self, cfg: MambaConfig, *, dtype, param_dtype, scan_impl: str, rngs: nnx.Rngs):
    self.embedding = nnx.Embed(cfg.padded_vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    kw = dict(dtype=dtype, param_dtype=param_dtype, scan_impl=scan_impl, rngs=rngs)
    self.layers = nnx.List([Block(cfg, **kw) for _ in range(cfg.n_layer)])
    self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_epsilon)


class MambaLM(nnx.Module):
  """Mamba1 or Mamba2 causal language model (mamba_ssm `MambaLMHeadModel`).

  Calling it on int token ids `(b, l)` returns logits `(b, l, padded_vocab)` in the compute dtype.
  `prefill` + `step` decode recurrently with a per-layer `MixerCache`.
  """

  # Blocks per iteration of the layer scan (`lax.scan`'s unroll). Read when tracing. 2 to 16 did not measurably
  # change mamba-1.4b's 8K SPSA iteration on an H200 (112.6-115.2 against 114.3-114.6 ms, calibrate.md round 22).
  layer_scan_unroll = 1

  def __init__(
    self,
    cfg: MambaConfig,
    *,
    dtype=None,
    param_dtype=F32,
    scan_impl: str = "auto",
    remat: bool = False,
    scan_layers: bool = True,
    rngs: nnx.Rngs,
  ):
    """Args:
    cfg: the architecture.
    dtype: compute dtype (None: the parameter dtype).
    param_dtype: dtype of the weight matrices, embedding and conv (A_log, D, dt biases and norms stay float32).
    scan_impl: "auto" | "pallas" | "xla" | "reference", passed to `mamba_jax.ops`.
    remat: rematerialise each block in the backward pass (long-context gradients).
    scan_layers: run the blocks of the parallel forward as one `lax.scan` (compile time independent of depth).
    """
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype or param_dtype)
    self.remat = remat
    self.scan_layers = scan_layers
    self.backbone = Backbone(cfg, dtype=dtype, param_dtype=param_dtype, scan_impl=scan_impl, rngs=rngs)
    self.lm_head = (
      None
      if cfg.tie_embeddings
      else nnx.Linear(
        cfg.d_model, cfg.padded_vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
      )
    )

  def _embed(self, input_ids: jax.Array) -> jax.Array:
    x = self.backbone.embedding(input_ids).astype(self.dtype)
    return x.astype(F32) if self.cfg.residual_in_fp32 else x

  def _head(self, residual: jax.Array) -> jax.Array:
    return self.logits_from_hidden(self.backbone.norm_f(residual, self.dtype))

  @property
  def uses_layer_scan(self) -> bool:
    """Whether the parallel forward runs its blocks as one `lax.scan`: `scan_layers` and blocks of one structure."""
    layers = list(self.backbone.layers)
    graphdef = nnx.graphdef(layers[0])
    return self.scan_layers and all(nnx.graphdef(layer) == graphdef for layer in layers[1:])

  def stack_layers(self) -> nnx.State:
    """The blocks' weights (`nnx.Param`) stacked over layers, leading axis L: what the layer scan reads.

    Without it `hidden_states` stacks them on every call, a copy of every block weight: on an H200 an 8K-token
    mamba-1.4b forward took 77.3 ms that way and 71.0 ms with the weights stacked once (benchmarks/results/
    calibrate.md, round 11). A caller that runs many steps on frozen weights (the calibrators, the perplexity
    evaluation) stacks them once with this and passes the result as `stacked_layers`; the stacked copy is not
    updated if the weights change afterwards.
    """
    return _stack([nnx.state(layer, nnx.Param) for layer in self.backbone.layers])

  def hidden_states(self, input_ids: jax.Array, stacked_layers: nnx.State | None = None) -> jax.Array:
    """(b, l) int -> final-normed hidden states (b, l, d), before the LM head.

    stacked_layers: `stack_layers()` of this model's weights, computed once by the caller (layer scan only). The
      blocks' other variables (calibration scales) are still read from the blocks on every call.
    """
    # The carry is (residual stream, the previous block's output): each block adds its predecessor's output and
    # then normalises, as mamba_ssm's fused add + norm does, so that the add and the RMSNorm sit in one loop
    # iteration, where XLA can fuse them (carrying the sum put them on the two sides of the loop's boundary: two
    # kernels per layer in round 19's profile; the SPSA step went 119.8 -> 118.9 ms, calibrate.md round 20). The
    # first block adds the embedding to zeros.
    hidden = self.backbone.embedding(input_ids).astype(self.dtype)
    residual = jnp.zeros(hidden.shape, F32 if self.cfg.residual_in_fp32 else self.dtype)
    layers = list(self.backbone.layers)
    if self.uses_layer_scan:
      graphdef = nnx.graphdef(layers[0])
      # One compiled block applied to blocks 1..L-1 (lax.scan over their stacked states) instead of n_layer
      # inlined copies: compile time independent of depth. Stacking copies the weights, once per call unless the
      # caller stacked them.
      block = _block_fn(graphdef, self.dtype, self.remat)
      # The first block runs before the scan, from its own variables. Under a vmap over the calibration scales
      # (the SPSA pair) its input, the embedding, is one unbatched array, so its norm, projections and conv run
      # once for both points; inside the scan the carry is batched from the first iteration on. That is ~0.45 ms
      # of mamba-1.4b's 8K SPSA iteration by round 23's per-layer kernel times (calibrate.md, round 24).
      carry, _ = block((residual, hidden), (nnx.state(layers[0]),))
      rest = layers[1:]
      if rest and stacked_layers is None:
        carry, _ = jax.lax.scan(
          block, carry, (_stack([nnx.state(layer) for layer in rest]),), unroll=self.layer_scan_unroll
        )
      elif rest:
        # The caller's stacked weights, indexed by the loop (what scanning them as xs does), so that the first
        # layer's need not be sliced off them: a copy of all the others on every call.
        def body(carry, xs):
          i, others = xs
          weights = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, i, keepdims=False), stacked_layers)
          return block(carry, (weights, others))

        others = _stack([nnx.state(layer, nnx.Not(nnx.Param)) for layer in rest])
        xs = (jnp.arange(1, len(layers)), others)
        carry, _ = jax.lax.scan(body, carry, xs, unroll=self.layer_scan_unroll)
      residual, hidden = carry
    else:
      if stacked_layers is not None:
        raise ValueError(
          "stacked_layers is for the layer scan, which this model does not run (scan_layers=False, or blocks of "
          "different structure): pass stacked_layers=None"
        )
      programs = _BlockPrograms("forward", self.dtype, self.remat, traced=_traced(hidden))
      for layer in layers:
        block, state = programs(layer)
        (residual, hidden), _ = block((residual, hidden), (state,))
    impl = layers[0].mixer.scan_impl
    return self.backbone.norm_f.add_and_norm(residual, hidden, self.dtype, impl=impl)[1]

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """(..., d) final-normed hidden states -> (..., v) logits."""
    if self.lm_head is None:
      return self.backbone.embedding.attend(h)
    return self.lm_head(h)

  @jax.named_scope("mamba_lm")
  def __call__(self, input_ids: jax.Array, stacked_layers: nnx.State | None = None) -> jax.Array:
    return self.logits_from_hidden(self.hidden_states(input_ids, stacked_layers))

  def prefill(self, input_ids: jax.Array) -> tuple[jax.Array, tuple[MixerCache, ...]]:
    """Processes the prompt in parallel. Returns logits (b, l, v) and the cache after its last token."""
    residual = self._embed(input_ids)
    caches = []
    programs = _BlockPrograms("prefill", self.dtype, traced=_traced(residual))
    for layer in self.backbone.layers:
      block, state = programs(layer)
      residual, cache = block(state, residual)
      caches.append(cache)
    return self._head(residual), tuple(caches)

  def init_cache(self, batch: int) -> tuple[MixerCache, ...]:
    return tuple(layer.mixer.init_cache(batch, self.dtype) for layer in self.backbone.layers)

  def step(self, token: jax.Array, caches: tuple[MixerCache, ...]) -> tuple[jax.Array, tuple[MixerCache, ...]]:
    """One token per sequence: token (b,) int -> logits (b, v) and the updated cache."""
    residual = self._embed(token)
    new = []
    programs = _BlockPrograms("step", self.dtype, traced=_traced(residual))
    for layer, cache in zip(self.backbone.layers, caches, strict=True):
      block, state = programs(layer)
      residual, cache = block(state, residual, cache)
      new.append(cache)
    return self._head(residual), tuple(new)
