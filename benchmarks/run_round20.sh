#!/bin/bash
# Round 20 (an H200): the gradient step's extra Mosaic GPU launch (pass 1's optimization barrier) and the fused
# residual add + RMSNorm of the layer scan, on mamba-1.4b at 8K.
#   STEP=remat     benchmarks/check_remat_calls.py with and without the barrier (REMAT_ARGS: "-" for none).
#   STEP=cal       bench_calibrate.py for CAL_MODELS (mamba-1.4b) and CAL_METHODS (spsa,grad) at CAL_LENS (8192);
#                  CAL_ARGS are passed to every bench_calibrate.py run (e.g. "--conv-backward xla", round 21).
#   STEP=calab     bench_calibrate.py's CALAB_METHODS (grad) with each JSON SelectiveScanConfig of CALAB_CONFIGS.
#   STEP=base      bench_calibrate.py's BASE_METHODS (spsa) on the session's base commit (the device's git HEAD,
#                  extracted to /tmp/base): the A/B against this tree in one lease.
#   STEP=prof      profile_model.py for PROF_METHODS (spsa) with the default config, or PROF_CONFIG's JSON
#                  SelectiveScanConfig overrides when set (round 21).
#   STEP=tests     the compiled GPU tests of TEST_FILES (-k TEST_K when set), each test's outcome listed; give
#                  TEST_S >= 400 for the vjp kernels' tests (TEST_K="remat_layer_scan or mosaic_vjp"): in round 20
#                  each compiled case took ~45 s, and 170-200 s limits killed the run before any result came back.
#   STEP=conv      bench_causal_conv.py (the conv's backward kernel against XLA's derivative) at CONV_LENS (8192).
#   STEP=ptests    each pytest selection of the ;-separated PTESTS (node ids or "FILE -k EXPR") in its own process,
#                  all at once (compiles in parallel; no GPU memory preallocation), each stopped after PTEST_S (480);
#                  outputs streamed to /tmp and gathered into $OUT/ptests.txt (round 21).
# Pass the commit literally (the device's git metadata is the session's base commit): GIT_COMMIT=abc1234 STEPS=...
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee -a $OUT/device.txt
echo "commit ${GIT_COMMIT:-unknown} (base $(git rev-parse --short HEAD 2>/dev/null))" | tee -a $OUT/device.txt
M=${CAL_MODELS:-mamba-1.4b}
bench() {  # bench DIR TAG METHODS [extra args...]
  local dir=$1 tag=$2 methods=$3; shift 3
  echo "### $tag" | tee -a $OUT/calibrate.txt
  (cd $dir && PYTHONPATH=. timeout ${CAL_S:-240} python benchmarks/bench_calibrate.py --lengths 8192 \
    --iters ${CAL_ITERS:-5} --models $M --methods $methods --json $OUT/calibrate_$tag.jsonl $CAL_ARGS "$@" 2>&1 \
    | grep -v "Warning\|warn" | tail -6 | tee -a $OUT/calibrate.txt)
}
for step in ${STEPS:-remat}; do
case "$step" in
remat)
  for a in ${REMAT_ARGS:-- --no-barrier}; do
    [ "$a" = "-" ] && a=""
    echo "### check_remat_calls $a" | tee -a $OUT/remat.txt
    timeout ${REMAT_S:-120} python benchmarks/check_remat_calls.py $a 2>&1 | grep -v "Warning\|warn" | cut -c1-300 \
      | tee -a $OUT/remat.txt
  done
  ;;
cal)
  bench . head ${CAL_METHODS:-spsa,grad}
  ;;
calab)
  for c in ${CALAB_CONFIGS:-'{"barrier_segment_states":false}'}; do
    bench . "calab" ${CALAB_METHODS:-grad} --selective-scan-config "$c"
  done
  ;;
base)
  rm -rf /tmp/base && mkdir -p /tmp/base && git archive HEAD | tar -x -C /tmp/base
  bench /tmp/base base ${BASE_METHODS:-spsa}
  ;;
prof)
  timeout ${PROF_S:-300} python benchmarks/profile_model.py --models $M --length 8192 --methods ${PROF_METHODS:-spsa} \
    --hlo --top ${PROF_TOP:-30} --json $OUT/profile.jsonl ${PROF_CONFIG:+--selective-scan-config "$PROF_CONFIG"} 2>&1 | grep -v "Warning\|warn" | cut -c1-400 | tee -a $OUT/profile.txt
  ;;
tests)
  timeout ${TEST_S:-300} python -m pytest -q -rA -p no:cacheprovider ${TEST_FILES:-tests/test_pallas_selective_scan_mosaic.py} \
    ${TEST_K:+-k "$TEST_K"} 2>&1 | tail -40 | tee -a $OUT/tests.txt
  ;;
conv)
  timeout ${CONV_S:-90} python benchmarks/bench_causal_conv.py --lens ${CONV_LENS:-8192} --out $OUT/causal_conv.jsonl \
    2>&1 | grep -v "Warning\|warn" | tee -a $OUT/conv.txt
  ;;
ptests)
  IFS=';' read -ra sel <<< "$PTESTS"
  for i in "${!sel[@]}"; do
    (eval "XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${PTEST_S:-480} python -m pytest -q -rA --durations=5 \
      -p no:cacheprovider ${sel[$i]}" > /tmp/ptest_$i.txt 2>&1; echo "rc $?" >> /tmp/ptest_$i.txt) &
  done
  wait
  for i in "${!sel[@]}"; do
    echo "### ${sel[$i]}" >> $OUT/ptests.txt; grep -v "Warning\|warn" /tmp/ptest_$i.txt | tail -30 >> $OUT/ptests.txt
  done
  tail -c 6000 $OUT/ptests.txt
  ;;
esac
done
