"""`python -m calibrate`: calibrate scales (SPSA or gradient), evaluate perplexity per length, export folded weights.

  python -m calibrate MODEL --data PATH --length 16384 --method spsa|grad --target A|dt --mode linear|power \
      --granularity layer|head|channel|entry --steps N --seed S --out DIR [--calib-split 0.75]
  python -m calibrate ppl MODEL --data PATH --lengths 2048,4096 [--scales DIR] [--plot out.png]
  python -m calibrate export MODEL --scales DIR --out OUT [--format hf|state-spaces]

Exit status: 0 done, 2 bad input (the message says what and how to fix it), 3 stopped on a non-finite loss
(the last good scales are saved).
"""

import argparse
import json
import math
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calibrate import data as data_lib
from calibrate import scales as scales_lib
from calibrate.checkpointing import Checkpointer, ResumeError
from calibrate.evaluate import ppl_per_length, stream_to_documents
from calibrate.gradient import Gradient
from calibrate.objective import frozen_layers
from calibrate.plots import plot_calibration, plot_ppl
from calibrate.spsa import SPSA, SPSAConfig, make_optimizer, make_schedule
from mamba_jax.config import MambaConfig, UnsupportedModelError
from mamba_jax.loading import CheckpointError, from_pretrained
from mamba_jax.scales import CalibrationScale, attach_scales, scale_shape

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
# Settings that may change between a killed run and its restart without changing what the steps compute.
_NOT_IN_SIGNATURE = {"steps", "checkpoint_every", "restart", "out", "quiet", "layers", "no_plot"}


def scan_layers(layers: str) -> bool:
  """--layers as `MambaLM.scan_layers`. The layer scan reads the blocks' weights stacked over layers (stacked once
  per run, `frozen_layers`) and slices them per block; inlined blocks avoid the slices and compile longer. auto: the
  layer scan for every method and architecture. Measured on an H200 at 8K tokens (benchmarks/results/calibrate.md):
  in round 14 the mamba2-1.3b SPSA iteration took 99.3 ms (scan) against 99.0 ms (inlined) for 12 against 144 s of
  compile, probably because every inlined block compiles its own Mosaic GPU SSD kernels (round 11, all Triton:
  102.7 against 100.1 ms for 13 against 29 s, when auto inlined Mamba2 SPSA); on an H100 (round 6) mamba-1.4b
  170.1 -> 158.5 ms for 46 -> 142 s. Since round 24 the inlined blocks of one structure share one traced program
  (`model._BlockPrograms`): JAX's part of that compile went 67.8 -> 2.2 s for mamba-1.4b (benchmarks/lower_time.py);
  XLA's part is not yet re-measured."""
  return layers != "unroll"


class NonFiniteLoss(RuntimeError):
  """The objective became NaN or Inf; the last good scales were saved."""


def _floats(text: str, n: int, name: str) -> tuple[float, ...]:
  try:
    vals = tuple(float(v) for v in text.split(","))
  except ValueError as e:
    raise ValueError(f"--{name} {text!r}: expected {n} comma-separated numbers") from e
  if len(vals) != n:
    raise ValueError(f"--{name} {text!r}: expected {n} comma-separated numbers")
  return vals


def _model_dir(source: str) -> pathlib.Path:
  path = pathlib.Path(source)
  if path.is_dir():
    return path
  from convert.hub import resolve_source  # noqa: PLC0415

  return pathlib.Path(resolve_source(source).path)


# ---------------------------------------------------------------------------------------------- calibrate


