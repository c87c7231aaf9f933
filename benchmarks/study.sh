#!/usr/bin/env bash
# The reference study (Li et al. 2024) as one command: `wherefrom bench` on every task on the default
# model (SmolLM2-135M-Instruct + rank-4 LoRA on q/v), then the tables copied to benchmarks/results/.
#
#   bash benchmarks/study.sh [WORK_DIR]      (WORK_DIR keeps fine-tuned adapters and per-seed rows;
#                                             a rerun resumes from it; default .cache/study)
#
# Environment knobs (defaults = the CPU size whose tables are in benchmarks/results/study-smollm2):
#   SEEDS=0,1,2  N_TRAIN=40 (backdoor-multi: 1.5x)  N_TEST=8  EPOCHS=2  TASKS="rules math ..."  DATA=../shared/datasets
#   TASKS may also name the BM25-hard tasks (backdoor-paraphrase facts unwanted-paraphrase) and the reference
#   study's identification sets in DATA (mixedS mixedL multibackdoor, and backdoor-sudo = its backdoor set)
#   METHODS=ekfac,kfac,datainf,gradsim,tracin,repsim,bm25  LISSA="depth=... batch_size=..."
#   LISSA_TASKS="rules"   tasks that also run lissa (GGN-vector products through SmolLM2 cost ~10 min
#                         a seed at the default size on 2 CPU cores, so by default only one task)
#   RESULTS=benchmarks/results/study-smollm2  MODEL=<local model folder>  DEVICE=cuda|cpu  THREADS=<CPU threads>
#   MAX_LENGTH=256 (the reference study's harmful and backdoor rows need 320: nothing is truncated)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-.cache/study}
SEEDS=${SEEDS:-0,1,2}
N_TRAIN=${N_TRAIN:-40}
N_TEST=${N_TEST:-8}
EPOCHS=${EPOCHS:-2}
MAX_LENGTH=${MAX_LENGTH:-256}
DATA=${DATA:-../shared/datasets}
METHODS=${METHODS:-ekfac,kfac,datainf,gradsim,tracin,repsim,bm25}
LISSA_TASKS=${LISSA_TASKS:-rules}
LISSA=${LISSA:-depth=10 batch_size=4 power_iterations=3 probes=4}
RESULTS=${RESULTS:-benchmarks/results/study-smollm2}
TASKS=${TASKS:-rules backdoor unwanted math emotion grammars backdoor-multi}
WHEREFROM=${WHEREFROM:-.venv/bin/wherefrom}
mkdir -p "$WORK"

extra=()
[[ -n "${MODEL:-}" ]] && extra+=(--model "$MODEL")
[[ -n "${DEVICE:-}" ]] && extra+=(--device "$DEVICE")
[[ -n "${THREADS:-}" ]] && extra+=(--threads "$THREADS")
lissa=()
for pair in $LISSA; do lissa+=(--option "lissa.$pair"); done

failed=()
for name in $TASKS; do
  case "$name" in
    emotion|grammars) task="path:$DATA/$name.train.jsonl:$DATA/$name.test.jsonl" ;;
    mixedS|mixedL|multibackdoor) task="path:$DATA/$name.train.jsonl:$DATA/$name.test.jsonl:identify" ;;
    backdoor-sudo) task="path:$DATA/backdoor.train.jsonl:$DATA/backdoor.test.jsonl:identify" ;;  # the file set, not the generated task
    *) task="$name" ;;
  esac
  n_train=$N_TRAIN
  # 3 triggers at a 6% poison share need >= 50 rows to give every trigger a row
  [[ "$name" == backdoor-multi ]] && n_train=$(( N_TRAIN * 3 / 2 ))
  methods=$METHODS
  options=()
  # lissa's options only where it runs (bench refuses an option of a method it does not run)
  [[ " $LISSA_TASKS " == *" $name "* ]] && methods="$methods,lissa" && options=("${lissa[@]}")
  start=$(date +%s)
  "$WHEREFROM" bench --task "$task" --methods "$methods" --seeds "$SEEDS" --n-train "$n_train" \
    --n-test "$N_TEST" --epochs "$EPOCHS" --max-length "$MAX_LENGTH" "${extra[@]}" "${options[@]}" --out "$WORK/$name" > "$WORK/$name.log" 2>&1 \
    || { echo "$name: failed, see $WORK/$name.log" >&2; failed+=("$name"); continue; }
  mkdir -p "$RESULTS/$name"
  cp "$WORK/$name/bench.md" "$WORK/$name/bench.json" "$RESULTS/$name/"
  echo "$name: $(( $(date +%s) - start )) s"
done
if compgen -G "$RESULTS/*/bench.json" > /dev/null; then  # the summary of the tasks there (none: every task failed)
  "${PY:-.venv/bin/python}" benchmarks/study_summary.py "$RESULTS"
fi
# a failed task is skipped above so the others still run; the script then exits 1 naming them (userN: exit 0)
if (( ${#failed[@]} )); then
  echo "failed tasks: ${failed[*]}" >&2
  exit 1
fi
