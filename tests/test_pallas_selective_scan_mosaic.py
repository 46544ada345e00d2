"""The selective scan's Mosaic GPU kernels (the forward's two passes, the state-storing forward, the backward's
pass 1): their CUDA lowering on any machine, their outputs and gradients on a GPU."""

import dataclasses
import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.ops.selective_scan import pallas_triton as pt
from mamba_jax.ops.selective_scan.reference import selective_scan_reference
from tests.conftest import float64, kernel_call_lines, kernel_calls, operand_types, rel_err, result_types

# Few programs, so that a few hundred tokens span several segments; 128 channels per Mosaic GPU program.
CFG = pt.SelectiveScanConfig(target_programs=8, fwd_lowering="mosaic")
ON_HOPPER = jax.default_backend() == "gpu" and getattr(jax.devices()[0], "compute_capability", "") in ("9.0", "9.0a")
_GPU = pytest.mark.skipif(not ON_HOPPER, reason="the Mosaic GPU kernels run only on a Hopper GPU")


def _inputs(seed=0, b=2, l=300, e=256, n=16, dtype=jnp.bfloat16, drop=()):
  k = jax.random.split(jax.random.PRNGKey(seed), 9)
  r = lambda i, shape: jax.random.normal(k[i], shape, jnp.float32)  # noqa: E731
  inp = dict(
    u=r(0, (b, l, e)).astype(dtype),
    delta=(r(1, (b, l, e)) * 0.5 - 1.0).astype(dtype),
    A=-jnp.exp(r(2, (e, n)) * 0.5),
    B=r(3, (b, l, n)).astype(dtype),
    C=r(4, (b, l, n)).astype(dtype),
    D=r(5, (e,)),
    z=r(6, (b, l, e)).astype(dtype),
    delta_bias=r(7, (e,)) * 0.3,
    initial_state=r(8, (b, e, n)),
  )
  return {k: (None if k in drop else v) for k, v in inp.items()}


@pytest.mark.parametrize("vjp", ["triton", "mosaic"])
def test_plain_forward_lowers_to_two_mosaic_gpu_kernels_and_the_vjp_forward_stores_states(vjp):
  """Runs Mosaic GPU's lowering (no GPU needed). The plain forward: pass 1 and pass 2 in Mosaic GPU, no Triton
  call. The gradient: pass 1 in Mosaic GPU; the state-storing forward (the states every K steps among its
  results) and the backward's pass 1 (each segment's adjoint) in `vjp`'s lowering; the backward's pass 2 in
  Triton."""
  inp = _inputs()
  args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
  cfg = dataclasses.replace(CFG, vjp_fwd_lowering=vjp, adjoint_lowering=vjp)
  f = lambda *a: pt.selective_scan_pallas(*a, True, config=cfg)  # noqa: E731
  calls = kernel_calls(f, *args)
  assert len(calls["mosaic"]) == 2 and not calls["triton"]
  b, l, e = inp["u"].shape
  n = inp["A"].shape[1]
  seg, S = pt._segments(l, b, e, cfg)
  assert S > 1 and seg * S > l  # several segments and a padded tail
  pass1 = [f"tensor<{b}x{S - 1}x{n}x{e}xf32>", f"tensor<{b}x{S - 1}x{e}xf32>"]  # all segments but the last
  assert result_types(calls["mosaic"][0]) == pass1

  grad_calls = kernel_calls(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2)), *args)
  assert len(grad_calls["mosaic"]) == (3 if vjp == "mosaic" else 1)
  assert len(grad_calls["triton"]) == (1 if vjp == "mosaic" else 3)
  saving, adjoints = grad_calls[vjp][-3:-1] if vjp == "triton" else grad_calls[vjp][1:]
  assert result_types(saving)[-1] == f"tensor<{b}x{seg * S // cfg.unroll_bwd}x{n}x{e}xf32>"
  assert result_types(adjoints) == [f"tensor<{b}x{S}x{n}x{e}xf32>"]


