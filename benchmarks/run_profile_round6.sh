#!/bin/bash
# Round 6: the gated-norm kernel compiled on the GPU, where the calibration forward's time goes, calibration rows.
set -x
export PYTHONPATH=. PYTHONUNBUFFERED=1
python -m pytest -q -p no:cacheprovider tests/test_gated_norm.py 2>&1 | tail -3
python benchmarks/profile_model.py --models mamba2-1.3b --length 8192 --methods forward,spsa --layers unroll --hlo --top 20 --json $OUT/profile.jsonl
python benchmarks/bench_calibrate.py --models mamba2-1.3b --lengths 8192 --iters 5 --json $OUT/calibrate.jsonl
