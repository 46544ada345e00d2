"""A first-order linear recurrence along one axis as a primitive, with a Pallas Triton lowering.

  linear_scan(a, b, axis) -> (P, H):  P_t = a_0 a_1 ... a_t,  H_t = a_t H_{t-1} + b_t  (H_{-1} = 0)

On the Triton lowering it is one `tt.scan` whose combiner takes pairs, (a1, b1) then (a2, b2) -> (a1 a2, a2 b1 + b2):
Triton scans each thread's elements in registers, then across lanes and warps. Pallas exposes only `cumsum` (a
scan with `+`); this primitive gives the time-parallel selective scan (`time_parallel.py`) its pair scan.
Elsewhere (XLA, and the Pallas interpreter) it is `lax.associative_scan` with the same combiner.
"""

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

linear_scan_p = Primitive("linear_scan")
linear_scan_p.multiple_results = True


def _combine(earlier, later):
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


def _impl(a, b, *, axis):
  return jax.lax.associative_scan(_combine, (a, b), axis=axis)


def _abstract_eval(a, b, *, axis):
  if a.shape != b.shape or a.dtype != b.dtype:
    raise TypeError(f"linear_scan: a {a.shape} {a.dtype} and b {b.shape} {b.dtype} must match")
  return a, b


linear_scan_p.def_impl(_impl)
linear_scan_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(linear_scan_p, mlir.lower_fun(_impl, multiple_results=True))


def linear_scan(a: jax.Array, b: jax.Array, axis: int = 0) -> tuple[jax.Array, jax.Array]:
  """(prefix products of a, the recurrence H_t = a_t H_{t-1} + b_t from H = 0) along `axis`."""
  axis = axis % a.ndim
  return tuple(linear_scan_p.bind(jnp.asarray(a), jnp.asarray(b), axis=axis))


@functools.cache
def _register_triton():
  """Registers the Pallas Triton lowering (on first use: it imports jax's internal Triton lowering module)."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, math
  from jax._src.lib.triton import dialect as tt
  from jax._src.pallas.triton import lowering as tl

  def rule(ctx, a, b, *, axis):
    del ctx
    elt = tl._element_type(a.type)
    op = tt.ScanOp([a, b], axis)
    entry = op.regions[0].blocks.append(elt, elt, elt, elt)  # earlier (a1, b1), later (a2, b2)
    with ir.InsertionPoint.at_block_begin(entry):
      a1, b1, a2, b2 = entry.arguments
      tt.scan_return([arith.mulf(a1, a2), math.fma(a2, b1, b2)])
    op.verify()
    return list(op.result)

  tl.register_lowering(linear_scan_p)(rule)


_register_triton()

__all__ = ["linear_scan", "linear_scan_p"]