def _calibrate_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m calibrate",
    description="Calibrate per-layer A or dt scales of a frozen Mamba/Mamba2 model. Subcommands: ppl, export.",
  )
  p.add_argument("model", help="model directory or hub id")
  p.add_argument("--data", required=True, help=".txt file (one stream), folder of .txt, .jsonl (text), or HF dataset")
  p.add_argument("--length", type=int, default=16384, help="tokens per sample (BOS included)")
  p.add_argument("--samples", type=int, default=20, help="samples read (calibration + held-out)")
  p.add_argument("--calib-split", type=float, default=0.75, help="fraction calibrating; the rest chooses the best step")
  p.add_argument("--short", choices=data_lib.SHORT_POLICIES, default="skip", help="documents shorter than --length")
  p.add_argument("--text-field", default="text")
  p.add_argument("--split", default="validation", help="HF dataset split")
  p.add_argument("--tokenizer", default=None, help="directory, hub id, or 'bytes' (default: the model's)")
  p.add_argument("--method", choices=("spsa", "grad"), default="spsa")
  p.add_argument("--target", choices=("A", "dt"), default="A")
  p.add_argument("--mode", choices=("linear", "power"), default="linear", help="A scaling form")
  p.add_argument("--granularity", choices=("layer", "head", "channel", "entry"), default="layer")
  p.add_argument("--prefill-only", action="store_true", help="scales off in the decode step (released-code behaviour)")
  p.add_argument("--init", type=float, default=1.0, help="initial value of every scale")
  p.add_argument("--init-uniform", default=None, metavar="LO,HI", help="initial scales ~ U(LO, HI) (seeded)")
  p.add_argument("--clamp", default="0.01,inf", metavar="LO,HI", help="projection range of the scales")
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--objective", choices=("nll", "ppl"), default=None, help="default: ppl for spsa, nll for grad")
  p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=None, help="default: sgd/spsa, adamw/grad")
  p.add_argument("--lr", type=float, default=None, help="default: 0.001 (spsa), 0.01 (grad)")
  p.add_argument("--schedule", choices=("cosine", "constant"), default=None, help="default: cosine/spsa, const/grad")
  p.add_argument("--cosine-period", type=int, default=99, help="cosine reaches 0 at this step (released: 99)")
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--c", type=float, default=0.1, help="SPSA perturbation size c; c_k = c / (1+k)^gamma")
  p.add_argument("--gamma", type=float, default=0.1)
  p.add_argument("--perturbation", choices=("rademacher", "gaussian"), default="rademacher")
  p.add_argument("--pair", choices=("vmap", "sequential"), default="vmap", help="SPSA: both points in one forward")
  p.add_argument("--clip", type=float, default=1.0, help="grad: global-norm clip (0: none)")
  p.add_argument("--accum", type=int, default=4, help="grad: micro-batches per optimizer step")
  p.add_argument("--batch-size", type=int, default=1, help="samples per forward")
  p.add_argument("--chunk", type=int, default=2048, help="positions per LM-head slice")
  p.add_argument("--no-remat", action="store_true", help="grad: keep block activations (faster, more memory)")
  p.add_argument(
    "--layers",
    choices=("auto", "scan", "unroll"),
    default="auto",
    help="blocks as one lax.scan (auto, scan: fast compile) or inlined (unroll: no weight slices, longer XLA compile)",
  )
  p.add_argument("--eval-every", type=int, default=1, help="held-out evaluation (keep-best) interval")
  p.add_argument("--no-keep-best", action="store_true", help="save the last scales, not the best held-out ones")
  p.add_argument("--checkpoint-every", type=int, default=10, help="orbax checkpoint interval (0: never)")
  p.add_argument("--restart", action="store_true", help="discard checkpoints in --out and start over")
  p.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: as stored)")
  p.add_argument("--scan-impl", default="auto")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.add_argument("--no-plot", action="store_true", help="do not write calibration.png (curve and scales per layer)")
  return p


def _defaults(args) -> None:
  spsa = args.method == "spsa"
  args.objective = args.objective or ("ppl" if spsa else "nll")
  args.optimizer = args.optimizer or ("sgd" if spsa else "adamw")
  args.lr = args.lr if args.lr is not None else (0.001 if spsa else 0.01)
  args.schedule = args.schedule or ("cosine" if spsa else "constant")


