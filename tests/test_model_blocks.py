"""The blocks outside the layer scan (inlined forward, prefill, decode step): one trace per block structure and
call, and the same results as the layer scan and the full forward."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mamba_jax import MambaConfig, MambaLM
from mamba_jax.mamba1 import Mamba1Mixer
from mamba_jax.mamba2 import Mamba2Mixer
from tests.conftest import rel_err

MIXERS = {"mamba1": Mamba1Mixer, "mamba2": Mamba2Mixer}


def _count_traces(monkeypatch, cls, method):
  """Counts calls of cls.method: under jit, one per trace of a block."""
  calls = []
  original = getattr(cls, method)

  def counted(self, *args, **kwargs):
    calls.append(method)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(cls, method, counted)
  return calls


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_inlined_forward_traces_each_block_structure_once_per_call(monkeypatch, arch):
  model = MambaLM(MambaConfig.tiny(arch, n_layer=4), rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 100)
  want = model(ids)  # the layer scan
  model.scan_layers = False
  calls = _count_traces(monkeypatch, MIXERS[arch], "__call__")
  got = nnx.jit(lambda m, x: m(x))(model, ids)
  assert len(calls) == 1  # 4 blocks of one structure: one trace
  assert rel_err(got, want) < 1e-5
  nnx.jit(lambda m, x: m(x))(model, ids)  # a new jit traces the blocks again: nothing cached across calls
  assert len(calls) == 2


def test_inlined_forward_traces_each_distinct_block_structure(monkeypatch):
  model = MambaLM(MambaConfig.tiny("mamba1", n_layer=3), rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.PRNGKey(1), (1, 16), 0, 100)
  want = model(ids)
  model.scan_layers = False
  model.backbone.layers[1].mixer.split_in_proj = True  # another structure: its own program
  calls = _count_traces(monkeypatch, Mamba1Mixer, "__call__")
  got = nnx.jit(lambda m, x: m(x))(model, ids)
  assert len(calls) == 2
  assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_prefill_and_step_trace_each_block_structure_once(monkeypatch, arch):
  model = MambaLM(MambaConfig.tiny(arch, n_layer=3), rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, 100)
  full = model(ids)
  prefills = _count_traces(monkeypatch, MIXERS[arch], "__call__")
  steps = _count_traces(monkeypatch, MIXERS[arch], "step")
  logits, cache = nnx.jit(lambda m, x: m.prefill(x))(model, ids[:, :8])
  step_logits, _ = nnx.jit(lambda m, t, c: m.step(t, c))(model, ids[:, 8], cache)
  assert (len(prefills), len(steps)) == (1, 1)
  assert rel_err(jnp.concatenate([logits, step_logits[:, None]], axis=1), full) < 1e-5


def test_eager_calls_run_the_blocks_directly(monkeypatch):
  """Outside a trace nothing is jitted per call (a program made anew would compile on every decode step): each
  block's mixer runs, op by op, once per block."""
  model = MambaLM(MambaConfig.tiny("mamba2", n_layer=3), rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.PRNGKey(2), (1, 6), 0, 100)
  full = model(ids)
  calls = _count_traces(monkeypatch, Mamba2Mixer, "__call__")
  steps = _count_traces(monkeypatch, Mamba2Mixer, "step")
  logits, cache = model.prefill(ids[:, :5])
  step_logits, _ = model.step(ids[:, 5], cache)
  assert (len(calls), len(steps)) == (3, 3)
  assert rel_err(jnp.concatenate([logits, step_logits[:, None]], axis=1), full) < 1e-5


def _dots_outside_loops(jaxpr, found):
  """(lhs shape, rhs shape) of every dot_general of a jaxpr and its sub-jaxprs, scan bodies left out."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
    if eqn.primitive.name in ("scan", "while"):
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "jaxpr"):  # ClosedJaxpr
          sub = sub.jaxpr
        if hasattr(sub, "eqns"):
          _dots_outside_loops(sub, found)
  return found


@pytest.mark.parametrize("stacked", [False, True], ids=["stacked per call", "stacked once"])
def test_first_block_runs_unbatched_under_the_vmapped_pair(stacked):
  """The layer scan's first block runs before the loop, so under a vmap over the scales alone (the SPSA pair)
  its in_proj reads one unbatched (1, l, d) input: inside the loop the carry is batched from the start."""
  from calibrate.objective import frozen_layers, token_nll  # noqa: PLC0415
  from mamba_jax.scales import CalibrationScale, attach_scales  # noqa: PLC0415

  cfg = MambaConfig.tiny("mamba1", n_layer=3)
  model = MambaLM(cfg, rngs=nnx.Rngs(0))
  attach_scales(model, "A", "linear", "layer")
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  layers = frozen_layers(model) if stacked else None
  ids = jnp.zeros((1, 16), jnp.int32)
  both = jax.tree.map(lambda s: jnp.stack([s, 2 * s]), scales)
  pair = jax.vmap(lambda s: token_nll(nnx.merge(graphdef, s, rest), ids, 8, layers))
  dots = _dots_outside_loops(jax.make_jaxpr(pair)(both).jaxpr, [])
  in_proj = [lhs for lhs, rhs in dots if rhs == (cfg.d_model, 2 * cfg.d_inner)]
  assert in_proj == [(1, 16, cfg.d_model)], dots
  nll = pair(both)  # and the two points still differ: the scales act in every block
  assert float(nll[0, 0]) != pytest.approx(float(nll[1, 0]), rel=1e-6)
