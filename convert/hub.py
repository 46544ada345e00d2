"""Resolve a checkpoint source (a local directory or a Hugging Face Hub repo id) to a local directory."""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
  "BIN_PATTERNS",
  "CONFIG_PATTERNS",
  "ResolvedSource",
  "SAFETENSORS_PATTERNS",
  "SourceNotFoundError",
  "TOKENIZER_PATTERNS",
  "resolve_source",
]

CONFIG_PATTERNS = ("config.json", "params.json")
TOKENIZER_PATTERNS = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.json",
  "merges.txt",
  "tokenizer.model",
  "tokenizer.model.v3",
)
# "*.safetensors" also covers sharded (model-00001-of-00002.safetensors) and mistral-style (consolidated.safetensors).
SAFETENSORS_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
BIN_PATTERNS = ("pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json")


class SourceNotFoundError(RuntimeError):
  """A checkpoint source could not be resolved; the message is one line: what failed and what to do."""


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
  """Where a checkpoint source resolved to.

  Attributes:
    path: local directory holding the checkpoint files.
    repo_id: the Hub repo id, or None for a local directory.
    revision: the revision asked for ("main" when none was given), or None for a local directory.
    commit: the commit hash of the snapshot used, or None for a local directory.
  """

  path: Path
  repo_id: str | None = None
  revision: str | None = None
  commit: str | None = None


def _has_weights(path: Path) -> bool:
  return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def _looks_like_path(source: str) -> bool:
  # Strings a user can only have meant as a path: never try the Hub for them.
  return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1


def _describe_failure(error: Exception, repo_id: str, revision: str, offline: bool, cache_dir: str) -> str:
  """One line saying what failed and what to do, for an exception raised by huggingface_hub."""
  from huggingface_hub import errors

  where = f"{repo_id} (revision {revision})" if revision != "main" else repo_id
  local = "or pass a local directory"
  # Order matters: GatedRepoError is a RepositoryNotFoundError, IncompleteSnapshotError a LocalEntryNotFoundError.
  if isinstance(error, getattr(errors, "IncompleteSnapshotError", ())):
    return f"the cached snapshot of {where} in {cache_dir} is incomplete: run once with network access to finish it"
  if isinstance(error, errors.GatedRepoError):
    return (
      f"{repo_id} is a gated repository: accept its terms at https://huggingface.co/{repo_id} and pass a token "
      "(--token, HF_TOKEN or `hf auth login`)"
    )
  if isinstance(error, errors.RepositoryNotFoundError):
    return (
      f"{repo_id} is neither a local directory nor a repository on the Hugging Face Hub (a private repository needs "
      "a token: --token, HF_TOKEN or `hf auth login`)"
    )
  if isinstance(error, errors.RevisionNotFoundError):
    return f"{repo_id} has no revision '{revision}': pass an existing branch, tag or commit hash"
  if offline:
    return (
      f"{where} is not in the Hugging Face cache ({cache_dir}) and downloads are disabled (HF_HUB_OFFLINE=1 or "
      f"local_files_only): run once with network access, {local}"
    )
  if isinstance(error, errors.LocalEntryNotFoundError):
    return (
      f"{where} is not in the Hugging Face cache ({cache_dir}) and the Hub could not be reached: check the network "
      f"connection (and HF_ENDPOINT), {local}"
    )
  status = getattr(getattr(error, "response", None), "status_code", None)
  reason = f"HTTP {status}" if status else type(error).__name__
  return f"downloading {where} from the Hugging Face Hub failed ({reason}): retry later, {local}"


def _download_errors() -> tuple[type[BaseException], ...]:
  """Exception types that mean "the Hub or the cache could not provide the files" across huggingface_hub versions."""
  from huggingface_hub import errors

  types: list[type[BaseException]] = [errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError, ConnectionError]
  # Newer huggingface_hub versions talk to the Hub through httpx (or its fork httpx2), whose errors are not OSErrors.
  for module_name in ("httpx", "httpx2"):
    try:
      types.append(importlib.import_module(module_name).HTTPError)
    except (ImportError, AttributeError):
      pass
  return tuple(types)


