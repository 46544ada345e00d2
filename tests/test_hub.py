"""Tests for convert.hub: resolving local directories and Hub repo ids from a huggingface_hub cache, offline."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import errors

from convert import hub
from convert.hub import ResolvedSource, SourceNotFoundError, resolve_source

REPO_ROOT = Path(__file__).resolve().parents[1]
MAIN = "a" * 40
DEV = "b" * 40
OLD = "c" * 40
SAFETENSORS_FILES = {"config.json": b'{"d_model": 8}', "model.safetensors": b"weights-main"}


def make_cached_repo(cache: Path, repo_id: str, snapshots: dict[str, dict[str, bytes]], refs: dict[str, str]) -> Path:
  """Lays out a repo exactly as huggingface_hub's cache does: blobs by hash, snapshot symlinks, refs files."""
  repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
  for commit, files in snapshots.items():
    for name, data in files.items():
      blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
      blob.parent.mkdir(parents=True, exist_ok=True)
      blob.write_bytes(data)
      link = repo_dir / "snapshots" / commit / name
      link.parent.mkdir(parents=True, exist_ok=True)
      link.symlink_to(os.path.relpath(blob, link.parent))
  for ref, commit in refs.items():
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
  return repo_dir


@pytest.fixture
def cache(tmp_path):
  cache = tmp_path / "hub"
  make_cached_repo(
    cache,
    "state-spaces/mamba-130m",
    {
      MAIN: SAFETENSORS_FILES,
      DEV: {"config.json": b"{}", "pytorch_model.bin": b"weights-dev"},
      OLD: {"config.json": b"{}", "model.safetensors": b"weights-old"},
    },
    {"main": MAIN, "dev": DEV},
  )
  return cache


def test_local_directory(tmp_path):
  (tmp_path / "ckpt").mkdir()
  resolved = resolve_source(str(tmp_path / "ckpt"), revision="ignored")
  assert resolved == ResolvedSource(path=(tmp_path / "ckpt").resolve())


@pytest.mark.parametrize("source", ["./missing/dir", "/no/such/place", "~/nope-xyz/a", "a/b/c"])
def test_missing_directory(source):
  with pytest.raises(SourceNotFoundError, match="no such directory"):
    resolve_source(source)


