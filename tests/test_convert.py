"""Tests for `python -m convert`: official/HF checkpoints -> Flax -> PyTorch again, and every bad input refused.

PyTorch and transformers are the reference only: they write the source checkpoints (torch.save, save_pretrained)
and compute the reference logits; the converter itself never imports torch.
"""

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from convert import artifact
from convert.cli import main
from convert.export import export
from mamba_jax import from_pretrained
from mamba_jax.config import MambaConfig
from mamba_jax.loading import abstract_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [("mamba1", True), ("mamba1", False), ("mamba2", True), ("mamba2", False)]
IDS = np.random.default_rng(1).integers(0, 100, size=(2, 13))  # 13: not a multiple of the chunk size 8


def _ss_config(arch: str, tied: bool) -> dict:
  """A state-spaces config.json as mamba_ssm writes it: unpadded vocab + pad multiple, mixer kwargs in ssm_cfg."""
  ssm_cfg = {"d_state": 8} if arch == "mamba1" else {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}
  return {
    "d_model": 32,
    "d_intermediate": 0,
    "n_layer": 2,
    "vocab_size": 100,
    "ssm_cfg": ssm_cfg,
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": tied,
  }


def _torch_model(arch: str, tied: bool):
  common = dict(hidden_size=32, num_hidden_layers=2, vocab_size=104, tie_word_embeddings=tied, use_bias=False)
  if arch == "mamba1":
    config = transformers.MambaConfig(state_size=8, expand=2, time_step_rank=2, **common)
    cls = transformers.MambaForCausalLM
  else:
    config = transformers.Mamba2Config(state_size=16, head_dim=16, num_heads=4, n_groups=1, chunk_size=8, **common)
    cls = transformers.Mamba2ForCausalLM
  torch.manual_seed(VARIANTS.index((arch, tied)))
  model = cls(config).eval()
  with torch.no_grad():  # non-trivial norm weights and D, so that a mix-up of leaves shows
    for name, p in model.named_parameters():
      if name.endswith(("norm.weight", "norm_f.weight", ".D")):
        p.copy_(1 + 0.3 * torch.randn_like(p))
  return model


def _logits(model, ids=IDS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def _rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))


def _write_ss(model, directory: Path, arch: str, tied: bool, dtype=None) -> Path:
  """state-spaces format: torch.save of the state dict under mamba_ssm's names (`embedding`, lm_head listed)."""
  directory.mkdir(parents=True)
  state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()}
  if dtype is not None:
    state = {k: v.to(dtype) for k, v in state.items()}
  torch.save(state, directory / "pytorch_model.bin")
  (directory / "config.json").write_text(json.dumps(_ss_config(arch, tied)))
  return directory


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """{(format, arch, tied): (source directory, torch model)} for both official formats and all four variants."""
  root = tmp_path_factory.mktemp("sources")
  out = {}
  for arch, tied in VARIANTS:
    model = _torch_model(arch, tied)
    ss = _write_ss(model, root / f"ss-{arch}-{tied}", arch, tied)
    hf = root / f"hf-{arch}-{tied}"
    model.save_pretrained(hf)
    (hf / "tokenizer.json").write_text('{"version": "1.0"}')
    out["ss", arch, tied] = (ss, model)
    out["hf", arch, tied] = (hf, model)
  return out


def _run(*argv) -> int:
  return main([*map(str, argv), "--quiet"])


def _nothing_written(out: Path) -> bool:
  parent = out.parent
  return not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in parent.iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# Conversion matches PyTorch


