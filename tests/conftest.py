"""Shared test helpers: float64 context, tiny transformers checkpoints written by the official code."""

import contextlib
import importlib.util
import os
import re

# Without a CUDA plugin the suite runs on the CPU, where most of its time is XLA compiling (the Pallas interpreter's
# kernels above all): LLVM's optimisation level 0 makes those compiles cheaper (on this 2-core machine three of the
# slowest test groups took 50 instead of 82 s). XLA's CPU code keeps IEEE semantics at any level (no fast math).
# Set before jax is imported, so that the backend and the subprocesses that tests start see it; on a GPU machine
# nothing changes.
if not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@contextlib.contextmanager
def float64():
  """Enables float64 in JAX for the duration (the references run in float64)."""
  with jax.enable_x64(True):
    yield


def rel_err(actual, expected) -> float:
  """max |actual - expected| / max |expected|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def _cuda_lowering(fn, *args) -> str:
  """jit(fn)'s CUDA lowering at `args` (shapes), as text. CI has no GPU, but the CUDA lowering runs on the CPU;
  skips where this jaxlib has no Triton lowering."""
  try:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  except Exception as err:
    if "triton" in str(err).lower() and "not" in str(err).lower():
      pytest.skip(f"no Triton lowering in this jaxlib: {err}")
    raise


def _result_types_text(line: str) -> str:
  return line.rsplit("-> ", 1)[-1]


_CALL_MARKS = {"triton": "__gpu$xla.gpu.triton", "mosaic": "custom_call @mosaic_gpu"}


def _is_triton(line: str) -> bool:
  return _CALL_MARKS["triton"] in line


def _is_kernel(line: str) -> bool:
  return any(mark in line for mark in _CALL_MARKS.values())


def kernel_call_lines(fn, *args) -> dict[str, list[str]]:
  """{"triton": [...], "mosaic": [...]}: the line of every Triton and every Mosaic GPU call in jit(fn)'s CUDA
  lowering at `args` (shapes), each in program order (operand types before `->`, result types after)."""
  lines = _cuda_lowering(fn, *args).splitlines()
  return {kind: [ln for ln in lines if mark in ln] for kind, mark in _CALL_MARKS.items()}


def operand_types(line: str) -> list[str]:
  """The operand tensor types of one `kernel_call_lines` line."""
  return re.findall(r"tensor<[^>]*>", line.rsplit("-> ", 1)[0].rsplit(" : ", 1)[-1])


def kernel_calls(fn, *args) -> dict[str, list[str]]:
  """{"triton": [...], "mosaic": [...]}: the result types of every Triton and every Mosaic GPU call in jit(fn)'s
  CUDA lowering at `args` (shapes), each in program order, as written after `->` in the lowered text:
  "tensor<...>" for one result, "(tensor<...>, ...)" for several."""
  return {k: [_result_types_text(ln) for ln in v] for k, v in kernel_call_lines(fn, *args).items()}


def triton_call_results(fn, *args) -> list[str]:
  """The Triton calls of `kernel_calls`."""
  return kernel_calls(fn, *args)["triton"]


def kernel_call_results(fn, *args) -> list[str]:
  """`triton_call_results` counting the Mosaic GPU calls too (on a Hopper GPU the selective scan's plain forward
  kernels are Mosaic GPU by default; on the CPU, Triton), in program order."""
  return [_result_types_text(ln) for ln in _cuda_lowering(fn, *args).splitlines() if _is_kernel(ln)]


def live_triton_call_results(fn, *args, match=_is_triton) -> list[str]:
  """`triton_call_results` less the calls none of whose results is used in their function: XLA removes those (a
  Triton call has no side effects), e.g. what jax.checkpoint recomputes beside a value its policy saved."""
  live = []
  for func in _cuda_lowering(fn, *args).split("func.func")[1:]:
    lines = func.splitlines()
    for i, ln in enumerate(lines):
      if not match(ln):
        continue
      name = ln.split("=", 1)[0].strip().split(":")[0]  # "%20:2" -> "%20"
      pattern = re.compile(re.escape(name) + r"(#\d+)?\b")
      if any(pattern.search(other) for j, other in enumerate(lines) if j != i):
        live.append(_result_types_text(ln))
  return live


def live_kernel_call_results(fn, *args) -> list[str]:
  """`live_triton_call_results` counting the Mosaic GPU calls too (see `kernel_call_results`)."""
  return live_triton_call_results(fn, *args, match=_is_kernel)


def result_types(results: str) -> list[str]:
  """The tensor types in one `triton_call_results` entry."""
  return [t.strip(" ()") for t in results.split(",")]


@pytest.fixture(scope="session")
def torch_mods():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  transformers.logging.set_verbosity_error()
  return torch, transformers


def make_hf_mamba(torch_mods, directory, arch: str, seed: int = 0, **overrides):
  """Writes a tiny random transformers Mamba/Mamba2 checkpoint with `save_pretrained`; returns the torch model."""
  torch, transformers = torch_mods
  torch.manual_seed(seed)
  if arch == "mamba1":
    kw = dict(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)
    kw.update(time_step_rank=4, use_bias=False)
    kw.update(overrides)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**kw))
  else:
    kw = dict(vocab_size=96, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2, num_heads=4, head_dim=16)
    kw.update(n_groups=1, chunk_size=8, tie_word_embeddings=False)
    kw.update(overrides)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kw))
  # Random A_log / D / dt biases away from their init so that a mis-mapped parameter cannot hide.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("A_log", ".D", "dt_bias", "norm.weight", "norm_f.weight")):
        p.add_(0.3 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(directory)
  return model
