#!/bin/bash
# Round 17 (an H200): selective-scan launch shapes with several channels per thread, B / C read as float32 quads
# (`vector_bc`, 734ef3f) and the segment-state pass with its own channel block (`block_e_states`, 021da0d); both
# removed after (scans.md, round 17).
#   STEP=sweep profile_selective_scan.py over SWEEP_VARIANTS (JSON SelectiveScanConfig overrides) at SWEEP_LENS, for
#              each batch of SWEEP_BATCHES (SPSA's pair is batch 2), each checked against float32 XLA first and traced
#              (GPU time per kernel); forward+backward variants SWEEP_BWD (none by default) likewise.
#   STEP=tests the selective-scan tests, compiled on the GPU.
#   STEP=cal   bench_calibrate.py for CAL_MODELS (mamba-1.4b) and CAL_METHODS at each of CAL_LENS (8192), one process each.
# Pass the commit literally (the device's git metadata is the session's base commit): GIT_COMMIT=abc1234 STEPS=sweep ...
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee $OUT/device.txt
echo "commit ${GIT_COMMIT:-unknown}" | tee -a $OUT/device.txt
SWEEP_VARIANTS=${SWEEP_VARIANTS:-'{} {"block_e":256,"target_programs":1056} {"block_e":256} {"block_e":512,"target_programs":528} {"block_e":256,"target_programs":1056,"unroll":8} {"block_e":256,"num_warps":2,"target_programs":2112}'}
for step in ${STEPS:-sweep}; do
case "$step" in
sweep)
  for bsz in ${SWEEP_BATCHES:-2 1}; do
    timeout ${SWEEP_S:-250} python benchmarks/profile_selective_scan.py --check --trace --lens ${SWEEP_LENS:-8192} \
      --batch $bsz --fwd $SWEEP_VARIANTS ${SWEEP_BWD:+--bwd $SWEEP_BWD} 2>&1 | grep --line-buffered -v Warning | tee -a $OUT/sweep.txt
  done
  ;;
tests)
  timeout ${TEST_S:-150} python -m pytest -q -p no:cacheprovider tests/test_pallas_selective_scan.py 2>&1 | tail -15 \
    | tee $OUT/tests.txt
  ;;
cal)
  for l in ${CAL_LENS:-8192}; do
    timeout ${CAL_S:-300} python benchmarks/bench_calibrate.py --lengths $l --iters ${CAL_ITERS:-3} \
      --models ${CAL_MODELS:-mamba-1.4b} --methods ${CAL_METHODS:-forward,spsa,grad} --json $OUT/calibrate.jsonl 2>&1 \
      | grep -v "Warning\|warn" | tee -a $OUT/calibrate.txt
  done
  ;;
esac
done
