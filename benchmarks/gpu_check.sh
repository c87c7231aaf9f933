#!/usr/bin/env bash
# GPU readiness check: fit, index, query and scores on CUDA (float32, bfloat16 and float16 autocast), the same float32
# run on CPU and the CUDA scores compared with it, index build throughput against plain forward+backward
# on SmolLM2 (benchmarks/index_throughput.py, float32 and bfloat16), and a 2-process torchrun fit on nccl when
# two GPUs are there; wall times -> benchmarks/results/gpu-check/timings.md (with the comparison and the
# throughput tables beside it).
#   bash benchmarks/gpu_check.sh [OUT] [MODEL]    # OUT default /tmp/wherefrom-gpu-check; MODEL: a saved HF
#                                                 # model folder (default: a tiny Llama built here, no download)
# THROUGHPUT_MODEL: a saved HF folder of SmolLM2's shape for the throughput step (default: SmolLM2-135M-Instruct;
# random weights time the same); THROUGHPUT_ROWS (default 512) training rows of ~64 tokens.
# Bounded to 10 minutes (each step has its own timeout, the whole script at most 600 s). Exits 3 with one
# line saying why, before any work, where torch sees no CUDA device. GPU_CHECK_DEVICE=cpu is a dry run of
# the script itself on CPU (its table stays in OUT; benchmarks/results/ is not touched).
set -euo pipefail
# run from anywhere: OUT, MODEL, THROUGHPUT_MODEL and a PYTHON path are named from where it is called, then the
# script works from the repository's root (its .venv, benchmarks/ and results; userG: called from another folder it
# did not find .venv/bin/python and said "needs CUDA")
absolute() { if [[ -n $1 && $1 != /* ]]; then echo "$PWD/$1"; else echo "$1"; fi; }
OUT=$(absolute "${1:-/tmp/wherefrom-gpu-check}")
MODEL=$(absolute "${2:-}")
ARGS=""  # the arguments as given, with their paths as resolved above: the recorded command reruns from the root
for given in "${1:+$OUT}" "${2:+$MODEL}"; do if [[ -n $given ]]; then ARGS+=$(printf ' %q' "$given"); fi; done
if [[ -n ${THROUGHPUT_MODEL:-} ]]; then THROUGHPUT_MODEL=$(absolute "$THROUGHPUT_MODEL"); fi
if [[ ${PYTHON:-} == */* ]]; then PYTHON=$(absolute "$PYTHON"); fi
GIVEN_PYTHON=${PYTHON:-}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=benchmarks/results/gpu-check
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-600}))  # GPU_CHECK_SECONDS: a smaller budget; steps past it are skipped
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
    # every setting it was given (userG: a dry run's GPU_CHECK_DEVICE=cpu and PYTHON were left out)
    made="${GPU_CHECK_SECONDS:+GPU_CHECK_SECONDS=$GPU_CHECK_SECONDS }${THROUGHPUT_MODEL:+THROUGHPUT_MODEL=$THROUGHPUT_MODEL }"
    made+="${THROUGHPUT_ROWS:+THROUGHPUT_ROWS=$THROUGHPUT_ROWS }${GPU_CHECK_DEVICE:+GPU_CHECK_DEVICE=$GPU_CHECK_DEVICE }"
    made+="${GIVEN_PYTHON:+PYTHON=$(printf %q "$GIVEN_PYTHON") }"
    echo "Made by \`${made}bash benchmarks/gpu_check.sh${ARGS}\` (from the repository's root) on $(date -u +%Y-%m-%dT%H:%MZ)."
    "$PYTHON" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    echo "Device: $DEVICE."
    echo "Model: $MODEL; 400 training rows, 20 queries (generated rule task)."
    echo
    echo "| step | seconds | command |"
    echo "|---|---|---|"
} > "$TABLE"

failed=()  # the steps that failed: the script exits 1 naming them (userN: it exited 0 beside a failed step)
step() {  # step NAME COMMAND...: run with the time left (at most 300 s), record its wall time
    local name=$1; shift
    local left=$((DEADLINE - SECONDS))
    if ((left < 10)); then echo "| $name | skipped (time budget spent) | |" >> "$TABLE"; return; fi
    local start=$SECONDS status=0
    timeout $((left < 300 ? left : 300)) "$@" > "$OUT/$name.log" 2>&1 || status=$?
    local took=$((SECONDS - start))
    if ((status != 0)); then took="failed (exit $status, see $name.log)"; failed+=("$name"); fi
    local shown out; shown=$(printf '%q ' "$@") out=$(printf %q "$OUT")  # as a shell reads it back
    echo "| $name | $took | \`${shown//"$out"/OUT}\` |" >> "$TABLE"
}

