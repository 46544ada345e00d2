"""One configuration type for Mamba1 and Mamba2, read from state-spaces, Hugging Face or Mistral config.json."""

import dataclasses
import json
import math
import os
from typing import Any


class UnsupportedModelError(ValueError):
  """The checkpoint describes an architecture this project does not implement."""


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """Architecture of a Mamba1 or Mamba2 language model.

  Attributes:
    arch: "mamba1" or "mamba2".
    d_model: residual width D.
    n_layer: number of blocks.
    vocab_size: vocabulary size as stored in the source config (state-spaces: unpadded).
    pad_vocab_size_multiple: embedding rows are `vocab_size` rounded up to this multiple.
    d_state: N. d_conv: K, the causal conv width. expand: d_inner = expand * d_model.
    dt_rank: Mamba1 low-rank dt projection R (None: ceil(d_model / 16)).
    headdim: Mamba2 head dimension P. ngroups: Mamba2 B/C groups G.
    d_ssm: Mamba2 channels that go through the SSM (None: all of d_inner).
    D_has_hdim: Mamba2 D is `(d_ssm,)` instead of `(nheads,)`.
    rmsnorm: Mamba2 gated RMSNorm before out_proj. norm_before_gate: norm(y) * silu(z) instead of norm(y * silu(z)).
    dt_limit: Mamba2 clamp on dt after softplus.
    chunk_size: Mamba2 SSD chunk length (speed and rounding only).
    bias: in/out projection biases. conv_bias: conv bias.
    residual_in_fp32: keep the residual stream in float32.
    tie_embeddings: the LM head is the embedding matrix.
    norm_epsilon: every RMSNorm's epsilon (block, final and gated).
  """

  arch: str = "mamba2"
  d_model: int = 768
  n_layer: int = 24
  vocab_size: int = 50277
  pad_vocab_size_multiple: int = 16
  d_state: int = 128
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | None = None
  headdim: int = 64
  ngroups: int = 1
  d_ssm: int | None = None
  D_has_hdim: bool = False
  rmsnorm: bool = True
  norm_before_gate: bool = False
  dt_limit: tuple[float, float] = (0.0, math.inf)
  chunk_size: int = 256
  bias: bool = False
  conv_bias: bool = True
  residual_in_fp32: bool = True
  tie_embeddings: bool = True
  norm_epsilon: float = 1e-5

  def __post_init__(self):
    if self.arch not in ("mamba1", "mamba2"):
      raise UnsupportedModelError(f"arch={self.arch!r}: only 'mamba1' and 'mamba2' are supported")
    object.__setattr__(self, "dt_limit", tuple(_json_float(v) for v in self.dt_limit))
    if self.arch == "mamba2":
      if self.ssm_width % self.headdim:
        raise ValueError(f"d_ssm={self.ssm_width} is not a multiple of headdim={self.headdim}")
      if self.nheads % self.ngroups:
        raise ValueError(f"nheads={self.nheads} is not a multiple of ngroups={self.ngroups}")

  # Derived sizes (names follow mamba_ssm).
  @property
  def d_inner(self) -> int:
    return int(self.expand * self.d_model)

  @property
  def padded_vocab_size(self) -> int:
    m = self.pad_vocab_size_multiple
    return self.vocab_size + (-self.vocab_size) % m

  @property
  def dt_rank_value(self) -> int:
    return math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank

  @property
  def ssm_width(self) -> int:
    """E_ssm: the Mamba2 channels that go through the SSM."""
    return self.d_inner if self.d_ssm is None else self.d_ssm

  @property
  def d_mlp(self) -> int:
    return self.d_inner - self.ssm_width

  @property
  def nheads(self) -> int:
    return self.ssm_width // self.headdim

  @property
  def conv_dim(self) -> int:
    """Channels that go through the causal conv: x (Mamba1), or x, B and C (Mamba2)."""
    return self.d_inner if self.arch == "mamba1" else self.ssm_width + 2 * self.ngroups * self.d_state

  @property
  def d_in_proj(self) -> int:
    if self.arch == "mamba1":
      return 2 * self.d_inner
    return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

  # Reading and writing config.json.
  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MambaConfig":
    """Reads a state-spaces, Hugging Face (`MambaConfig`/`Mamba2Config`) or Mistral (Codestral) config dict."""
    if "arch" in d and "d_model" in d and "ssm_cfg" not in d:  # this project's own normalized form
      fields = {f.name for f in dataclasses.fields(cls)}
      return cls(**{k: v for k, v in d.items() if k in fields})
    model_type = d.get("model_type")
    if model_type in ("mamba", "mamba2") and "hidden_size" in d:
      return _from_hf(cls, d)
    if "dim" in d and "n_layers" in d:
      return _from_mistral(cls, d)
    if "d_model" in d and "n_layer" in d:
      return _from_state_spaces(cls, d)
    if model_type:
      raise UnsupportedModelError(
        f"model_type={model_type!r} is not a Mamba model; supported: state-spaces MambaLMHeadModel configs, "
        "Hugging Face 'mamba' and 'mamba2', Mistral Mamba (Codestral)"
      )
    raise UnsupportedModelError(
      "config.json is not a recognised Mamba config: expected state-spaces keys (d_model, n_layer, ssm_cfg), "
      "Hugging Face keys (model_type 'mamba'/'mamba2', hidden_size, ...) or Mistral keys (dim, n_layers)"
    )

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "MambaConfig":
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or fix the file") from e
    return cls.from_dict(d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["dt_limit"] = list(self.dt_limit)
    return d

  def to_state_spaces_dict(self) -> dict[str, Any]:
    """config.json as mamba_ssm's `MambaLMHeadModel.from_pretrained` expects it."""
    if self.arch == "mamba1":
      ssm_cfg = {"d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand, "bias": self.bias}
      ssm_cfg.update({"conv_bias": self.conv_bias, "dt_rank": self.dt_rank_value})
    else:
      ssm_cfg = {
        "layer": "Mamba2",
        "d_state": self.d_state,
        "d_conv": self.d_conv,
        "expand": self.expand,
        "headdim": self.headdim,
        "ngroups": self.ngroups,
        "d_ssm": self.d_ssm,
        "D_has_hdim": self.D_has_hdim,
        "rmsnorm": self.rmsnorm,
        "norm_before_gate": self.norm_before_gate,
        "dt_limit": list(self.dt_limit),
        "chunk_size": self.chunk_size,
        "bias": self.bias,
        "conv_bias": self.conv_bias,
      }
    return {
      "d_model": self.d_model,
      "d_intermediate": 0,
      "n_layer": self.n_layer,
      "vocab_size": self.vocab_size,
      "ssm_cfg": ssm_cfg,
      "attn_layer_idx": [],
      "attn_cfg": {},
      "rms_norm": True,
      "residual_in_fp32": self.residual_in_fp32,
      "fused_add_norm": True,
      "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
      "tie_embeddings": self.tie_embeddings,
    }

  def to_hf_dict(self) -> dict[str, Any]:
    """config.json for transformers' `MambaForCausalLM` / `Mamba2ForCausalLM` (vocab stored padded)."""
    common = {
      "hidden_size": self.d_model,
      "num_hidden_layers": self.n_layer,
      "vocab_size": self.padded_vocab_size,
      "state_size": self.d_state,
      "conv_kernel": self.d_conv,
      "expand": self.expand,
      "use_bias": self.bias,
      "use_conv_bias": self.conv_bias,
      "residual_in_fp32": self.residual_in_fp32,
      "layer_norm_epsilon": self.norm_epsilon,
      "tie_word_embeddings": self.tie_embeddings,
      "hidden_act": "silu",
    }
    if self.arch == "mamba1":
      return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "intermediate_size": self.d_inner,
        "time_step_rank": self.dt_rank_value,
        **common,
      }
    if self.d_mlp or self.D_has_hdim or self.norm_before_gate or not self.rmsnorm:
      raise UnsupportedModelError(
        "transformers' Mamba2 has no d_ssm < d_inner, D_has_hdim, norm_before_gate or rmsnorm=False; "
        "export this model in the state-spaces format instead"
      )
    return {
      "architectures": ["Mamba2ForCausalLM"],
      "model_type": "mamba2",
      "num_heads": self.nheads,
      "head_dim": self.headdim,
      "n_groups": self.ngroups,
      "chunk_size": self.chunk_size,
      "time_step_limit": list(self.dt_limit),
      "rms_norm": True,
      "norm_before_gate": False,
      **common,
    }

  @classmethod
  def tiny(cls, arch: str = "mamba2", **overrides) -> "MambaConfig":
    """A few-thousand-parameter model for tests."""
    base = dict(arch=arch, d_model=32, n_layer=2, vocab_size=100, pad_vocab_size_multiple=8, chunk_size=8)
    base.update(dict(d_state=16, headdim=16) if arch == "mamba2" else dict(d_state=8))
    base.update(overrides)
    return cls(**base)


def _json_float(v: Any) -> float:
  """A float from JSON; transformers >= 5 writes infinity as {"__float__": "Infinity"}."""
  if isinstance(v, dict) and "__float__" in v:
    return float(v["__float__"])
  return float(v)


def _check_no_hybrid(d: dict[str, Any]) -> None:
  if d.get("attn_layer_idx"):
    raise UnsupportedModelError(
      f"hybrid model with attention layers at {d['attn_layer_idx']} is not supported (only pure Mamba/Mamba2)"
    )
  if d.get("d_intermediate", 0):
    raise UnsupportedModelError(f"d_intermediate={d['d_intermediate']} (a gated MLP after each mixer) is not supported")
  if not d.get("rms_norm", True):
    raise UnsupportedModelError("rms_norm=false (LayerNorm blocks) is not supported")


def _from_state_spaces(cls, d: dict[str, Any]) -> MambaConfig:
  _check_no_hybrid(d)
  ssm = dict(d.get("ssm_cfg") or {})
  layer = ssm.pop("layer", "Mamba1")
  if layer not in ("Mamba1", "Mamba2"):
    raise UnsupportedModelError(f"ssm_cfg.layer={layer!r} is not supported (only Mamba1 and Mamba2)")
  arch = "mamba1" if layer == "Mamba1" else "mamba2"
  mixer_defaults = (
    dict(d_state=16, d_conv=4, expand=2, bias=False, conv_bias=True)
    if arch == "mamba1"
    else dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, bias=False, conv_bias=True, chunk_size=256)
  )
  known = {
    "d_state",
    "d_conv",
    "expand",
    "dt_rank",
    "bias",
    "conv_bias",
    "headdim",
    "ngroups",
    "d_ssm",
    "D_has_hdim",
    "rmsnorm",
    "norm_before_gate",
    "dt_limit",
    "chunk_size",
  }
  init_only = {
    "dt_min",
    "dt_max",
    "dt_init",
    "dt_scale",
    "dt_init_floor",
    "A_init_range",
    "conv_init",
    "use_fast_path",
    "use_mem_eff_path",
    "process_group",
    "sequence_parallel",
    "layer_idx",
    "device",
    "dtype",
  }
  unknown = set(ssm) - known - init_only
  if unknown:
    raise UnsupportedModelError(f"unknown ssm_cfg keys {sorted(unknown)}; this converter does not know their effect")
  kw = {**mixer_defaults, **{k: v for k, v in ssm.items() if k in known}}
  if kw.get("dt_rank") == "auto":
    kw["dt_rank"] = None
  return cls(
    arch=arch,
    d_model=d["d_model"],
    n_layer=d["n_layer"],
    vocab_size=d.get("vocab_size", 50277),
    pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
    residual_in_fp32=d.get("residual_in_fp32", True),
    tie_embeddings=d.get("tie_embeddings", True),
    **kw,
  )


