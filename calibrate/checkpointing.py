"""Orbax checkpoints of a calibration run, so that a killed run restarted with the same command continues exactly.

Saved: the step count, the scales, the optimizer state, the keep-best record (scales, held-out loss, step) and the
PRNG seed key. Every calibrator step is a pure function of (scales, optimizer state, step, seed), so restoring these
reproduces an uninterrupted run bitwise on the same platform. A `run.json` beside the checkpoints records the
run's settings; restarting with different settings is refused instead of silently mixing two runs.
"""

import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp


class ResumeError(ValueError):
  """The checkpoint directory belongs to a different run."""


class Checkpointer:
  """Saves every `every` steps into `directory` (keeping the newest two) and restores the newest.

  Args:
    directory: where the checkpoints go (created).
    every: save interval in steps; 0 disables saving (restore still works).
    signature: the settings that must match to resume (model, data fingerprint, hyper-parameters).
  """

  def __init__(self, directory: str | os.PathLike, every: int, signature: dict):
    self.dir = pathlib.Path(directory).absolute()
    self.every = every
    self.signature = json.loads(json.dumps(signature, default=str))  # what a JSON round trip would give
    self.dir.mkdir(parents=True, exist_ok=True)
    self._manager = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def _check_signature(self) -> None:
    path = self.dir / "run.json"
    if path.exists():
      saved = json.loads(path.read_text())
      if saved != self.signature:
        diffs = sorted(k for k in set(saved) | set(self.signature) if saved.get(k) != self.signature.get(k))
        raise ResumeError(
          f"{self.dir} holds checkpoints of a different run (settings differ: {diffs}); use another --out, or "
          "--restart to discard them"
        )
    else:
      path.write_text(json.dumps(self.signature, indent=2) + "\n")

  def restore(self, template: dict) -> dict | None:
    """The newest checkpoint with the structure of `template`, or None when there is none."""
    self._check_signature()
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return jax.tree.map(np.asarray, restored)

  def maybe_save(self, step: int, tree: dict, force: bool = False) -> bool:
    """Saves `tree` as checkpoint `step` when step is a multiple of `every` (or `force`); waits for the write."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    if self._manager.latest_step() == step:
      return False
    self._manager.save(step, args=ocp.args.StandardSave(tree))
    self._manager.wait_until_finished()
    return True

  def close(self) -> None:
    self._manager.close()