def _build_calibrator(args, graphdef):
  schedule = make_schedule(args.schedule, args.lr, args.cosine_period)
  clamp = _floats(args.clamp, 2, "clamp")
  if args.method == "spsa":
    tx = make_optimizer(args.optimizer, schedule, weight_decay=args.weight_decay)
    cfg = SPSAConfig(args.c, args.gamma, args.perturbation, args.objective, clamp, args.pair)
    return SPSA(graphdef, tx, cfg, seed=args.seed, batch_size=args.batch_size, chunk=args.chunk)
  tx = make_optimizer(args.optimizer, schedule, weight_decay=args.weight_decay, clip=args.clip or None)
  return Gradient(
    graphdef,
    tx,
    objective=args.objective,
    clamp=clamp,
    seed=args.seed,
    batch_size=args.batch_size,
    accum=args.accum,
    chunk=args.chunk,
  )


def _check_arch(cfg: MambaConfig, args) -> None:
  scale_shape(
    cfg.arch,
    args.target,
    args.granularity,
    d_inner=cfg.d_inner,
    d_state=cfg.d_state,
    nheads=cfg.nheads if cfg.arch == "mamba2" else 0,
  )
  if args.target == "dt" and args.mode == "power":
    raise ValueError("--mode power applies to A only; dt scales are linear (dt * s)")


def _set_initial(model, args) -> None:
  if args.init_uniform is None:
    return
  lo, hi = _floats(args.init_uniform, 2, "init-uniform")
  rng = np.random.default_rng(args.seed)
  vals = {t: rng.uniform(lo, hi, a.shape).astype(np.float32) for t, a in scales_lib.stacked(model).items()}
  scales_lib.set_stacked(model, vals)


def _log_lines(path: pathlib.Path, upto: int) -> list[str]:
  """The log of a resumed run: every line up to the restored step (later ones are recomputed)."""
  if not path.exists():
    return []
  return [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= upto]


def _to_host(tree):
  return jax.tree.map(lambda x: np.asarray(x), tree)


