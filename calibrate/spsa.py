"""SPSA (simultaneous perturbation stochastic approximation) over the calibration scales, one jit-compiled step.

Each step draws one perturbation direction delta for all scales at once, evaluates the objective at the two points
proj(s + c_k delta) and proj(s - c_k delta), and hands the estimate g = (L+ - L-) / (2 c_k) * delta to an optax
optimizer, then projects onto the clamp range. Two objective evaluations per step, whatever the number of scales.

Also here: the learning-rate schedules of the released calibration code and the optimizer builder that the
gradient calibrator shares.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from calibrate.objective import objective_value, scale_loss
from calibrate.scales import projection
from mamba_jax.ops.selective_scan import pallas_triton as selective_scan_kernels

PERTURBATIONS = ("rademacher", "gaussian")
SCHEDULES = ("cosine", "constant")


def make_schedule(name: str, lr: float, period: int = 99) -> optax.Schedule:
  """The released step-size schedules.

  "cosine": lr * cos(k pi / (2 period)), period 99 giving the released 0.001 * cos(k pi / 198). It reaches 0 at
  k = period; it is held at 0 after that, where the released formula would turn negative and reverse the
  updates. "constant": lr.
  """
  if name == "constant":
    return optax.constant_schedule(lr)
  if name == "cosine":
    return lambda k: lr * jnp.maximum(jnp.cos(k * jnp.pi / (2 * period)), 0.0)
  raise ValueError(f"schedule={name!r} is not one of {SCHEDULES}")


def make_optimizer(
  name: str, schedule: optax.Schedule, *, weight_decay: float = 0.0, clip: float | None = None
) -> optax.GradientTransformation:
  """sgd | adam | adamw with the schedule, after optional global-norm clipping."""
  if name == "sgd":
    tx = optax.sgd(schedule)
  elif name == "adam":
    tx = optax.adam(schedule)
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=weight_decay)
  else:
    raise ValueError(f"optimizer={name!r} is not one of ('sgd', 'adam', 'adamw')")
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def vmapped_pair_scan_overrides() -> dict:
  """How the vmapped pair's forward sets the Mamba1 selective scan's kernels (the Pallas ones; others ignore it).

  Each kernel launch of the vmapped forward runs both points, but the kernels see one point's batch and aim their
  segment count at `target_programs` for it: the pair launches twice the programs of one forward. Aiming at half
  gives each launch the unvmapped default's program count (at 8K tokens, 32 segments of 256 steps instead of 64 of
  128: fewer end states to chain in pass 2). Mosaic GPU chunks of 8 steps went with it in the measurement:
  mamba-1.4b's 8K SPSA iteration on an H200 took 117.7-118.1 ms (two leases) against 119.6-122.4 ms with the
  defaults, and 120.0 ms with the halved target alone (benchmarks/results/calibrate.md, round 19).
  """
  cfg = selective_scan_kernels.DEFAULT_CONFIG
  return dict(target_programs=max(1, cfg.target_programs // 2), mosaic_chunk=8)


@dataclasses.dataclass(frozen=True)
class SPSAConfig:
  """SPSA hyper-parameters.

  Attributes:
    c: perturbation size at step 0; c_k = c / (1 + k)^gamma.
    gamma: decay exponent of c_k.
    perturbation: "rademacher" (+-1 per scale) or "gaussian" (N(0, 1) per scale).
    objective: "nll" (mean NLL) or "ppl" (exp of it; what the released code minimises).
    clamp: (lo, hi) range the scales are projected onto, after each update and for the perturbed points.
    pair: "vmap" evaluates s+ and s- as one batched forward; "sequential" runs two forwards (less memory).
  """

  c: float = 0.1
  gamma: float = 0.1
  perturbation: str = "rademacher"
  objective: str = "ppl"
  clamp: tuple[float, float] = (0.01, math.inf)
  pair: str = "vmap"

  def __post_init__(self):
    if self.perturbation not in PERTURBATIONS:
      raise ValueError(f"perturbation={self.perturbation!r} is not one of {PERTURBATIONS}")
    if self.pair not in ("vmap", "sequential"):
      raise ValueError(f"pair={self.pair!r} is not 'vmap' or 'sequential'")


def _direction(key: jax.Array, tree, kind: str):
  """One random direction with the structure of `tree`: Rademacher or standard normal per scale."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  if kind == "rademacher":
    draws = [jax.random.rademacher(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves, strict=True)]
  else:
    draws = [jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves, strict=True)]
  return jax.tree.unflatten(treedef, draws)


