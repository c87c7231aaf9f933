"""Ground truth on a small model the project trains itself: every estimator against LDS, leave-one-out and
PBRF, plus EK-FAC's damping tuned by LDS on held-out queries.

The model is a 1-layer tiny GPT-2 (hidden 16, :func:`wherefrom.models.tiny.tiny_gpt2`) fully fine-tuned from a
saved random initialisation on a generated word-association set (prompt "w1 [w2] w:", completion " w"),
small enough that ``exact`` (the dense damped GGN of every parameter block) is feasible, so the exact
influence function is one of the rows of the table::

    python benchmarks/groundtruth_tiny.py [--out .cache/groundtruth-tiny] [--results benchmarks/results/groundtruth-tiny] [--overwrite]

Writes ``evaluate.{md,json}`` and ``tune.{md,json}`` (copied to ``--results``); a rerun resumes from ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

from common import command_line
from wherefrom.core.store import atomic_write_text
from wherefrom.models.tiny import tiny_gpt2, tiny_tokenizer
from wherefrom.studies.groundtruth import GroundTruthConfig, build_groundtruth, evaluate
from wherefrom.studies.groundtruth.tune import tune

WORDS = ["ab", "cd", "ef", "gh"]
METHODS = [
    "exact",
    "cg",
    "ekfac",
    "kfac",
    "diagonal",
    "datainf",
    "lissa",
    "arnoldi",
    "identity",
    "gradsim-cosine",
    "tracin",
    "trak",
    "logra",
    "repsim",
    "bm25",
]


def word_rows(n: int, seed: int, prefix: str) -> list[dict]:
    """``n`` rows: prompt of 1-2 random words then the answer word and ":", completion the answer word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(WORDS)
        context = " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2])))
        rows.append({"id": f"{prefix}{i}", "prompt": f"{context} {word}:", "completion": f" {word}", "label": word})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/groundtruth-tiny"))
    parser.add_argument(
        "--results", type=Path, default=Path(__file__).resolve().parent / "results" / "groundtruth-tiny"
    )
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--n-test", type=int, default=12)
    parser.add_argument("--subsets", type=int, default=48)
    parser.add_argument("--loo-rows", type=int, default=12)
    parser.add_argument("--loo-seeds", type=int, default=3)
    parser.add_argument("--pbrf-rows", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to evaluate")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace results in --out made with other settings (else refused)"
    )
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    base = out / "base-model"
    if not (base / "config.json").is_file():
        tiny_gpt2(len(tokenizer), hidden=16, layers=1, seed=0).save_pretrained(base)
        tokenizer.save_pretrained(base)
    for split, n, seed in (("train", args.n_train, 1), ("test", args.n_test, 2)):
        atomic_write_text("".join(json.dumps(r) + "\n" for r in word_rows(n, seed, split[:2])), out / f"{split}.jsonl")

    command = command_line("groundtruth_tiny.py", None, args)
    started = time.perf_counter()
    config = GroundTruthConfig(
        task=f"path:{out / 'train.jsonl'}:{out / 'test.jsonl'}",
        out=str(out / "gt"),
        model=str(base),
        epochs=3,
        learning_rate=1e-2,
        lora_rank=None,
        batch_size=4,
        max_length=64,
        n_subsets=args.subsets,
        subset_seeds=1,
        loo_rows=args.loo_rows,
        loo_seeds=args.loo_seeds,
        pbrf_rows=args.pbrf_rows,
        device="cpu",
        # PBRF at the estimators' default relative damping, solved in float64 (float32 stalls, and HF Llama
        # keeps its norms in float32 even in a float64 copy, hence GPT-2 here; see README "PBRF and tuning")
        pbrf_options=(
            {"eps": 1e-3, "float64": True, "damping_factor": 0.1, "steps": 1000, "tol": 1e-5} if args.pbrf_rows else {}
        ),
    )
    build_groundtruth(config, log=print, command=command, overwrite=args.overwrite)
    built = time.perf_counter() - started
    evaluate(
        out / "gt",
        args.methods.split(","),
        method_options={"lissa": {"depth": 2000}, "cg": {"max_iter": 500}},
        log=print,
        command=command,
        overwrite=args.overwrite,
    )
    evaluated = time.perf_counter() - started - built
    tune(out / "gt", "ekfac", {"damping_factor": [1e-3, 1e-2, 0.1, 1.0, 10.0]}, log=print, command=command)
    tuned = time.perf_counter() - started - built - evaluated

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for source in ("evaluate.md", "evaluate.json", "tune-ekfac/tune.md", "tune-ekfac/tune.json"):
        shutil.copy(out / "gt" / source, results / Path(source).name)
    timing = (
        f"Command: `{command}`. This call: build {built:.0f} s, evaluate {evaluated:.0f} s, tune {tuned:.0f} s "
        f"on {os.cpu_count()} CPU cores (a resumed call only reloads what earlier calls cached).\n"
    )
    atomic_write_text(timing, results / "timing.md")
    print((results / "evaluate.md").read_text())
    print(timing)


if __name__ == "__main__":
    main()