@pytest.mark.parametrize("src_format", ["ss", "hf"])
@pytest.mark.parametrize("arch,tied", VARIANTS)
def test_convert_matches_pytorch(sources, tmp_path, src_format, arch, tied):
  source, model = sources[src_format, arch, tied]
  fmt = "orbax" if (arch == "mamba1") == tied else "safetensors"  # both output formats across the variants
  out = tmp_path / "out"
  assert _run(source, "--out", out, "--format", fmt) == 0

  manifest = json.loads((out / "manifest.json").read_text())
  cfg = MambaConfig.from_json(out / "config.json")
  assert (cfg.arch, cfg.tie_embeddings, cfg.padded_vocab_size) == (arch, tied, 104)
  assert manifest["format"] == fmt and manifest["arch"] == arch
  assert manifest["parameters"] == sum(p.numel() for p in model.parameters())  # tied head counted once, as torch
  assert manifest["source_format"] == {"ss": "state-spaces", "hf": "hf"}[src_format]
  assert artifact.verify_checksums(out) == []
  assert (out / "tokenizer.json").exists() == (src_format == "hf")

  params = artifact.read_params(out)
  assert set(params) == set(abstract_params(cfg))  # one copy of a tied head: no lm_head at all
  emb = model.state_dict()["backbone.embeddings.weight"].numpy()
  np.testing.assert_array_equal(params["backbone", "embedding", "embedding"], emb)

  assert _rel_err(from_pretrained(out)(IDS), _logits(model)) <= 1e-4


def test_dtypes_keep_fp16_and_bfloat16(sources, tmp_path):
  """An fp16 .bin (as the Mamba2 releases) kept fp16, or cast to bf16; A_log, D, dt_bias and norms float32."""
  _, model = sources["ss", "mamba2", True]
  source = _write_ss(model, tmp_path / "fp16", "mamba2", True, dtype=torch.float16)
  for dtype, fmt, want in [("keep", "orbax", np.float16), ("bfloat16", "safetensors", "bfloat16")]:
    out = tmp_path / f"out-{dtype}"
    assert _run(source, "--out", out, "--dtype", dtype, "--format", fmt) == 0
    params = artifact.read_params(out)
    layer = ("backbone", "layers", 0)
    assert params[(*layer, "mixer", "in_proj", "kernel")].dtype == np.dtype(want)
    assert params["backbone", "embedding", "embedding"].dtype == np.dtype(want)
    for leaf in [
      ("mixer", "A_log"),
      ("mixer", "D"),
      ("mixer", "dt_bias"),
      ("mixer", "norm", "weight"),
      ("norm", "weight"),
    ]:
      assert params[(*layer, *leaf)].dtype == np.float32, leaf
    assert json.loads((out / "manifest.json").read_text())["dtype"] == np.dtype(want).name
  # fp16 storage then float32 compute: within fp16 rounding of the weights.
  assert _rel_err(from_pretrained(tmp_path / "out-keep", dtype="float32")(IDS), _logits(model)) < 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# Round trip: Flax -> export -> PyTorch load -> same logits


@pytest.mark.parametrize("arch,tied", [("mamba1", False), ("mamba2", True)])
def test_export_round_trip(sources, tmp_path, arch, tied):
  source, model = sources["ss", arch, tied]
  flax_dir = tmp_path / "flax"
  assert _run(source, "--out", flax_dir) == 0
  ref = _logits(model)

  assert _run("--to", "hf", flax_dir, "--out", tmp_path / "hf") == 0
  cls = transformers.MambaForCausalLM if arch == "mamba1" else transformers.Mamba2ForCausalLM
  assert _rel_err(_logits(cls.from_pretrained(tmp_path / "hf").eval()), ref) <= 1e-6

  assert _run("--to", "state-spaces", flax_dir, "--out", tmp_path / "ss") == 0
  ss_config = json.loads((tmp_path / "ss" / "config.json").read_text())
  # the same architecture (dt_rank "auto" comes back as its value)
  assert (
    MambaConfig.from_dict(ss_config).to_state_spaces_dict()
    == MambaConfig.from_dict(_ss_config(arch, tied)).to_state_spaces_dict()
  )
  state = torch.load(tmp_path / "ss" / "pytorch_model.bin", weights_only=True)
  assert "lm_head.weight" in state and "backbone.embedding.weight" in state  # mamba_ssm loads strictly
  fresh = cls(model.config).eval()
  fresh.load_state_dict({k.replace(".embedding.", ".embeddings."): v for k, v in state.items()}, strict=True)
  assert _rel_err(_logits(fresh), ref) <= 1e-6

  # The library entry point the calibration package uses: a loaded model straight to disk.
  export(from_pretrained(flax_dir), MambaConfig.from_json(flax_dir / "config.json"), tmp_path / "lib", "hf")
  assert _rel_err(_logits(cls.from_pretrained(tmp_path / "lib").eval()), ref) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# --verify