def _lowered_mosaic_calls(monkeypatch, inp, cfg=CFG):
  """Lowers the plain forward (no GPU needed) and returns each `pallas_mosaic._call` it made, in order, as its
  arguments by name (defaults filled in)."""
  from mamba_jax.ops.selective_scan import pallas_mosaic  # noqa: PLC0415

  real = pallas_mosaic._call
  signature = inspect.signature(real)
  calls = []

  def spy(*args, **kw):
    bound = signature.bind(*args, **kw)
    bound.apply_defaults()
    calls.append(bound.arguments)
    return real(*args, **kw)

  monkeypatch.setattr(pallas_mosaic, "_call", spy)
  kernel_calls(lambda i: pt.selective_scan_pallas(**i, delta_softplus=True, config=cfg), inp)
  return calls


def test_both_passes_get_the_configured_launch_parameters(monkeypatch):
  """Chunk, buffers, channels per thread and each pass's FMA decays reach pass 1 and pass 2 (lowered, no GPU needed)."""
  cfg = dataclasses.replace(CFG, mosaic_chunk=8, mosaic_stages=3, mosaic_channels_per_thread=2)
  cfg = dataclasses.replace(cfg, mosaic_poly_pass1=2, mosaic_poly_pass2=4)
  calls = _lowered_mosaic_calls(monkeypatch, _inputs(l=512), cfg)
  seen = sorted((c["write_y"], c["T"], c["stages"], c["cpt"], c["poly"]) for c in calls)
  assert seen == [(False, 8, 3, 2, 2), (True, 8, 3, 2, 4)], seen


def test_pass_1_copies_b_from_pass_2s_float32_rows(monkeypatch):
  """Both Mosaic GPU passes take the same (b, l, 2n) float32 [B | C] rows (`bc_rows`), so that XLA converts B and
  C once for both (round 22's profile: two conversions per layer, one for each pass). Lowered, no GPU needed."""
  inp = _inputs(l=512)
  seen = sorted((c["write_y"], c["ins"][3].shape, c["ins"][3].dtype) for c in _lowered_mosaic_calls(monkeypatch, inp))
  b, l, n = inp["B"].shape
  assert seen == [(False, (b, l, 2 * n), jnp.float32), (True, (b, l, 2 * n), jnp.float32)], seen


@pytest.mark.parametrize("given", [False, True])
def test_pass_2_takes_an_initial_state_only_when_given(given, monkeypatch):
  """Without an initial state the Mosaic GPU pass 2 starts from zeros in registers: no (b, n, e) zeros array to
  build in every layer (round 22's profile: a broadcast launch per layer). Lowered, no GPU needed."""
  inp = _inputs(l=512, drop=() if given else ("initial_state",))
  seen = [[a.shape for a in c["ins"]] for c in _lowered_mosaic_calls(monkeypatch, inp) if c["write_y"]]
  b, l, e = inp["u"].shape
  n = inp["A"].shape[1]
  assert len(seen) == 1 and ((b, n, e) in seen[0]) == given, seen


def _nested_eqns(eqn):
  """The equations of every jaxpr directly in `eqn`'s parameters (a scan's body, a kernel's, a cond's branches)."""
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns"):
        yield from inner.eqns


def _primitive_counts(eqns, counts=None):
  """{primitive name: equations} over some equations and every jaxpr nested in them."""
  counts = {} if counts is None else counts
  for eqn in eqns:
    counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
    _primitive_counts(_nested_eqns(eqn), counts)
  return counts


# What a `plgpu.kernel` call is in a jaxpr: a pallas_call, or (jax 0.10) a custom_vmap_call around an mpmd_map.
_KERNEL_PRIMITIVES = ("pallas_call", "custom_vmap_call", "mpmd_map")