def _from_hf(cls, d: dict[str, Any]) -> MambaConfig:
  hidden = d["hidden_size"]
  common = dict(
    d_model=hidden,
    n_layer=d["num_hidden_layers"],
    vocab_size=d["vocab_size"],  # HF stores the padded size
    pad_vocab_size_multiple=1,
    d_state=d.get("state_size", 16 if d["model_type"] == "mamba" else 128),
    d_conv=d.get("conv_kernel", 4),
    expand=d.get("expand", 2),
    bias=d.get("use_bias", False),
    conv_bias=d.get("use_conv_bias", True),
    residual_in_fp32=d.get("residual_in_fp32", True),
    norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
  )
  if d["model_type"] == "mamba":
    inner = d.get("intermediate_size", common["expand"] * hidden)
    if inner != common["expand"] * hidden:
      raise UnsupportedModelError(f"intermediate_size={inner} != expand*hidden_size={common['expand'] * hidden}")
    rank = d.get("time_step_rank", "auto")
    return cls(
      arch="mamba1",
      dt_rank=None if rank == "auto" else rank,
      tie_embeddings=d.get("tie_word_embeddings", True),
      **common,
    )
  headdim = d.get("head_dim", 64)
  nheads = d.get("num_heads", common["expand"] * hidden // headdim)
  if nheads * headdim != common["expand"] * hidden:
    raise UnsupportedModelError(
      f"num_heads*head_dim={nheads * headdim} != expand*hidden_size={common['expand'] * hidden}: "
      "transformers' Mamba2 requires the SSM to cover all of d_inner"
    )
  limit = d.get("time_step_limit", (0.0, math.inf))
  return cls(
    arch="mamba2",
    headdim=headdim,
    ngroups=d.get("n_groups", 8),
    chunk_size=d.get("chunk_size", 256),
    dt_limit=tuple(limit) if limit is not None else (0.0, math.inf),
    tie_embeddings=d.get("tie_word_embeddings", False),
    **common,
  )


def _from_mistral(cls, d: dict[str, Any]) -> MambaConfig:
  _check_no_hybrid(d)
  return cls(
    arch="mamba2",
    d_model=d["dim"],
    n_layer=d["n_layers"],
    vocab_size=d["vocab_size"],
    pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 1),
    ngroups=d.get("n_groups", 1),
    residual_in_fp32=d.get("residual_in_fp32", True),
    tie_embeddings=d.get("tie_embeddings", False),
  )
