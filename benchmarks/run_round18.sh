#!/bin/bash
# Round 18 (an H200): the selective scan's forward kernels in Mosaic GPU (`ops/selective_scan/pallas_mosaic.py`).
#   STEP=sweep profile_selective_scan_mosaic.py: Triton against Mosaic GPU (T:stages of SWEEP_VARIANTS) at SWEEP_LENS,
#              batches SWEEP_BATCHES, each checked against the Triton kernels' outputs.
#   STEP=tests the selective-scan tests (Triton and Mosaic GPU), compiled on the GPU.
#   STEP=cal   bench_calibrate.py for CAL_MODELS (mamba-1.4b) and CAL_METHODS at each of CAL_LENS (8192), default
#              config (Mosaic GPU forward kernels on Hopper); then, when CAL_AB is set, the SPSA iteration with the
#              Triton forward kernels ({"fwd_lowering": "triton"}) and the default again (A/B/A in one lease), or
#              with each of CAL_AB_CONFIGS (JSON SelectiveScanConfig overrides, space-separated).
# Pass the commit literally (the device's git metadata is the session's base commit): GIT_COMMIT=abc1234 STEPS=sweep ...
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee -a $OUT/device.txt
echo "commit ${GIT_COMMIT:-unknown}" | tee -a $OUT/device.txt
for step in ${STEPS:-sweep}; do
case "$step" in
sweep)
  timeout ${SWEEP_S:-250} python benchmarks/profile_selective_scan_mosaic.py --lens ${SWEEP_LENS:-8192} \
    --batches ${SWEEP_BATCHES:-2,1} --variants ${SWEEP_VARIANTS:-16:2,8:2,16:1} --out $OUT/sweep.jsonl 2>&1 \
    | grep --line-buffered -v Warning | cut -c1-600 | tee -a $OUT/sweep.txt
  ;;
tests)
  timeout ${TEST_S:-200} python -m pytest -q -p no:cacheprovider tests/test_pallas_selective_scan_mosaic.py \
    tests/test_pallas_selective_scan.py 2>&1 | tail -15 | tee $OUT/tests.txt
  ;;
cal)
  for l in ${CAL_LENS:-8192}; do
    timeout ${CAL_S:-300} python benchmarks/bench_calibrate.py --lengths $l --iters ${CAL_ITERS:-3} \
      --models ${CAL_MODELS:-mamba-1.4b} --methods ${CAL_METHODS:-spsa,grad} --json $OUT/calibrate.jsonl 2>&1 \
      | grep -v "Warning\|warn" | tee -a $OUT/calibrate.txt
  done
  if [ -n "$CAL_AB" ]; then
    for c in ${CAL_AB_CONFIGS:-'{"fwd_lowering":"triton"}' '{}'}; do
      timeout ${CAL_S:-300} python benchmarks/bench_calibrate.py --lengths 8192 --iters ${CAL_ITERS:-3} \
        --models ${CAL_MODELS:-mamba-1.4b} --methods spsa --selective-scan-config "$c" --json $OUT/calibrate.jsonl 2>&1 \
        | grep -v "Warning\|warn" | tee -a $OUT/calibrate.txt
    done
  fi
  ;;
esac
done
