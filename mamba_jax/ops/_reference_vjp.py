"""A Pallas forward differentiated through its XLA reference: the gated-norm kernel's pattern (the conv's too until
it got its own backward kernel, round 21)."""

import functools
from collections.abc import Callable

import jax


def reference_vjp(forward: Callable, reference: Callable) -> Callable:
  """f(meta, *arrays) = forward(meta, *arrays), whose backward is the VJP of reference(meta, *arrays).

  The forward's inputs are saved and the reference recomputed in the backward. For memory-bound elementwise-style
  kernels whose backward is one or two XLA fusions anyway (they only run under gradient calibration). `meta` is a
  static, hashable description of the call.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def f(meta, *arrays):
    return forward(meta, *arrays)

  def f_fwd(meta, *arrays):
    return forward(meta, *arrays), arrays

  def f_bwd(meta, saved, g):
    return jax.vjp(functools.partial(reference, meta), *saved)[1](g)

  f.defvjp(f_fwd, f_bwd)
  return f
