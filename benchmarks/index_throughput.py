"""Index build throughput as a fraction of a plain forward + ``loss.backward()`` (issue 12, item 6).

On SmolLM2-135M with every MLP and attention projection tracked (210 Linear layers, not only LoRA),
over the same batches, interleaved in one process (so the machine's load hits each alike), best of
``--repeats``:

(a) plain: forward + ``loss.backward()`` of the summed training loss, no hooks, gradients of the
    tracked parameters only;
(b) logra index: the LoGra rows of every training example (per-token factors projected on both sides,
    ``P_out G P_in^T`` per module, preconditioned by the fitted ``(F~ + lambda I)^-1``) written to a
    :class:`wherefrom.core.vectors.VectorStore` in float16 -- what ``wherefrom index`` does for a fitted
    ``logra`` run (the fit pass is not timed);
(d) empirical index: what ``wherefrom index --precondition empirical`` does for a logra run never fitted:
    one pass writing the raw LoGra rows, then the projected Fisher fitted on the stored rows (read back
    verified) and saved beside them -- the whole preconditioned build, no fit pass;
(c) raw: dense per-example gradients ``(b, out, in)`` per module (``Attributor.gradients``), materialised,
    as the index of an influence run ("projection none") computes them (``--no-raw`` to skip).

Usage::

    python benchmarks/index_throughput.py                       # 32 rows of ~64 tokens, 2 repeats, ~5 min
    python benchmarks/index_throughput.py --rows 64 --repeats 3
    python benchmarks/index_throughput.py --device cuda --autocast bfloat16 --model FOLDER --name NAME

Writes ``benchmarks/results/index_throughput.{md,json}``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_kronfluence import make_rows, plain_backward
from common import MLP_AND_ATTENTION, begin, command_line, results_arguments, timed, write_results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32, help="training rows (synthetic text, --tokens each +-25%%)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dim", type=int, default=16, help="LoGra dim_in = dim_out (the default of `logra`)")
    p.add_argument("--include", default=MLP_AND_ATTENTION, help="module-name regex of the tracked modules")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-raw", action="store_true", help="skip (c), the dense per-example gradients")
    results_arguments(p, "index_throughput")
    p.add_argument(
        "--model", type=Path, help="a saved HF model folder of SmolLM2's shape (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument("--device", default="cpu", help="torch device of the model passes (cpu, cuda)")
    p.add_argument("--autocast", choices=["bfloat16", "float16"], help="autocast of the model passes (GPUs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before, model, tokenizer = begin(args.model, args.device)
    import torch

    from wherefrom.core.gradients import flatten_blocks
    from wherefrom.core.vectors import VectorStore, VectorStoreWriter
    from wherefrom.engine.api import AttributionConfig, Attributor
    from wherefrom.methods.projection import ProjectedInfluence

    train = make_rows(tokenizer, args.rows, "t", 1, args.tokens)
    config = AttributionConfig(
        strategy="identity",
        fisher="empirical",
        include=[args.include],
        batch_size=args.batch_size,
        max_length=512,
        autocast=args.autocast,
    )
    attributor = Attributor(model, tokenizer, config)
    encoded = attributor.encode(train)
    tokens = sum(len(e.input_ids) for e in encoded)
    logra = ProjectedInfluence.logra(model, tokenizer, config, dim_in=args.dim, dim_out=args.dim)
    fit_time: list[float] = []
    with timed(fit_time, args.device):
        logra.fit(encoded)
    dim = sum(logra.dims().values())
    n_params = sum(m.shape[0] * m.shape[1] for m in attributor.modules)

    def index(folder: Path) -> None:
        writer = VectorStoreWriter(folder, [r.id for r in train], dim, {"bench": "throughput"}, "float16", len(train))
        writer.start()
        writer.build(lambda _shard, _ids: logra.train_vectors(encoded, precondition=True))
        writer.finalize()

    def empirical(folder: Path) -> None:
        writer = VectorStoreWriter(folder, [r.id for r in train], dim, {"bench": "throughput"}, "float16", len(train))
        writer.start()
        writer.build(lambda _shard, _ids: logra.train_vectors(encoded, precondition=False))
        built = VectorStore(writer.folder, writer.manifest, writer.ids)
        logra.row_curvature(lambda: (rows for _start, rows in built.shards())).save(folder / "preconditioner")
        writer.finalize()

    def raw() -> None:
        for _ids, grads in attributor.gradients(encoded):
            flatten_blocks(grads, attributor.module_names).sum().item()  # materialised, as the raw index stores it

    phases = {"plain": [], "logra": [], "empirical": []} | ({} if args.no_raw else {"raw": []})
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="index_throughput_") as tmp:
        for repeat in range(args.repeats):
            for phase, times in phases.items():
                if phase in errors:
                    continue
                try:
                    with timed(times, args.device):
                        if phase == "plain":
                            plain_backward(attributor, encoded)
                        elif phase == "logra":
                            index(Path(tmp) / f"index-{repeat}")
                        elif phase == "empirical":
                            empirical(Path(tmp) / f"empirical-{repeat}")
                        else:
                            raw()
                except (MemoryError, RuntimeError) as error:  # raw gradients may not fit in memory
                    errors[phase] = f"{type(error).__name__}: {error}"
                    times.clear()
                print(f"repeat {repeat} {phase}: {times[-1] if times else errors[phase]}", flush=True)
    best = {phase: min(times) for phase, times in phases.items() if times}
    ratio = {phase: best["plain"] / best[phase] for phase in best if phase != "plain"}
    label = {
        "plain": "(a) plain forward + loss.backward()",
        "logra": f"(b) logra index ({args.dim}x{args.dim} per module, preconditioned, float16 store)",
        "empirical": f"(d) empirical index ({args.dim}x{args.dim}: one pass of raw rows + F~ of the stored rows)",
        "raw": "(c) raw per-example gradients (dense, materialised)",
    }
    table = [
        "| phase | times (s) | best (s) | rows/s | tokens/s | throughput / plain |",
        "|---|---|---|---|---|---|",
    ]
    for phase, times in phases.items():
        if phase in errors:
            table.append(f"| {label[phase]} | failed: `{errors[phase]}` | | | | |")
            continue
        share = "1" if phase == "plain" else f"**{ratio[phase]:.2f}**"
        table.append(
            f"| {label[phase]} | {', '.join(f'{t:.2f}' for t in times)} | {best[phase]:.2f} | "
            f"{len(train) / best[phase]:.2f} | {tokens / best[phase]:.0f} | {share} |"
        )
    markdown = [
        f"# Index build throughput vs plain forward + backward ({args.model or 'SmolLM2-135M'}, {args.device})",
        "",
        f"Autocast: {args.autocast or 'none (float32)'}. {len(train)} rows, {tokens} tokens (synthetic, ~{args.tokens} per row), batch {args.batch_size}, "
        f"{len(attributor.module_names)} tracked modules (`{args.include}`, {n_params:,} parameters), "
        f"one torch thread; LoGra row length {dim:,}. Phases interleaved, {args.repeats} repeats each; "
        f"the ratio is best plain time / best phase time (target for (b): >= 0.8). The LoGra fit pass "
        f"(projected Fisher, not timed in (b)) took {fit_time[0]:.1f} s.",
        "",
        *table,
        "",
        *(
            [
                f"The whole preconditioned build: (b) with its fit pass, {best['logra'] + fit_time[0]:.2f} s, is "
                f"**{best['plain'] / (best['logra'] + fit_time[0]):.2f}** of plain throughput; (d), which needs no "
                f"fit pass, is **{ratio['empirical']:.2f}**."
            ]
            if "logra" in best and "empirical" in best
            else []
        ),
    ]
    data = {
        "rows": len(train),
        "tokens": tokens,
        "modules": len(attributor.module_names),
        "parameters": n_params,
        "logra_dim": args.dim,
        "row_length": dim,
        "times": phases,
        "best": best,
        "ratio_to_plain": ratio,
        "errors": errors,
        "fit_seconds": fit_time[0],
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "autocast": args.autocast,
        "model": None if args.model is None else str(args.model),
    }
    path = write_results(
        args.results / args.name, markdown, data, command_line("index_throughput.py", argv, args), load_before
    )
    print("\n".join(markdown))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
