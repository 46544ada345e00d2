#!/bin/bash
# Round 8: the selective scan cut into segments without padding (against rounds 3-7's padded cut,
# "_pad_segments"), and B/C read as packed bf16 pairs in the forward's main kernel (`pack_bc`); per-kernel GPU
# times of each variant (--trace). With TESTS=1 first the compiled tests.
# (The first call of this round also packed B/C in the segment-state kernel and the backward: slower there.)
export PYTHONPATH=. PYTHONUNBUFFERED=1
if [ -n "$TESTS" ]; then
  timeout 240 python -m pytest -q -p no:cacheprovider tests/test_pallas_selective_scan.py 2>&1 | tail -5 | tee $OUT/tests.txt
fi
run() { python benchmarks/profile_selective_scan.py --check "$@" 2>&1 | grep --line-buffered -v Warning | tee -a $OUT/variants.txt; }
run --lens 8192,32768 --fwd '{}' '{"pack_bc": true}'
run --trace --lens 65536 --fwd '{}' '{"pack_bc": true}' '{"_pad_segments": true}' --bwd '{}' '{"_pad_segments": true}'
