#!/bin/bash
# Round 10 (an H200): the selective-scan forward variants built in round 9 and not yet measured.
#   STEP=sweep  (ran at 2387f1e; the chain kernel was removed after it, so it no longer runs) forward: the default, `chain_kernel` (with 32 and 64 channels per chain program) and, with the chain
#               kernel, three launch variants the round-3 H100 sweep chose for an older kernel (128 channels x 4
#               warps, unroll 8, one pipeline stage); forward+backward: default against `chain_kernel`. Per-kernel
#               GPU times (--trace), checked against float32 XLA first.
#   The table and cal steps prepared here for the next session ran there as run_round11.sh's table and cal steps.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee $OUT/device.txt
case "${STEP:-sweep}" in
sweep)
  timeout ${SWEEP_S:-500} python benchmarks/profile_selective_scan.py --check --trace --lens ${LENS:-8192,32768,65536} \
    --fwd '{}' '{"chain_kernel": true}' '{"chain_kernel": true, "block_e_chain": 64}' \
    '{"chain_kernel": true, "block_e": 128, "num_warps": 4}' '{"chain_kernel": true, "unroll": 8}' \
    '{"chain_kernel": true, "num_stages": 1}' --bwd '{}' '{"chain_kernel": true}' 2>&1 \
    | grep --line-buffered -v Warning | tee $OUT/sweep.txt
  ;;
sweep2)
  # the launch variants without the chain kernel (whose compile took 6 min 21 s in the first call), then
  # mamba-1.4b's calibration rows at 8K (gate read in place)
  timeout 230 python benchmarks/profile_selective_scan.py --lens 8192,32768,65536 --fwd '{}' \
    '{"block_e": 128, "num_warps": 4}' '{"unroll": 8}' '{"num_stages": 1}' 2>&1 \
    | grep --line-buffered -v Warning | tee $OUT/sweep2.txt
  timeout 250 python benchmarks/bench_calibrate.py --models mamba-1.4b --lengths 8192 --iters 3 \
    --json $OUT/calibrate.jsonl 2>&1 | grep -v "Warning\|warn"
  ;;
split)
  # the state split over 2 or 4 threads per channel (block_e < 32 * num_warps: Triton's layout spreads n over the
  # threads of a channel), segments kept at 64; one process per variant so that a failed lowering stops only it
  for v in '{}' '{"block_e": 128, "num_warps": 8, "target_programs": 2112}' \
    '{"block_e": 64, "num_warps": 8, "target_programs": 4224}' '{"block_e": 128, "num_warps": 4, "target_programs": 2112}'; do
    timeout 110 python benchmarks/profile_selective_scan.py --check --lens 8192,32768,65536 --fwd "$v" 2>&1 \
      | grep --line-buffered -v "Warning\|^device" | tee -a $OUT/split.txt
  done
  ;;
esac
