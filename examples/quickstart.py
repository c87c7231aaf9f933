"""wherefrom from top to bottom, in Python: which training rows made the model say this?

    python examples/quickstart.py [--model DIR] [--out .cache/quickstart] [--n-train 60] [--n-queries 4]

Without ``--model`` it uses the default model (SmolLM2-135M-Instruct, installed by ``make demo``). Steps:

1. make a small labelled task (string-rewriting rules: each training row applies one of five rules);
2. LoRA-fine-tune the model on it (``wherefrom.models.finetune``), so that the rows shaped what it says;
3. fit EK-FAC on the LoRA parameters in a run directory and index the training gradients
   (``wherefrom.engine.run.Run``: ``config.json``, ``manifest.json``, ``factors/``, ``index/``);
4. attribute held-out queries: the top proponents (positive = the row raised log p(completion | prompt)),
   their labels against the query's, and how one proponent's score splits over its tokens.

Every step is cached in ``--out``: a second run reuses the fine-tuning, the factors and the index. An ``--out``
made with other arguments (but ``--n-queries``) is refused before anything is written there (``quickstart.json``
records them once the fine-tuning and the run are made).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from wherefrom.core.store import atomic_write_json, read_json_object, settings_differences
from wherefrom.engine.api import AttributionConfig
from wherefrom.engine.run import Run, RunConfig
from wherefrom.models.finetune import FinetuneConfig, finetune
from wherefrom.models.loading import load_model
from wherefrom.studies.generated import rule_identification, write_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="local model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=".cache/quickstart", help="folder for every output (reused)")
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-queries", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    out = Path(args.out)
    # userI: another --n-train into the same --out rewrote train.jsonl and the fine-tuning, then stopped at the run.
    # What the cached steps depend on (the queries are drawn after the training rows and scored anew):
    model = None if args.model is None else os.path.abspath(args.model)
    chosen = {"n_train": args.n_train, "epochs": args.epochs, "max_length": args.max_length, "model": model}
    record = out / "quickstart.json"
    differences = settings_differences(read_json_object(record), chosen) if record.is_file() else []
    if differences:
        parser.error(
            f"{out} holds a quickstart made with other arguments ({'; '.join(differences)}): give another --out"
        )

    # 1. data: rows {id, prompt, completion, label}, written as JSONL as a user's files would be
    train, queries = rule_identification(n_train=args.n_train, n_test=args.n_queries, seed=0)
    train_file = write_jsonl(train, out / "train.jsonl")
    print(
        f"1. task: {len(train)} training rows, {len(queries)} queries; e.g. {train[0].prompt!r} -> {train[0].completion!r}"
    )

    # 2. fine-tune a LoRA adapter (rank 4 on q_proj / v_proj), one checkpoint per epoch
    base = load_model(args.model, device="cpu")
    tuned = finetune(
        base.model,
        base.tokenizer,
        train,
        FinetuneConfig(epochs=args.epochs, max_length=args.max_length),
        out / "finetune",
        progress=False,
        overwrite=False,  # a fine-tuning of other settings there is refused, not replaced
    )
    print(f"2. fine-tuned: mean loss per epoch {[round(x, 3) for x in tuned.epoch_losses]} -> {tuned.weights_dir}")
    del base, tuned

    # 3. a run directory: EK-FAC factors of the LoRA parameters, then the training gradients once
    config = RunConfig(
        train=str(train_file),
        model=args.model,
        adapter=str(out / "finetune" / "adapter"),
        device="cpu",
        attribution=AttributionConfig(strategy="ekfac", max_length=args.max_length),
    )
    run = Run.create(out / "run", config)
    run.fit()
    run.build_index()
    print(f"3. EK-FAC on {len(run.attributor.modules)} LoRA modules, training gradients indexed -> {out / 'run'}")
    atomic_write_json(chosen, record)  # once the fine-tuning and the run are these arguments'

    # 4. attribute: scores (n_queries, n_train), positive = proponent
    scores = run.scores(queries)
    rows = {row.id: row for row in train}
    hits = 0
    for q, query in enumerate(queries):
        top = scores.top(q, 3)
        hits += rows[top[0][0]].label == query.label
        print(f"4. query {query.id} (label {query.label}): {query.completion!r}")
        for row_id, score in top:
            print(f"     {score:+10.4g}  {row_id:>6}  label {rows[row_id].label:<10} {rows[row_id].completion!r}")
    print(f"   top-1 proponent has the query's label for {hits}/{len(queries)} queries")

    # ... and which tokens of the strongest proponent carry its influence (they sum to its score)
    best = rows[scores.top(0, 1)[0][0]]
    _, per_token = run.attributor.token_scores(queries[:1], [best])
    row_id, input_ids, values = per_token[0]
    tokenizer = run.loaded.tokenizer
    strongest = sorted(zip(input_ids, values[0].tolist()), key=lambda pair: -abs(pair[1]))[:5]
    shown = ", ".join(f"{tokenizer.decode([token])!r} {value:+.3g}" for token, value in strongest)
    print(f"   tokens of {row_id} with the largest share: {shown} (sum {float(values[0].sum()):+.4g})")


if __name__ == "__main__":
    main()