def _kernels_primitive_counts(cfg, **inputs):
  """{primitive: equations} of each kernel of the plain forward (pass 1, pass 2), over every nested jaxpr."""
  inp = _inputs(**inputs)
  args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
  jaxpr = jax.make_jaxpr(lambda *a: pt.selective_scan_pallas(*a, True, config=cfg))(*args).jaxpr
  kernels = []

  def find(eqns):
    for eqn in eqns:
      if eqn.primitive.name in _KERNEL_PRIMITIVES:  # the outermost one that holds a kernel
        kernels.append(_primitive_counts([eqn]))
      else:
        find(_nested_eqns(eqn))

  find(jaxpr.eqns)
  return kernels


def test_kernels_divide_only_in_the_gate():
  """Under approx_math every division is a special-function reciprocal, in the units that bound these kernels.
  The softplus must not divide (its series by 6, jnp.log2's log(x) / log(2): one each per step until round 19);
  pass 2's gate, z / (1 + e^-z), divides once per step (T of them per chunk's unrolled steps)."""
  kernels = _kernels_primitive_counts(CFG)
  assert len(kernels) == 2, kernels
  pass1, pass2 = kernels
  assert pass1.get("exp2", 0) > 0 and "div" not in pass1, pass1
  assert pass2.get("div") == CFG.mosaic_chunk, pass2


def test_exp2_fma_matches_exp2_without_the_special_function_unit():
  """The decays' polynomial 2^x against float64, over the range the decays clamp to and below it. Run op by op:
  under jit XLA folds (x + 1.5 * 2^23) - 1.5 * 2^23 back to x (the kernels' Mosaic GPU lowering does not; their
  compiled tests below check the outputs)."""
  from mamba_jax.ops.selective_scan.pallas_mosaic import exp2_fma  # noqa: PLC0415

  x = np.concatenate([np.linspace(-126, 0, 20001), -np.logspace(-8, 0, 200), [0.0, -0.5, -1.5, -125.5]])
  x = x.astype(np.float32)
  with jax.disable_jit():
    y = np.asarray(exp2_fma(jnp.asarray(x)), np.float64)
    below = np.asarray(exp2_fma(jnp.asarray([-126.5, -300.0, -np.inf], jnp.float32)))
  ref = np.exp2(x.astype(np.float64))
  assert np.max(np.abs(y / ref - 1)) < 3e-7
  np.testing.assert_array_equal(below, np.float32(2.0**-126))


def test_fma_decays_replace_that_many_exponentials_per_step():
  """`mosaic_poly_pass1` / `mosaic_poly_pass2`: each kernel's exponentials fall by T per emulated state (one per
  unrolled step), and the kernels still lower for the GPU (bitcasts and shifts included; no GPU needed)."""
  T = CFG.mosaic_chunk
  base = _kernels_primitive_counts(CFG)
  poly = _kernels_primitive_counts(dataclasses.replace(CFG, mosaic_poly_pass1=3, mosaic_poly_pass2=5))
  assert base[0]["exp2"] - poly[0]["exp2"] == 3 * T
  assert base[1]["exp2"] - poly[1]["exp2"] == 5 * T
  assert poly[0].get("bitcast_convert_type", 0) == 3 * T * 3  # three bitcasts per emulated decay
  inp = _inputs()
  args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
  cfg = dataclasses.replace(CFG, mosaic_poly_pass1=3, mosaic_poly_pass2=5, vjp_fwd_lowering="mosaic")
  cfg = dataclasses.replace(cfg, adjoint_lowering="mosaic", mosaic_poly_adjoint=4)
  f = lambda *a: jnp.sum(pt.selective_scan_pallas(*a, True, config=cfg).astype(jnp.float32))  # noqa: E731
  assert len(kernel_calls(f, *args)["mosaic"]) == 2
  assert len(kernel_calls(jax.grad(f, argnums=(0, 1, 2)), *args)["mosaic"]) == 3


