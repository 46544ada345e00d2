#!/bin/bash
# Round 15 (an H200): the SSD backward's dB/dC partials in 16 bits, and the Mosaic GPU segment states under jax.vjp.
#   STEP=tests   the compiled SSD tests (Triton and Mosaic GPU) on the GPU.
#   STEP=vars    trace_scans.py over VARIANTS (JSON SSDConfig overrides): gradients' errors against float32 XLA at
#                ERR_LENS, then stream times at TIME_LENS, and per-kernel times at TRACE_LENS.
#   STEP=ssd     bench_scans.py's SSD table (the defaults).
#   STEP=xla64   the same at 64K only, with the XLA fallback's forward+backward timed (the 5x goal).
#   STEP=cal     bench_calibrate.py for CAL_MODELS (mamba2-1.3b) at each of CAL_LENS (8192), one process each.
# STEPS may name several, run in order. The device's copy of the tree keeps its base commit's git metadata, so pass the
# commit that runs: GIT_COMMIT=$(git rev-parse --short HEAD) STEPS=... bash benchmarks/run_round15.sh
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee $OUT/device.txt
commit=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "commit $commit" | tee -a $OUT/device.txt
VARIANTS=${VARIANTS:-'{} {"bwd_partials":"scaled_fp16"} {"bwd_partials":"input"} {"mosaic_segment_states":false}'}
for step in ${STEPS:-tests}; do
case "$step" in
tests)
  timeout ${TEST_S:-240} python -m pytest -q -p no:cacheprovider tests/test_pallas_ssd_mosaic.py tests/test_pallas_ssd.py \
    2>&1 | tail -30 | tee $OUT/tests.txt
  ;;
vars)
  for l in ${ERR_LENS-8192}; do
    timeout ${ERR_S:-150} python benchmarks/trace_scans.py --ops ssd --lens $l --grad-err --no-trace --configs $VARIANTS \
      2>&1 | grep --line-buffered -v Warning | tee -a $OUT/vars.txt
  done
  for l in ${TIME_LENS-32768}; do
    timeout ${TIME_S:-150} python benchmarks/trace_scans.py --ops ssd --lens $l --no-trace --configs $VARIANTS \
      2>&1 | grep --line-buffered -v Warning | tee -a $OUT/vars.txt
  done
  for l in ${TRACE_LENS-65536}; do
    timeout ${TRACE_S:-200} python benchmarks/trace_scans.py --ops ssd --lens $l --top 10 --configs $VARIANTS \
      2>&1 | grep --line-buffered -v Warning | tee -a $OUT/vars.txt
  done
  ;;
ssd)
  GIT_COMMIT=$commit timeout ${SSD_S:-300} python benchmarks/bench_scans.py --ops ssd \
    --lens ${SSD_LENS:-2048,8192,32768,65536} --no-xla-bwd-above 0 --official-json benchmarks/results/official_h200.json \
    --out $OUT/scans_ssd.md 2>&1 | grep --line-buffered -v Warning | tee $OUT/scans_ssd.log | grep -v '^{'
  ;;
xla64)
  GIT_COMMIT=$commit timeout ${XLA_S:-200} python benchmarks/bench_scans.py --ops ssd --lens 65536 --check-len 0 \
    --no-xla-bwd-above 65536 --official-json benchmarks/results/official_h200.json --out $OUT/scans_xla64.md 2>&1 \
    | grep --line-buffered -v Warning | tee $OUT/scans_xla64.log | grep -v '^{'
  ;;
cal)
  for l in ${CAL_LENS:-8192}; do
    timeout ${CAL_S:-220} python benchmarks/bench_calibrate.py --lengths $l --iters ${CAL_ITERS:-5} \
      --models ${CAL_MODELS:-mamba2-1.3b} --json $OUT/calibrate.jsonl 2>&1 | grep -v "Warning\|warn" | tee -a $OUT/calibrate.txt
  done
  ;;
esac
done
