"""Every official checkpoint configuration: parameter shapes and counts without allocating (jax.eval_shape)."""

import pytest

from mamba_jax import MambaConfig
from mamba_jax.loading import abstract_params

# Reference doc §6.1 / §6.2: configs as the checkpoints' config.json give them, and unique parameter counts.
MAMBA1 = {
  "mamba-130m": (24, 768, 129_135_360),
  "mamba-370m": (48, 1024, 371_516_416),
  "mamba-790m": (48, 1536, 793_204_224),
  "mamba-1.4b": (48, 2048, 1_372_178_432),
  "mamba-2.8b": (64, 2560, 2_768_345_600),
}
MAMBA2 = {
  "mamba2-130m": (24, 768, 128_989_632),
  "mamba2-370m": (48, 1024, 368_346_624),
  "mamba2-780m": (48, 1536, 780_161_280),
  "mamba2-1.3b": (48, 2048, 1_343_757_312),
  "mamba2-2.7b": (64, 2560, 2_702_599_680),
}


def _count(params):
  total = 0
  for s in params.values():
    n = 1
    for d in s.shape:
      n *= d
    total += n
  return total


@pytest.mark.parametrize("name", MAMBA1)
def test_mamba1_official_shapes(name):
  n_layer, d_model, expected = MAMBA1[name]
  cfg = MambaConfig.from_dict(
    dict(d_model=d_model, n_layer=n_layer, vocab_size=50277, ssm_cfg={}, rms_norm=True, residual_in_fp32=True,
         fused_add_norm=True, pad_vocab_size_multiple=8)
  )  # fmt: skip
  params = abstract_params(cfg)
  e, r = 2 * d_model, -(-d_model // 16)
  mixer = ("backbone", "layers", n_layer - 1, "mixer")
  assert params[("backbone", "embedding", "embedding")].shape == (50280, d_model)
  assert params[(*mixer, "in_proj", "kernel")].shape == (d_model, 2 * e)
  assert params[(*mixer, "x_proj", "kernel")].shape == (e, r + 32)
  assert params[(*mixer, "dt_proj", "kernel")].shape == (r, e)
  assert params[(*mixer, "conv1d", "kernel")].shape == (4, e)
  assert params[(*mixer, "A_log")].shape == (e, 16)
  assert ("lm_head", "kernel") not in params  # tied
  assert _count(params) == expected


@pytest.mark.parametrize("name", MAMBA2)
def test_mamba2_official_shapes(name):
  n_layer, d_model, expected = MAMBA2[name]
  cfg = MambaConfig.from_dict(
    dict(d_model=d_model, d_intermediate=0, n_layer=n_layer, vocab_size=50277, ssm_cfg={"layer": "Mamba2"},
         attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
         pad_vocab_size_multiple=16, tie_embeddings=True)
  )  # fmt: skip
  params = abstract_params(cfg)
  e, h = 2 * d_model, 2 * d_model // 64
  mixer = ("backbone", "layers", 0, "mixer")
  assert params[("backbone", "embedding", "embedding")].shape == (50288, d_model)
  assert params[(*mixer, "in_proj", "kernel")].shape == (d_model, 2 * e + 2 * 128 + h)
  assert params[(*mixer, "conv1d", "kernel")].shape == (4, e + 256)
  assert params[(*mixer, "A_log")].shape == (h,) and params[(*mixer, "D")].shape == (h,)
  assert params[(*mixer, "norm", "weight")].shape == (e,)
  assert _count(params) == expected


def test_mamba2_2p7b_pinned_shapes():
  cfg = MambaConfig.from_dict(dict(d_model=2560, n_layer=64, vocab_size=50277, ssm_cfg={"layer": "Mamba2"},
                                   pad_vocab_size_multiple=16))  # fmt: skip
  params = abstract_params(cfg)
  assert params[("backbone", "layers", 0, "mixer", "in_proj", "kernel")].shape == (2560, 10576)
  assert cfg.conv_dim == 5376 and cfg.nheads == 80


def test_codestral_style_shapes():
  """Mistral-native Codestral config (ngroups 8, untied head, vocab 32768); in_proj (18560, 4096) per the doc."""
  cfg = MambaConfig.from_dict(dict(dim=4096, n_layers=64, vocab_size=32768, n_groups=8, rms_norm=True,
                                   residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=1,
                                   tie_embeddings=False, model_type="mamba"))  # fmt: skip
  params = abstract_params(cfg)
  mixer = ("backbone", "layers", 0, "mixer")
  assert params[(*mixer, "in_proj", "kernel")].shape == (4096, 18560)
  assert params[(*mixer, "conv1d", "kernel")].shape == (4, 10240)
  assert params[(*mixer, "norm", "weight")].shape == (8192,)
  assert params[("lm_head", "kernel")].shape == (4096, 32768)
  assert cfg.d_inner // cfg.ngroups == 1024  # gated-norm group size
  # Per layer: in_proj + conv (weight, bias) + dt_bias + A_log + D + gated norm + out_proj + block norm.
  per_layer = 4096 * 18560 + 10240 * 5 + 3 * 128 + 8192 + 8192 * 4096 + 4096
  assert _count(params) == 64 * per_layer + 2 * 32768 * 4096 + 4096
  assert round(64 * per_layer / 1e9 + 2 * 32768 * 4096 / 1e9, 3) == 7.285


def test_hf_config_equivalent_to_state_spaces():
  ss = MambaConfig.from_dict(dict(d_model=768, n_layer=24, vocab_size=50277, ssm_cfg={}, pad_vocab_size_multiple=8))
  hf = MambaConfig.from_dict(
    dict(model_type="mamba", hidden_size=768, num_hidden_layers=24, intermediate_size=1536, state_size=16,
         conv_kernel=4, expand=2, time_step_rank=48, vocab_size=50280, use_bias=False, use_conv_bias=True)
  )  # fmt: skip
  assert _count(abstract_params(ss)) == _count(abstract_params(hf)) == 129_135_360
