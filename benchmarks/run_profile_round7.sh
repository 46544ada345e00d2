#!/bin/bash
# Round 7: where the selective scan's time goes (Nsight Compute), then forward and forward+backward variants.
export PYTHONPATH=. PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv
if [ -n "$NCU" ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 $NCU --clock-control none --kernel-name regex:selective_scan \
    --section LaunchStats --section Occupancy --section SpeedOfLight --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section InstructionStats --section SchedulerStats \
    python benchmarks/profile_selective_scan.py --ncu --lens 32768 --fwd '{}' '{"fwd_tile": true}' > $OUT/ncu_ss.txt 2>&1
  echo "ncu rc $?"; grep -E "selective_scan|Registers Per|Achieved Occ|Issue Slots Busy|Theoretical Occ|Duration|No Eligible|Block Limit Reg" $OUT/ncu_ss.txt | head -80
fi
python benchmarks/profile_selective_scan.py --check --lens 8192,32768,65536 \
  --fwd '{}' '{"fwd_tile": true}' '{"target_programs": 2112}' '{"fwd_tile": true, "target_programs": 2112}' \
  '{"fwd_tile": true, "block_e": 128, "num_warps": 4}' '{"fwd_tile": true, "unroll": 8}' \
  --bwd '{}' '{"fwd_tile": true}' '{"target_programs": 2112}' 2>&1 | grep -v Warning | tee $OUT/variants.txt
