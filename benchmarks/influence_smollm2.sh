#!/usr/bin/env bash
# Grosse et al.'s analyses on the emotion study (SmolLM2-135M-Instruct + rank-4 LoRA on q/v), CPU size:
# fine-tune, fit EK-FAC, score held-out queries, then the HTML report, one query view, PNG screenshots
# of both, and the tail / layer tables (`wherefrom influence`). Results go to RESULTS with every
# command and its wall time in RESULTS/commands.md.
#
#   bash benchmarks/influence_smollm2.sh [WORK_DIR]     (default .cache/influence; a rerun reuses what is done)
#
# Environment knobs: PER_CLASS=60 (training rows per class: 300) QUERIES_PER_CLASS=4 (20 queries)
#   EPOCHS=3 DATA=../shared/datasets RESULTS=benchmarks/results/influence-smollm2 THREADS=1
#   WO_RANK=8 WO_EPOCHS=30 WO_LR=3e-3 (word order: LoRA rank, epochs, learning rate)
#   MLP_PER_CLASS=20 (the last run: EK-FAC on every layer's MLP and attention output projections of the
#   fine-tuned model, 100 rows) MLP_QUERIES_PER_CLASS=2 (its 10 queries)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-.cache/influence}
PER_CLASS=${PER_CLASS:-60}
QUERIES_PER_CLASS=${QUERIES_PER_CLASS:-4}
MLP_PER_CLASS=${MLP_PER_CLASS:-20}
MLP_QUERIES_PER_CLASS=${MLP_QUERIES_PER_CLASS:-2}
EPOCHS=${EPOCHS:-3}
WO_RANK=${WO_RANK:-8}
WO_EPOCHS=${WO_EPOCHS:-30}
WO_LR=${WO_LR:-3e-3}
DATA=${DATA:-../shared/datasets}
RESULTS=${RESULTS:-benchmarks/results/influence-smollm2}
THREADS=${THREADS:-1}
WHEREFROM=${WHEREFROM:-.venv/bin/wherefrom}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=$THREADS
mkdir -p "$WORK" "$RESULTS"
LOG="$RESULTS/commands.md"
[[ -f "$LOG" ]] || printf '# Commands and wall times (%s, %s threads)\n\n| step | command | wall time, s |\n| --- | --- | ---: |\n' \
  "$(uname -m)" "$THREADS" > "$LOG"

step() {  # step NAME CMD...: run CMD (stdout to WORK/NAME.out) unless done before, log it and its wall time
  local name=$1; shift
  [[ -f "$WORK/$name.done" ]] && { echo "$name: done before"; return; }
  local start; start=$(date +%s.%N)
  "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
  local took; took=$(echo "$(date +%s.%N) - $start" | bc)
  local line; printf -v line '%q ' "$@"
  printf '| %s | `%s` | %.0f |\n' "$name" "wherefrom ${line#"$WHEREFROM" }" "$took" >> "$LOG"
  touch "$WORK/$name.done"
  echo "$name: ${took%.*} s"
}

# class-balanced subsets: the first PER_CLASS rows of each class (file order), QUERIES_PER_CLASS test rows
"$PY" - "$DATA" "$WORK" "$PER_CLASS" "$QUERIES_PER_CLASS" "$MLP_PER_CLASS" "$MLP_QUERIES_PER_CLASS" <<'EOF'
import collections, json, sys
data, work, per_class, per_query_class, mlp_per_class, mlp_queries_per_class = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
def subset(source, target, k):
    seen, out = collections.Counter(), []
    for line in open(source):
        label = json.loads(line)["label"]
        if seen[label] < k:
            seen[label] += 1
            out.append(line)
    open(target, "w").writelines(out)
subset(f"{data}/emotion.train.jsonl", f"{work}/train.jsonl", per_class)
subset(f"{data}/emotion.train.jsonl", f"{work}/train-mlp.jsonl", mlp_per_class)
subset(f"{data}/emotion.test.jsonl", f"{work}/queries.jsonl", per_query_class)
subset(f"{data}/emotion.test.jsonl", f"{work}/queries-mlp.jsonl", mlp_queries_per_class)
EOF

