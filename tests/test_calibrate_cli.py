"""`python -m calibrate` end to end on tiny transformers checkpoints: calibrate, ppl, export, resume, bad input."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from conftest import make_hf_mamba

from calibrate import checkpointing, cli
from calibrate import scales as scales_lib
from calibrate.cli import main
from mamba_jax import from_pretrained
from mamba_jax.scales import attach_scales

LICENSE = (
  pathlib.Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"
)


def license_text() -> str:
  if LICENSE.exists():
    return LICENSE.read_text()
  import this  # noqa: F401, PLC0415  (prints the Zen; its source is rot13)

  return "".join(this.d.get(c, c) for c in this.s) * 40


def save_tokenizer(directory: pathlib.Path, text: str) -> None:
  """A 200-entry BPE tokenizer trained on `text`, saved as transformers saves GPT-NeoX's (<|endoftext|> = 0)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>", "[UNK]"]))
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="[UNK]"
  )
  fast.save_pretrained(directory)


@pytest.fixture(scope="module")
def world(tmp_path_factory, torch_mods):
  """Tiny checkpoints (Mamba2 with a BPE tokenizer, Mamba1 without), and data in every format."""
  root = tmp_path_factory.mktemp("calib")
  text = license_text()
  make_hf_mamba(torch_mods, root / "m2", "mamba2", vocab_size=256, num_hidden_layers=1)
  save_tokenizer(root / "m2", text)
  make_hf_mamba(torch_mods, root / "m1", "mamba1", vocab_size=256)
  (root / "stream.txt").write_text(text)
  paragraphs = [p for p in text.split("\n\n") if p.strip()]
  with open(root / "docs.jsonl", "w") as f:
    for p in paragraphs:
      f.write(json.dumps({"text": p}) + "\n")
  (root / "folder").mkdir()
  for i, p in enumerate(paragraphs[:30]):
    (root / "folder" / f"{i:03d}.txt").write_text(p)
  (root / "empty.txt").write_text("")
  (root / "nofiles").mkdir()
  return root


def run(args, capsys) -> tuple[int, str]:
  code = main([str(a) for a in args])
  return code, capsys.readouterr().err


CAL = ["--length", 48, "--samples", 4, "--calib-split", 0.5, "--steps", 4, "--quiet"]


def test_calibrate_then_ppl(world, capsys, tmp_path):
  out = tmp_path / "run"
  code, err = run([world / "m2", "--data", world / "stream.txt", "--granularity", "head", "--out", out, *CAL], capsys)
  assert code == 0, err
  assert "perplexity at 48 tokens on the held-out samples (2): before" in err
  meta = json.loads((out / "scales.json").read_text())
  assert meta["targets"] == {"A": {"mode": "linear", "granularity": "head", "shape": [4]}}
  cal = meta["calibration"]
  assert cal["method"] == "spsa" and cal["hyperparameters"]["c"] == 0.1 and len(cal["data"]["fingerprint_sha256"]) == 64
  assert cal["data"]["calibration_samples"] == 2 and cal["data"]["held_out_samples"] == 2
  log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log] == [0, 1, 2, 3, 4] and all("held_nll" in r for r in log)
  assert all(r["loss_plus"] > 0 for r in log[1:])
  # The tokenizer came from the model directory: every sample starts with its BOS (<|endoftext|> = 0).
  model = from_pretrained(world / "m2", scales=out)
  saved = scales_lib.read_scales(out)[1]["A"]
  np.testing.assert_array_equal(scales_lib.stacked(model)["A"], saved)
  assert cal["result"]["held_ppl_after"] <= cal["result"]["held_ppl_before"] + 1e-6  # keep-best includes step 0
  png_run = out / "calibration.png"
  assert png_run.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_run.stat().st_size > 5000
  assert "plot calibration.png" in err
  assert not [p for p in out.iterdir() if p.name.startswith(".calibration.png")]  # no temporary file left

  png, js = tmp_path / "ppl.png", tmp_path / "ppl.json"
  code, _ = run(
    ["ppl", world / "m2", "--data", world / "docs.jsonl", "--lengths", "16,32,100000", "--samples", 3]
    + ["--scales", out, "--with-base", "--plot", png, "--json", js],
    capsys,
  )
  assert code == 0
  curves = json.loads(js.read_text())
  assert set(curves) == {"base", "calibrated"}
  assert [r["docs"] for r in curves["base"]] == [3, 3, 0] and curves["base"][2]["ppl"] is None
  assert png.stat().st_size > 1000