def test_file_instead_of_directory(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(SourceNotFoundError, match="is a file"):
    resolve_source(tmp_path / "pytorch_model.bin")


@pytest.mark.parametrize(
  ("revision", "commit", "weights"),
  [(None, MAIN, "model.safetensors"), ("dev", DEV, "pytorch_model.bin"), (OLD, OLD, "model.safetensors")],
  ids=["main", "branch", "commit"],
)
def test_cached_revisions(cache, revision, commit, weights):
  resolved = resolve_source("state-spaces/mamba-130m", revision=revision, cache_dir=cache, local_files_only=True)
  assert resolved.path == cache / "models--state-spaces--mamba-130m" / "snapshots" / commit
  assert (resolved.repo_id, resolved.revision, resolved.commit) == (
    "state-spaces/mamba-130m",
    revision or "main",
    commit,
  )
  assert (resolved.path / weights).read_bytes().startswith(b"weights-")


def test_offline_mode_without_local_files_only(cache, monkeypatch):
  # HF_HUB_OFFLINE is read when huggingface_hub is imported; patch the parsed value (the subprocess test below
  # covers the environment variable itself).
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  assert resolve_source("state-spaces/mamba-130m", cache_dir=cache).commit == MAIN
  with pytest.raises(SourceNotFoundError) as info:
    resolve_source("state-spaces/mamba-2.8b", cache_dir=cache)
  message = str(info.value)
  assert "\n" not in message
  assert "state-spaces/mamba-2.8b is not in the Hugging Face cache" in message
  assert "HF_HUB_OFFLINE=1" in message and "run once with network access" in message


def test_uncached_repo_and_unknown_branch(cache):
  with pytest.raises(SourceNotFoundError, match=r"^state-spaces/mamba-2\.8b is not in the Hugging Face cache"):
    resolve_source("state-spaces/mamba-2.8b", cache_dir=cache, local_files_only=True)
  with pytest.raises(SourceNotFoundError, match=r"mamba-130m \(revision nope\) is not in the Hugging Face cache"):
    resolve_source("state-spaces/mamba-130m", revision="nope", cache_dir=cache, local_files_only=True)


def test_snapshot_without_weights(tmp_path):
  make_cached_repo(tmp_path, "owner/config-only", {MAIN: {"config.json": b"{}"}}, {"main": MAIN})
  with pytest.raises(SourceNotFoundError, match=r"no \*\.safetensors or pytorch_model\*\.bin weights"):
    resolve_source("owner/config-only", cache_dir=tmp_path, local_files_only=True)


def _fake_hub(monkeypatch, tmp_path, repo_files):
  """Replaces snapshot_download by a fake that "downloads" the files matching allow_patterns; records the calls."""
  calls = []

  def fake_snapshot_download(repo_id, *, revision, allow_patterns, **kwargs):
    calls.append((revision, tuple(allow_patterns)))
    folder = tmp_path / "snapshots" / MAIN
    folder.mkdir(parents=True, exist_ok=True)
    for name in huggingface_hub.utils.filter_repo_objects(repo_files, allow_patterns=allow_patterns):
      (folder / name).write_bytes(b"x")
    return str(folder)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  return calls


def test_prefers_safetensors_over_bin(tmp_path, monkeypatch):
  files = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "README.md", "train.log"]
  calls = _fake_hub(monkeypatch, tmp_path, files)
  resolved = resolve_source("owner/both")
  assert sorted(p.name for p in resolved.path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
  assert len(calls) == 1 and calls[0][0] == "main"


def test_falls_back_to_bin_pinned_to_the_same_commit(tmp_path, monkeypatch):
  files = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
  files.append("pytorch_model.bin.index.json")
  calls = _fake_hub(monkeypatch, tmp_path, files)
  resolved = resolve_source("owner/bin-only", revision="v1")
  assert sorted(p.name for p in resolved.path.iterdir()) == sorted(files)
  assert [revision for revision, _ in calls] == ["v1", MAIN]
  assert (resolved.revision, resolved.commit) == ("v1", MAIN)


def _response(status):
  return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/owner/name"))


@pytest.mark.parametrize(
  ("error", "expected"),
  [
    (errors.GatedRepoError("gated", response=_response(401)), r"owner/name is a gated repository: accept its terms"),
    (errors.RepositoryNotFoundError("404", response=_response(404)), r"neither a local directory nor a repository"),
    (errors.RevisionNotFoundError("404", response=_response(404)), r"has no revision 'main'"),
    (errors.LocalEntryNotFoundError("no connection"), r"the Hub could not be reached: check the network"),
    (errors.HfHubHTTPError("boom", response=_response(500)), r"failed \(HTTP 500\): retry later"),
    (httpx2.ReadTimeout("timeout"), r"failed \(ReadTimeout\)"),
  ],
  ids=["gated", "no-repo", "no-revision", "unreachable", "http-500", "timeout"],
)
def test_hub_errors_become_one_clear_line(monkeypatch, error, expected):
  def failing_snapshot_download(*args, **kwargs):
    raise error

  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as if online, whatever the caller's env
  monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_snapshot_download)
  with pytest.raises(SourceNotFoundError, match=expected) as info:
    resolve_source("owner/name")
  assert "\n" not in str(info.value)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))} | env
  env["PYTHONPATH"] = str(REPO_ROOT)
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_environment_variables_in_a_fresh_process(tmp_path):
  # HF_HOME (cache under $HF_HOME/hub) and HF_HUB_OFFLINE=1, read by huggingface_hub at import time.
  make_cached_repo(tmp_path / "home" / "hub", "state-spaces/mamba-130m", {MAIN: SAFETENSORS_FILES}, {"main": MAIN})
  code = (
    "import sys\n"
    "from convert.hub import resolve_source, SourceNotFoundError\n"
    "print(resolve_source('state-spaces/mamba-130m').path)\n"
    "try:\n"
    "  resolve_source('state-spaces/mamba2-2.7b')\n"
    "except SourceNotFoundError as e:\n"
    "  print('ERROR', e)\n"
  )
  result = _run(code, {"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == str(tmp_path / "home" / "hub" / "models--state-spaces--mamba-130m" / "snapshots" / MAIN)
  assert lines[1].startswith("ERROR state-spaces/mamba2-2.7b is not in the Hugging Face cache")
  assert "HF_HUB_OFFLINE=1" in lines[1]
  # HF_HUB_CACHE takes precedence over HF_HOME.
  make_cached_repo(tmp_path / "other", "state-spaces/mamba-130m", {DEV: SAFETENSORS_FILES}, {"main": DEV})
  result = _run(
    code, {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "other"), "HF_HUB_OFFLINE": "1"}
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0].endswith(DEV)


def test_module_exports():
  assert hub.SourceNotFoundError.__mro__[1] is RuntimeError