class SPSA:
  """SPSA calibrator over the `CalibrationScale` state of a split model.

  Usage: `graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)`, `opt_state = spsa.init(scales)`,
  then `scales, opt_state, metrics = spsa.step(scales, opt_state, k, rest, ids, stacked)` with ids (s, l) the
  calibration samples and `stacked = frozen_layers(model)` (the blocks' weights stacked once for the layer scan;
  None runs the same step, stacking them inside it). The step is a pure function of (scales, opt_state, k, seed),
  so a resumed run repeats exactly.
  """

  def __init__(
    self,
    graphdef,
    tx: optax.GradientTransformation,
    cfg: SPSAConfig = SPSAConfig(),
    *,
    seed: int = 0,
    batch_size: int = 1,
    chunk: int = 2048,
  ):
    self.cfg = cfg
    self.tx = tx
    self.seed = seed
    self._nll = scale_loss(graphdef, batch_size, chunk)
    self._project = projection(*cfg.clamp)
    self.step = jax.jit(self._step)
    self.evaluate = jax.jit(self._nll)

  def init(self, scales):
    return self.tx.init(scales)

  def _pair_nll(self, s_plus, s_minus, rest, ids, stacked_layers):
    if self.cfg.pair == "sequential":
      return self._nll(s_plus, rest, ids, stacked_layers), self._nll(s_minus, rest, ids, stacked_layers)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), s_plus, s_minus)
    with selective_scan_kernels.default_config_overrides(**vmapped_pair_scan_overrides()):
      nll = jax.vmap(self._nll, in_axes=(0, None, None, None))(both, rest, ids, stacked_layers)  # (2,)
    return nll[0], nll[1]

  def _step(self, scales, opt_state, step, rest, ids, stacked_layers=None):
    cfg = self.cfg
    key = jax.random.fold_in(jax.random.key(self.seed), step)
    delta = _direction(key, scales, cfg.perturbation)
    c_k = cfg.c / (1.0 + step) ** cfg.gamma
    s_plus = self._project(jax.tree.map(lambda s, d: s + c_k * d, scales, delta))
    s_minus = self._project(jax.tree.map(lambda s, d: s - c_k * d, scales, delta))
    nll_plus, nll_minus = self._pair_nll(s_plus, s_minus, rest, ids, stacked_layers)
    l_plus, l_minus = objective_value(nll_plus, cfg.objective), objective_value(nll_minus, cfg.objective)
    # Rademacher: 1/delta = delta. Gaussian: multiply by delta (the smoothed-gradient estimator, E[delta delta^T]
    # = I); dividing by a Gaussian delta, as one released script does, gives an estimate with infinite variance.
    coef = (l_plus - l_minus) / (2.0 * c_k)
    grad = jax.tree.map(lambda d: coef * d, delta)
    updates, new_opt = self.tx.update(grad, opt_state, scales)
    new_scales = self._project(optax.apply_updates(scales, updates))
    finite = jnp.isfinite(l_plus) & jnp.isfinite(l_minus)
    # A non-finite loss leaves everything as it was, so the caller can stop with the last good scales.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    metrics = {
      "loss": 0.5 * (l_plus + l_minus),
      "loss_plus": l_plus,
      "loss_minus": l_minus,
      "nll_plus": nll_plus,
      "nll_minus": nll_minus,
      "c_k": jnp.asarray(c_k, jnp.float32),
      "grad_norm": optax.tree.norm(grad),
      "finite": finite,
    }
    return keep(new_scales, scales), keep(new_opt, opt_state), metrics
