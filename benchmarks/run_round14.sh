#!/bin/bash
# Round 14 (an H200): the SSD forward's segment-state kernel in Mosaic GPU, a single-pass selective-scan probe, and
# the calibration steps re-timed with rounds 12-14's kernels.
#   STEP=mosaic  the Mosaic GPU tests, then benchmarks/profile_ssd_mosaic.py at MOSAIC_LENS: whole forwards with the
#                Triton or the Mosaic GPU segment-state kernel (STATE_STAGES), the kernels alone, per-kernel times.
#   STEP=ss1     the selective-scan forward with one segment (one pass, no segment-state kernel): 32 channels x 1
#                warp and 64 x 2, against the default, at SS1_LENS.
#   STEP=ssd     bench_scans.py's SSD table (the defaults).
#   STEP=trace   per-kernel GPU time of the Pallas forward and forward+backward (benchmarks/trace_scans.py, TRACE_OPS
#                at TRACE_LENS; the defaults). Round 14's config variants ran as one command:
#                trace_scans.py --ops ssd --lens 65536 --top 10 --configs '{}' '{"heads_per_program_bwd": 2}' \
#                  '{"heads_per_program_bwd": 4}').
#   STEP=cal     both models' calibration steps at 8K (bench_calibrate.py).
# STEPS may name several, run in order.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee $OUT/device.txt
commit=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "commit $commit" | tee -a $OUT/device.txt
for step in ${STEPS:-mosaic}; do
case "$step" in
mosaic)
  timeout ${MTEST_S:-120} python -m pytest -q -p no:cacheprovider tests/test_pallas_ssd_mosaic.py 2>&1 | tail -30 | tee $OUT/mosaic_tests.txt
  timeout ${MOSAIC_S:-300} python benchmarks/profile_ssd_mosaic.py --lens ${MOSAIC_LENS:-8192,32768,65536} --stages 1 \
    --state-stages ${STATE_STAGES:-1,2,3} ${MOSAIC_TRACE---trace} 2>&1 | grep --line-buffered -v Warning | tee -a $OUT/mosaic.txt
  ;;
ss1)
  timeout ${SS1_S:-150} python benchmarks/profile_selective_scan.py --lens ${SS1_LENS:-8192,32768} --check --fwd '{}' \
    '{"block_e": 32, "num_warps": 1, "target_programs": 1}' '{"block_e": 64, "num_warps": 2, "target_programs": 1}' \
    2>&1 | grep --line-buffered -v Warning | tee $OUT/ss1.txt
  ;;
ssd)
  GIT_COMMIT=$commit timeout ${SSD_S:-300} python benchmarks/bench_scans.py --ops ssd \
    --lens ${SSD_LENS:-8192,32768,65536} --no-xla-bwd-above 0 --official-json benchmarks/results/official_h200.json \
    --out $OUT/scans_ssd.md 2>&1 | grep --line-buffered -v Warning | tee $OUT/scans_ssd.log | grep -v '^{'
  ;;
trace)
  timeout ${TRACE_S:-150} python benchmarks/trace_scans.py --ops ${TRACE_OPS:-ssd} --lens ${TRACE_LENS:-32768,65536} \
    2>&1 | grep --line-buffered -v Warning | tee $OUT/trace.txt
  ;;
cal)
  for m in ${CAL_MODELS:-mamba-1.4b mamba2-1.3b}; do
    timeout ${CAL_S:-220} python benchmarks/bench_calibrate.py --lengths 8192 --iters 5 --models $m \
      --json $OUT/calibrate.jsonl 2>&1 | grep -v "Warning\|warn" | tee -a $OUT/calibrate.txt
  done
  ;;
esac
done