def run_calibration(args) -> dict:
  """Runs `python -m calibrate MODEL ...` with parsed args; returns the summary written to scales.json."""
  _defaults(args)
  if args.steps < 0 or args.samples < 1 or args.batch_size < 1 or args.accum < 1:
    raise ValueError("--steps must be >= 0, and --samples, --batch-size and --accum >= 1")
  model_dir = _model_dir(args.model)
  from mamba_jax.loading import load_config  # noqa: PLC0415

  cfg = load_config(model_dir)
  _check_arch(cfg, args)

  # Data before weights: a data problem should not cost a model load.
  tokenizer = data_lib.load_tokenizer(args.tokenizer, model_dir)
  tok_name = str(getattr(tokenizer, "name_or_path", args.tokenizer))
  samples = data_lib.load_samples(
    args.data, tokenizer, args.length, args.samples, short=args.short, text_field=args.text_field, split=args.split
  )
  data_lib.check_vocab(samples.ids, cfg.padded_vocab_size, tok_name)
  calib_ids, held_ids = data_lib.split_samples(samples.ids, args.calib_split)
  if held_ids.shape[0] == 0:
    held_ids = calib_ids  # --calib-split 1: keep-best and the report use the calibration samples themselves
  if args.method == "grad" and args.accum * args.batch_size > calib_ids.shape[0]:
    raise ValueError(
      f"--accum {args.accum} x --batch-size {args.batch_size} exceeds the {calib_ids.shape[0]} calibration samples"
    )
  for name, ids in (("calibration", calib_ids), ("held-out", held_ids)):
    if ids.shape[0] % args.batch_size:
      raise ValueError(f"{ids.shape[0]} {name} samples are not a multiple of --batch-size {args.batch_size}")

  model = from_pretrained(model_dir, args.dtype, scan_impl=args.scan_impl)
  model.remat = args.method == "grad" and not args.no_remat
  model.scan_layers = scan_layers(args.layers)
  attach_scales(model, args.target, args.mode, args.granularity, apply_in_decode=not args.prefill_only, init=args.init)
  _set_initial(model, args)
  graphdef, scales, rest = nnx.split(model, CalibrationScale, ...)
  stacked = frozen_layers(model)  # the frozen block weights stacked once for the layer scan (None: inlined)
  identity = jax.tree.map(jnp.ones_like, scales)  # the uncalibrated model, for "perplexity before"
  calibrator = _build_calibrator(args, graphdef)
  opt_state = calibrator.init(scales)
  calib_dev, held_dev = jnp.asarray(calib_ids), jnp.asarray(held_ids)

  out = pathlib.Path(args.out)
  if args.restart and (out / "checkpoints").exists():
    shutil.rmtree(out / "checkpoints")
    (out / "log.jsonl").unlink(missing_ok=True)
  signature = {k: v for k, v in vars(args).items() if k not in _NOT_IN_SIGNATURE}
  signature["data_fingerprint"] = samples.fingerprint()
  ckpt = Checkpointer(out / "checkpoints", args.checkpoint_every, signature)

  def held_nll(s) -> float:
    return float(calibrator.evaluate(s, rest, held_dev, stacked))

  nll_before = held_nll(identity)
  nll_init = held_nll(scales)
  state = {
    "step": np.asarray(0, np.int64),
    "scales": _to_host(jax.tree.leaves(scales)),
    "opt_state": _to_host(jax.tree.leaves(opt_state)),
    "best_scales": _to_host(jax.tree.leaves(scales)),
    "best_nll": np.asarray(nll_init, np.float64),
    "best_step": np.asarray(0, np.int64),
    "key": np.asarray(jax.random.key_data(jax.random.key(args.seed))),
  }
  scales_def, opt_def = jax.tree.structure(scales), jax.tree.structure(opt_state)
  restored = ckpt.restore(state)
  start = 0
  if restored is not None:
    state = restored
    start = int(state["step"])
    scales = jax.tree.unflatten(scales_def, [jnp.asarray(a) for a in state["scales"]])
    opt_state = jax.tree.unflatten(opt_def, [jnp.asarray(a) for a in state["opt_state"]])
  out.mkdir(parents=True, exist_ok=True)
  log_path = out / "log.jsonl"
  lines = _log_lines(log_path, start)
  if not lines:
    lines = [json.dumps({"step": 0, "held_nll": nll_init, "held_nll_identity": nll_before})]
  log_path.write_text("".join(line + "\n" for line in lines))
  if start:
    print(f"resuming from step {start} (checkpoint in {ckpt.dir})", file=sys.stderr)

  best_nll, best_step = float(state["best_nll"]), int(state["best_step"])
  best_leaves = [jnp.asarray(a) for a in state["best_scales"]]
  status, done = "done", start
  from tqdm import tqdm  # noqa: PLC0415

  bar = tqdm(total=args.steps, initial=start, disable=args.quiet, desc=f"{args.method} {args.target}", unit="step")
  with open(log_path, "a") as log:
    for k in range(start, args.steps):
      t0 = time.perf_counter()
      new_scales, new_opt, metrics = calibrator.step(scales, opt_state, k, rest, calib_dev, stacked)
      metrics = {m: float(v) for m, v in metrics.items()}
      record = {"step": k + 1, **metrics, "seconds": time.perf_counter() - t0}
      if not metrics["finite"]:
        record["error"] = "non-finite loss"
        log.write(json.dumps(record) + "\n")
        status = f"stopped: non-finite loss at step {k + 1} (steps up to {k} completed)"
        break
      scales, opt_state, done = new_scales, new_opt, k + 1
      if (k + 1) % max(args.eval_every, 1) == 0 or k + 1 == args.steps:
        record["held_nll"] = held_nll(scales)
        if record["held_nll"] < best_nll:
          best_nll, best_step, best_leaves = record["held_nll"], k + 1, jax.tree.leaves(scales)
      log.write(json.dumps(record) + "\n")
      log.flush()
      bar.update(1)
      bar.set_postfix(loss=f"{metrics['loss']:.4g}", best_ppl=f"{math.exp(best_nll):.4g}")
      ckpt.maybe_save(
        k + 1,
        {
          "step": np.asarray(k + 1, np.int64),
          "scales": _to_host(jax.tree.leaves(scales)),
          "opt_state": _to_host(jax.tree.leaves(opt_state)),
          "best_scales": _to_host(best_leaves),
          "best_nll": np.asarray(best_nll, np.float64),
          "best_step": np.asarray(best_step, np.int64),
          "key": state["key"],
        },
      )
  bar.close()
  ckpt.close()

  keep_best = not args.no_keep_best
  final = jax.tree.unflatten(scales_def, best_leaves) if keep_best else scales
  nnx.update(model, final)
  nll_after = held_nll(final)
  summary = {
    "model": str(args.model),
    "method": args.method,
    "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("model", "data", "out", "quiet", "no_plot")},
    "data": {
      "source": samples.source,
      "fingerprint_sha256": samples.fingerprint(),
      "tokenizer": tok_name,
      "length": args.length,
      "samples": int(samples.ids.shape[0]),
      "calibration_samples": int(calib_ids.shape[0]),
      "held_out_samples": int(held_ids.shape[0]) if held_ids is not calib_ids else 0,
    },
    "result": {
      "status": status,
      "steps_done": done,
      "kept": f"best held-out step {best_step}" if keep_best else "last step",
      "held_ppl_before": math.exp(nll_before),
      "held_ppl_init": math.exp(nll_init),
      "held_ppl_after": math.exp(nll_after),
      "best_step": best_step,
    },
  }
  scales_lib.save_scales(model, out, summary)
  plotted = ""
  if not args.no_plot:
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    png = plot_calibration(
      records,
      scales_lib.stacked(model),
      out / "calibration.png",
      best_step=best_step if keep_best else None,
      objective=args.objective,
      title=f"{args.model}: {args.method} on {args.target} ({args.mode}, {args.granularity}), {args.length} tokens",
    )
    plotted = f", plot {png.name}"
  where = "held-out" if summary["data"]["held_out_samples"] else "calibration (no held-out split)"
  print(
    f"perplexity at {args.length} tokens on the {where} samples ({held_ids.shape[0]}): "
    f"before {math.exp(nll_before):.4f}, after {math.exp(nll_after):.4f} ({summary['result']['kept']}); "
    f"scales in {out}{plotted}",
    file=sys.stderr,
  )
  if status != "done":
    raise NonFiniteLoss(f"{status}; the last good scales are saved in {out}")
  return summary


