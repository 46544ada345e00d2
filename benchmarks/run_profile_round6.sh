#!/bin/bash
# Round 6: where the calibration forward's time goes (benchmarks/profile_model.py).
set -x
export PYTHONPATH=. PYTHONUNBUFFERED=1
python benchmarks/profile_model.py --models mamba2-1.3b --length 8192 --methods forward,spsa --no-scan-layers --hlo --top 16 --json $OUT/profile.jsonl
python benchmarks/profile_model.py --models mamba2-1.3b --length 8192 --methods forward --hlo --top 16 --json $OUT/profile.jsonl
