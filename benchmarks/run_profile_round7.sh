#!/bin/bash
# Round 7: the selective scan's forward and forward+backward variants (FMA, prefetch, launch shapes);
# with NCU=1 first Nsight Compute on the forward at 32K.
export PYTHONPATH=. PYTHONUNBUFFERED=1
if [ -n "$NCU" ]; then
  NCU_BIN=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 $NCU_BIN --clock-control none --kernel-name regex:selective_scan \
    --section LaunchStats --section Occupancy --section SpeedOfLight --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section InstructionStats --section SchedulerStats \
    python benchmarks/profile_selective_scan.py --ncu --lens 32768 $NCU_ARGS > $OUT/ncu_ss.txt 2>&1
  echo "ncu rc $?"
fi
python benchmarks/profile_selective_scan.py --check --lens ${LENS:-8192,32768,65536} --fwd $FWD --bwd $BWD $EXTRA 2>&1 \
  | grep --line-buffered -v Warning | tee $OUT/variants.txt
