#!/bin/bash
# Round 16 (an H200): the time-parallel selective-scan forward (tried, removed), and mamba-1.4b's gradient step with the
# selective scan's segment states kept by the remat policy (calibrate.md and scans.md, round 16).
#   STEP=tp   profile_selective_scan.py over TP_VARIANTS (JSON SelectiveScanConfig overrides) at TP_LENS, batch 1 and 2,
#             each checked against float32 XLA first. The default variants are the time-parallel forward's, which
#             exists only at commit 846b383 (removed after it: scans.md round 16); at later commits pass others.
#   STEP=tests the selective-scan tests, compiled on the GPU.
#   STEP=cal  bench_calibrate.py for CAL_MODELS (mamba-1.4b) and CAL_METHODS at each of CAL_LENS (8192), one process each.
# The device's copy keeps the session's base commit in its git metadata, so write the commit that runs out literally
# (a $(git rev-parse) in the command runs there): GIT_COMMIT=3a2c012 STEPS=cal bash benchmarks/run_round16.sh
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee $OUT/device.txt
commit=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "commit $commit" | tee -a $OUT/device.txt
TP_VARIANTS=${TP_VARIANTS:-'{} {"time_parallel":true} {"time_parallel":true,"tp_chunk":128} {"time_parallel":true,"tp_block_e":16,"tp_warps":2} {"time_parallel":true,"tp_chunk":128,"tp_warps":8} {"time_parallel":true,"tp_block_e":64} {"time_parallel":true,"tp_chunk":32,"tp_block_e":64}'}
for step in ${STEPS:-cal}; do
case "$step" in
tp)
  for bsz in ${TP_BATCHES:-1 2}; do
    timeout ${TP_S:-280} python benchmarks/profile_selective_scan.py --check --lens ${TP_LENS:-8192} --batch $bsz \
      --fwd $TP_VARIANTS 2>&1 | grep --line-buffered -v Warning | tee -a $OUT/tp.txt
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
