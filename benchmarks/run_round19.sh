#!/bin/bash
# Round 19 (an H200): where mamba-1.4b's 8K SPSA iteration and gradient step spend their time, and what helps.
#   STEP=prof      profile_model.py --hlo for PROF_METHODS (spsa,grad) with the default config.
#   STEP=profab    profile_model.py for PROF_AB_METHODS (grad) with each JSON SelectiveScanConfig override of
#                  PROF_AB_CONFIGS (the Triton forward kernels by default).
#   STEP=cmdbuf    bench_calibrate.py's SPSA iteration under each XLA_FLAGS of CMDBUF_FLAGS ('|'-separated; "-"
#                  for none), to see what XLA's command buffers (CUDA graphs) do to the gaps between kernels.
#   STEP=cal       bench_calibrate.py for CAL_MODELS (mamba-1.4b) and CAL_METHODS (spsa,grad) at CAL_LENS (8192).
#   STEP=sweep     profile_selective_scan_mosaic.py for SWEEP_VARIANTS at 8K, batches 2 and 1.
#   STEP=calab     bench_calibrate.py's CALAB_METHODS (spsa) with each JSON SelectiveScanConfig override of CALAB_CONFIGS.
#   STEP=sass      the Mosaic GPU selective-scan kernels' PTX and ptxas report (MOSAIC_GPU_DUMP_*), gzipped (the
#                  device has no nvdisasm: assemble the PTX elsewhere for SASS).
#   STEP=remat     benchmarks/check_remat_calls.py: the selective-scan kernel calls of a tiny remat gradient step.
#   STEP=tests     the compiled GPU tests of TEST_FILES.
# Pass the commit literally (the device's git metadata is the session's base commit): GIT_COMMIT=abc1234 STEPS=prof ...
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee -a $OUT/device.txt
echo "commit ${GIT_COMMIT:-unknown}" | tee -a $OUT/device.txt
M=${CAL_MODELS:-mamba-1.4b}
for step in ${STEPS:-prof}; do
case "$step" in
prof)
  timeout ${PROF_S:-300} python benchmarks/profile_model.py --models $M --length 8192 --methods ${PROF_METHODS:-spsa,grad} \
    --hlo --top ${PROF_TOP:-30} --json $OUT/profile.jsonl 2>&1 | grep -v "Warning\|warn" | cut -c1-700 | tee -a $OUT/profile.txt
  ;;
profab)
    for c in ${PROF_AB_CONFIGS:-'{"fwd_lowering":"triton"}'}; do
      echo "### config $c" | tee -a $OUT/profile.txt
      timeout ${PROF_S:-300} python benchmarks/profile_model.py --models $M --length 8192 --methods ${PROF_AB_METHODS:-grad} \
        --top ${PROF_TOP:-30} --selective-scan-config "$c" --json $OUT/profile.jsonl 2>&1 | grep -v "Warning\|warn" \
        | cut -c1-700 | tee -a $OUT/profile.txt
    done
  ;;
cmdbuf)
  IFS='|' read -ra FLAGS <<< "${CMDBUF_FLAGS:--|--xla_gpu_enable_command_buffer=|--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL}"
  for f in "${FLAGS[@]}"; do
    [ "$f" = "-" ] && f=""
    echo "### XLA_FLAGS=$f" | tee -a $OUT/cmdbuf.txt
    XLA_FLAGS="$f" timeout ${CAL_S:-200} python benchmarks/bench_calibrate.py --lengths 8192 --iters ${CAL_ITERS:-5} \
      --models $M --methods ${CMDBUF_METHODS:-spsa} --json $OUT/cmdbuf.jsonl 2>&1 | grep -v "Warning\|warn" \
      | tail -8 | tee -a $OUT/cmdbuf.txt
  done
  ;;
cal)
  for l in ${CAL_LENS:-8192}; do
    timeout ${CAL_S:-300} python benchmarks/bench_calibrate.py --lengths $l --iters ${CAL_ITERS:-3} \
      --models $M --methods ${CAL_METHODS:-spsa,grad} --json $OUT/calibrate.jsonl 2>&1 \
      | grep -v "Warning\|warn" | tee -a $OUT/calibrate.txt
  done
  ;;
sweep)
  timeout ${SWEEP_S:-250} python benchmarks/profile_selective_scan_mosaic.py --lens 8192 --batches ${SWEEP_BATCHES:-2,1} \
    --variants ${SWEEP_VARIANTS:-16:2} --out $OUT/sweep.jsonl 2>&1 | grep --line-buffered -v Warning | cut -c1-600 \
    | tee -a $OUT/sweep.txt
  ;;
calab)
  for c in ${CALAB_CONFIGS:-'{}' '{"target_programs":1056}'}; do
    timeout ${CAL_S:-200} python benchmarks/bench_calibrate.py --lengths 8192 --iters ${CAL_ITERS:-5} --models $M \
      --methods ${CALAB_METHODS:-spsa} --selective-scan-config "$c" --json $OUT/calab.jsonl 2>&1 \
      | grep -v "Warning\|warn" | tail -4 | tee -a $OUT/calab.txt
  done
  ;;
remat)
  timeout ${REMAT_S:-120} python benchmarks/check_remat_calls.py 2>&1 | grep -v "Warning\|warn" | tee -a $OUT/remat.txt
  ;;
sass)
  MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 timeout ${SASS_S:-150} python benchmarks/profile_selective_scan_mosaic.py \
    --lens 8192 --batches 2 --variants ${SASS_VARIANTS:-16:2} --out $OUT/sass_sweep.jsonl > $OUT/sass.txt 2>&1
  grep -v Warning $OUT/sass.txt | grep -v "^\s*/\*[0-9a-f]*\*/" | tail -5; gzip -f $OUT/sass.txt; ls -la $OUT
  ;;
tests)
  timeout ${TEST_S:-300} python -m pytest -q -p no:cacheprovider ${TEST_FILES:-tests/test_pallas_selective_scan_mosaic.py} \
    2>&1 | tail -15 | tee -a $OUT/tests.txt
  ;;
esac
done