def test_mosaic_lowering_refuses_shapes_it_cannot_run():
  inp = _inputs(e=64)
  with pytest.raises(ValueError, match="multiple of 128"):
    pt.selective_scan_pallas(**inp, config=CFG)
  with pytest.raises(ValueError, match="fwd_lowering must be"):
    pt.selective_scan_pallas(**_inputs(), config=dataclasses.replace(CFG, fwd_lowering="cuda"))
  with pytest.raises(ValueError, match="adjoint_lowering='mosaic' needs .*bwd_rows"):
    pt.selective_scan_pallas(**_inputs(), config=dataclasses.replace(CFG, adjoint_lowering="mosaic", bwd_rows=False))


def test_auto_picks_triton_off_hopper_and_for_small_channel_counts():
  cfg = dataclasses.replace(CFG, fwd_lowering="auto")
  assert not pt._use_mosaic(cfg, 64, 16, False)  # d_inner not a multiple of 128
  assert not pt._use_mosaic(cfg, 256, 16, True)  # the interpreter
  assert pt._use_mosaic(cfg, 256, 16, False) == ON_HOPPER


def _reference(inp, **kw):
  with float64():
    arrays = {k: None if v is None else np.asarray(v, np.float64) for k, v in inp.items()}
    y, h = selective_scan_reference(**arrays, **kw)
    return np.asarray(y), np.asarray(h)


CASES = {
  "all": dict(),  # ragged length, several segments, every option
  "plain": dict(drop=("D", "z", "delta_bias", "initial_state"), l=256),
  "one segment": dict(l=48, b=1),
  "float32": dict(dtype=jnp.float32, drop=("z",)),
}


@_GPU
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("chunk, cpt, poly", [(16, 1, 0), (32, 1, 0), (16, 2, 0), (16, 1, 16)])
def test_forward_matches_float64_reference_and_triton(name, chunk, cpt, poly):
  """Fresh inputs per case; y and the last state against a float64 sequential scan, and against the Triton
  kernels' outputs on the same inputs (the same algorithm: equal to float32 rounding). `poly`: every decay of
  pass 1 and `poly` - 4 of pass 2's on the FMA units (`exp2_fma`)."""
  spec = dict(CASES[name])
  inp = _inputs(seed=10 * list(CASES).index(name) + chunk + cpt, **spec)
  kw = dict(delta_softplus=True, return_last_state=True)
  cfg = dataclasses.replace(CFG, mosaic_chunk=chunk, mosaic_channels_per_thread=cpt)
  cfg = dataclasses.replace(cfg, mosaic_poly_pass1=poly, mosaic_poly_pass2=max(poly - 4, 0))
  y, h = pt.selective_scan_pallas(**inp, **kw, config=cfg)
  y_t, h_t = pt.selective_scan_pallas(**inp, **kw, config=dataclasses.replace(cfg, fwd_lowering="triton"))
  y_ref, h_ref = _reference(inp, **kw)
  assert y.shape == inp["u"].shape and y.dtype == inp["u"].dtype and h.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  tol = 1e-2 if inp["u"].dtype == jnp.bfloat16 else 1e-4  # y rounds to the inputs' dtype
  assert rel_err(y, y_ref) < tol
  assert rel_err(h, h_ref) < 1e-4
  assert rel_err(h, h_t) < 1e-5
  assert rel_err(y, y_t) < (1e-2 if inp["u"].dtype == jnp.bfloat16 else 1e-5)


@_GPU
def test_gate_read_in_place_from_the_wider_in_proj_output():
  inp = _inputs(l=512)  # divides into whole segments: the gate is read in place
  b, l, e = inp["u"].shape
  wide = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(5), (b, l, e)).astype(inp["z"].dtype), inp["z"]], -1)
  kw = dict(delta_softplus=True)
  y_wide = pt.selective_scan_pallas(**{**inp, "z": wide}, z_start=e, **kw, config=CFG)
  y = pt.selective_scan_pallas(**inp, **kw, config=CFG)
  np.testing.assert_array_equal(np.asarray(y_wide, np.float32), np.asarray(y, np.float32))


