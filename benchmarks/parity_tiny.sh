#!/usr/bin/env bash
# Behaviour check across a refactor: bench (8 methods), diagnose and groundtruth+evaluate on a tiny Llama.
#   bash benchmarks/parity_tiny.sh OUT            # in a checkout of each commit, then
#   python benchmarks/parity_compare.py OUT_BEFORE OUT_AFTER
set -euo pipefail
OUT=$1
W=".venv/bin/wherefrom"
rm -rf "$OUT"; mkdir -p "$OUT"
export OMP_NUM_THREADS=1
.venv/bin/python - "$OUT" <<'PY'
import sys
from pathlib import Path

from wherefrom.models.tiny import save_tiny
from wherefrom.studies.generated import rule_identification, write_jsonl

out = Path(sys.argv[1])
save_tiny(out / "model", arch="llama")
train, queries = rule_identification(n_train=12, n_test=3, seed=0)
write_jsonl(train, out / "train.jsonl")
write_jsonl(queries, out / "queries.jsonl")
PY
common=(--model "$OUT/model" --max-length 128 --threads 1)
$W bench --task rules --n-train 16 --n-test 3 --methods gradsim,bm25,repsim,tracin,ekfac,kfac,datainf,trak --seeds 0 \
    --epochs 1 --device cpu --out "$OUT/bench" "${common[@]}" > /dev/null
$W diagnose --train "$OUT/train.jsonl" --queries "$OUT/queries.jsonl" --methods ekfac,kfac,gradsim,datainf \
    --exact-blocks module --include layers.1.mlp.down --out "$OUT/diag" "${common[@]}" > /dev/null
$W groundtruth --task "path:$OUT/train.jsonl:$OUT/queries.jsonl" --epochs 1 --lora-rank 0 --batch-size 4 --subsets 4 \
    --loo-rows 3 --loo-seeds 1 --device cpu --out "$OUT/gt" "${common[@]}" > /dev/null
$W evaluate "$OUT/gt" --methods ekfac,gradsim,tracin > /dev/null
echo "parity outputs -> $OUT"
