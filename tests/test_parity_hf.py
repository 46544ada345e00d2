"""Logits of `from_pretrained` models against transformers' MambaForCausalLM / Mamba2ForCausalLM (CPU, float32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mamba_jax
from tests.conftest import make_hf_mamba, rel_err

CHUNK = 8
LENGTHS = [1, 7, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5]


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  """float32 matmuls at full precision: XLA's default on GPU is TF32, ~1e-3 off the torch logits (seen on an H100)."""
  with jax.default_matmul_precision("highest"):
    yield


def _torch_logits(torch, model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("tied", [True, False])
def test_mamba1_logits_match_transformers(torch_mods, tmp_path, tied):
  torch, _ = torch_mods
  ref = make_hf_mamba(torch_mods, tmp_path, "mamba1", tie_word_embeddings=tied)
  model = mamba_jax.from_pretrained(tmp_path)
  assert (model.lm_head is None) == tied
  rng = np.random.default_rng(0)
  for length in LENGTHS:
    ids = rng.integers(0, 96, (2, length))
    want = _torch_logits(torch, ref, ids)
    for unroll in (1, 2):  # one block per layer-scan iteration, and two (`layer_scan_unroll`)
      model.layer_scan_unroll = unroll
      out = np.asarray(model(jnp.asarray(ids)))
      assert out.shape == (2, length, 96)
      assert rel_err(out, want) <= 1e-4, (length, unroll)


def test_mamba2_logits_match_transformers(torch_mods, tmp_path):
  torch, _ = torch_mods
  ref = make_hf_mamba(torch_mods, tmp_path, "mamba2", chunk_size=CHUNK, n_groups=1)
  model = mamba_jax.from_pretrained(tmp_path)
  assert model.cfg.chunk_size == CHUNK
  rng = np.random.default_rng(1)
  for length in LENGTHS:
    ids = rng.integers(0, 96, (2, length))
    want = _torch_logits(torch, ref, ids)
    for scan_layers in (True, False):  # blocks as one lax.scan, and inlined (calibrate's --layers)
      model.scan_layers = scan_layers
      assert rel_err(model(jnp.asarray(ids)), want) <= 1e-4, (length, scan_layers)


def _grouped_gated_norm_forward(torch, ngroups):
  """The gated RMSNorm as mamba_ssm defines it (reference doc §3.4 step 8): norm(y * silu(z)) per contiguous group."""

  def forward(self, hidden_states, gate=None):
    dtype = hidden_states.dtype
    v = hidden_states.to(torch.float32)
    if gate is not None:
      v = v * torch.nn.functional.silu(gate.to(torch.float32))
    g = v.reshape(*v.shape[:-1], ngroups, v.shape[-1] // ngroups)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * g.reshape(v.shape).to(dtype)

  return forward


def test_mamba2_two_groups_matches_grouped_reference(torch_mods, tmp_path, monkeypatch):
  """ngroups=2. transformers' MambaRMSNormGated long normalised over all channels, ignoring groups (fixed by PR
  #40861 in recent releases), while mamba_ssm normalises each of the `ngroups` contiguous channel groups on its own.
  We follow mamba_ssm, so the torch reference's gated norm is replaced by the grouped definition written here from
  the reference doc, whatever the installed transformers does; the SSD itself (B/C groups) stays transformers'."""
  torch, _ = torch_mods
  ref = make_hf_mamba(torch_mods, tmp_path, "mamba2", chunk_size=CHUNK, n_groups=2)
  norm_cls = type(ref.backbone.layers[0].mixer.norm)
  rng = np.random.default_rng(2)
  ids = rng.integers(0, 96, (2, 3 * CHUNK + 3))
  monkeypatch.setattr(norm_cls, "forward", _grouped_gated_norm_forward(torch, 1))
  ungrouped = _torch_logits(torch, ref, ids)
  monkeypatch.setattr(norm_cls, "forward", _grouped_gated_norm_forward(torch, 2))
  model = mamba_jax.from_pretrained(tmp_path)
  assert model.cfg.ngroups == 2
  for length in [1, CHUNK + 1, 3 * CHUNK + 3]:
    grouped = _torch_logits(torch, ref, ids[:, :length])
    assert rel_err(model(jnp.asarray(ids[:, :length])), grouped) <= 1e-4, length
  # The two definitions really differ here, so the comparison above is not vacuous.
  assert rel_err(ungrouped, grouped) > 1e-3


def test_from_pretrained_dtype(torch_mods, tmp_path):
  make_hf_mamba(torch_mods, tmp_path, "mamba2")
  model = mamba_jax.from_pretrained(tmp_path, dtype="bfloat16")
  layer = model.backbone.layers[0].mixer
  assert layer.in_proj.kernel[...].dtype == jnp.bfloat16
  assert layer.A_log[...].dtype == jnp.float32 and layer.D[...].dtype == jnp.float32
  logits = model(jnp.zeros((1, 5), jnp.int32))
  assert logits.dtype == jnp.bfloat16 and bool(jnp.isfinite(logits.astype(jnp.float32)).all())
  with pytest.raises(ValueError, match="not a dtype"):
    mamba_jax.from_pretrained(tmp_path, dtype="float33")


def test_from_pretrained_sharded_safetensors(torch_mods, tmp_path):
  torch, _ = torch_mods
  ref = make_hf_mamba(torch_mods, tmp_path / "full", "mamba1")
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  model = mamba_jax.from_pretrained(tmp_path / "sharded")
  ids = np.arange(10)[None] % 96
  assert rel_err(model(jnp.asarray(ids)), _torch_logits(torch, ref, ids)) <= 1e-4


def test_from_pretrained_missing_pieces(tmp_path, torch_mods):
  with pytest.raises(ValueError, match="config.json"):
    mamba_jax.from_pretrained(tmp_path)
  make_hf_mamba(torch_mods, tmp_path, "mamba1")
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(ValueError, match="weights"):
    mamba_jax.from_pretrained(tmp_path)
  with pytest.raises(Exception, match="no such directory"):
    mamba_jax.from_pretrained(tmp_path / "missing")


def test_from_pretrained_state_spaces_bin(torch_mods, tmp_path):
  """A state-spaces directory (config.json with ssm_cfg + torch.save'd pytorch_model.bin) loads without conversion."""
  torch, _ = torch_mods
  ref = make_hf_mamba(torch_mods, tmp_path / "hf", "mamba2", tie_word_embeddings=True)
  state = {k.replace("embeddings", "embedding"): v for k, v in ref.state_dict().items()}
  (tmp_path / "ss").mkdir()
  torch.save(state, tmp_path / "ss" / "pytorch_model.bin")
  cfg = mamba_jax.MambaConfig.from_json(tmp_path / "hf" / "config.json")
  ss_config = cfg.to_state_spaces_dict()
  ss_config["vocab_size"], ss_config["pad_vocab_size_multiple"] = 93, 8  # 93 padded to 96 rows, as mamba_ssm does
  (tmp_path / "ss" / "config.json").write_text(json.dumps(ss_config))
  model = mamba_jax.from_pretrained(tmp_path / "ss")
  assert model.cfg.vocab_size == 93 and model.cfg.padded_vocab_size == 96 and model.lm_head is None
  ids = np.arange(20)[None] % 93
  assert rel_err(model(jnp.asarray(ids)), _torch_logits(torch, ref, ids)) <= 1e-4