RESUME_CASES = {
  "spsa": ["m2", "--optimizer", "adam", "--lr", 0.05],
  # The gradient path end to end from the CLI: Mamba1, dt scales per channel, remat, accumulation over 2 samples.
  "grad": ["m1", "--tokenizer", "bytes", "--method", "grad", "--target", "dt", "--granularity", "channel"]
  + ["--accum", 2, "--lr", 0.05],
}


@pytest.mark.parametrize("case", ["spsa", pytest.param("grad", marks=pytest.mark.slow)])
def test_resume_equals_uninterrupted(world, capsys, tmp_path, monkeypatch, case):
  model, *extra = RESUME_CASES[case]
  args = [world / model, "--data", world / "folder", *extra, "--checkpoint-every", 2]
  args += ["--length", 32, "--samples", 4, "--calib-split", 0.5, "--steps", 6, "--quiet", "--no-plot"]
  code, err = run([*args, "--out", tmp_path / "whole"], capsys)
  assert code == 0, err
  assert not (tmp_path / "whole" / "calibration.png").exists() and "plot" not in err
  held = [json.loads(x)["held_nll"] for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
  assert len(set(held)) > 1  # the scales moved during the run, so the equality below is not trivial

  real_save = checkpointing.Checkpointer.maybe_save

  def killed_after_step_5(self, step, tree, force=False):
    if step == 5:  # step 5 ran and was logged, but its checkpoint never comes: the run dies here
      raise KeyboardInterrupt
    return real_save(self, step, tree, force)

  monkeypatch.setattr(checkpointing.Checkpointer, "maybe_save", killed_after_step_5)
  with pytest.raises(KeyboardInterrupt):
    main([str(a) for a in [*args, "--out", tmp_path / "killed"]])
  monkeypatch.undo()
  code, err = run([*args, "--out", tmp_path / "killed"], capsys)
  assert code == 0, err
  assert "resuming from step 4" in err
  whole = (tmp_path / "whole" / scales_lib.SCALES_FILE).read_bytes()
  assert (tmp_path / "killed" / scales_lib.SCALES_FILE).read_bytes() == whole
  strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in p.read_text().splitlines()]
  assert strip(tmp_path / "killed" / "log.jsonl") == strip(tmp_path / "whole" / "log.jsonl")
  # A restart with other settings is refused instead of mixing two runs.
  code, err = run([*args, "--c", 0.2, "--out", tmp_path / "killed"], capsys)
  assert code == 2 and "different run" in err and "'c'" in err


def test_nonfinite_loss_stops_with_last_good_scales(world, capsys, tmp_path):
  # dt scales free to go negative and an absurd step size: after one step some head has dt < 0, its state grows
  # like exp(|dt A| t) and the next loss is not finite.
  out = tmp_path / "nan"
  code, err = run(
    [world / "m2", "--data", world / "stream.txt", "--target", "dt", "--granularity", "head", "--lr", 1e4]
    + ["--schedule", "constant", "--clamp=-1e6,1e6", "--out", out, *CAL],
    capsys,
  )
  assert code == 3, err
  assert "non-finite loss at step 2" in err
  meta = json.loads((out / "scales.json").read_text())
  assert meta["calibration"]["result"]["status"].startswith("stopped: non-finite loss at step 2")
  assert np.all(np.isfinite(scales_lib.read_scales(out)[1]["dt"]))
  log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
  assert log[-1]["step"] == 2 and log[-1]["error"] == "non-finite loss"
  assert (out / "calibration.png").stat().st_size > 5000  # the curve up to the last good step


