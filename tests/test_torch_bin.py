"""Tests for convert.torch_bin: torch-free, code-free reading and writing of torch.save checkpoints."""

import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from convert import torch_bin
from convert.torch_bin import CheckpointFormatError, UnsafeCheckpointError, load, load_state_dict, save_state_dict

torch = pytest.importorskip("torch")  # the reference writer/reader only; the module under test never imports it

REPO_ROOT = Path(__file__).resolve().parents[1]

DTYPES = {
  torch.float32: np.float32,
  torch.float16: np.float16,
  torch.bfloat16: ml_dtypes.bfloat16,
  torch.float64: np.float64,
  torch.int64: np.int64,
  torch.int32: np.int32,
  torch.int16: np.int16,
  torch.int8: np.int8,
  torch.uint8: np.uint8,
  torch.bool: np.bool_,
}


def _random(shape, dtype, seed=0):
  g = torch.Generator().manual_seed(seed)
  if dtype.is_floating_point:
    return torch.randn(shape, generator=g).to(dtype)
  if dtype == torch.bool:
    return torch.randn(shape, generator=g) > 0
  info = torch.iinfo(dtype)
  return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)


def _bytes_of(t):
  """Raw bytes of a tensor in C order (bit-exact comparisons, including NaN payloads and bfloat16)."""
  return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(arr, t):
  assert isinstance(arr, np.ndarray)
  assert arr.dtype == np.dtype(DTYPES[t.dtype])
  assert arr.shape == tuple(t.shape)
  assert np.ascontiguousarray(arr).tobytes() == _bytes_of(t)


# ---------------------------------------------------------------------------------------------------------------------
# Reading files written by torch.save


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_reads_every_dtype(tmp_path, dtype):
  sd = {"matrix": _random((3, 5), dtype), "scalar": _random((), dtype, 1), "empty": _random((0, 4), dtype)}
  torch.save(sd, tmp_path / "m.bin")
  out = load_state_dict(tmp_path / "m.bin")
  assert list(out) == list(sd)
  for name, t in sd.items():
    _assert_same(out[name], t)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_views_offsets_and_non_contiguous(tmp_path, legacy):
  base = _random((6, 8), torch.float32)
  sd = {
    "transposed": base.t(),
    "every_other_column": base[:, ::2],
    "row_slice": base[2:4],  # storage offset 16
    "one_row": base[5],
    "expanded": base[0, :3].unsqueeze(0).expand(4, 3),  # stride 0
    "bf16_t": _random((4, 3), torch.bfloat16).t(),
  }
  torch.save(sd, tmp_path / "v.bin", _use_new_zipfile_serialization=not legacy)
  out = load_state_dict(tmp_path / "v.bin")
  for name, t in sd.items():
    _assert_same(out[name], t)
  assert out["row_slice"].flags.c_contiguous and out["transposed"].flags.c_contiguous


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_shared_storage_is_shared_not_copied(tmp_path, legacy):
  w = _random((16, 4), torch.float32)
  sd = {"backbone.embedding.weight": w, "lm_head.weight": w, "first_rows": w[:2]}
  torch.save(sd, tmp_path / "tied.bin", _use_new_zipfile_serialization=not legacy)
  out = load_state_dict(tmp_path / "tied.bin")
  emb, head = out["backbone.embedding.weight"], out["lm_head.weight"]
  _assert_same(emb, w)
  _assert_same(head, w)
  assert np.shares_memory(emb, head) and np.shares_memory(emb, out["first_rows"])
  # Views over the memory-mapped file, not copies: read-only and not owning their data.
  assert not emb.flags.writeable and not emb.flags.owndata


def test_module_state_dict_and_parameters(tmp_path):
  torch.manual_seed(0)
  module = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))
  module.register_buffer("steps", torch.tensor(7))
  sd = module.state_dict()  # an OrderedDict carrying a `_metadata` attribute (a BUILD opcode in the pickle)
  torch.save(sd, tmp_path / "module.bin")
  out = load_state_dict(tmp_path / "module.bin")
  assert list(out) == list(sd)
  for name, t in sd.items():
    _assert_same(out[name], t)
  # Parameters saved as such go through torch._utils._rebuild_parameter.
  params = dict(module.named_parameters())
  torch.save(params, tmp_path / "params.bin")
  out = load_state_dict(tmp_path / "params.bin")
  for name, p in params.items():
    _assert_same(out[name], p.detach())


