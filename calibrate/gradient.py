"""Back-propagation calibration of the scales: jax.grad over the `CalibrationScale` state only, one jit-compiled step.

The frozen weights enter the step as a separate argument that is never differentiated, so they get neither
gradients nor optimizer state. Gradients are accumulated over `accum` micro-batches of `batch_size` samples, the
samples drawn without replacement from a per-epoch permutation that depends only on (seed, epoch).

Shape legend: s samples, l length, m samples per step (accum * batch_size).
"""

import math

import jax
import jax.numpy as jnp
import optax

from calibrate.objective import objective_value, scale_loss
from calibrate.scales import projection


class Gradient:
  """Gradient calibrator over the scale state of a split model.

  Usage as for `SPSA`: `opt_state = g.init(scales)`; `scales, opt_state, metrics = g.step(scales, opt_state, k,
  rest, ids, stacked)` with ids (s, l) all calibration samples (`stacked` as for `SPSA`); step k reads samples
  k*m .. k*m+m-1 of the shuffled stream. For long samples build the model with `remat=True` before splitting, so
  each block recomputes its activations.
  """

  def __init__(
    self,
    graphdef,
    tx: optax.GradientTransformation,
    *,
    objective: str = "nll",
    clamp: tuple[float, float] = (0.01, math.inf),
    seed: int = 0,
    batch_size: int = 1,
    accum: int = 1,
    chunk: int = 2048,
  ):
    objective_value(jnp.zeros(()), objective)  # validates the name
    self.tx = tx
    self.objective = objective
    self.seed = seed
    self.batch_size = batch_size
    self.accum = accum
    self._nll = scale_loss(graphdef, batch_size, chunk)
    self._project = projection(*clamp)
    self.step = jax.jit(self._step)
    self.evaluate = jax.jit(self._nll)

  def init(self, scales):
    return self.tx.init(scales)

  def sample_indices(self, step, n: int) -> jax.Array:
    """(accum, batch_size) indices into the n calibration samples for step `step`."""
    m = self.accum * self.batch_size
    t = step * m + jnp.arange(m)  # position in the endless shuffled stream
    epoch, pos = t // n, t % n
    base = jax.random.key(self.seed)
    perm_at = lambda e, p: jax.random.permutation(jax.random.fold_in(base, e), n)[p]
    return jax.vmap(perm_at)(epoch, pos).reshape(self.accum, self.batch_size)

  def _loss(self, scales, rest, ids, stacked_layers=None):
    return objective_value(self._nll(scales, rest, ids, stacked_layers), self.objective)

  def _step(self, scales, opt_state, step, rest, ids, stacked_layers=None):
    idx = self.sample_indices(step, ids.shape[0])
    grad_fn = jax.value_and_grad(self._loss)  # argnums=0: the scales only

    def body(carry, batch_idx):
      loss_sum, grad_sum = carry
      loss, grad = grad_fn(scales, rest, ids[batch_idx], stacked_layers)
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grad)), None

    zeros = jax.tree.map(jnp.zeros_like, scales)
    (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), idx)
    loss = loss_sum / self.accum
    grad = jax.tree.map(lambda g: g / self.accum, grad_sum)
    grad_norm = optax.tree.norm(grad)
    updates, new_opt = self.tx.update(grad, opt_state, scales)
    new_scales = self._project(optax.apply_updates(scales, updates))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite loss or gradient leaves everything as it was; the caller stops with the last good scales.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
    return keep(new_scales, scales), keep(new_opt, opt_state), metrics
