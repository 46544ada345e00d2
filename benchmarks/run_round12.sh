#!/bin/bash
# Round 12 (an H200): the selective scan's special functions. Its first step (poly: some decays on the FMA units,
# `poly_exp*`) ran at 601aa30 and was removed with the option (scans.md round 12).
#   STEP=sp     softplus of delta from ex2/lg2 and the backward's sigmoids from rcp.approx (`fast_math`, the new default):
#               its compiled GPU tests, the forward at 8K / 32K / 64K (checked first) and forward+backward at 8K.
#   STEP=table  bench_scans.py for the selective scan (forward and forward+backward at 8K-64K, the 256K check).
#   STEP=cal    both models' calibration steps at 8K (bench_calibrate.py), as in round 11's rows: the first timing of
#               the gradient step with the kernels' `optimize_remat` (its forward pass no longer stores scan states)
#               and of every step with the selective scan's `fast_math`.
#   STEP=rows   both models' rows at 4K, 16K and 64K (ran in round 12; ROWS_MODELS picks the models).
# STEP=sp's forward+backward rows, STEP=table and STEP=cal did not run in round 12 (device time).
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee $OUT/device.txt
commit=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "commit $commit" | tee -a $OUT/device.txt
case "${STEP:-sp}" in
sp)
  timeout ${TEST_S:-100} python -m pytest -q -p no:cacheprovider tests/test_pallas_selective_scan.py -k "softplus or exp2 or fast_math" \
    2>&1 | tail -3 | tee $OUT/tests.txt
  timeout ${FWD_S:-160} python benchmarks/profile_selective_scan.py --lens ${FWD_LENS:-8192,32768,65536} --check --fwd '{}' \
    '{"fast_math": false}' 2>&1 | grep --line-buffered -v Warning | tee $OUT/fwd.txt
  timeout ${BWD_S:-120} python benchmarks/profile_selective_scan.py --lens 8192 --fwd --bwd '{}' '{"fast_math": false}' \
    2>&1 | grep --line-buffered -v Warning | tee $OUT/bwd.txt
  ;;
table)
  GIT_COMMIT=$commit timeout ${TABLE_S:-420} python benchmarks/bench_scans.py --ops selective_scan \
    --lens 8192,32768,65536 --no-xla-bwd-above 0 --official-json benchmarks/results/official_h200.json \
    --out $OUT/scans_ss.md 2>&1 | grep --line-buffered -v Warning | tee $OUT/scans_ss.log | grep -v '^{'
  ;;
cal)
  for m in mamba-1.4b mamba2-1.3b; do
    timeout ${CAL_S:-220} python benchmarks/bench_calibrate.py --lengths 8192 --iters 5 --models $m \
      --json $OUT/calibrate.jsonl 2>&1 | grep -v "Warning\|warn" | tee -a $OUT/calibrate.txt
  done
  ;;
rows)
  for m in ${ROWS_MODELS:-mamba-1.4b mamba2-1.3b}; do
    for l in ${ROWS_LENS:-4096 16384 65536}; do
      timeout ${ROW_S:-280} python benchmarks/bench_calibrate.py --models $m --lengths $l --iters 3 \
        --json $OUT/calibrate.jsonl 2>&1 | grep -v "Warning\|warn" | tee -a $OUT/calibrate.txt
    done
  done
  ;;
esac