# ---------------------------------------------------------------------------------------------- ppl


def _ppl_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m calibrate ppl", description="Perplexity per context length.")
  p.add_argument("model")
  p.add_argument("--data", required=True)
  p.add_argument("--lengths", required=True, help="comma-separated, e.g. 2048,4096,8192")
  p.add_argument("--samples", type=int, default=20, help="documents per length (the first long enough)")
  p.add_argument("--scales", default=None, help="a scales directory from `python -m calibrate`")
  p.add_argument("--with-base", action="store_true", help="with --scales, also evaluate the uncalibrated model")
  p.add_argument("--plot", default=None, help="write a PNG of perplexity against length")
  p.add_argument("--json", default=None, help="write the results as JSON")
  p.add_argument("--tokenizer", default=None)
  p.add_argument("--text-field", default="text")
  p.add_argument("--split", default="test")
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--chunk", type=int, default=2048)
  p.add_argument("--dtype", default=None)
  p.add_argument("--scan-impl", default="auto")
  return p


def run_ppl(args) -> dict[str, list[dict]]:
  """Runs `python -m calibrate ppl`; returns {label: [{length, ppl, nll, docs}]}."""
  try:
    lengths = sorted({int(v) for v in args.lengths.split(",")})
  except ValueError as e:
    raise ValueError(f"--lengths {args.lengths!r}: expected comma-separated integers") from e
  model_dir = _model_dir(args.model)
  tokenizer = data_lib.load_tokenizer(args.tokenizer, model_dir)
  bos = data_lib.bos_id(tokenizer)
  docs = data_lib.load_documents(args.data, tokenizer, text_field=args.text_field, split=args.split)
  if len(docs) == 1 and pathlib.Path(args.data).is_file() and pathlib.Path(args.data).suffix != ".jsonl":
    docs = stream_to_documents(docs[0], max(lengths) - (bos is not None))
  from mamba_jax.loading import load_config  # noqa: PLC0415

  vocab = load_config(model_dir).padded_vocab_size
  for d in docs:
    data_lib.check_vocab(d, vocab, str(getattr(tokenizer, "name_or_path", args.tokenizer)))
  runs = [("calibrated", args.scales)] if args.scales else [("base", None)]
  if args.scales and args.with_base:
    runs.insert(0, ("base", None))
  curves = {}
  for label, scales_dir in runs:
    model = from_pretrained(model_dir, args.dtype, scan_impl=args.scan_impl, scales=scales_dir)

    def show(row, label=label):
      ppl = "n/a (no document long enough)" if row["ppl"] is None else f"{row['ppl']:.4f}"
      print(f"{label:>10}  length {row['length']:>7}  docs {row['docs']:>4}  ppl {ppl}", flush=True)

    curves[label] = ppl_per_length(
      model, docs, lengths, args.samples, bos, batch_size=args.batch_size, chunk=args.chunk, progress=show
    )
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(curves, indent=2) + "\n")
  if args.plot:
    plot_ppl(curves, args.plot, title=str(args.model))
  return curves


