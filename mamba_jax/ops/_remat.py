"""What the model's rematerialisation keeps: named intermediate results of the ops (`checkpoint_name`).

Under `jax.checkpoint` a block's backward pass recomputes its forward. A value named here is kept from the forward
pass instead, when it is small and its recomputation costs a kernel launch of its own:
  * selective scan, pass 1 (Pallas): each segment's end state from a zero start and its sum of delta, (b, s, n, e)
    and (b, s, e) float32, ~17 MB per mamba-1.4b layer at any length (s is set by the program count, not l).
"""

import jax

SELECTIVE_SCAN_SEGMENT_STATES = "selective_scan_segment_states"
REMAT_SAVED = (SELECTIVE_SCAN_SEGMENT_STATES,)


def remat_policy():
  """The `jax.checkpoint` policy of the model's blocks: save the `REMAT_SAVED` names, recompute everything else."""
  return jax.checkpoint_policies.save_only_these_names(*REMAT_SAVED)