common=(--device cpu --threads "$THREADS" --max-length 256)
step finetune "$WHEREFROM" finetune --train "$WORK/train.jsonl" --out "$WORK/ft" --epochs "$EPOCHS" "${common[@]}"
step fit "$WHEREFROM" fit --run "$WORK/run" --train "$WORK/train.jsonl" --adapter "$WORK/ft/adapter" --strategy ekfac "${common[@]}"
step scores "$WHEREFROM" scores --run "$WORK/run" --queries "$WORK/queries.jsonl" --device cpu --threads "$THREADS"
step influence "$WHEREFROM" influence --run "$WORK/run" --out "$RESULTS/lora" --threads "$THREADS"
step report "$WHEREFROM" report "$WORK/run" --out "$RESULTS/report.html" --threads "$THREADS"
# the query view of the first query
mapfile -t query < <("$PY" -c 'import json, sys; r = json.loads(open(sys.argv[1]).readline()); print(r["prompt"]); print(r["completion"])' "$WORK/queries.jsonl")
step query "$WHEREFROM" query "${query[0]}" "${query[1]}" --run "$WORK/run" --html "$RESULTS/query.html" --json --device cpu --threads "$THREADS"
cp "$WORK/query.out" "$RESULTS/query.json"

# word order (Grosse et al. 5.3.3) on invented facts: rank-8 LoRA, 30 epochs at 3e-3 (36 rows a seed)
step word-order "$WHEREFROM" word-order --out "$WORK/wordorder" --seeds 0,1,2 --lora-rank "$WO_RANK" \
  --epochs "$WO_EPOCHS" --learning-rate "$WO_LR" --max-length 64 --device cpu --threads "$THREADS"
mkdir -p "$RESULTS/wordorder"
cp "$WORK/wordorder/wordorder.json" "$WORK/wordorder/wordorder.md" "$RESULTS/wordorder/"
# the summed completion loss of the first batch before any update and the mean of the last epoch, per seed
"$PY" - "$WORK/wordorder" > "$RESULTS/wordorder/losses.md" <<'EOF'
import json, pathlib, sys
print("| seed | first step (before any update), nats | mean of the last epoch, nats |\n| --- | ---: | ---: |")
for log in sorted(pathlib.Path(sys.argv[1]).glob("seed-*/finetune/train_log.jsonl")):
    steps = [json.loads(line) for line in log.open()]
    last = [s["loss"] for s in steps if s["epoch"] == steps[-1]["epoch"]]
    print(f"| {log.parts[-3][5:]} | {steps[0]['loss']:.2f} | {sum(last) / len(last):.2f} |")
EOF

# the MLP run: every layer's MLP output (down_proj) and attention output (o_proj) projections of the
# fine-tuned model (LoRA adapter loaded, its factors not tracked); fewer rows, so it fits in memory
step fit-mlp "$WHEREFROM" fit --run "$WORK/run-mlp" --train "$WORK/train-mlp.jsonl" --adapter "$WORK/ft/adapter" --strategy ekfac --include 'mlp\.down_proj$' --include 'self_attn\.o_proj$' "${common[@]}"
step scores-mlp "$WHEREFROM" scores --run "$WORK/run-mlp" --queries "$WORK/queries-mlp.jsonl" --device cpu --threads "$THREADS"
step influence-mlp "$WHEREFROM" influence --run "$WORK/run-mlp" --out "$RESULTS/mlp" --threads "$THREADS"

# screenshots as tests/studies/test_report.py takes them, tall enough to show the layer and tail plots
for page in report query; do
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,6400 \
    --virtual-time-budget=2000 --screenshot="$RESULTS/$page.png" "file://$(realpath "$RESULTS/$page.html")" 2>/dev/null
done
ls -la "$RESULTS"
