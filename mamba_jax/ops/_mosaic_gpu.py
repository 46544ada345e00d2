"""Pallas Mosaic GPU helpers shared by the selective scan's, the SSD's and the causal conv's kernels."""

import inspect

from jax.experimental.pallas import mosaic_gpu as plgpu


def load(ref, layout, **kw):
  """ref[...] into registers in `layout`. jax 0.11 takes the ref alone (an index passed beside it is deprecated:
  index the ref with `ref.at[...]`); jax 0.10 also wants an index, empty for the whole ref."""
  idx = inspect.signature(plgpu.load).parameters.get("idx")
  if idx is not None and idx.default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout, **kw)
  return plgpu.load(ref, layout=layout, **kw)


def row_layout(E):
  """An (e,) row of E = 128 c channels across a warpgroup (lane semantics): channels [c i, c i + c) in thread i."""
  return plgpu.Layout.WG_STRIDED((E,), vec_size=E // 128)


def load_row(ref):
  """An (e,) row of a shared- or global-memory ref into registers (`row_layout`)."""
  return load(ref, row_layout(ref.shape[-1]), optimized=False)


def divisor_up_to(n: int, want: int, multiple: int = 1) -> int:
  """The largest divisor of n up to `want` that is a multiple of `multiple` (which divides n), at least
  `multiple`: a kernel's rows per copy or per program that tile n exactly."""
  for d in range(max(want, multiple) // multiple * multiple, 0, -multiple):
    if n % d == 0:
      return d
  return multiple
