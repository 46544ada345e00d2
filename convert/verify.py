"""`--verify`: run the converted model on a few token sequences and compare its logits with a reference.

The reference is the PyTorch model of transformers (`MambaForCausalLM` / `Mamba2ForCausalLM`) when torch and
transformers are importable, otherwise the source checkpoint loaded directly by `mamba_jax` (which checks the
converted files, not the model code). Both sides compute in float32 on the weights as converted (rounded to the
output dtype), so the error measures the conversion, not the rounding that `--dtype` asked for.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from mamba_jax.config import MambaConfig, UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class VerifyResult:
  """Attributes: max_rel_error: max |logits - reference| / max |reference|; reference: what was compared with;
  passed: the error is within the tolerance and every logit is finite."""

  max_rel_error: float
  reference: str
  passed: bool


def token_ids(cfg: MambaConfig, batch: int = 2, length: int = 24, seed: int = 0) -> np.ndarray:
  """Random token ids below the unpadded vocabulary size (rows past it are never produced by a tokenizer)."""
  vocab = min(cfg.vocab_size, cfg.padded_vocab_size)
  return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32)


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def torch_logits(cfg: MambaConfig, tensors: Mapping[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
  """Logits of transformers' Mamba model holding `tensors` (torch names, either embedding key), in float32.

  Raises:
    UnsupportedModelError: the architecture has no transformers equivalent (e.g. Mamba2 with d_ssm < d_inner).
  """
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  hf = cfg.to_hf_dict()
  config_cls = transformers.MambaConfig if cfg.arch == "mamba1" else transformers.Mamba2Config
  model_cls = transformers.MambaForCausalLM if cfg.arch == "mamba1" else transformers.Mamba2ForCausalLM
  config = config_cls(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
  state = {}
  for key, array in tensors.items():
    key = "backbone.embeddings.weight" if key == "backbone.embedding.weight" else key
    state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
  if cfg.tie_embeddings:
    state["lm_head.weight"] = state["backbone.embeddings.weight"]
  # Built on the meta device, then given the arrays: a random init of a multi-GB model would take minutes.
  with torch.device("meta"):
    model = model_cls(config)
  model.load_state_dict(state, strict=True, assign=True)
  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def jax_logits(directory: str | os.PathLike, ids: np.ndarray) -> np.ndarray:
  from mamba_jax.loading import from_pretrained  # noqa: PLC0415

  model = from_pretrained(directory, dtype="float32")
  return np.asarray(model(ids), dtype=np.float32)


def max_rel_error(logits: np.ndarray, reference: np.ndarray) -> float:
  scale = float(np.max(np.abs(reference)))
  return float(np.max(np.abs(logits - reference))) / max(scale, np.finfo(np.float32).tiny)


def verify(
  directory: str | os.PathLike,
  cfg: MambaConfig,
  reference_tensors: Mapping[str, np.ndarray] | None,
  *,
  source_dir: str | os.PathLike | None = None,
  tolerance: float = 1e-4,
  log: Callable[[str], None] = print,
) -> VerifyResult:
  """Loads a converted directory with `from_pretrained` and compares its logits with a reference.

  Args:
    directory: the converted directory.
    cfg: its architecture.
    reference_tensors: torch-named tensors for the PyTorch reference (e.g. the source's, rounded as converted);
      None takes them from the converted directory itself.
    source_dir: the source checkpoint, the reference when torch is not importable.
    tolerance: largest max relative logit error that passes.
    log: where the result line goes.
  """
  ids = token_ids(cfg)
  logits = jax_logits(directory, ids)
  reference = None
  if torch_available():
    try:
      if reference_tensors is None:
        from convert.artifact import read_params  # noqa: PLC0415
        from convert.export import torch_state_dict  # noqa: PLC0415

        reference_tensors = torch_state_dict(read_params(directory), cfg, "hf")
      reference, name = torch_logits(cfg, reference_tensors, ids), "PyTorch (transformers)"
    except UnsupportedModelError as e:
      log(f"verify: PyTorch reference skipped ({e})")
  else:
    log("verify: PyTorch reference skipped (torch and transformers are not importable)")
  if reference is None:
    if source_dir is None:
      finite = bool(np.isfinite(logits).all())
      log(f"verify: no reference; the converted model runs and its logits are {'finite' if finite else 'NOT finite'}")
      return VerifyResult(float("nan"), "none", finite)
    reference, name = jax_logits(Path(source_dir), ids), "the source loaded directly by mamba_jax"
  error = max_rel_error(logits, reference)
  passed = bool(np.isfinite(logits).all()) and error <= tolerance
  log(
    f"verify: max relative logit error vs {name}: {error:.3g} on {ids.shape[0]} sequences of {ids.shape[1]} tokens "
    f"(tolerance {tolerance:g}): {'ok' if passed else 'FAILED'}"
  )
  return VerifyResult(error, name, passed)
