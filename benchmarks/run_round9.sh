#!/bin/bash
# Round 9, on whatever kind the device tool lends (an H200 this round, where rounds 2-8 had an H100): the official
# kernels timed on the same device (benchmarks/bench_official.py, from a git-ignored checkout in third_party/mamba,
# carried with the call), then this project's table against them (bench_scans.py --official-json).
# third_party/mamba (git-ignored, never committed): a clone of state-spaces/mamba (round 9: e9594ce) trimmed to its
# csrc/selective_scan and mamba_ssm folders (1.4 MB); name it in the device call's `carry`.
#   STEP=scans  official build + timings in the background while the compiled kernel tests run, then
#               bench_scans.py for the SSD with the 256K check.
#   STEP=ss     bench_scans.py for the selective scan against benchmarks/results/official_h200.json (XLA
#               forward+backward timed up to 32K), then the segment-count variants round 8 left untried.
#   STEP=last   the selective scan's 64K row (no XLA forward+backward) and its 256K check, then mamba-1.4b's
#               calibration rows at 8K (the selective scan changed in rounds 7-8; the Mamba2 path did not).
#   STEP=next   (removed: run in round 10 as benchmarks/run_round10.sh; the chain kernel it timed was removed)
#   STEP=bwd    forward+backward of both ops timed as the official figures are (a given output cotangent, jax.vjp)
#               and, in the same lease, as rounds 2-8 timed it (the gradient of a loss), at 8K and 64K.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee $OUT/device.txt
commit=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
case "${STEP:-scans}" in
scans)
  (timeout 420 python benchmarks/bench_official.py --src third_party/mamba --out $OUT/official.json \
    > $OUT/official.log 2>&1; echo "official exit $?" >> $OUT/official.log) &
  timeout 200 python -m pytest -q -p no:cacheprovider -x tests/test_pallas_selective_scan.py tests/test_pallas_ssd.py \
    tests/test_causal_conv.py tests/test_gated_norm.py 2>&1 | tail -4 | tee $OUT/tests.txt
  wait
  grep -v Warning $OUT/official.log | tail -25
  GIT_COMMIT=$commit timeout 330 python benchmarks/bench_scans.py --ops ssd --official-json $OUT/official.json \
    --out $OUT/scans.md 2>&1 | grep --line-buffered -v Warning | tee $OUT/scans.log | grep -v '^{'
  ;;
ss)
  GIT_COMMIT=$commit timeout 360 python benchmarks/bench_scans.py --ops selective_scan --no-xla-bwd-above 32768 \
    --official-json benchmarks/results/official_h200.json --out $OUT/scans_ss.md 2>&1 | grep --line-buffered -v Warning \
    | tee $OUT/scans_ss.log | grep -v '^{'
  timeout 200 python benchmarks/profile_selective_scan.py --check --lens 8192,32768,65536 --fwd '{}' \
    '{"target_programs": 528}' '{"target_programs": 2112}' 2>&1 | grep --line-buffered -v Warning | tee $OUT/variants.txt
  ;;
last)
  GIT_COMMIT=$commit timeout 150 python benchmarks/bench_scans.py --ops selective_scan --lens 65536 \
    --no-xla-bwd-above 0 --official-json benchmarks/results/official_h200.json --out $OUT/scans_ss64k.md 2>&1 \
    | grep --line-buffered -v Warning | tee $OUT/scans_ss64k.log | grep -v '^{'
  timeout 250 python benchmarks/bench_calibrate.py --models mamba-1.4b --lengths 8192 --iters 3 \
    --json $OUT/calibrate.jsonl 2>&1 | grep -v "Warning\|warn" | tee $OUT/calibrate.log
  ;;
bwd)
  GIT_COMMIT=$commit timeout 170 python benchmarks/bench_scans.py --lens 8192,65536 --check-len 0 \
    --no-xla-bwd-above 0 --loss-bwd --official-json benchmarks/results/official_h200.json --out $OUT/scans_bwd.md \
    2>&1 | grep --line-buffered -v Warning | tee $OUT/scans_bwd.log | grep -v '^{'
  ;;
esac
