#!/usr/bin/env bash
# Which setting explains the reference study's failure: `wherefrom ablate` from the reference study's
# settings to wherefrom's, one switch at a time, on the default model (SmolLM2-135M-Instruct + LoRA),
# then the tables copied to benchmarks/results/ablation-smollm2/<task>/ with the run time.
#
#   bash benchmarks/ablation.sh [WORK_DIR]   (WORK_DIR keeps runs and fine-tunes; a rerun resumes;
#                                             default .cache/ablation)
#
# Environment knobs (defaults = the CPU size whose tables are in benchmarks/results/ablation-smollm2):
#   TASKS="emotion"  SEEDS=0,1,2  N_TRAIN=20  N_TEST=10  METHODS=ekfac,gradsim,repsim  DATA=../shared/datasets
#   FIXED="--epochs 3 --batch-size 4"   flags that hold in every run (at other than their default). Here
#                        the CPU budget: the reference's 10 epochs of rows padded to 128 tokens cost ~3x
#                        more, and its batch of 24 would give 1 optimiser step an epoch on 20 rows (the
#                        reference: 32 steps an epoch on 750), so the `finetune` switch is left with
#                        LoRA alpha, dropout, learning rate and schedule
#   FROM=reference-study TO=wherefrom  RESULTS=benchmarks/results/ablation-smollm2  MODEL=<folder>  DEVICE=cpu
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-.cache/ablation}
TASKS=${TASKS:-emotion}
SEEDS=${SEEDS:-0,1,2}
N_TRAIN=${N_TRAIN:-20}
N_TEST=${N_TEST:-10}
METHODS=${METHODS:-ekfac,gradsim,repsim}
DATA=${DATA:-../shared/datasets}
FIXED=${FIXED:---epochs 3 --batch-size 4}
FROM=${FROM:-reference-study}
TO=${TO:-wherefrom}
RESULTS=${RESULTS:-benchmarks/results/ablation-smollm2}
WHEREFROM=${WHEREFROM:-.venv/bin/wherefrom}
mkdir -p "$WORK"

extra=()
[[ -n "${MODEL:-}" ]] && extra+=(--model "$MODEL")
[[ -n "${DEVICE:-}" ]] && extra+=(--device "$DEVICE")
[[ -n "${THREADS:-}" ]] && extra+=(--threads "$THREADS")
read -r -a fixed <<< "$FIXED"

failed=()
for name in $TASKS; do
  case "$name" in
    emotion|grammars|math|backdoor)
      task="path:$DATA/$name.train.jsonl:$DATA/$name.test.jsonl" ;;
    mixedS|mixedL|multibackdoor)  # identification sets: the harmful / triggered rows are the ones to find
      task="path:$DATA/$name.train.jsonl:$DATA/$name.test.jsonl:identify" ;;
    *) task="$name" ;;
  esac
  start=$(date +%s)
  "$WHEREFROM" ablate --task "$task" --from "$FROM" --to "$TO" --methods "$METHODS" --seeds "$SEEDS" \
    --n-train "$N_TRAIN" --n-test "$N_TEST" "${fixed[@]}" "${extra[@]}" --out "$WORK/$name" > "$WORK/$name.log" 2>&1 \
    || { echo "$name: failed, see $WORK/$name.log" >&2; failed+=("$name"); continue; }
  seconds=$(( $(date +%s) - start ))
  mkdir -p "$RESULTS/$name"
  cp "$WORK/$name/ablate.md" "$WORK/$name/ablate.json" "$RESULTS/$name/"
  for run in "$WORK/$name"/runs/*/; do
    cp "$run/bench.md" "$RESULTS/$name/bench-$(basename "$run").md"
  done
  echo "$name: $seconds s (this invocation; a resumed run counts only what it computed)" | tee "$RESULTS/$name/time.txt"
done
# a failed task is skipped above so the others still run; the script then exits 1 naming them (userN: exit 0)
if (( ${#failed[@]} )); then
  echo "failed tasks: ${failed[*]}" >&2
  exit 1
fi
