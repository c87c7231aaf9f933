#!/usr/bin/env bash
# The iHVP-error analysis (Li et al. 2024, analysis (a)) where an exact reference is affordable: a
# 1-layer tiny Llama (hidden 16) with a rank-4 LoRA on q/v, on the generated `rules` task, every
# influence method, 2 seeds, then `wherefrom analyze ihvp` against the exact damped GGN inverse.
# (On SmolLM2 the exact reference is infeasible and a tight cg one out of reach on a CPU: README, "Analyses".)
#
#   bash benchmarks/ihvp_tiny.sh [WORK_DIR]       (default .cache/ihvp-tiny; a rerun resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-.cache/ihvp-tiny}
RESULTS=${RESULTS:-benchmarks/results/ihvp-tiny}
PY=${PY:-.venv/bin/python}
mkdir -p "$WORK" "$RESULTS"
"$PY" -c "
import sys
from pathlib import Path
from wherefrom.models.tiny import tiny_llama, tiny_tokenizer
folder = Path(sys.argv[1])
if not (folder / 'config.json').is_file():
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer), hidden=16, intermediate=32, layers=1, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
" "$WORK/model"
.venv/bin/wherefrom bench --task rules --model "$WORK/model" --device cpu --seeds 0,1 --n-train 40 --n-test 8 \
  --epochs 3 --learning-rate 0.01 --max-length 128 \
  --methods exact,ekfac,kfac,diagonal,datainf,lissa,arnoldi,gradsim \
  --option lissa.depth=200 --out "$WORK/bench" > "$WORK/bench.log" 2>&1
.venv/bin/wherefrom analyze ihvp --bench "$WORK/bench" --reference exact >> "$WORK/bench.log" 2>&1
cp "$WORK/bench/bench.md" "$WORK/bench/bench.json" "$WORK/bench/ihvp.md" "$WORK/bench/ihvp.json" "$RESULTS/"
cat "$RESULTS/ihvp.md"
