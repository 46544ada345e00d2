"""Command line of `python -m convert`: official / Hugging Face Mamba checkpoints <-> this project's Flax format."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """\
examples:
  python -m convert state-spaces/mamba2-1.3b                 # -> ./mamba2-1.3b-flax (Orbax, dtype as stored)
  python -m convert state-spaces/mamba-130m-hf --dtype bfloat16 --format safetensors --out m130
  python -m convert ./my-mamba-checkpoint --verify           # compare logits with the PyTorch reference
  HF_HUB_OFFLINE=1 python -m convert state-spaces/mamba2-130m --revision main   # from the Hugging Face cache
  python -m convert --to hf mamba2-1.3b-flax --out mamba2-1.3b-hf             # back to transformers
  python -m convert --to state-spaces mamba2-1.3b-flax --out mamba2-1.3b-ss   # back to mamba_ssm (.bin)

SOURCE is a Hugging Face Hub id (resolved through huggingface_hub: its cache, HF_HOME, HF_HUB_OFFLINE, --revision
and tokens behave as usual) or a local directory in the state-spaces format (config.json + pytorch_model.bin), the
transformers format (config.json + model.safetensors or shards) or Mistral's (Codestral). `.bin` files are read
without torch and without running any code from them.

exit status: 0 success, 1 --verify failed, 2 bad input or usage (nothing is written), 130 interrupted.
"""


class _VerifyFailed(Exception):
  pass


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m convert",
    description="Convert Mamba / Mamba2 checkpoints into a directory that mamba_jax.from_pretrained loads, "
    "or (--to) a converted directory back into a transformers or state-spaces checkpoint.",
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("source", metavar="SOURCE", help="hub id (owner/name) or local checkpoint directory")
  p.add_argument("--out", type=Path, help="output directory (default: <name>-flax in the current directory)")
  p.add_argument(
    "--dtype",
    choices=("keep", "float32", "bfloat16", "float16"),
    default="keep",
    help="dtype of the weight matrices, embedding and conv (default: keep as stored); A_log, D, dt biases and "
    "norm weights are always float32",
  )
  p.add_argument("--format", choices=("orbax", "safetensors"), default="orbax", help="weights format (default orbax)")
  p.add_argument("--revision", help="hub branch, tag or commit (default main)")
  p.add_argument("--token", help="hub token (default: HF_TOKEN or the stored login)")
  p.add_argument("--force", action="store_true", help="replace an existing output directory")
  p.add_argument("--strict", action="store_true", help="refuse weights holding NaN/Inf (default: warn)")
  p.add_argument("--verify", action="store_true", help="compare the converted model's logits with a reference")
  p.add_argument("--tolerance", type=float, default=1e-4, help="--verify's max relative logit error (default 1e-4)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.add_argument(
    "--to",
    choices=("hf", "state-spaces"),
    help="export SOURCE (a converted directory) to a transformers (hf) or mamba_ssm (state-spaces) checkpoint",
  )
  return p


def default_out(source: str, suffix: str) -> Path:
  """The last component of the source plus `suffix`, in the current directory (mamba2-130m -> mamba2-130m-flax)."""
  name = Path(source.rstrip("/\\")).name or "model"
  if suffix != "-flax":
    name = name.removesuffix("-flax")
  return Path.cwd() / f"{name}{suffix}"


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return EXIT_BAD_INPUT


def _check_out(out: Path, source_dir: Path, force: bool) -> None:
  out, source_dir = out.absolute().resolve(), source_dir.absolute().resolve()
  if out == source_dir or source_dir.is_relative_to(out):
    raise ValueError(f"--out {out} would replace the source {source_dir}: choose another output directory")
  if (out.exists() or out.is_symlink()) and not force:
    raise FileExistsError(f"{out} already exists: pass --force to replace it, or choose another --out")


def _reference_tensors(ckpt, dtype: str) -> dict:
  """The source tensors by torch name, rounded to the converted dtype (see convert.verify)."""
  import numpy as np  # noqa: PLC0415

  from convert.artifact import output_dtype  # noqa: PLC0415
  from mamba_jax import torch_names  # noqa: PLC0415

  return {
    torch_names.torch_key(path)[0]: p.tensor.read().astype(output_dtype(path, p.tensor.dtype, dtype)).astype(np.float32)
    for path, p in ckpt.plan.items()
  }


def run_convert(args) -> int:
  from convert import artifact  # noqa: PLC0415
  from convert.checkpoint import read_checkpoint  # noqa: PLC0415
  from convert.hub import resolve_source  # noqa: PLC0415

  start = time.perf_counter()
  out = (args.out or default_out(args.source, "-flax")).absolute()
  if (out.exists() or out.is_symlink()) and not args.force:  # before any download or read
    raise FileExistsError(f"{out} already exists: pass --force to replace it, or choose another --out")
  resolved = resolve_source(args.source, revision=args.revision, token=args.token)
  _check_out(out, Path(resolved.path), args.force)
  ckpt = read_checkpoint(resolved.path)
  cfg = ckpt.cfg
  info = {
    "source": args.source,
    "repo_id": resolved.repo_id,
    "revision": resolved.revision,
    "commit": resolved.commit,
  }
  with artifact.staging(out, args.force) as tmp:
    written = artifact.write_converted(
      ckpt, tmp, dtype=args.dtype, fmt=args.format, strict=args.strict, source_info=info, progress=not args.quiet
    )
    if args.verify:
      from convert.verify import verify  # noqa: PLC0415

      result = verify(
        tmp, cfg, _reference_tensors(ckpt, args.dtype), source_dir=resolved.path, tolerance=args.tolerance
      )
      if not result.passed:
        raise _VerifyFailed(
          f"--verify failed (max relative logit error {result.max_rel_error:.3g} > {args.tolerance:g})"
        )
  m = written.manifest
  print(
    f"converted {args.source} -> {out}\n"
    f"  architecture  {cfg.arch}, {cfg.n_layer} layers, d_model {cfg.d_model}, "
    f"vocab {cfg.padded_vocab_size}, {'tied' if cfg.tie_embeddings else 'untied'} embeddings\n"
    f"  parameters    {m['parameters']:,}\n"
    f"  dtype         {m['dtype']} (A_log, D, dt biases and norm weights float32)\n"
    f"  format        {m['format']} ({ckpt.source_format} source, {ckpt.nbytes / 2**30:.2f} GiB)\n"
    f"  seconds       {time.perf_counter() - start:.1f}"
  )
  return EXIT_OK


def run_export(args) -> int:
  from convert import artifact  # noqa: PLC0415
  from convert.checkpoint import read_checkpoint  # noqa: PLC0415
  from convert.export import export  # noqa: PLC0415
  from convert.hub import resolve_source  # noqa: PLC0415
  from mamba_jax import torch_names  # noqa: PLC0415
  from mamba_jax.loading import load_config  # noqa: PLC0415

  start = time.perf_counter()
  out = (args.out or default_out(args.source, f"-{args.to}")).absolute()
  if (out.exists() or out.is_symlink()) and not args.force:
    raise FileExistsError(f"{out} already exists: pass --force to replace it, or choose another --out")
  directory = Path(resolve_source(args.source, revision=args.revision, token=args.token).path)
  _check_out(out, directory, args.force)
  if (directory / artifact.MANIFEST).exists():
    cfg, params = load_config(directory), artifact.read_params(directory)
  else:  # any checkpoint this tool reads: a format change (e.g. state-spaces .bin -> transformers safetensors)
    ckpt = read_checkpoint(directory)
    cfg = ckpt.cfg
    params = {path: torch_names.to_flax(p.tensor.read(), p.transform) for path, p in ckpt.plan.items()}
  export(params, cfg, out, args.to, force=args.force, tokenizer_dir=directory)
  print(
    f"exported {args.source} -> {out} ({args.to}: {cfg.arch}, {cfg.n_layer} layers) "
    f"in {time.perf_counter() - start:.1f} s"
  )
  return EXIT_OK


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit status instead of exiting (the `__main__` module exits with it)."""
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as e:  # --help (0) and usage errors (2)
    return int(e.code or 0)
  if args.tolerance <= 0:
    return _error(f"--tolerance must be positive, got {args.tolerance}")
  # Imported here so that `--help` and usage errors stay fast (no jax import).
  from convert.artifact import DiskFullError  # noqa: PLC0415
  from convert.checkpoint import ConvertError  # noqa: PLC0415
  from convert.hub import SourceNotFoundError  # noqa: PLC0415
  from mamba_jax.config import UnsupportedModelError  # noqa: PLC0415
  from mamba_jax.loading import CheckpointError  # noqa: PLC0415

  try:
    return run_export(args) if args.to else run_convert(args)
  except _VerifyFailed as e:
    print(f"error: {e}; nothing was written", file=sys.stderr)
    return EXIT_VERIFY_FAILED
  except DiskFullError as e:
    return _error(e.strerror)
  except (ConvertError, SourceNotFoundError, UnsupportedModelError, CheckpointError, FileExistsError) as e:
    return _error(str(e))
  except ValueError as e:  # --out onto the source, unreadable manifest of a converted directory
    return _error(str(e))
  except KeyboardInterrupt:
    print("interrupted; nothing was written", file=sys.stderr)
    return EXIT_INTERRUPTED
