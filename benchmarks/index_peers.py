"""The LoGra index side by side with peers (issue 12, item 6): build time, query time, disk size, Spearman.

Same model (SmolLM2-135M), data (``--train`` emotion training rows, ``--queries`` emotion test rows, as
``index_quality.py`` picks them), tracked modules (default: the MLP of the last two blocks) and batch
size, one process (Bergson: a subprocess), one torch thread, empirical Fisher, damping 0.1 x mean eigenvalue:

* **wherefrom logra index** (``--dim`` x ``--dim`` per module): build = projected Fisher fit + one pass
  writing preconditioned float16 rows to a :class:`wherefrom.core.vectors.VectorStore`; query = the query
  pass (projected query gradients) + a scan of the store; disk = the store folder;
* **wherefrom ekfac** (unprojected): build = EK-FAC fit, factors saved; query = ``Attributor.scores``
  (preconditioned queries, one pass over the training rows); disk = the factors folder;
* **Bergson** (``bergson==2.5.1``, its projected-gradient index): build = ``approximate_hessians``
  (``method="autocorrelation"``: the dense ``k x k`` Gram ``mean_n G~_n G~_n^T`` of each module's projected
  gradient, the same ``F~`` as wherefrom's index) + ``build`` (the projected training gradients, unpreconditioned,
  to its ``gradients.bin`` store); query = ``build`` of the query gradients + ``Attributor.search`` over the
  whole store, one-sided ``(F~ + 0.1 mean(lambda) I)^-1`` on the queries; disk = store + Hessian folders.
  Its per-module projection is two-sided, ``--dim`` x ``--dim`` (``projection_dim=--dim``,
  ``projection_type="normal"``), like LoGra's; each step loads the model from its folder
  (:func:`wherefrom.models.loading.default_model_dir`), which is in the times. It reads the rows wherefrom
  encoded (``input_ids`` and ``labels`` in a JSONL file, so the loss is the same summed completion loss) and
  tracks the same modules (``filter_modules`` lists every other Linear layer). pip's resolver would replace this
  venv's CPU torch with a CUDA one, so Bergson and the packages it imports (:data:`BERGSON_PACKAGES`) are
  installed with ``--no-deps`` into ``--peers-dir``/``bergson`` (default :data:`PEERS`; once; a ``.part`` folder renamed when done), and it runs in
  a subprocess (this script with ``--bergson-worker``) with that folder on ``PYTHONPATH``; the venv is not
  changed. A failing step is recorded with its error text instead of numbers;
* **kronfluence ekfac** (``kronfluence==1.0.1``, run last: ``prepare_model`` wraps the model's modules):
  build = ``fit_all_factors``; query = ``compute_pairwise_scores``; disk = its factors folder.

Spearman: mean per-query rank correlation of every pair's ``(n_query, n_train)`` scores.

Usage::

    python benchmarks/index_peers.py                          # 80 rows, 10 queries
    python benchmarks/index_peers.py --train 40 --queries 6   # the recorded run: ~1 min on an idle 2-core CPU

Writes ``benchmarks/results/index_peers.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from bench_kronfluence import kronfluence_analyzer, kronfluence_fit, kronfluence_pairwise
from common import (
    begin,
    command_line,
    emotion_sample,
    folder_bytes,
    quiet_threads,
    results_arguments,
    timed,
    write_results,
)

PEERS = Path(__file__).resolve().parent.parent / ".cache" / "peers"
"""The default ``--peers-dir``, where Bergson is installed (``bergson/``) outside the venv: the checkout's ignored
``.cache`` (userG: a read-only or shared checkout needs another place)."""
BERGSON_PACKAGES = (
    "bergson==2.5.1",
    *("jaxtyping==0.3.11", "wadler_lindig==0.1.8", "natsort==8.4.0", "simple-parsing==0.1.9"),
    *("docstring_parser==0.18.0", "petname==2.9", "ml_dtypes==0.7.0", "datasets==5.2.0", "dill==0.4.1"),
    *("multiprocess==0.70.19", "xxhash==4.1.0", "pandas==3.1.1", "fsspec==2026.9.0", "tzdata==2026.6"),
    "python-dateutil==4.0.0",
)
"""Bergson and what it needs to import beside this venv's packages (its own torch, torchvision, torchopt and
bitsandbytes requirements are left out: ``import bergson`` and the steps used here do not need them)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=80)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--dim", type=int, default=16, help="LoGra dim_in = dim_out; Bergson's projection_dim")
    p.add_argument("--include", default=r"layers\.(28|29)\.mlp\.")
    p.add_argument("--batch-size", type=int, default=8)
    results_arguments(p, "index_peers")
    p.add_argument(
        "--peers-dir",
        type=Path,
        default=PEERS,
        help="where Bergson is installed, once (default: <checkout>/.cache/peers)",
    )
    p.add_argument(
        "--bergson-worker", type=Path, help="internal: run Bergson on this spec file (in the subprocess that has it)"
    )
    return p.parse_args(argv)


