#!/bin/bash
# Round 6: the new kernels compiled on the GPU (and the models against transformers with them), where the
# calibration forward's time goes, calibration rows.
export PYTHONPATH=. PYTHONUNBUFFERED=1
python -m pytest -q -p no:cacheprovider tests/test_gated_norm.py tests/test_causal_conv.py tests/test_parity_hf.py > $OUT/gpu_tests.txt 2>&1
tail -5 $OUT/gpu_tests.txt
python benchmarks/profile_model.py --models mamba2-1.3b --length 8192 --methods forward,spsa --layers unroll --hlo --top 14 --json $OUT/profile.jsonl
python benchmarks/bench_calibrate.py --models mamba2-1.3b --lengths 8192 --iters 5 --json $OUT/calibrate.jsonl
