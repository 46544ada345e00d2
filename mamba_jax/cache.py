"""Recurrent decoding state of one mixer layer."""

from typing import NamedTuple

import jax


class MixerCache(NamedTuple):
  """Decoding state of one Mamba1 or Mamba2 layer.

  Attributes:
    conv_state: (b, k, c) the last k pre-conv inputs, oldest first, channels last (mamba_ssm keeps the
      same numbers as (b, c, k)). c = d_inner (Mamba1) or d_ssm + 2 * ngroups * d_state (Mamba2).
    ssm_state: float32, (b, e, n) for Mamba1 or (b, h, p, n) for Mamba2.
  """

  conv_state: jax.Array
  ssm_state: jax.Array
