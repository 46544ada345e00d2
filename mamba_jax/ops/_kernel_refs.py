"""Naming a kernel's refs when some of them are optional."""


def split_refs(refs, *present):
  """(one entry per flag in `present`: the next ref in order where the flag is true, else None; the refs left).

  A Pallas kernel receives its inputs, outputs and scratch buffers as one flat list, in which the optional ones
  (D, a gate, saved states...) appear only when used: `split_refs(refs, True, has_d, ...)` names them in one line.
  """
  it = iter(refs)
  named = [next(it) if p else None for p in present]
  return named, list(it)
