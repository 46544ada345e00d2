#!/bin/bash
# Round 8: the selective scan cut into segments without padding (against rounds 3-7's padded cut,
# "_pad_segments"), and B/C read as packed bf16 pairs in the forward's main kernel (`pack_bc`, then off by
# default, now on); per-kernel GPU times of each variant (--trace). With TESTS=1 first the compiled tests.
# (The first call of this round also packed B/C in the segment-state kernel and the backward: slower there.)
# NEXT=1: what round 8 left untried (segment counts 32 / 64 / 128 at 8K-64K; forward+backward with the forward
# alone packed), in place of the round-8 variants.
export PYTHONPATH=. PYTHONUNBUFFERED=1
if [ -n "$TESTS" ]; then
  timeout 240 python -m pytest -q -p no:cacheprovider tests/test_pallas_selective_scan.py 2>&1 | tail -5 | tee $OUT/tests.txt
fi
run() { python benchmarks/profile_selective_scan.py --check "$@" 2>&1 | grep --line-buffered -v Warning | tee -a $OUT/variants.txt; }
if [ -n "$NEXT" ]; then
  # 528 programs: 32 segments (one wave at 4 programs per SM; at 8K each main-kernel program also chains half as
  # many earlier segments' states, ~16 chain steps against 128 segment steps now); 2112: 128 segments.
  run --trace --lens 8192,32768,65536 --fwd '{}' '{"target_programs": 528}' '{"target_programs": 2112}' \
    --bwd '{}' '{"pack_bc": false}'
  run --lens 8192 --bwd '{}' '{"pack_bc": false}'
else
  run --lens 8192,32768 --fwd '{"pack_bc": false}' '{"pack_bc": true}'
  run --trace --lens 65536 --fwd '{"pack_bc": false}' '{"pack_bc": true}' '{"_pad_segments": true, "pack_bc": false}' \
    --bwd '{"pack_bc": false}' '{"_pad_segments": true, "pack_bc": false}'
fi
