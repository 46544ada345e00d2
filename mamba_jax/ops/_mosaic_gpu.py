"""Pallas Mosaic GPU helpers shared by the selective scan's and the SSD's kernels."""

import inspect

from jax.experimental.pallas import mosaic_gpu as plgpu


def load(ref, layout, **kw):
  """ref[...] into registers in `layout`. jax 0.11 takes the ref alone (an index passed beside it is deprecated:
  index the ref with `ref.at[...]`); jax 0.10 also wants an index, empty for the whole ref."""
  idx = inspect.signature(plgpu.load).parameters.get("idx")
  if idx is not None and idx.default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout, **kw)
  return plgpu.load(ref, layout=layout, **kw)
