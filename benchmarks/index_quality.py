"""LoGra index quality against projection dimension (issue 12, item 6): which default dimension?

On SmolLM2-135M with a small tracked set (default: the MLP projections of the last two blocks, 6 Linear
layers, 5.3 M parameters, so that unprojected EK-FAC is affordable as the reference on this CPU),
``--train`` emotion training rows and ``--queries`` emotion test rows, in one process:

* the reference: unprojected EK-FAC scores (``Attributor`` with ``strategy="ekfac"``), and identity
  (raw gradient dot products, "gradsim") for scale;
* LoGra at each of ``--dims`` (``k x k`` per module): the projected Fisher fitted on the same rows, scores
  ``q~ . (F~ + lambda I)^-1 G~`` (equal to the index's rows, see ``tests/engine/test_vector_index.py``),
  and at each of ``--raw-dims`` the same without preconditioning (``curvature=False``, the
  ``--precondition none`` index);

and for each: the mean per-query Spearman with EK-FAC (:func:`wherefrom.studies.metrics.spearman_rows`),
the emotion bench metric (``acc``: top-1 row of the query's class; ``cover``: share of the query's class
among the top ``k = n_train / n_classes``; :func:`wherefrom.studies.metrics.class_attribution`, as
``wherefrom bench`` computes them), the row length and the wall time.

Usage::

    python benchmarks/index_quality.py                          # 80 rows, 10 queries, dims 4 8 16 32, ~10 min

Writes ``benchmarks/results/index_quality.{md,json}``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from common import begin, command_line, emotion_sample, results_arguments, timed, write_results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=80)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--dims", type=int, nargs="+", default=[4, 8, 16, 32], help="LoGra dim_in = dim_out values")
    p.add_argument("--raw-dims", type=int, nargs="*", default=[16], help="dims also scored without preconditioning")
    p.add_argument("--include", default=r"layers\.(28|29)\.mlp\.", help="module-name regex of the tracked modules")
    p.add_argument("--batch-size", type=int, default=8)
    results_arguments(p, "index_quality")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before, model, tokenizer = begin()
    import numpy as np

    from wherefrom.engine.api import AttributionConfig, Attributor
    from wherefrom.methods.projection import ProjectedInfluence
    from wherefrom.studies.metrics import class_attribution, spearman_rows

    train, queries = emotion_sample(args.train, args.queries)
    train_labels = {r.id: r.label for r in train}
    query_labels = {r.id: r.label for r in queries}
    config = AttributionConfig(
        strategy="ekfac", fisher="empirical", include=[args.include], batch_size=args.batch_size, seed=0
    )
    results: dict[str, dict] = {}

    def record(name: str, scores, seconds: float, row_length: int | None) -> None:
        metric = class_attribution(scores, train_labels, query_labels)
        results[name] = {
            "seconds": seconds,
            "row_length": row_length,
            "acc": metric["acc"],
            "cover": metric["cover"],
            "cover_ceiling": metric["cover_ceiling"],
            "total": scores.total.double().numpy(),
        }
        print(name, {k: v for k, v in results[name].items() if k != "total"}, flush=True)

    for strategy in ("ekfac", "identity"):
        attributor = Attributor(model, tokenizer, replace(config, strategy=strategy))
        seconds: list[float] = []
        with timed(seconds):
            if strategy == "ekfac":
                attributor.fit(train)
            scores = attributor.scores(queries, train)
        parameters = sum(m.shape[0] * m.shape[1] for m in attributor.modules)
        name = "ekfac (unprojected)" if strategy == "ekfac" else "identity (raw gradient dot)"
        record(name, scores, seconds[0], parameters)
    for dim, precondition in [(dim, True) for dim in args.dims] + [(dim, False) for dim in args.raw_dims]:
        method = ProjectedInfluence.logra(model, tokenizer, config, dim_in=dim, dim_out=dim, curvature=precondition)
        seconds = []
        with timed(seconds):
            if precondition:
                method.fit(train)
            scores = method.scores(queries, train)
        name = f"logra {dim}x{dim}" + ("" if precondition else ", no preconditioning")
        record(name, scores, seconds[0], sum(method.dims().values()))
    reference = results["ekfac (unprojected)"]["total"]
    for result in results.values():
        result["spearman_ekfac"] = float(np.nanmean(spearman_rows(result.pop("total"), reference)))
    table = [
        "| scores | numbers per row | Spearman with EK-FAC (mean over queries) | acc | cover | wall (s) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {r['row_length']:,} | {r['spearman_ekfac']:.3f} | {r['acc']:.2f} | {r['cover']:.2f} | "
            f"{r['seconds']:.1f} |"
            for name, r in results.items()
        ),
    ]
    ceiling = next(iter(results.values()))["cover_ceiling"]
    markdown = [
        "# LoGra index quality against projection dimension (SmolLM2-135M, emotion, CPU)",
        "",
        f"{len(train)} emotion training rows, {len(queries)} test queries (evenly spaced through the files), "
        f"tracked modules `{args.include}`, empirical Fisher, damping factor {config.damping_factor} x mean "
        f"eigenvalue, one torch thread, one process. LoGra rows: `k x k` per module "
        "(preconditioned: the fitted projected Fisher on the same rows; wall time = fit + scores). "
        f"`cover` ceiling {ceiling:.2f}. Spearman per query against unprojected EK-FAC, then averaged.",
        "",
        *table,
    ]
    path = write_results(
        args.results / args.name,
        markdown,
        {"train": len(train), "queries": len(queries), "include": args.include, "results": results},
        command_line("index_quality.py", argv, args),
        load_before,
    )
    print("\n".join(markdown))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