@_GPU
def test_one_float32_conversion_of_b_and_c_feeds_both_passes():
  """In the compiled forward XLA computes the [B | C] float32 rows once (the two passes' identical expressions
  merged), not once per pass."""
  inp = _inputs(l=512)
  args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
  hlo = jax.jit(lambda *a: pt.selective_scan_pallas(*a, True, config=CFG)).lower(*args).compile().as_text()
  b, l, n = inp["B"].shape
  fusions = re.findall(rf"= f32\[{b},{l},{2 * n}\]\{{[^}}]*\}} fusion\(", hlo)  # the instructions, not their bodies
  assert len(fusions) == 1, fusions


def _remat_layer_scan_grad(cfg, layers=2):
  """The gradient of a loss over `layers` scan calls run as a `lax.scan` of rematerialised blocks that save the
  segment states (the model's remat over its layer scan), w.r.t. the per-layer A."""
  from mamba_jax.ops import remat_policy  # noqa: PLC0415

  inp = _inputs(l=512)

  def block(x, A):
    y = pt.selective_scan_pallas(x, inp["delta"], A, inp["B"], inp["C"], inp["D"], inp["z"], inp["delta_bias"], True,
                                 config=cfg)  # fmt: skip
    return (x.astype(jnp.float32) + y.astype(jnp.float32)).astype(x.dtype), None

  def loss(As):
    x, _ = jax.lax.scan(jax.checkpoint(block, policy=remat_policy()), inp["u"], As)
    return jnp.sum(x.astype(jnp.float32) ** 2)

  return jax.jit(jax.grad(loss)), jnp.stack([inp["A"] * (1 + 0.1 * i) for i in range(layers)])


def _mosaic_calls_in_optimised_hlo(fn, *args):
  return fn.lower(*args).compile().as_text().count('custom_call_target="mosaic_gpu')


@_GPU
def test_remat_layer_scan_gradient_runs_each_mosaic_kernel_once_per_layer():
  """Under the model's remat over a layer scan, each loop body runs each of its Mosaic GPU kernels once: the
  forward's pass 1 and pass 2, the backward's recomputation (which takes the saved segment states) and its pass 1.
  Without `barrier_segment_states`, XLA (jax 0.11.2) put the forward's pass 1 into a dynamic-slice fusion writing
  the saved residual and kept a clone for pass 2: one call more."""
  grad, As = _remat_layer_scan_grad(dataclasses.replace(CFG, vjp_fwd_lowering="mosaic", adjoint_lowering="mosaic"))
  assert _mosaic_calls_in_optimised_hlo(grad, As) == 4
  g = grad(As)
  triton = dataclasses.replace(CFG, fwd_lowering="triton", vjp_fwd_lowering="triton", adjoint_lowering="triton")
  g_triton = _remat_layer_scan_grad(triton)[0](As)
  assert bool(jnp.all(jnp.isfinite(g))) and rel_err(g, g_triton) < 1e-4