def test_newer_dtypes_via_untyped_storage(tmp_path):
  sd = {
    "f8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
    "u16": torch.tensor([1, 65535], dtype=torch.uint16),
  }
  torch.save(sd, tmp_path / "new.bin")
  out = load_state_dict(tmp_path / "new.bin")
  assert out["f8"].dtype == ml_dtypes.float8_e4m3fn and out["f8"].astype(np.float32).tolist() == [0.5, -2.0, 448.0]
  assert out["u16"].dtype == np.uint16 and out["u16"].tolist() == [1, 65535]


def test_load_keeps_nested_structure(tmp_path):
  t = _random((2,), torch.float32)
  torch.save({"model": {"w": t}, "step": 3, "names": ["a", "b"]}, tmp_path / "nested.bin")
  out = load(tmp_path / "nested.bin")
  assert out["step"] == 3 and out["names"] == ["a", "b"]
  _assert_same(out["model"]["w"], t)
  with pytest.raises(CheckpointFormatError, match="not a flat state dict.*'model'"):
    load_state_dict(tmp_path / "nested.bin")


def test_load_does_not_import_torch(tmp_path):
  torch.save({"w": _random((3,), torch.bfloat16)}, tmp_path / "w.bin")
  code = (
    "import sys\n"
    "from convert.torch_bin import load_state_dict\n"
    f"sd = load_state_dict({str(tmp_path / 'w.bin')!r})\n"
    "assert sd['w'].shape == (3,)\n"
    "assert 'torch' not in sys.modules, 'torch was imported'\n"
  )
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Bad files


def test_truncated_zip(tmp_path):
  torch.save({"w": _random((64, 64), torch.float32)}, tmp_path / "full.bin")
  data = (tmp_path / "full.bin").read_bytes()
  (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointFormatError, match=r"cut\.bin.*truncated"):
    load_state_dict(tmp_path / "cut.bin")


def test_truncated_legacy(tmp_path):
  torch.save({"w": _random((64, 64), torch.float32)}, tmp_path / "full.bin", _use_new_zipfile_serialization=False)
  data = (tmp_path / "full.bin").read_bytes()
  (tmp_path / "cut.bin").write_bytes(data[:-100])
  with pytest.raises(CheckpointFormatError, match=r"cut\.bin.*truncated"):
    load_state_dict(tmp_path / "cut.bin")