common=(--model "$MODEL" --max-length 128 --device "$DEVICE")
step fit-float32 "${W[@]}" fit --train "$OUT/train.jsonl" --run "$OUT/run" "${common[@]}"
step index "${W[@]}" index --run "$OUT/run"
step query "${W[@]}" query "Determine the rewriting rule: a b c -> c b a Rule:" " reverse" --run "$OUT/run" --json
step scores "${W[@]}" scores --run "$OUT/run" --queries "$OUT/queries.jsonl"
# the same float32 run on CPU: the CUDA path must give the same scores (to float32 rounding)
step fit-cpu "${W[@]}" fit --train "$OUT/train.jsonl" --run "$OUT/run-cpu" --model "$MODEL" --max-length 128 --device cpu
step index-cpu "${W[@]}" index --run "$OUT/run-cpu"
step scores-cpu "${W[@]}" scores --run "$OUT/run-cpu" --queries "$OUT/queries.jsonl"
step compare-cpu "$PYTHON" - "$OUT" <<'PY'
import sys
from pathlib import Path

import torch

from wherefrom.core.scoring import load_scores
from wherefrom.studies.metrics import spearman_rows

out = Path(sys.argv[1])
device, cpu = (load_scores(out / run / "scores", "scores") for run in ("run", "run-cpu"))
assert (device.query_ids, device.train_ids) == (cpu.query_ids, cpu.train_ids), "score sets of other rows"
a, b = device.total.double(), cpu.total.double()
relative = ((a - b).norm() / b.norm()).item()
rho = spearman_rows(a.numpy(), b.numpy())
top = [len(set(x.topk(10).indices.tolist()) & set(y.topk(10).indices.tolist())) / 10 for x, y in zip(a, b)]
lines = [
    f"{tuple(a.shape)} scores of the device run against the same run on CPU (float32 model passes and index rows):",
    f"relative Frobenius difference {relative:.2e}; Spearman per query min {rho.min():.6f}, mean {rho.mean():.6f};",
    f"top-10 proponents shared: min {min(top):.1f}, mean {sum(top) / len(top):.2f}; torch {torch.__version__}.",
]
(out / "compare-cpu.md").write_text(" ".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if relative < 1e-2 and rho.min() > 0.99 else 1)
PY
step fit-bfloat16 "${W[@]}" fit --train "$OUT/train.jsonl" --run "$OUT/run-bf16" --autocast bfloat16 "${common[@]}"
step scores-bfloat16 "${W[@]}" scores --run "$OUT/run-bf16" --queries "$OUT/queries.jsonl"
# float16's backward pass runs on a scaled loss (wherefrom.core.tracking.LOSS_SCALES): its path on CUDA
step fit-float16 "${W[@]}" fit --train "$OUT/train.jsonl" --run "$OUT/run-fp16" --autocast float16 "${common[@]}"
step scores-float16 "${W[@]}" scores --run "$OUT/run-fp16" --queries "$OUT/queries.jsonl"
throughput=("$PYTHON" benchmarks/index_throughput.py --device "$DEVICE" --rows "${THROUGHPUT_ROWS:-512}" --batch-size 16
    --repeats 2 --results "$OUT" ${THROUGHPUT_MODEL:+--model "$THROUGHPUT_MODEL"})
step throughput-float32 "${throughput[@]}" --name index_throughput-float32
step throughput-bfloat16 "${throughput[@]}" --autocast bfloat16 --name index_throughput-bfloat16
if [[ $DEVICE == cuda ]] && (($("$PYTHON" -c "import torch; print(torch.cuda.device_count())") >= 2)); then
    step torchrun-fit-nccl "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m wherefrom.cli -- \
        fit --train "$OUT/train.jsonl" --run "$OUT/run-2gpu" --model "$MODEL" --max-length 128
    step torchrun-scores-nccl "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m wherefrom.cli -- \
        scores --run "$OUT/run" --queries "$OUT/queries.jsonl" --name two-gpus
else
    echo "| torchrun (nccl) | skipped: fewer than 2 GPUs | |" >> "$TABLE"
fi
if [[ -f $OUT/compare-cpu.md ]]; then printf '\n%s\n' "$(cat "$OUT/compare-cpu.md")" >> "$TABLE"; fi
if [[ $DEVICE == cuda ]]; then
    mkdir -p "$RESULTS"
    for result in "$TABLE" "$OUT"/compare-cpu.md "$OUT"/index_throughput-*.{md,json}; do
        if [[ -f $result ]]; then cp "$result" "$RESULTS"/; fi
    done
fi
cat "$TABLE"
if (( ${#failed[@]} )); then
    echo "gpu_check.sh: failed steps: ${failed[*]} (their logs are in $OUT)" >&2
    exit 1
fi