@_GPU
@pytest.mark.parametrize("name, poly", [("all", 0), ("plain", 0), ("float32", 0), ("all", 16)])
def test_gradients_with_the_mosaic_vjp_kernels_match_triton_and_float64(name, poly):
  """The state-storing forward and the backward's pass 1 in Mosaic GPU: the gradients equal those with the Triton
  kernels to float32 rounding, and the float64 reference's to the inputs' precision. `poly`: every decay of
  these two kernels and of pass 1 on the FMA units."""
  inp = _inputs(seed=70 + list(CASES).index(name), **CASES[name])
  names = [k for k, v in inp.items() if v is not None]
  ct = jax.random.normal(jax.random.PRNGKey(3), inp["u"].shape, jnp.float32)

  def loss(scan, *arrays):
    y, h = scan(**dict(zip(names, arrays, strict=True)), delta_softplus=True, return_last_state=True)
    return jnp.sum(y.astype(ct.dtype) * ct) + jnp.sum(h)

  def grads(vjp):
    cfg = dataclasses.replace(CFG, vjp_fwd_lowering=vjp, adjoint_lowering=vjp)
    if vjp == "mosaic":
      cfg = dataclasses.replace(cfg, mosaic_poly_pass1=poly, mosaic_poly_pass2=poly, mosaic_poly_adjoint=poly)
    scan = lambda **kw: pt.selective_scan_pallas(**kw, config=cfg)  # noqa: E731
    return jax.jit(jax.grad(functools.partial(loss, scan), argnums=tuple(range(len(names)))))(*[inp[k] for k in names])

  g_mosaic, g_triton = grads("mosaic"), grads("triton")
  with float64():
    arrays = [np.asarray(inp[k], np.float64) for k in names]
    ct = np.asarray(ct, np.float64)
    g_ref = jax.grad(functools.partial(loss, selective_scan_reference), argnums=tuple(range(len(names))))(*arrays)
  tol = 2e-2 if inp["u"].dtype == jnp.bfloat16 else 1e-3
  for k, gm, gt, gr in zip(names, g_mosaic, g_triton, g_ref, strict=True):
    # float32 gradients agree to float32 rounding; bf16 ones (those of bf16 inputs) round the same float32 sums,
    # so a few entries land one bf16 step (2^-8 relative) apart: on an H200, delta's 9.4e-4 in the "plain" case.
    assert rel_err(gm, gt) < (4e-3 if gm.dtype == jnp.bfloat16 else 1e-4), k
    assert rel_err(gm, np.asarray(gr)) < tol, k


@pytest.mark.parametrize("jax_api", ["0.10", "0.11"])
def test_mosaic_load_passes_an_index_only_where_plgpu_load_requires_one(monkeypatch, jax_api):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  from mamba_jax.ops import _mosaic_gpu

  calls = []
  if jax_api == "0.10":  # idx required: an empty index for the whole ref

    def fake_load(src, idx, *, layout=None, optimized=True):
      calls.append((src, idx, layout, optimized))
  else:  # idx optional and deprecated: the ref alone

    def fake_load(src, idx=_mosaic_gpu.inspect.Parameter, *, layout=None, optimized=True):
      calls.append((src, "no index" if idx is _mosaic_gpu.inspect.Parameter else idx, layout, optimized))

  monkeypatch.setattr(plgpu, "load", fake_load)
  _mosaic_gpu.load("ref", "layout", optimized=False)
  assert calls == [("ref", () if jax_api == "0.10" else "no index", "layout", False)]


@_GPU
def test_vmapped_over_A_alone_equals_each_point():
  """The SPSA pair's first block: vmapped over A only (two scaled copies), with one unbatched u, delta, B, C, z."""
  inp = _inputs(l=512, drop=("initial_state",))
  As = jnp.stack([inp["A"], 0.5 * inp["A"]])
  f = lambda A: pt.selective_scan_pallas(**{**inp, "A": A}, delta_softplus=True, config=CFG)  # noqa: E731
  both = jax.jit(jax.vmap(f))(As)
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(both[i], np.float32), np.asarray(jax.jit(f)(As[i]), np.float32))
  assert rel_err(both[0], both[1]) > 1e-2  # the scale acts


@pytest.mark.parametrize("vjp", ["triton", "mosaic"])
def test_segment_chain_kernel_lowers_between_the_passes(vjp):
  """`segment_chain="mosaic"`: one more Mosaic GPU launch between the passes, whose (b, s, n, e) incoming states
  pass 2 takes instead of pass 1's (b, s - 1, ...) outputs; the same under `jax.vjp` with either state-storing
  forward (lowered, no GPU needed)."""
  inp = _inputs()
  args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
  cfg = dataclasses.replace(CFG, segment_chain="mosaic", vjp_fwd_lowering=vjp, adjoint_lowering=vjp)
  f = lambda *a: pt.selective_scan_pallas(*a, True, config=cfg)  # noqa: E731
  b, l, e = inp["u"].shape
  n = inp["A"].shape[1]
  S = pt._segments(l, b, e, cfg)[1]
  calls = kernel_call_lines(f, *args)["mosaic"]
  assert len(calls) == 3, calls  # pass 1, the chain, pass 2
  assert operand_types(calls[1])[:2] == [f"tensor<{b}x{S - 1}x{n}x{e}xf32>", f"tensor<{b}x{S - 1}x{e}xf32>"]
  assert result_types(calls[1].rsplit("-> ", 1)[-1]) == [f"tensor<{b}x{S}x{n}x{e}xf32>"]
  ins = operand_types(calls[2])
  assert f"tensor<{b}x{S}x{n}x{e}xf32>" in ins and f"tensor<{b}x{S - 1}x{e}xf32>" not in ins, ins
  grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  grad_calls = kernel_call_lines(grad, *args)
  assert len(grad_calls["mosaic"]) == (4 if vjp == "mosaic" else 2)  # pass 1, chain[, saving pass 2, adjoints]
  saving = grad_calls["mosaic"][2] if vjp == "mosaic" else grad_calls["triton"][0]
  assert f"tensor<{b}x{S}x{n}x{e}xf32>" in operand_types(saving)