def _rezip(src: Path, dst: Path, replace: dict[str, bytes | None]) -> None:
  """Copies a torch zip, replacing (bytes) or dropping (None) members whose name ends with a key of `replace`."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
    for info in zin.infolist():
      suffix = next((k for k in replace if info.filename.endswith(k)), None)
      if suffix is None:
        zout.writestr(info.filename, zin.read(info))
      elif replace[suffix] is not None:
        zout.writestr(info.filename, replace[suffix])


def test_missing_storage_record(tmp_path):
  torch.save({"a": _random((4,), torch.float32), "b": _random((4,), torch.float32)}, tmp_path / "ok.bin")
  _rezip(tmp_path / "ok.bin", tmp_path / "missing.bin", {"data/1": None})
  with pytest.raises(CheckpointFormatError, match=r"missing\.bin.*data/1.*missing"):
    load_state_dict(tmp_path / "missing.bin")


def test_short_storage_record(tmp_path):
  torch.save({"a": _random((4,), torch.float32)}, tmp_path / "ok.bin")
  _rezip(tmp_path / "ok.bin", tmp_path / "short.bin", {"data/0": b"\0" * 8})
  with pytest.raises(CheckpointFormatError, match=r"8 bytes.*needs 16"):
    load_state_dict(tmp_path / "short.bin")


def test_compressed_members_still_load(tmp_path):
  sd = {"a": _random((40,), torch.float32)}
  torch.save(sd, tmp_path / "ok.bin")
  with zipfile.ZipFile(tmp_path / "ok.bin") as zin, zipfile.ZipFile(tmp_path / "deflated.bin", "w") as zout:
    for info in zin.infolist():
      zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
  _assert_same(load_state_dict(tmp_path / "deflated.bin")["a"], sd["a"])


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "junk.bin").write_bytes(b"definitely not a checkpoint" * 10)
  with pytest.raises(CheckpointFormatError, match="not a torch.save checkpoint"):
    load_state_dict(tmp_path / "junk.bin")


def test_out_of_bounds_tensor_is_refused(tmp_path):
  # A storage of 4 floats but a tensor claiming 100 elements: must not read past the storage.
  torch.save({"a": _random((4,), torch.float32)}, tmp_path / "ok.bin")
  with zipfile.ZipFile(tmp_path / "ok.bin") as z:
    name = next(n for n in z.namelist() if n.endswith("data.pkl"))
    pkl = z.read(name)
  forged = pkl.replace(b"K\x04\x85", b"Kd\x85")  # size (4,) -> (100,); stride (1,) stays
  assert forged != pkl
  _rezip(tmp_path / "ok.bin", tmp_path / "forged.bin", {"data.pkl": forged})
  with pytest.raises(CheckpointFormatError, match="holds only 4"):
    load_state_dict(tmp_path / "forged.bin")


# ---------------------------------------------------------------------------------------------------------------------
# Malicious pickles


class _RunsCommand:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _CallsEval:
  def __reduce__(self):
    return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, protocol):
  marker = tmp_path / "pwned"
  torch.save({"a": _random((4,), torch.float32)}, tmp_path / "ok.bin")
  payload = pickle.dumps({"a": _RunsCommand(f"touch {marker}")}, protocol=protocol)
  _rezip(tmp_path / "ok.bin", tmp_path / "evil.bin", {"data.pkl": payload})
  with pytest.raises(UnsafeCheckpointError, match=r"posix\.system.*nothing from the file was executed"):
    load_state_dict(tmp_path / "evil.bin")
  assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path):
  torch.save({"a": _random((4,), torch.float32)}, tmp_path / "ok.bin")
  _rezip(tmp_path / "ok.bin", tmp_path / "eval.bin", {"data.pkl": pickle.dumps(_CallsEval(), protocol=2)})
  with pytest.raises(UnsafeCheckpointError, match=r"builtins\.eval"):
    load(tmp_path / "eval.bin")


def test_malicious_legacy_pickle_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  with open(tmp_path / "evil_legacy.bin", "wb") as f:
    pickle.dump(torch_bin._LEGACY_MAGIC_NUMBER, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True}, f, protocol=2)
    pickle.dump(_RunsCommand(f"touch {marker}"), f, protocol=2)
  with pytest.raises(UnsafeCheckpointError, match=r"posix\.system"):
    load(tmp_path / "evil_legacy.bin")
  assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _numpy_inputs():
  rng = np.random.default_rng(0)
  out = {}
  for np_dtype in DTYPES.values():
    values = rng.normal(size=(3, 4)) * 50
    out[f"{np.dtype(np_dtype).name}"] = (values > 0) if np_dtype is np.bool_ else values.astype(np_dtype)
  out["scalar"] = np.array(1.5, np.float32)
  out["empty"] = np.zeros((0, 3), np.float16)
  out["big_int"] = np.array([2**40, -(2**62)], np.int64)
  out["transposed"] = rng.normal(size=(5, 3)).astype(np.float32).T  # non-contiguous input
  out["strided"] = np.arange(20, dtype=np.int32)[::3]
  return out


@pytest.mark.parametrize("weights_only", [True, False])
def test_save_is_read_by_torch_bit_for_bit(tmp_path, weights_only):
  arrays = _numpy_inputs()
  save_state_dict(arrays, tmp_path / "pytorch_model.bin")
  assert "pytorch_model/data.pkl" in zipfile.ZipFile(tmp_path / "pytorch_model.bin").namelist()
  out = torch.load(tmp_path / "pytorch_model.bin", weights_only=weights_only)
  assert isinstance(out, OrderedDict) and list(out) == list(arrays)
  for name, arr in arrays.items():
    t = out[name]
    assert DTYPES[t.dtype] == arr.dtype.type, name
    assert tuple(t.shape) == arr.shape, name
    assert _bytes_of(t) == np.ascontiguousarray(arr).tobytes(), name


def test_save_ties_shared_arrays_and_reads_back(tmp_path):
  w = np.random.default_rng(1).normal(size=(32, 8)).astype(ml_dtypes.bfloat16)
  save_state_dict({"backbone.embedding.weight": w, "lm_head.weight": w, "other": w.copy()}, tmp_path / "tied.bin")
  out = torch.load(tmp_path / "tied.bin", weights_only=True)
  emb, head, other = out["backbone.embedding.weight"], out["lm_head.weight"], out["other"]
  assert emb.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
  assert other.untyped_storage().data_ptr() != emb.untyped_storage().data_ptr()
  with zipfile.ZipFile(tmp_path / "tied.bin") as z:
    assert sorted(n for n in z.namelist() if "/data/" in n) == ["tied/data/0", "tied/data/1"]
  # And back through our reader: shared memory again, equal bits.
  back = load_state_dict(tmp_path / "tied.bin")
  assert np.shares_memory(back["backbone.embedding.weight"], back["lm_head.weight"])
  assert back["other"].tobytes() == w.tobytes()


def test_save_aligns_storages_to_64_bytes(tmp_path):
  arrays = {f"w{i}": np.ones(i + 1, np.float32) for i in range(5)}
  save_state_dict(arrays, tmp_path / "a.bin")
  with open(tmp_path / "a.bin", "rb") as fh, zipfile.ZipFile(tmp_path / "a.bin") as z:
    size = os.path.getsize(tmp_path / "a.bin")
    for info in z.infolist():
      if "/data/" in info.filename:
        assert torch_bin._member_data_offset(fh, info, tmp_path / "a.bin", size) % 64 == 0


def test_roundtrip_our_writer_our_reader(tmp_path):
  arrays = _numpy_inputs()
  save_state_dict(arrays, tmp_path / "rt.bin")
  back = load_state_dict(tmp_path / "rt.bin")
  for name, arr in arrays.items():
    assert back[name].dtype == arr.dtype and back[name].shape == arr.shape
    assert back[name].tobytes() == np.ascontiguousarray(arr).tobytes()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
  target = tmp_path / "out.bin"
  target.write_bytes(b"previous contents")

  def failing_chunks(arr):
    yield memoryview(b"partial")
    raise OSError("No space left on device")

  monkeypatch.setattr(torch_bin, "_array_chunks", failing_chunks)
  with pytest.raises(OSError, match="No space"):
    save_state_dict({"w": np.ones(4, np.float32)}, target)
  assert target.read_bytes() == b"previous contents"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_save_refuses_unsupported_dtype(tmp_path):
  with pytest.raises(TypeError, match="cannot be saved"):
    save_state_dict({"s": np.array(["text"])}, tmp_path / "s.bin")
  assert not (tmp_path / "s.bin").exists()


def test_writer_pickle_has_only_state_dict_globals(tmp_path):
  save_state_dict({"a": np.ones(2, np.float32), "b": np.ones(2, np.int8)}, tmp_path / "g.bin")
  with zipfile.ZipFile(tmp_path / "g.bin") as z:
    pkl = z.read("g/data.pkl")
  import pickletools

  globals_ = {arg for op, arg, _ in pickletools.genops(io.BytesIO(pkl)) if op.name == "GLOBAL"}
  assert globals_ == {
    "collections OrderedDict",
    "torch._utils _rebuild_tensor_v2",
    "torch FloatStorage",
    "torch CharStorage",
  }
  assert struct.unpack("<H", pkl[0:2]) == (0x0280,)  # PROTO 2, as torch.save writes


@pytest.mark.parametrize(
  "payload",
  [
    b"\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeK\x01s\x86b.",  # BUILD slot state on a shared stand-in
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x0b\x00\x00\x00__defaults__)sb.",  # BUILD on a function
  ],
  ids=["storage-type", "function"],
)
def test_build_cannot_poison_the_allowed_globals(tmp_path, payload):
  torch.save({"a": _random((4,), torch.float32)}, tmp_path / "ok.bin")
  _rezip(tmp_path / "ok.bin", tmp_path / "poison.bin", {"data.pkl": payload})
  with pytest.raises(CheckpointFormatError):
    load(tmp_path / "poison.bin")
  # The next, honest file still loads with the right dtype.
  out = load_state_dict(tmp_path / "ok.bin")
  assert out["a"].dtype == np.float32


def test_big_endian_byteorder_record(tmp_path):
  sd = {
    "f": _random((3,), torch.float32),
    "b": _random((2, 2), torch.bfloat16),
    "i": _random((5,), torch.int16),
    "c": torch.tensor([1 + 2j, -3.5 + 0.25j], dtype=torch.complex64),
  }
  torch.save(sd, tmp_path / "little.bin")
  swapped = {"byteorder": b"big"}
  for key, (t, unit) in enumerate([(sd["f"], 4), (sd["b"], 2), (sd["i"], 2), (sd["c"], 4)]):
    raw = np.frombuffer(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), np.uint8)
    swapped[f"data/{key}"] = raw.reshape(-1, unit)[:, ::-1].tobytes()
  _rezip(tmp_path / "little.bin", tmp_path / "big.bin", swapped)
  out = load_state_dict(tmp_path / "big.bin")
  for name in ("f", "b", "i"):
    _assert_same(out[name], sd[name])
  assert out["c"].tolist() == [1 + 2j, -3.5 + 0.25j]