# ---------------------------------------------------------------------------------------------- export


def _export_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m calibrate export",
    description="Fold A scales into A_log and write an ordinary checkpoint (dt scales cannot be folded).",
  )
  p.add_argument("model")
  p.add_argument("--scales", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--format", default=None, help="hf | state-spaces (default: the source's format)")
  p.add_argument("--dtype", default=None)
  p.add_argument("--force", action="store_true", help="replace an existing --out")
  return p


def _source_format(model_dir: pathlib.Path) -> str:
  """hf for transformers and converted directories, state-spaces for mamba_ssm ones."""
  cfg = json.loads((model_dir / "config.json").read_text())
  if (model_dir / "manifest.json").exists():
    return "hf"
  return "hf" if "model_type" in cfg else "state-spaces"


def run_export(args) -> pathlib.Path:
  """Runs `python -m calibrate export`; returns the output directory."""
  meta, _ = scales_lib.read_scales(args.scales)
  if "dt" in meta.get("targets", {}):
    scales_lib.fold_into_params({}, meta, {})  # raises the dt explanation before any weight is read
  model_dir = _model_dir(args.model)
  fmt = args.format or _source_format(model_dir)
  model = from_pretrained(model_dir, args.dtype, scales=args.scales)
  folded = scales_lib.fold_model(model)
  from convert.export import export  # noqa: PLC0415

  out = export(folded, folded.cfg, args.out, fmt, force=args.force, tokenizer_dir=model_dir)
  print(f"wrote {fmt} checkpoint with A scales folded into A_log to {out}", file=sys.stderr)
  return out


# ---------------------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    if argv and argv[0] == "ppl":
      run_ppl(_ppl_parser().parse_args(argv[1:]))
    elif argv and argv[0] == "export":
      run_export(_export_parser().parse_args(argv[1:]))
    else:
      run_calibration(_calibrate_parser().parse_args(argv))
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_NONFINITE
  except (
    data_lib.DataError,
    scales_lib.ScalesError,
    ResumeError,
    CheckpointError,
    UnsupportedModelError,
    FileNotFoundError,
    ValueError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  return 0


__all__ = ["main", "run_calibration", "run_ppl", "run_export"]