@_GPU
@pytest.mark.parametrize("given", [False, True])
def test_chain_kernel_equals_the_xla_chain(given):
  rng = np.random.default_rng(3)
  b, S, n, e = 2, 9, 16, 256
  h_loc = jnp.asarray(rng.normal(size=(b, S - 1, n, e)), jnp.float32)
  dsum = jnp.asarray(rng.uniform(0, 3, size=(b, S - 1, e)), jnp.float32)
  A2 = jnp.asarray(-rng.uniform(0.1, 2.0, size=(n, e)), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(b, n, e)), jnp.float32) if given else None
  from mamba_jax.ops.selective_scan import pallas_mosaic  # noqa: PLC0415

  for stages in (1, 3, 8):
    got = jax.jit(functools.partial(pallas_mosaic.chain_states, stages=stages))(h_loc, dsum, A2, h0)
    assert rel_err(got, pt.chain_states_xla(h_loc, dsum, A2, h0)) < 1e-5, stages


@_GPU
@pytest.mark.parametrize("chain", ["xla", "mosaic"])
def test_segment_chain_outside_pass_2_matches_the_inline_chain(chain):
  """Outputs and gradients (both Mosaic GPU vjp kernels) with the chain outside pass 2 equal pass 2's own
  chaining to float32 rounding."""
  inp = _inputs(seed=90)
  names = [k for k, v in inp.items() if v is not None]
  ct = jax.random.normal(jax.random.PRNGKey(4), inp["u"].shape, jnp.float32)

  def run(segment_chain):
    cfg = dataclasses.replace(CFG, vjp_fwd_lowering="mosaic", adjoint_lowering="mosaic", segment_chain=segment_chain)

    def loss(*arrays):
      y, h = pt.selective_scan_pallas(**dict(zip(names, arrays, strict=True)), delta_softplus=True,
                                      return_last_state=True, config=cfg)  # fmt: skip
      return jnp.sum(y.astype(ct.dtype) * ct) + jnp.sum(h), (y, h)

    f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))
    (_, out), grads = f(*[inp[k] for k in names])
    return out, grads

  (y, h), g = run(chain)
  (y_p, h_p), g_p = run("pass2")
  assert rel_err(h, h_p) < 1e-5 and rel_err(y, y_p) < 1e-2  # y in bf16
  for k, a, p in zip(names, g, g_p, strict=True):
    assert rel_err(a, p) < (4e-3 if a.dtype == jnp.bfloat16 else 1e-4), k


def test_divisor_up_to_against_brute_force():
  from mamba_jax.ops._mosaic_gpu import divisor_up_to  # noqa: PLC0415

  for n in (16, 48, 256, 300, 448, 8192):
    for multiple in (1, 2, 4, 8, 16):
      if n % multiple:
        continue
      for want in (1, 5, 16, 32, 100, 256, 10000):
        ok = [d for d in range(multiple, max(want, multiple) + 1, multiple) if n % d == 0]
        assert divisor_up_to(n, want, multiple) == max(ok), (n, want, multiple)
