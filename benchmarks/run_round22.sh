#!/bin/bash
# Round 22: the gradient step's conv backward and split in_proj A/B, and where the SPSA iteration goes, on mamba-1.4b
# at 8K. Each GPU of the machine runs its own list of jobs, in order; the lists run side by side.
#   GPU0, GPU1, ...: ;-separated jobs, each "TAG METHODS [bench_calibrate.py args]" (a bench_calibrate.py run at 8K,
#                    CAL_ITERS iterations), "prof METHODS [profile_model.py args]" (the kernel profile, --hlo) or
#                    "sh S COMMAND..." (any command, stopped after S seconds; e.g. pytest or bench_causal_conv.py).
#   XF_TAG: XLA_FLAGS for the jobs tagged TAG (e.g. XF_dsf="--xla_gpu_enable_dynamic_slice_fusion=true").
#   Outputs: $OUT/gpuN.txt per GPU, $OUT/calibrate_TAG.jsonl, $OUT/profile.jsonl.
# Pass the commit literally (the device's git metadata is the session's base commit): GIT_COMMIT=abc1234 GPU0=...
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee -a $OUT/device.txt
echo "commit ${GIT_COMMIT:-unknown} (base $(git rev-parse --short HEAD 2>/dev/null))" | tee -a $OUT/device.txt
M=${CAL_MODELS:-mamba-1.4b}
job() {  # job GPU TAG METHODS [args...]
  local gpu=$1 tag=$2 methods=$3; shift 3
  local xf="XF_$tag"
  export XLA_FLAGS="${!xf}"
  echo "### gpu$gpu $tag $methods $* ${XLA_FLAGS:+XLA_FLAGS=$XLA_FLAGS}"
  if [ "$tag" = sh ]; then
    CUDA_VISIBLE_DEVICES=$gpu timeout $methods "$@" 2>&1 | grep -v "Warning\|warn" | tail -${SH_TAIL:-40}
  elif [ "$tag" = prof ]; then
    CUDA_VISIBLE_DEVICES=$gpu timeout ${PROF_S:-300} python benchmarks/profile_model.py --models $M --length 8192 \
      --methods $methods --hlo --top ${PROF_TOP:-40} --json $OUT/profile.jsonl "$@" 2>&1 | grep -v "Warning\|warn" \
      | cut -c1-400
  else
    CUDA_VISIBLE_DEVICES=$gpu timeout ${CAL_S:-240} python benchmarks/bench_calibrate.py --lengths 8192 \
      --iters ${CAL_ITERS:-3} --models $M --methods $methods --json $OUT/calibrate_$tag.jsonl "$@" 2>&1 \
      | grep -v "Warning\|warn" | tail -6
  fi
}
for g in 0 1 2 3 4 5 6 7; do
  var=GPU$g
  [ -z "${!var}" ] && continue
  (IFS=';' read -ra jobs <<< "${!var}"
   for j in "${jobs[@]}"; do eval "job $g $j"; done > $OUT/gpu$g.txt 2>&1) &
done
wait
for f in $OUT/gpu*.txt; do echo "=== $f"; tail -c 5000 $f; done