def resolve_source(
  source: str | os.PathLike,
  revision: str | None = None,
  token: str | bool | None = None,
  *,
  cache_dir: str | os.PathLike | None = None,
  local_files_only: bool = False,
  allow_patterns: Sequence[str] | None = None,
) -> ResolvedSource:
  """Resolves a local checkpoint directory or a Hugging Face Hub repo id to a local directory.

  A Hub repo is fetched with `huggingface_hub.snapshot_download`, so its cache (`HF_HOME`, `HF_HUB_CACHE`,
  `cache_dir`), offline mode (`HF_HUB_OFFLINE=1`), revisions and tokens (`HF_TOKEN`, `hf auth login`) behave as in
  every other Hugging Face tool. By default only the config, tokenizer and weight files are fetched, and the
  `pytorch_model*.bin` weights only when the repo has no safetensors weights.

  Args:
    source: an existing directory, or a repo id such as "state-spaces/mamba-130m".
    revision: branch, tag or commit hash on the Hub (default: "main"); ignored for a local directory.
    token: Hub token; None uses the token of the environment (`HF_TOKEN` or the stored login).
    cache_dir: Hub cache directory; None uses `HF_HUB_CACHE` (by default `$HF_HOME/hub`).
    local_files_only: never use the network, only the cache (as `HF_HUB_OFFLINE=1` does).
    allow_patterns: files to fetch, overriding the default config + tokenizer + weights selection.

  Returns:
    The local directory, with the repo id, revision and commit hash of the snapshot for a Hub source.

  Raises:
    SourceNotFoundError: the directory does not exist, or the repo could not be fetched (offline and not cached,
      Hub unreachable, unknown repo or revision, gated repo); the message says what to do.
  """
  text = os.fspath(source)
  path = Path(text).expanduser()
  if path.is_dir():
    return ResolvedSource(path=path.resolve())
  if path.exists():
    raise SourceNotFoundError(f"{text} is a file: pass the directory that holds the checkpoint and its config.json")

  from huggingface_hub import constants, snapshot_download
  from huggingface_hub.utils import HFValidationError, validate_repo_id

  try:
    if _looks_like_path(text):
      raise HFValidationError(text)
    validate_repo_id(text)
  except HFValidationError:
    raise SourceNotFoundError(f"{text}: no such directory (and not a Hugging Face repo id like 'owner/name')") from None

  revision = revision or "main"
  cache = os.fspath(Path(cache_dir).expanduser()) if cache_dir is not None else constants.HF_HUB_CACHE
  offline = local_files_only or constants.HF_HUB_OFFLINE

  def download(patterns: Sequence[str], rev: str) -> Path:
    try:
      folder = snapshot_download(
        text,
        revision=rev,
        token=token,
        cache_dir=cache,
        local_files_only=local_files_only,
        allow_patterns=list(patterns),
      )
    except _download_errors() as e:
      raise SourceNotFoundError(_describe_failure(e, text, revision, offline, cache)) from e
    return Path(folder)

  base = (*CONFIG_PATTERNS, *TOKENIZER_PATTERNS)
  if allow_patterns is not None:
    folder = download(allow_patterns, revision)
  else:
    # Safetensors first; the .bin files only if the repo has no safetensors weights, so that repos shipping both
    # formats are not downloaded twice. The second call pins the commit found by the first one.
    folder = download((*base, *SAFETENSORS_PATTERNS), revision)
    if not any(folder.glob("*.safetensors")):
      folder = download((*base, *BIN_PATTERNS), folder.name)
    if not _has_weights(folder):
      where = f"{text} (revision {revision})" if revision != "main" else text
      hint = "run once with network access to download them" if offline else "is this a Mamba checkpoint repo?"
      raise SourceNotFoundError(f"{where}: no *.safetensors or pytorch_model*.bin weights in {folder}: {hint}")
  # Snapshot folders are named after their commit hash (huggingface_hub's cache layout).
  return ResolvedSource(path=folder, repo_id=text, revision=revision, commit=folder.name)
