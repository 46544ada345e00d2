#!/bin/bash
# Round 6: the models against transformers on the GPU (float32 matmuls at full precision: XLA's default on GPU is
# TF32), then calibration rows, one process per (model, length) so that each peak belongs to its length.
export PYTHONPATH=. PYTHONUNBUFFERED=1
MODELS=${MODELS:-mamba2-1.3b}
LENGTHS=${LENGTHS:-4096,16384,65536}
if [ -n "$PARITY" ]; then
  JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest -q -p no:cacheprovider tests/test_parity_hf.py > $OUT/gpu_parity.txt 2>&1
  tail -3 $OUT/gpu_parity.txt
fi
for m in ${MODELS//,/ }; do
  for l in ${LENGTHS//,/ }; do
    python benchmarks/bench_calibrate.py --models $m --lengths $l --iters 3 --json $OUT/calibrate.jsonl 2>&1 | grep -v "Warning\|warn"
  done
done