def test_verify(sources, tmp_path, capsys, monkeypatch):
  source, _ = sources["hf", "mamba2", False]
  assert _run(source, "--out", tmp_path / "ok", "--verify") == 0
  assert "max relative logit error vs PyTorch" in capsys.readouterr().out

  import convert.verify

  true_logits = convert.verify.jax_logits
  monkeypatch.setattr(convert.verify, "jax_logits", lambda d, ids: true_logits(d, ids) * 1.01)
  assert _run(source, "--out", tmp_path / "bad", "--verify") == 1
  assert "FAILED" in capsys.readouterr().out
  assert _nothing_written(tmp_path / "bad")

  monkeypatch.setattr(convert.verify, "jax_logits", true_logits)
  monkeypatch.setattr(convert.verify, "torch_available", lambda: False)
  assert _run(source, "--out", tmp_path / "notorch", "--verify") == 0
  printed = capsys.readouterr().out
  assert "PyTorch reference skipped" in printed and "vs the source loaded directly" in printed


# ---------------------------------------------------------------------------------------------------------------------
# Refused inputs: a clear message, exit status 2, nothing written


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_bin_is_refused_and_never_runs(tmp_path, capsys):
  source, marker, out = tmp_path / "evil", tmp_path / "pwned", tmp_path / "out"
  source.mkdir()
  (source / "config.json").write_text(json.dumps(_ss_config("mamba2", True)))
  with zipfile.ZipFile(source / "pytorch_model.bin", "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"backbone.embedding.weight": _Evil(marker)}, protocol=2))
    zf.writestr("archive/version", "3\n")
  assert _run(source, "--out", out) == 2
  err = capsys.readouterr().err
  assert "system" in err and "nothing from the file was executed" in err
  assert not marker.exists()
  assert _nothing_written(out)


def _copy(source: Path, tmp_path: Path) -> Path:
  return Path(shutil.copytree(source, tmp_path / "src"))


def _refused(source: Path, tmp_path: Path, capsys, *extra) -> str:
  out = tmp_path / "out"
  assert _run(source, "--out", out, *extra) == 2
  assert _nothing_written(out)
  return capsys.readouterr().err


def test_missing_config(sources, tmp_path, capsys):
  source = _copy(sources["ss", "mamba1", True][0], tmp_path)
  (source / "config.json").unlink()
  assert "no config.json" in _refused(source, tmp_path, capsys)


def test_missing_weights(sources, tmp_path, capsys):
  source = _copy(sources["hf", "mamba1", True][0], tmp_path)
  (source / "model.safetensors").unlink()
  assert "has no weights" in _refused(source, tmp_path, capsys)


def test_hybrid_not_supported(sources, tmp_path, capsys):
  source = _copy(sources["ss", "mamba2", True][0], tmp_path)
  config = {**_ss_config("mamba2", True), "attn_layer_idx": [1], "attn_cfg": {"num_heads": 2}}
  (source / "config.json").write_text(json.dumps(config))
  err = _refused(source, tmp_path, capsys)
  assert "attention layers" in err and "not supported" in err


def test_missing_and_extra_keys_listed(sources, tmp_path, capsys):
  source = tmp_path / "src"
  state = {k.replace("embeddings", "embedding"): v for k, v in sources["ss", "mamba2", False][1].state_dict().items()}
  del state["backbone.layers.1.mixer.D"]
  state["backbone.layers.0.mixer.mystery.weight"] = torch.zeros(3)
  source.mkdir()
  torch.save(state, source / "pytorch_model.bin")
  (source / "config.json").write_text(json.dumps(_ss_config("mamba2", False)))
  err = _refused(source, tmp_path, capsys)
  assert "missing keys (1): backbone.layers.1.mixer.D" in err
  assert "unexpected keys (1): backbone.layers.0.mixer.mystery.weight" in err


def test_shape_mismatch_listed(sources, tmp_path, capsys):
  source = _copy(sources["ss", "mamba1", False][0], tmp_path)
  config = {**_ss_config("mamba1", False), "d_model": 48}  # weights are for d_model 32
  (source / "config.json").write_text(json.dumps(config))
  err = _refused(source, tmp_path, capsys)
  assert "shape mismatches" in err
  assert "backbone.layers.0.mixer.in_proj.weight: expected (192, 48), found (128, 32)" in err


@pytest.mark.parametrize("kind", ["ss", "hf"])
def test_truncated_file(sources, tmp_path, capsys, kind):
  source = _copy(sources[kind, "mamba2", True][0], tmp_path)
  weights = source / ("pytorch_model.bin" if kind == "ss" else "model.safetensors")
  data = weights.read_bytes()
  weights.write_bytes(data[: len(data) // 2])
  assert "truncated" in _refused(source, tmp_path, capsys)


def test_nonfinite_weights_warn_or_refuse_with_strict(sources, tmp_path, capsys):
  _, model = sources["ss", "mamba1", True]
  source = tmp_path / "src"
  state = {k.replace("embeddings", "embedding"): v.clone() for k, v in model.state_dict().items()}
  state["backbone.layers.1.mixer.x_proj.weight"][0, :2] = torch.tensor([float("nan"), float("inf")])
  source.mkdir()
  torch.save(state, source / "pytorch_model.bin")
  (source / "config.json").write_text(json.dumps(_ss_config("mamba1", True)))

  err = _refused(source, tmp_path, capsys, "--strict")
  assert "backbone.layers.1.mixer.x_proj.weight holds 2 NaN/Inf" in err

  assert _run(source, "--out", tmp_path / "out") == 0
  err = capsys.readouterr().err
  assert "warning: NaN/Inf values in 1 tensors: backbone.layers.1.mixer.x_proj.weight (2)" in err
  assert json.loads((tmp_path / "out" / "manifest.json").read_text())["nonfinite"] == {
    "backbone.layers.1.mixer.x_proj.weight": 2
  }


@pytest.mark.parametrize("fmt", ["orbax", "safetensors"])
def test_disk_full(sources, tmp_path, capsys, monkeypatch, fmt):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(artifact, "write_orbax" if fmt == "orbax" else "write_safetensors", full)
  err = _refused(sources["ss", "mamba2", True][0], tmp_path, capsys, "--format", fmt)
  assert "no space left on the device" in err and "nothing was written" in err


def test_existing_output_needs_force(sources, tmp_path, capsys):
  source = sources["hf", "mamba1", False][0]
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert _run(source, "--out", out) == 2
  assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
  assert _run(source, "--out", out, "--force") == 0
  assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old copy left behind


def test_usage_errors():
  assert main(["--dtype", "float8", "x"]) == 2
  assert main([]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Command line in a subprocess: --help, and the Hugging Face cache under HF_HUB_OFFLINE=1


def _python_m_convert(*argv, cwd, env=None):
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
  return subprocess.run(
    [sys.executable, "-m", "convert", *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
  )


def test_help(tmp_path):
  result = _python_m_convert("--help", cwd=tmp_path)
  assert result.returncode == 0
  assert "examples:" in result.stdout and "--to" in result.stdout and "exit status" in result.stdout


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
  """Lays files out as huggingface_hub's cache does: blobs by hash, a snapshot of symlinks, refs/main -> commit."""
  repo = cache / f"models--{repo_id.replace('/', '--')}"
  commit = hashlib.sha1(repo_id.encode()).hexdigest()
  (repo / "blobs").mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  snapshot = repo / "snapshots" / commit
  snapshot.mkdir(parents=True)
  for name, path in files.items():
    data = path.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


def test_hub_source_from_offline_cache(sources, tmp_path):
  source, model = sources["ss", "mamba2", True]
  cache = tmp_path / "hub"
  _fake_hub_cache(cache, "owner/tiny-mamba2", {n: source / n for n in ("config.json", "pytorch_model.bin")})
  env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}

  result = _python_m_convert("owner/tiny-mamba2", cwd=tmp_path, env=env)
  assert result.returncode == 0, result.stderr
  out = tmp_path / "tiny-mamba2-flax"
  manifest = json.loads((out / "manifest.json").read_text())
  assert (
    manifest["repo_id"] == "owner/tiny-mamba2" and manifest["commit"] == hashlib.sha1(b"owner/tiny-mamba2").hexdigest()
  )
  assert _rel_err(from_pretrained(out)(IDS), _logits(model)) <= 1e-4

  result = _python_m_convert("owner/not-cached", cwd=tmp_path, env=env)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "owner/not-cached" in lines[0], result.stderr
  assert not (tmp_path / "not-cached-flax").exists()


@pytest.mark.parametrize("shape", [(200, 130), (67, 301)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_blocked_transpose(shape, dtype):
  """The fast transposed copy used for large Linear weights (tiny test models are below its size threshold)."""
  import ml_dtypes

  torch_weight = np.random.default_rng(0).standard_normal(shape).astype(dtype)
  for out_dtype in (dtype, ml_dtypes.bfloat16):
    got = artifact.contiguous(torch_weight.T, np.dtype(out_dtype))
    assert got.flags.c_contiguous and got.dtype == out_dtype
    np.testing.assert_array_equal(got, torch_weight.T.astype(out_dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Mistral-native (Codestral-style) and sharded .bin sources


def test_mistral_native_source_with_groups(tmp_path):
  """A Codestral-layout folder: params.json (dim, n_layers, n_groups, ...) and consolidated.safetensors whose keys
  carry mistral_inference's `model.` prefix. Every other Mamba2 size takes mamba_ssm's defaults (d_state 128,
  headdim 64, expand 2, chunk 256), so the torch reference is built with those; ngroups 2, untied head."""
  from safetensors.torch import save_file

  config = transformers.Mamba2Config(
    hidden_size=64, num_hidden_layers=2, vocab_size=96, state_size=128, head_dim=64, num_heads=2, n_groups=2,
    chunk_size=256, tie_word_embeddings=False, use_bias=False,
  )  # fmt: skip
  torch.manual_seed(5)
  ref = transformers.Mamba2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith(("norm.weight", ".D")):
        p.copy_(1 + 0.3 * torch.randn_like(p))
  src = tmp_path / "codestral-tiny"
  src.mkdir()
  state = {f"model.{k.replace('embeddings', 'embedding')}": v.contiguous() for k, v in ref.state_dict().items()}
  save_file(state, src / "consolidated.safetensors")
  params = dict(dim=64, n_layers=2, vocab_size=96, n_groups=2, rms_norm=True, residual_in_fp32=True,
                fused_add_norm=True, pad_vocab_size_multiple=1, tie_embeddings=False, model_type="mamba")  # fmt: skip
  (src / "params.json").write_text(json.dumps(params))
  out = tmp_path / "out"
  assert _run(src, "--out", out) == 0
  model = from_pretrained(out)
  assert model.cfg.ngroups == 2 and model.cfg.d_state == 128 and not model.cfg.tie_embeddings
  ids = IDS % 96
  # transformers >= 5 normalises the gated norm per group, as mamba_ssm does (see test_parity_hf for older ones).
  assert _rel_err(model(ids), _logits(ref, ids)) <= 1e-4
  assert _rel_err(from_pretrained(src)(ids), _logits(ref, ids)) <= 1e-4  # and straight from the source folder


def test_sharded_bin_index(sources, tmp_path):
  """pytorch_model-0000k-of-0000n.bin shards with a weight_map index, as transformers writes large .bin checkpoints."""
  src, ref = sources["ss", "mamba1", False]
  state = torch.load(src / "pytorch_model.bin", weights_only=True)
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  shutil.copy(src / "config.json", sharded / "config.json")
  keys = sorted(state)
  shards = {
    "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
    "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
  }
  weight_map = {}
  for name, names in shards.items():
    torch.save({k: state[k] for k in names}, sharded / name)
    weight_map.update(dict.fromkeys(names, name))
  (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  out = tmp_path / "out"
  assert _run(sharded, "--out", out, "--format", "safetensors") == 0
  assert _rel_err(from_pretrained(out)(IDS), _logits(ref)) <= 1e-4
  (sharded / "pytorch_model-00002-of-00002.bin").unlink()
  assert _run(sharded, "--out", tmp_path / "out2") == 2  # a shard the index names is missing
  assert _nothing_written(tmp_path / "out2")


def test_to_hf_straight_from_a_state_spaces_folder(sources, tmp_path):
  """`--to hf` also takes an unconverted official checkpoint: a plain state-spaces -> transformers format change."""
  source, model = sources["ss", "mamba2", True]
  assert _run("--to", "hf", source, "--out", tmp_path / "hf") == 0
  assert (
    _rel_err(_logits(transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()), _logits(model)) <= 1e-6
  )
