#!/usr/bin/env bash
# GPU readiness check: fit, index, query and scores on CUDA (float32 and bfloat16 autocast), and a 2-process
# torchrun fit on nccl when two GPUs are there; wall times -> benchmarks/results/gpu-check/timings.md.
#   bash benchmarks/gpu_check.sh [OUT] [MODEL]    # OUT default /tmp/wherefrom-gpu-check; MODEL: a saved HF
#                                                 # model folder (default: a tiny Llama built here, no download)
# Bounded to 10 minutes (each step has its own timeout, the whole script at most 600 s). Exits 3 with one
# line saying why, before any work, where torch sees no CUDA device. GPU_CHECK_DEVICE=cpu is a dry run of
# the script itself on CPU (its table stays in OUT; benchmarks/results/ is not touched).
set -euo pipefail
OUT=${1:-/tmp/wherefrom-gpu-check}
MODEL=${2:-}
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=benchmarks/results/gpu-check
DEADLINE=$((SECONDS + 600))
DEVICE=${GPU_CHECK_DEVICE:-cuda}

if [[ $DEVICE == cuda ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu_check.sh needs CUDA: torch.cuda.is_available() is False here ($("$PYTHON" -c 'import torch; print("torch", torch.__version__)')); run it on a machine with an NVIDIA GPU" >&2
    exit 3
fi
rm -rf "$OUT"; mkdir -p "$OUT"
"$PYTHON" - "$OUT" "$MODEL" <<'PY'
import sys
from pathlib import Path

from wherefrom.models.tiny import save_tiny
from wherefrom.studies.generated import rule_identification, write_jsonl

out, model = Path(sys.argv[1]), sys.argv[2]
if not model:
    save_tiny(out / "model", arch="llama")
train, queries = rule_identification(n_train=400, n_test=20, seed=0)
write_jsonl(train, out / "train.jsonl")
write_jsonl(queries, out / "queries.jsonl")
PY
MODEL=${MODEL:-$OUT/model}
W=("$PYTHON" -m wherefrom.cli)
TABLE="$OUT/timings.md"
{
    echo "# GPU check: wall seconds per step (process start and model load included)"
    echo
    echo "Made by \`bash benchmarks/gpu_check.sh $*\` on $(date -u +%Y-%m-%dT%H:%MZ)."
    "$PYTHON" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    echo "Device: $DEVICE."
    echo "Model: $MODEL; 400 training rows, 20 queries (generated rule task)."
    echo
    echo "| step | seconds | command |"
    echo "|---|---|---|"
} > "$TABLE"

step() {  # step NAME COMMAND...: run with the time left (at most 300 s), record its wall time
    local name=$1; shift
    local left=$((DEADLINE - SECONDS))
    if ((left < 10)); then echo "| $name | skipped (10-minute budget spent) | |" >> "$TABLE"; return; fi
    local start=$SECONDS status=0
    timeout $((left < 300 ? left : 300)) "$@" > "$OUT/$name.log" 2>&1 || status=$?
    local took=$((SECONDS - start))
    if ((status != 0)); then took="failed (exit $status, see $name.log)"; fi
    echo "| $name | $took | \`${*//$OUT/OUT}\` |" >> "$TABLE"
}

common=(--model "$MODEL" --max-length 128 --device "$DEVICE")
step fit-float32 "${W[@]}" fit --train "$OUT/train.jsonl" --run "$OUT/run" "${common[@]}"
step index "${W[@]}" index --run "$OUT/run"
step query "${W[@]}" query "Determine the rewriting rule: a b c -> c b a Rule:" " reverse" --run "$OUT/run" --json
step scores "${W[@]}" scores --run "$OUT/run" --queries "$OUT/queries.jsonl"
step fit-bfloat16 "${W[@]}" fit --train "$OUT/train.jsonl" --run "$OUT/run-bf16" --autocast bfloat16 "${common[@]}"
step scores-bfloat16 "${W[@]}" scores --run "$OUT/run-bf16" --queries "$OUT/queries.jsonl"
if [[ $DEVICE == cuda ]] && (($("$PYTHON" -c "import torch; print(torch.cuda.device_count())") >= 2)); then
    step torchrun-fit-nccl "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m wherefrom.cli -- \
        fit --train "$OUT/train.jsonl" --run "$OUT/run-2gpu" --model "$MODEL" --max-length 128
    step torchrun-scores-nccl "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m wherefrom.cli -- \
        scores --run "$OUT/run" --queries "$OUT/queries.jsonl" --name two-gpus
else
    echo "| torchrun (nccl) | skipped: fewer than 2 GPUs | |" >> "$TABLE"
fi
if [[ $DEVICE == cuda ]]; then mkdir -p "$RESULTS"; cp "$TABLE" "$RESULTS/timings.md"; fi
cat "$TABLE"
