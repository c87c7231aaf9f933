"""How much ``fisher_draws="once"`` moves true-Fisher EK-FAC scores, against the seed spread of the default.

``AttributionConfig.fisher_draws="once"`` replays one draw of the true Fisher's labels in every pass, so
EK-FAC's covariances and eigenvalue correction come from the same draws and a shared pass saves a backward
pass (``bench_kronfluence.py --fisher true-once`` times it). This script fits true-Fisher EK-FAC on the
issue's setting (SmolLM2-135M + LoRA on q and v, rank 4; ``--train`` emotion rows, ``--queries`` queries;
one torch thread) with each draw mode and each seed of ``--seeds``, and records the Spearman correlation of
the ``queries x train`` scores between every pair of fits: ``per-pass`` against itself over seeds is the
Monte-Carlo spread of the default, ``once`` against itself its own, and ``once`` against ``per-pass`` how far
the estimate moves.

Usage::

    python benchmarks/fisher_draws.py        # 2 seeds: 4 fits, about 3 minutes

Writes ``benchmarks/results/fisher_draws.{md,json}``.
"""

from __future__ import annotations

import argparse
import itertools

from common import begin, command_line, emotion_sample, write_results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=120)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--name", default="fisher_draws")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before, base, tokenizer = begin()
    from scipy.stats import spearmanr

    from wherefrom.engine.api import FISHER_DRAWS, AttributionConfig, Attributor
    from wherefrom.models.tiny import with_lora

    model = with_lora(base, r=args.lora_rank, target_modules=["q_proj", "v_proj"], seed=0)
    model.eval()
    train, queries = emotion_sample(args.train, args.queries)
    scores = {}
    for draws, seed in itertools.product(FISHER_DRAWS, args.seeds):
        config = AttributionConfig(strategy="ekfac", fisher="true", fisher_draws=draws, seed=seed, max_length=256)
        attributor = Attributor(model, tokenizer, config)
        attributor.fit(train)
        scores[draws, seed] = attributor.scores(queries, train).total.flatten().numpy()
        print(f"fitted {draws} seed {seed}", flush=True)
    pairs = [
        {"a": list(a), "b": list(b), "spearman": float(spearmanr(scores[a], scores[b]).statistic)}
        for a, b in itertools.combinations(scores, 2)
    ]
    markdown = [
        "# Spearman between true-Fisher EK-FAC scores: `fisher_draws` once vs per-pass, and seeds",
        "",
        f"SmolLM2-135M + LoRA (q, v; rank {args.lora_rank}), {args.train} emotion training rows x {args.queries} "
        "queries (evenly spaced), EK-FAC, true Fisher, damping 0.1 x mean eigenvalue, one torch thread, the "
        "attributor's fit and scores in one process. Each row: the Spearman correlation of the two fits' "
        f"{args.queries} x {args.train} scores.",
        "",
        "| fit A (draws, seed) | fit B (draws, seed) | Spearman |",
        "|---|---|---:|",
        *[f"| {p['a'][0]}, {p['a'][1]} | {p['b'][0]}, {p['b'][1]} | {p['spearman']:.4f} |" for p in pairs],
        "",
    ]
    path = write_results(args.name, markdown, {"pairs": pairs}, command_line("fisher_draws.py", argv), load_before)
    print("\n".join(markdown))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
