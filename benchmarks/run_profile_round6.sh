#!/bin/bash
# Round 6, GPU call 1: where the calibration forward's time goes (benchmarks/profile_model.py).
set -x
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
python benchmarks/profile_model.py --models mamba2-1.3b --length 8192 --methods forward,spsa --json $OUT/profile.jsonl
python benchmarks/profile_model.py --models mamba2-1.3b --length 8192 --methods forward --no-scan-layers --json $OUT/profile.jsonl
python benchmarks/profile_model.py --models mamba-1.4b --length 8192 --methods forward --json $OUT/profile.jsonl
