#!/bin/bash
# Round 11 (an H200).
#   STEP=cal    the calibration steps at 8K with the frozen block weights stacked once outside the step
#               (`calibrate.objective.frozen_layers`), against stacking them inside every step (rounds 2-10,
#               --stack-per-step), one process per row set so that each peak belongs to its own steps: mamba-1.4b
#               (layer scan) new then old; mamba2-1.3b with the layer scan (new), then its SPSA step inlined (what
#               --layers auto chose in rounds 6-10).
#   STEP=table  bench_scans.py for the selective scan with round 10's forward defaults (128 x 4, 2112 target
#               programs): forward and forward+backward at 8K-64K and the 256K check.
#   STEP=rows   (for a later session: not yet run) both models' rows at 4K, 16K and 64K on the H200 with the weights
#               stacked once, one process per (model, length) so that each peak is its own (the mamba-1.4b rows are
#               still rounds 3-5's, from an H100 with older kernels); mamba-1.4b's three compile ~150 s per length.
#   STEP=bwd    backward launch variants (last swept on an H100 in round 3, for an older forward), forward+backward
#               at 8K and 64K, the default first.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee $OUT/device.txt
commit=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "commit $commit" | tee -a $OUT/device.txt
bench() { timeout $1 python benchmarks/bench_calibrate.py --lengths 8192 --iters 5 --json $OUT/calibrate.jsonl "${@:2}" \
  2>&1 | grep -v "Warning\|warn" | tee -a $OUT/calibrate.txt; }
case "${STEP:-cal}" in
cal)
  bench 220 --models mamba-1.4b
  bench 120 --models mamba-1.4b --methods forward,spsa --stack-per-step
  bench 130 --models mamba2-1.3b --layers scan
  bench 80 --models mamba2-1.3b --layers unroll --methods spsa
  ;;
table)
  GIT_COMMIT=$commit timeout 420 python benchmarks/bench_scans.py --ops selective_scan --lens 8192,32768,65536 \
    --no-xla-bwd-above 0 --official-json benchmarks/results/official_h200.json --out $OUT/scans_ss.md 2>&1 \
    | grep --line-buffered -v Warning | tee $OUT/scans_ss.log | grep -v '^{'
  ;;
rows)
  for m in mamba2-1.3b mamba-1.4b; do
    for l in 4096 16384 65536; do
      timeout 280 python benchmarks/bench_calibrate.py --models $m --lengths $l --iters 3 \
        --json $OUT/calibrate.jsonl 2>&1 | grep -v "Warning\|warn" | tee -a $OUT/calibrate.txt
    done
  done
  ;;
bwd)
  timeout 330 python benchmarks/profile_selective_scan.py --lens 8192,65536 --fwd --bwd '{}' '{"unroll_bwd": 4}' \
    '{"unroll_bwd": 16}' '{"block_e_bwd": 64, "num_warps_bwd": 2}' '{"block_e_bwd": 256, "num_warps_bwd": 8}' \
    '{"block_e_bwd": 32, "num_warps_bwd": 1}' 2>&1 | grep --line-buffered -v Warning | tee $OUT/bwd.txt
  ;;
esac
