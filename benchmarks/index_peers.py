"""The LoGra index side by side with peers (issue 12, item 6): build time, query time, disk size, Spearman.

Same model (SmolLM2-135M), data (``--train`` emotion training rows, ``--queries`` emotion test rows, as
``index_quality.py`` picks them), tracked modules (default: the MLP of the last two blocks) and batch
size, one process, one torch thread, empirical Fisher, damping 0.1 x mean eigenvalue:

* **wherefrom logra index** (``--dim`` x ``--dim`` per module): build = projected Fisher fit + one pass
  writing preconditioned float16 rows to a :class:`wherefrom.core.vectors.VectorStore`; query = the query
  pass (projected query gradients) + a scan of the store; disk = the store folder;
* **wherefrom ekfac** (unprojected): build = EK-FAC fit, factors saved; query = ``Attributor.scores``
  (preconditioned queries, one pass over the training rows); disk = the factors folder;
* **kronfluence ekfac** (``kronfluence==1.0.1``, run last: ``prepare_model`` wraps the model's modules):
  build = ``fit_all_factors``; query = ``compute_pairwise_scores``; disk = its factors folder;
* **Bergson**: installed only when ``pip install --dry-run bergson`` would not replace this venv's torch;
  otherwise the packages it would install are recorded as the reason it did not run.

Spearman: mean per-query rank correlation of every pair's ``(n_query, n_train)`` scores.

Usage::

    python benchmarks/index_peers.py        # 80 rows, 10 queries, ~6 min

Writes ``benchmarks/results/index_peers.{md,json}``.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from bench_kronfluence import kronfluence_analyzer, kronfluence_fit, kronfluence_pairwise
from common import begin, command_line, emotion_sample, folder_bytes, timed, write_results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=80)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--dim", type=int, default=16, help="LoGra dim_in = dim_out")
    p.add_argument("--include", default=r"layers\.(28|29)\.mlp\.")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--name", default="index_peers")
    return p.parse_args(argv)


def bergson_status() -> str:
    """Why Bergson does or does not run here: the dry-run's plan when it would replace torch."""
    plan = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "bergson"], capture_output=True, text=True, timeout=600
    )
    would = [line for line in plan.stdout.splitlines() if line.startswith("Would install")]
    if plan.returncode != 0 or not would:
        return f"`pip install --dry-run bergson` failed (exit {plan.returncode}): {plan.stderr.strip()[-500:]}"
    if " torch-" in would[0]:
        return (
            "not installed: `pip install --dry-run bergson` would replace this venv's torch "
            f"(the brief allows it only if torch 2.13.0 CPU stays): `{would[0]}`"
        )
    return "installable without replacing torch, but not wired into this benchmark yet"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before, model, tokenizer = begin()
    warnings.simplefilter("ignore")
    import numpy as np
    import torch

    from wherefrom.core.encoding import pad_id
    from wherefrom.core.vectors import VectorStore, VectorStoreWriter
    from wherefrom.curvature import load_curvature
    from wherefrom.engine.api import AttributionConfig, Attributor
    from wherefrom.methods.projection import ProjectedInfluence
    from wherefrom.studies.metrics import spearman_rows

    train, queries = emotion_sample(args.train, args.queries)
    config = AttributionConfig(
        strategy="ekfac", fisher="empirical", include=[args.include], batch_size=args.batch_size, seed=0
    )
    attributor = Attributor(model, tokenizer, config)
    train_enc, query_enc = attributor.encode(train), attributor.encode(queries)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="index_peers_") as tmp:
        work = Path(tmp)
        # wherefrom logra index
        logra = ProjectedInfluence.logra(model, tokenizer, config, dim_in=args.dim, dim_out=args.dim)
        build, query = [], []
        with timed(build):
            logra.fit(train_enc)
            dim = sum(logra.dims().values())
            writer = VectorStoreWriter(work / "index", [r.id for r in train], dim, {"bench": "peers"}, "float16", 256)
            writer.start()
            writer.build(lambda _shard, _ids: logra.train_vectors(train_enc))
            writer.finalize()
        with timed(query):
            _ids, vectors = logra.query_vectors(query_enc)
            store = VectorStore.open(work / "index")
            total = torch.cat([vectors.float() @ shard.float().T for _start, shard in store.shards()], 1)
        results[f"wherefrom logra index {args.dim}x{args.dim}"] = {
            "build": build[0],
            "query": query[0],
            "disk": folder_bytes(work / "index"),
            "scores": total.double().numpy(),
        }
        # wherefrom ekfac
        build, query = [], []
        with timed(build):
            attributor.fit(train_enc).save(work / "wherefrom_factors")
        with timed(query):
            attributor.use_curvature(load_curvature(work / "wherefrom_factors"))
            total = attributor.scores(query_enc, train_enc).total
        results["wherefrom ekfac"] = {
            "build": build[0],
            "query": query[0],
            "disk": folder_bytes(work / "wherefrom_factors"),
            "scores": total.double().numpy(),
        }
        # kronfluence ekfac (last: it wraps the model's modules)
        analyzer = kronfluence_analyzer(model, attributor.module_names, torch.device("cpu"), work, pad_id(tokenizer))
        logging.getLogger("kronfluence").setLevel(logging.WARNING)
        build, query = [], []
        with timed(build):
            kronfluence_fit(analyzer, train_enc, args.batch_size, empirical=True)
        with timed(query):
            total = kronfluence_pairwise(analyzer, query_enc, train_enc, args.batch_size)
        factors = next((work / "kronfluence").rglob("factors_ekfac"))
        results["kronfluence ekfac"] = {
            "build": build[0],
            "query": query[0],
            "disk": folder_bytes(factors),
            "scores": total.double().numpy(),
        }
    names = list(results)
    spearman = {
        f"{a} / {b}": float(np.nanmean(spearman_rows(results[a]["scores"], results[b]["scores"])))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    for result in results.values():
        result.pop("scores")
    bergson = bergson_status()
    markdown = [
        "# The LoGra index and its peers (SmolLM2-135M, emotion, CPU)",
        "",
        f"{len(train)} emotion training rows, {len(queries)} test queries, tracked modules `{args.include}`, "
        "empirical Fisher, damping 0.1 x mean eigenvalue, batch "
        f"{args.batch_size}, one process, one torch thread. Build = everything done once per training set; "
        "query = everything done per batch of queries (kronfluence and wherefrom ekfac take the training "
        "gradients again; the index reads its rows).",
        "",
        "| library | build (s) | query (s) | disk |",
        "|---|---|---|---|",
        *(
            f"| {name} | {r['build']:.1f} | {r['query']:.1f} | {r['disk'] / 2**20:.2f} MiB |"
            for name, r in results.items()
        ),
        "| Bergson | - | - | - |",
        "",
        "Spearman (mean over queries):",
        "",
        "| pair | Spearman |",
        "|---|---|",
        *(f"| {pair} | {value:.3f} |" for pair, value in spearman.items()),
        "",
        f"Bergson: {bergson}",
    ]
    path = write_results(
        args.name,
        markdown,
        {"train": len(train), "queries": len(queries), "results": results, "spearman": spearman, "bergson": bergson},
        command_line("index_peers.py", argv),
        load_before,
    )
    print("\n".join(markdown))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