@pytest.mark.parametrize("arch,mode,granularity", [("mamba1", "power", "entry"), ("mamba2", "linear", "head")])
def test_export_folded_checkpoint_runs_calibrated_in_jax_and_torch(
  world, capsys, tmp_path, torch_mods, arch, mode, granularity
):
  torch, transformers = torch_mods
  src = world / ("m1" if arch == "mamba1" else "m2")
  model = from_pretrained(src)
  attach_scales(model, "A", mode, granularity)
  rng = np.random.default_rng(0)
  scales_lib.set_stacked(model, {"A": rng.uniform(0.1, 8.0, scales_lib.stacked(model)["A"].shape).astype(np.float32)})
  scales_lib.save_scales(model, tmp_path / "scales")
  ids = np.random.default_rng(1).integers(0, 256, (2, 20))
  want = np.asarray(model(jax.numpy.asarray(ids)))
  for fmt in ("hf", "state-spaces"):
    code, err = run(["export", src, "--scales", tmp_path / "scales", "--out", tmp_path / fmt, "--format", fmt], capsys)
    assert code == 0, err
    got = np.asarray(from_pretrained(tmp_path / fmt)(jax.numpy.asarray(ids)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  tm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  with torch.no_grad():
    got = tm(torch.as_tensor(ids)).logits.float().numpy()
  np.testing.assert_allclose(got, want[..., : got.shape[-1]], rtol=1e-4, atol=1e-4)
  unscaled = np.asarray(from_pretrained(src)(jax.numpy.asarray(ids)))
  assert (
    np.abs(unscaled - want).max() > 3e-3
  )  # the scales matter (30x the tolerance), so the match above means they were folded


def test_export_refuses_dt_scales(world, capsys, tmp_path):
  model = from_pretrained(world / "m2")
  attach_scales(model, "dt", "linear", "head")
  scales_lib.save_scales(model, tmp_path / "scales")
  code, err = run(["export", world / "m2", "--scales", tmp_path / "scales", "--out", tmp_path / "o"], capsys)
  assert code == 2 and "dt scales cannot be folded" in err and not (tmp_path / "o").exists()


def test_bad_input(world, capsys, tmp_path):
  m2, m1 = world / "m2", world / "m1"
  base = ["--out", tmp_path / "o", "--length", 64, "--quiet"]
  cases = [
    ([m2, "--data", world / "missing.txt", *base], "does not exist"),
    ([m2, "--data", world / "empty.txt", *base], "is empty"),
    ([m2, "--data", world / "nofiles", *base], "has no .txt files"),
    ([m2, "--data", world / "folder", "--samples", 20, "--length", 400, *base[:2]], "found only"),
    ([m2, "--data", world / "stream.txt", "--samples", 500, *base], "enough for"),
    ([m2, "--data", "some/hub-dataset", *base], "not a file or folder"),
    ([m2, "--data", world / "stream.txt", "--granularity", "entry", *base], "does not exist for target 'A' on mamba2"),
    ([m1, "--data", world / "stream.txt", "--granularity", "head", *base], "does not exist for target 'A' on mamba1"),
    ([m1, "--data", world / "stream.txt", *base], "tokenizer"),  # m1 ships no tokenizer
    (
      [m2, "--data", world / "stream.txt", "--tokenizer", "bytes", "--samples", 2, "--calib-split", 0.9, *base],
      "each needs",
    ),
  ]
  for args, message in cases:
    code, err = run(args, capsys)
    assert code == 2 and message in err, (args, err)
  assert not (tmp_path / "o").exists()  # nothing was written for bad input
  # "found only K": the count of usable documents is given.
  code, err = run([m2, "--data", world / "folder", "--samples", 20, "--length", 400, *base[:2]], capsys)
  assert "found only" in err and "usable documents with at least 399 tokens (of 30 documents)" in err
  # A scales directory made for another model.
  other = from_pretrained(m1)
  attach_scales(other, "A", "linear", "layer")
  scales_lib.save_scales(other, tmp_path / "m1scales")
  code, err = run(
    ["ppl", m2, "--data", world / "stream.txt", "--lengths", 32, "--scales", tmp_path / "m1scales"], capsys
  )
  assert code == 2 and "made for another model" in err and "arch: scales made for 'mamba1', model has 'mamba2'" in err


def test_layers_policy():
  """--layers auto and scan run the layer scan; unroll inlines the blocks."""
  assert cli.scan_layers("auto") is True
  assert cli.scan_layers("scan") is True
  assert cli.scan_layers("unroll") is False
