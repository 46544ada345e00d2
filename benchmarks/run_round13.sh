#!/bin/bash
# Round 13 (an H200): Triton vs Mosaic GPU for the SSD forward's main kernel, and the selective-scan table with
# round 12's `fast_math` (its forward+backward never timed).
#   STEP=mosaic  benchmarks/profile_ssd_mosaic.py at MOSAIC_LENS (checks, then whole forward and main kernels).
#   STEP=table   bench_scans.py for the selective scan (as round 12's STEP=table).
#   STEP=ssbwd   the selective scan's forward and forward+backward at 8K-64K (profile_selective_scan.py, defaults).
#   STEP=ssd     the Mosaic GPU tests, then bench_scans.py's SSD table (the main kernel's lowering now chosen by default).
#   STEP=cal     both models' calibration steps at 8K (optimize_remat, fast_math and the Mosaic GPU SSD forward).
# STEPS may name several, run in order.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee $OUT/device.txt
commit=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "commit $commit" | tee -a $OUT/device.txt
for step in ${STEPS:-mosaic}; do
case "$step" in
mosaic)
  timeout ${MTEST_S:-120} python -m pytest -q -p no:cacheprovider tests/test_pallas_ssd_mosaic.py 2>&1 | tail -30 | tee $OUT/mosaic_tests.txt
  timeout ${MOSAIC_S:-240} python benchmarks/profile_ssd_mosaic.py --lens ${MOSAIC_LENS:-8192} --stages ${MOSAIC_STAGES:-1,2} \
    2>&1 | grep --line-buffered -v Warning | tee -a $OUT/mosaic.txt
  ;;
table)
  GIT_COMMIT=$commit timeout ${TABLE_S:-420} python benchmarks/bench_scans.py --ops selective_scan \
    --lens ${TABLE_LENS:-8192,32768,65536} --no-xla-bwd-above 0 --official-json benchmarks/results/official_h200.json \
    --out $OUT/scans_ss.md 2>&1 | grep --line-buffered -v Warning | tee $OUT/scans_ss.log | grep -v '^{'
  ;;
ssbwd)
  timeout ${SSBWD_S:-200} python benchmarks/profile_selective_scan.py --lens ${SSBWD_LENS:-8192,32768,65536} --fwd '{}' --bwd '{}' \
    2>&1 | grep --line-buffered -v Warning | tee $OUT/ssbwd.txt
  ;;
ssd)
  timeout ${MTEST_S:-60} python -m pytest -q -p no:cacheprovider tests/test_pallas_ssd_mosaic.py 2>&1 | tail -3 | tee $OUT/mosaic_tests.txt
  GIT_COMMIT=$commit timeout ${SSD_S:-300} python benchmarks/bench_scans.py --ops ssd \
    --lens ${SSD_LENS:-8192,32768,65536} --no-xla-bwd-above 0 --official-json benchmarks/results/official_h200.json \
    --out $OUT/scans_ssd.md 2>&1 | grep --line-buffered -v Warning | tee $OUT/scans_ssd.log | grep -v '^{'
  ;;
cal)
  for m in ${CAL_MODELS:-mamba-1.4b mamba2-1.3b}; do
    timeout ${CAL_S:-220} python benchmarks/bench_calibrate.py --lengths 8192 --iters 5 --models $m \
      --json $OUT/calibrate.jsonl 2>&1 | grep -v "Warning\|warn" | tee -a $OUT/calibrate.txt
  done
  ;;
esac
done