def install_bergson(target: Path) -> str | None:
    """Install :data:`BERGSON_PACKAGES` into ``target`` unless there; the error text when pip fails."""
    if target.is_dir():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(part), *BERGSON_PACKAGES]
    try:
        done = subprocess.run(pip, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return "`pip install --no-deps --target` did not finish in 30 minutes"
    if done.returncode != 0:
        return f"`pip install --no-deps --target` failed (exit {done.returncode}): {done.stderr.strip()[-1000:]}"
    part.rename(target)
    return None


def run_bergson(work: Path, spec: dict, peers: Path) -> dict:
    """Run :func:`bergson_worker` in a subprocess with Bergson (installed in ``peers/bergson``) on ``PYTHONPATH``:
    its build / query seconds, disk bytes, scores ``(n_query, n_train)`` and collected modules, or
    ``{"error": text}`` (pip's error, or the worker's last traceback lines) when a step fails."""
    target = peers / "bergson"
    error = install_bergson(target)
    if error:
        return {"error": error}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "datasets_cache"),
        "WANDB_DISABLED": "true",
    }
    worker = [sys.executable, str(Path(__file__).resolve()), "--bergson-worker", str(work / "spec.json")]
    done = subprocess.run(worker, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        start = max((i for i, line in enumerate(lines) if line.startswith("Traceback")), default=len(lines) - 20)
        return {"error": "\n".join(lines[max(0, start) :][-40:])}
    import numpy as np

    return {**json.loads((work / "result.json").read_text()), "scores": np.load(work / "scores.npy")}


def bergson_worker(spec_path: Path) -> None:
    """Bergson's projected index on the rows, model and modules of ``spec.json`` (written by :func:`run_bergson`);
    writes ``result.json`` (seconds, bytes, collected modules) and ``scores.npy`` ``(n_query, n_train)`` beside it.
    Runs with Bergson importable (``PYTHONPATH``), one torch thread."""
    quiet_threads()
    work = spec_path.parent
    spec = json.loads(spec_path.read_text())
    import numpy as np
    import torch
    from bergson import Attributor, DataConfig, IndexConfig, PreprocessConfig, load_module_gradients
    from bergson.build import build
    from bergson.config.config import HessianConfig, InversionConfig
    from bergson.hessians.hessian_approximations import approximate_hessians

    def config(run: str, rows: str) -> IndexConfig:
        return IndexConfig(
            run_path=str(work / run),
            model=spec["model"],
            data=DataConfig(dataset=str(work / rows)),
            projection_dim=spec["dim"],
            projection_type="normal",
            filter_modules=spec["skip"],
            max_batch_size=spec["batch_size"],
            loss_reduction="sum",
        )

    build_s, query_s = [], []
    with timed(build_s):
        approximate_hessians(config("hessian", "train.jsonl"), HessianConfig(method="autocorrelation"))
        build(config("index", "train.jsonl"), PreprocessConfig())
    with timed(query_s):
        build(config("query", "queries.jsonl"), PreprocessConfig())
        attributor = Attributor(
            work / "index", hessian_path=work / "hessian", inversion_cfg=InversionConfig(damping_factor=0.1)
        )
        gradients = load_module_gradients(work / "query")
        queries = {name: torch.from_numpy(np.asarray(gradients[name], dtype=np.float32)) for name in gradients}
        values, indices = attributor.search(queries, k=None)
        scores = torch.empty_like(values).scatter_(1, indices, values)
    np.save(work / "scores.npy", scores.double().numpy())
    result = {
        "build": build_s[0],
        "query": query_s[0],
        "disk": folder_bytes(work / "index") + folder_bytes(work / "hessian"),
        "disk_index": folder_bytes(work / "index"),
        "disk_hessian": folder_bytes(work / "hessian"),
        "modules": list(gradients),
        "store_dtype": str(gradients.mmap.dtype),
    }
    (work / "result.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.bergson_worker:
        bergson_worker(args.bergson_worker)
        return
    load_before, model, tokenizer = begin()
    warnings.simplefilter("ignore")
    import numpy as np
    import torch

    from wherefrom.core.encoding import pad_id
    from wherefrom.core.vectors import VectorStore, VectorStoreWriter
    from wherefrom.curvature import load_curvature
    from wherefrom.engine.api import AttributionConfig, Attributor
    from wherefrom.methods.projection import ProjectedInfluence
    from wherefrom.models.loading import default_model_dir
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
        # Bergson (a subprocess): the rows as wherefrom encoded them, every untracked Linear layer filtered out
        (work / "bergson").mkdir()
        for name, rows in (("train", train_enc), ("queries", query_enc)):
            lines = (json.dumps({"input_ids": e.input_ids, "labels": e.labels}) for e in rows)
            (work / "bergson" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        tracked = {id(m) for name, m in model.named_modules() if name in set(attributor.module_names)}
        skip = [
            n for n, m in model.base_model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) not in tracked
        ]
        spec = {
            "model": str(default_model_dir()),
            "dim": args.dim,
            "batch_size": args.batch_size,
            "skip": ",".join(skip),
        }
        results["Bergson"] = run_bergson(work / "bergson", spec, args.peers_dir.resolve())
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
    ran = {name: r for name, r in results.items() if "scores" in r}
    names = list(ran)
    spearman = {
        f"{a} / {b}": float(np.nanmean(spearman_rows(ran[a]["scores"], ran[b]["scores"])))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    for result in ran.values():
        result.pop("scores")
    bergson = results["Bergson"]
    markdown = [
        "# The LoGra index and its peers (SmolLM2-135M, emotion, CPU)",
        "",
        f"{len(train)} emotion training rows, {len(queries)} test queries, tracked modules `{args.include}`, "
        "empirical Fisher, damping 0.1 x mean eigenvalue, batch "
        f"{args.batch_size}, one torch thread (Bergson in a subprocess of its own, the others in one process). "
        "Build = everything done once per training set; query = everything done per batch of queries "
        "(kronfluence and wherefrom ekfac take the training gradients again; the two indexes read their rows).",
        "",
        "| library | build (s) | query (s) | disk |",
        "|---|---|---|---|",
        *(
            f"| {name} | {r['build']:.1f} | {r['query']:.1f} | {r['disk'] / 2**20:.2f} MiB |"
            if "error" not in r
            else f"| {name} | - | - | - |"
            for name, r in results.items()
        ),
        "",
        "Spearman (mean over queries):",
        "",
        "| pair | Spearman |",
        "|---|---|",
        *(f"| {pair} | {value:.3f} |" for pair, value in spearman.items()),
        "",
        *(
            ["Bergson failed:", "", "```", bergson["error"], "```"]
            if "error" in bergson
            else [
                f"Bergson {args.dim}x{args.dim}: store {bergson['disk_index'] / 2**20:.2f} MiB "
                f"({bergson['store_dtype']} rows, with a copy of the tokenized rows), Hessian "
                f"{bergson['disk_hessian'] / 2**20:.2f} MiB; modules collected: "
                + ", ".join(f"`{m}`" for m in bergson["modules"])
                + ". Its build is two passes over the training rows (the Hessian, then the store), as "
                "wherefrom's index (the fit, then the store); its store keeps the gradients unpreconditioned "
                "and the Hessian is applied to the queries."
            ]
        ),
    ]
    path = write_results(
        args.results / args.name,
        markdown,
        {"train": len(train), "queries": len(queries), "results": results, "spearman": spearman},
        command_line("index_peers.py", argv, args),
        load_before,
    )
    print("\n".join(markdown))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
