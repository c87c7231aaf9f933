"""wherefrom vs kronfluence: EK-FAC fitting and pairwise scoring on the same model, data and modules.

Measured in one run, for both libraries:

* wall time of EK-FAC factor fitting (covariances + eigendecomposition + eigenvalue correction,
  factors written to disk: kronfluence always writes them, wherefrom's ``curvature.save`` is timed too)
  and of pairwise scoring (factors loaded from disk, query gradients preconditioned, train gradients
  streamed, scores returned); best (minimum) and median of ``--repeats`` runs, ratios from the best;
* peak memory of each phase: every (library, phase) runs in a fresh ``spawn`` subprocess and reports
  ``ru_maxrss`` at the end minus ``ru_maxrss`` after the model and data were loaded (and
  ``torch.cuda.max_memory_allocated`` minus the allocation at that point, on CUDA);
* the Spearman correlation and max relative difference between the two libraries' scores, so the
  timings compare equal outputs (with ``--fisher empirical``, the default, both are deterministic and
  agree to float round-off: see tests/curvature/test_kronfluence_parity.py for every matched setting);
* wherefrom's per-example gradient throughput (``Attributor.gradients`` over the train set) as a
  fraction of a plain forward + ``loss.backward()`` over the same batches;
* wherefrom's fit followed by scores in ONE process (the in-process API: the fit's shared pass keeps the
  training gradients, so scoring makes only the query pass; :mod:`wherefrom.engine.passes`), with a
  per-phase breakdown of its time (each progress-reported pass, the rest = eigendecompositions, saving,
  preconditioning and products), against kronfluence's fit + scores.

Usage::

    python benchmarks/bench_kronfluence.py                  # tiny Llama, ~2.5 min on 2 CPU cores
    python benchmarks/bench_kronfluence.py --model smollm2  # SmolLM2-135M, last two MLP blocks, ~4 min
    python benchmarks/bench_kronfluence.py --model smollm2-lora --fisher empirical true
        # the issue's setting: SmolLM2 + LoRA (q, v; r 4), 120 emotion rows, 20 queries, one torch thread

Writes ``benchmarks/results/kronfluence_<model>.md`` atomically and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import random
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from common import command_line, provenance_lines, wait_for

HERE = Path(__file__).resolve().parent
_WORD_TEXT = (
    "the a of to and in is it that for on with as was at by an be this from or are but not have all one "
    "cat dog bird fish tree river stone cloud rain wind fire snow light sound green blue red small large "
    "old new fast slow warm cold bright dark sweet quiet loud north south east west morning evening night "
    "walks runs sings reads writes finds keeps gives takes makes sees hears knows grows flies swims"
)
WORDS = _WORD_TEXT.split()


# --- configuration -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        choices=["tiny", "smollm2", "smollm2-lora"],
        default="tiny",
        help="tiny: random Llama (hidden 256, 4 layers, intermediate 512) with the char tokenizer; "
        "smollm2: wherefrom.models.loading.load_model() (SmolLM2-135M-Instruct); smollm2-lora: the same with a "
        "LoRA adapter on q_proj and v_proj (rank --lora-rank, lora_B drawn from N(0, 0.02^2) so every LoRA "
        "gradient is nonzero, wherefrom.models.tiny.with_lora), rows from the shared emotion set",
    )
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank of --model smollm2-lora")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads in every phase (default: 1 for smollm2-lora)"
    )
    p.add_argument(
        "--include",
        nargs="*",
        default=None,
        help="module-name regexes to track (default: all Linear layers but lm_head for tiny; "
        r"'layers\.(28|29)\.mlp\.' for smollm2)",
    )
    p.add_argument(
        "--train", type=int, default=None, help="training rows (default: 128 tiny, 32 smollm2, 120 smollm2-lora)"
    )
    p.add_argument(
        "--queries", type=int, default=None, help="query rows (default: 16 tiny, 8 smollm2, 20 smollm2-lora)"
    )
    p.add_argument(
        "--tokens", type=int, default=64, help="mean tokens per row (rows vary +-25%%, so batches are padded)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--fisher",
        choices=["empirical", "true"],
        nargs="+",
        default=["empirical"],
        help="empirical: deterministic, both libraries give the same scores; true: sampled labels (each library "
        "its own); several: each measured in the same run",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed runs per phase (default: 3 tiny, 2 smollm2, 1 smollm2-lora)"
    )
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="bytes: glibc's fixed mmap threshold (MALLOC_MMAP_THRESHOLD_) in every phase's process, so freed large "
        "buffers go back to the OS and peak RSS follows live memory (default: glibc's dynamic threshold, which keeps "
        "freed buffers of up to 32 MiB in the heap)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="default: benchmarks/results/kronfluence_<model>.md")
    args = p.parse_args(argv)
    small, lora = args.model == "tiny", args.model == "smollm2-lora"
    args.train = args.train or (128 if small else 120 if lora else 32)
    args.queries = args.queries or (16 if small else 20 if lora else 8)
    args.repeats = args.repeats or (3 if small else 1 if lora else 2)
    args.threads = args.threads or (1 if lora else None)
    if args.include is None and args.model == "smollm2":
        args.include = [r"layers\.(28|29)\.mlp\."]  # tiny: every Linear but lm_head; LoRA: the adapter
    args.output = args.output or HERE / "results" / f"kronfluence_{args.model}.md"
    return args


def make_rows(tokenizer, n: int, prefix: str, seed: int, mean_tokens: int):
    """``n`` records of about ``mean_tokens`` tokens (+-25%), prompt ~half, completion ~half (then EOS)."""
    from wherefrom.core.data import Record

    rng = random.Random(seed)

    def text(target: int) -> str:
        words: list[str] = []
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < target:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    rows = []
    for i in range(n):
        total = rng.randint(int(0.75 * mean_tokens), int(1.25 * mean_tokens)) - 2
        prompt_len = rng.randint(total // 3, 2 * total // 3)
        rows.append(Record(f"{prefix}{i}", text(prompt_len) + ":", " " + text(total - prompt_len)))
    return rows


def setup(args: argparse.Namespace):
    """Model (eval mode, on the device), tokenizer, train and query records, wherefrom config."""
    import torch

    from wherefrom.engine.api import AttributionConfig
    from wherefrom.models.loading import pick_device

    device = pick_device(args.device)
    if args.model == "tiny":
        from wherefrom.models.tiny import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_llama(len(tokenizer), hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, seed=args.seed)
        model.to(device)
    else:
        from transformers.utils import logging as hf_logging

        from wherefrom.models.loading import load_model

        hf_logging.disable_progress_bar()
        loaded = load_model(device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
    if args.model == "smollm2-lora":
        from common import emotion_sample
        from wherefrom.models.tiny import with_lora

        model = with_lora(model, r=args.lora_rank, target_modules=["q_proj", "v_proj"], seed=args.seed).to(device)
        train, queries = emotion_sample(args.train, args.queries)
    else:
        train = make_rows(tokenizer, args.train, "t", args.seed + 1, args.tokens)
        queries = make_rows(tokenizer, args.queries, "q", args.seed + 2, args.tokens)
    model.eval()
    config = AttributionConfig(
        strategy="ekfac",
        fisher=args.fisher,
        include=args.include,
        batch_size=args.batch_size,
        max_length=4 * args.tokens,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    return model, tokenizer, train, queries, config, device


class Rows:
    """A map-style dataset over a list (kronfluence wants ``len`` and indexing)."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def kronfluence_analyzer(model, module_names, device, workdir: Path, pad: int):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.utils.dataset import DataLoaderKwargs

    from wherefrom.core.encoding import collate
    from wherefrom.studies.peers import kronfluence_lm_task

    task = kronfluence_lm_task(module_names)
    kmodel = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name="bench",
        model=kmodel,
        task=task,
        cpu=device.type == "cpu",
        disable_tqdm=True,
        output_dir=str(workdir / "kronfluence"),
        disable_model_save=True,
        log_level=logging.WARNING,
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=lambda rows: collate(rows, pad)))
    return analyzer


def kronfluence_fit(analyzer, train_enc, batch_size: int, empirical: bool) -> None:
    """kronfluence's EK-FAC factors (``fit_all_factors``, name ``"ekfac"``) of the encoded training rows."""
    from kronfluence.arguments import FactorArguments

    analyzer.fit_all_factors(
        "ekfac",
        Rows(train_enc),
        per_device_batch_size=batch_size,
        factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=empirical),
        overwrite_output_dir=True,
    )


def kronfluence_pairwise(analyzer, query_enc, train_enc, batch_size: int):
    """kronfluence's ``(n_query, n_train)`` pairwise scores from the ``"ekfac"`` factors, damping 0.1 x mean
    eigenvalue (its heuristic, ``damping_factor=None``). All queries form one query batch: kronfluence passes over
    the training rows once per query batch, so this is its fastest setting (one training pass, as wherefrom's)."""
    from kronfluence.arguments import ScoreArguments

    analyzer.compute_pairwise_scores(
        scores_name="pairwise",
        factors_name="ekfac",
        query_dataset=Rows(query_enc),
        train_dataset=Rows(train_enc),
        per_device_query_batch_size=len(query_enc),
        per_device_train_batch_size=batch_size,
        score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores("pairwise")["all_modules"]


def plain_backward(attributor, encoded) -> None:
    """A plain forward + ``loss.backward()`` over ``attributor``'s batches of ``encoded``: the same loss, gradients
    of the tracked parameters only (summed over the batch), no hooks; ``requires_grad`` restored after."""
    model = attributor.model
    loss_fn = attributor.train_loss_fn()
    tracked = {id(p) for m in attributor.modules for p in m.parameters()}
    before = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in tracked)
    for _ids, batch in attributor.batches(encoded):
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(before[id(p)])


# --- one phase in a fresh process ---------------------------------------------------------------------
def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class PassTimes:
    """A progress callback that adds up the wall seconds of each described pass (from its first batch asked for
    to its end, the consumer's work between batches included): the per-phase breakdown."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, batches, description: str):
        start = time.perf_counter()
        try:
            yield from batches
        finally:
            self.seconds[description] = self.seconds.get(description, 0.0) + time.perf_counter() - start


def run_phase(job: dict) -> dict:
    """Run one (library, phase) ``--repeats`` times in this (fresh) process; return times and memory."""
    warnings.simplefilter("ignore")  # kronfluence's torch.cuda.amp.GradScaler deprecation, transformers notices
    import torch

    from wherefrom.core.encoding import encode_records, pad_id
    from wherefrom.curvature import load_curvature
    from wherefrom.engine.api import Attributor

    args = argparse.Namespace(**job["args"])
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir, lib, phase = Path(job["workdir"]), job["lib"], job["phase"]
    model, tokenizer, train, queries, config, device = setup(args)
    passes = PassTimes()
    attributor = Attributor(model, tokenizer, config, progress=passes)
    names = attributor.module_names
    train_enc, query_enc = (
        encode_records(train, tokenizer, config.max_length),
        encode_records(queries, tokenizer, config.max_length),
    )
    pad = pad_id(tokenizer)
    if lib == "kronfluence":
        analyzer = kronfluence_analyzer(model, names, device, workdir, pad)
    wait_for(device)
    base_rss = _rss_peak_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()

    times: list[float] = []
    extra: dict = {}
    for _ in range(args.repeats):
        torch.manual_seed(args.seed)
        wait_for(device)
        start = time.perf_counter()
        if (lib, phase) == ("wherefrom", "fit"):
            attributor.fit(train_enc).save(workdir / "wherefrom_factors")
        elif (lib, phase) == ("wherefrom", "fit+score"):
            passes.seconds.clear()
            attributor.fit(train_enc).save(workdir / "wherefrom_factors_one_process")
            wait_for(device)
            extra["fit_s"] = time.perf_counter() - start
            scores = attributor.scores(query_enc, train_enc).total
            wait_for(device)
            extra["score_s"] = time.perf_counter() - start - extra["fit_s"]
            extra["passes_s"] = dict(passes.seconds)
            extra["shared"] = attributor.curvature.info.get("correction_from", "token factors")
        elif (lib, phase) == ("wherefrom", "score"):
            attributor.use_curvature(load_curvature(workdir / "wherefrom_factors"))
            scores = attributor.scores(query_enc, train_enc).total
        elif (lib, phase) == ("kronfluence", "fit"):
            kronfluence_fit(analyzer, train_enc, args.batch_size, args.fisher == "empirical")
        elif (lib, phase) == ("kronfluence", "score"):
            scores = kronfluence_pairwise(analyzer, query_enc, train_enc, args.batch_size)
        elif (lib, phase) == ("wherefrom", "gradients"):
            for _ids, grads in attributor.gradients(train_enc):
                next(iter(grads.values())).sum().item()  # materialised, like an index build would
        elif (lib, phase) == ("plain", "gradients"):
            plain_backward(attributor, train_enc)
        else:
            raise ValueError((lib, phase))
        wait_for(device)
        times.append(time.perf_counter() - start)
    if phase in ("score", "fit+score"):
        torch.save(scores.detach().cpu().double(), workdir / f"{lib}_{phase}_{args.fisher}_scores.pt")
    result = {"times": times, "rss_peak_mb": _rss_peak_mb() - base_rss, "rss_total_mb": _rss_peak_mb(), **extra}
    if device.type == "cuda":
        result["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    if phase.startswith("fit") and lib == "wherefrom":
        result["tracked"] = {
            "modules": len(names),
            "parameters": sum(m.shape[0] * m.shape[1] for m in attributor.modules),
        }
        result["train_tokens"] = next(iter(attributor.curvature.info["tokens"].values()))
    result["device"] = str(device)
    result["threads"] = torch.get_num_threads()
    return result


def in_fresh_process(job: dict) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=1, maxtasksperchild=1) as pool:
        return pool.apply(run_phase, (job,))


# --- report ---------------------------------------------------------------------------------------------
def _fmt_time(times: list[float]) -> str:
    return f"{min(times):.2f} (median {statistics.median(times):.2f})"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def fisher_section(args, fisher: str, results: dict, agreement: dict) -> list[str]:
    """The tables of one Fisher: per phase (separate processes), then fit + scores in one process."""
    wf_fit, kf_fit = results["wherefrom", "fit", fisher], results["kronfluence", "fit", fisher]
    wf_sc, kf_sc = results["wherefrom", "score", fisher], results["kronfluence", "score", fisher]
    one = results["wherefrom", "fit+score", fisher]

    def best(result: dict) -> float:
        return min(result["times"])

    def mem_row(label: str, key: str, wf: dict, kf: dict) -> tuple[str, str, str, str]:
        return (label, f"{wf[key]:.0f}", f"{kf[key]:.0f}", _ratio(kf[key], wf[key]))

    fit_label = "EK-FAC fit (covariances + eigendecomposition + eigenvalue correction), s"
    kf_total = best(kf_fit) + best(kf_sc)
    kf_peak = max(kf_fit["rss_peak_mb"], kf_sc["rss_peak_mb"])
    rows = [
        (fit_label, _fmt_time(wf_fit["times"]), _fmt_time(kf_fit["times"]), _ratio(best(kf_fit), best(wf_fit))),
        ("pairwise scores, s", _fmt_time(wf_sc["times"]), _fmt_time(kf_sc["times"]), _ratio(best(kf_sc), best(wf_sc))),
        mem_row("fit: peak RSS over baseline, MiB", "rss_peak_mb", wf_fit, kf_fit),
        mem_row("scores: peak RSS over baseline, MiB", "rss_peak_mb", wf_sc, kf_sc),
        (
            "**fit + scores**, s (wherefrom: one process, the fit's pass shared with scoring; kronfluence: fit + "
            "scores above)",
            f"{best(one):.2f} (fit {one['fit_s']:.2f} + scores {one['score_s']:.2f})",
            f"{kf_total:.2f}",
            f"**{_ratio(kf_total, best(one))}** (wherefrom / kronfluence {best(one) / kf_total:.2f})",
        ),
        (
            "fit + scores: peak RSS over baseline, MiB (kronfluence: the larger of its two phases)",
            f"{one['rss_peak_mb']:.0f}",
            f"{kf_peak:.0f}",
            _ratio(kf_peak, one["rss_peak_mb"]),
        ),
    ]
    if "cuda_peak_mb" in wf_fit:
        rows += [
            mem_row("fit: CUDA peak allocated over baseline, MiB", "cuda_peak_mb", wf_fit, kf_fit),
            mem_row("scores: CUDA peak allocated over baseline, MiB", "cuda_peak_mb", wf_sc, kf_sc),
        ]
    accounted = sum(one["passes_s"].values())
    breakdown = "; ".join(f"{name} {seconds:.2f} s" for name, seconds in one["passes_s"].items())
    return [
        f"## {fisher} Fisher",
        "",
        "| metric | wherefrom | kronfluence | kronfluence / wherefrom |",
        "|---|---:|---:|---:|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        f"Scores at parity: Spearman {agreement['spearman']:.6f}, max |difference| / max |score| "
        f"{agreement['max_rel_diff']:.1e} ({args.queries} x {args.train} pairs; wherefrom's one-process scores; its "
        f"separate-process scores agree with them to {agreement['one_vs_separate']:.1e}).",
        "",
        f"Where wherefrom's one-process time goes (the EK-FAC correction read {one['shared']}): {breakdown}; the "
        f"rest, {best(one) - accounted:.2f} s, is the eigendecompositions, saving the factors, preconditioning "
        "the queries and the score products.",
        "",
    ]


def report(args, results: dict, agreements: dict, command: str, load: tuple[float, float]) -> str:
    import kronfluence
    import torch

    if (
        args.threads
    ):  # the count every phase ran with (run_phase), which the Hardware line records (userN: the parent's)
        torch.set_num_threads(args.threads)

    from wherefrom.core.store import package_versions

    first = results["wherefrom", "fit", args.fisher[0]]
    wf_gr, plain = results["wherefrom", "gradients", None], results["plain", "gradients", None]

    def best(result: dict) -> float:
        return min(result["times"])

    tokens = first["train_tokens"]
    include = args.include or (
        "the LoRA adapter" if args.model == "smollm2-lora" else "default: every Linear but lm_head"
    )
    setup_text = (
        f"Setup: {args.train} train rows / {args.queries} queries"
        + (" (the shared emotion set, evenly spaced)" if args.model == "smollm2-lora" else f" of ~{args.tokens} tokens")
        + f" ({tokens} real tokens in the train set, right-padded batches of {args.batch_size}), damping 0.1 x mean "
        f"eigenvalue per module, {first['tracked']['modules']} tracked modules "
        f"({first['tracked']['parameters']:,} parameters; include={include}), device {first['device']}, "
        f"{first['threads']} torch threads. Both libraries take the same loss, with the output layer run at the "
        "labelled positions only (`wherefrom.core.task.labelled_predictions`), so the times compare their passes. "
        f"Times: best (median) of {args.repeats} run(s), ratios from the best; "
        f"load average {load[0]:.2f} before, {load[1]:.2f} after (a shared machine adds time, never removes it). "
        "Each (library, phase) "
        "runs in a fresh process; memory: `ru_maxrss` at the end of the phase minus `ru_maxrss` after the model "
        "and data were loaded"
        + (
            f", every process with glibc's mmap threshold fixed at {args.malloc_mmap_threshold:,} bytes "
            "(`MALLOC_MMAP_THRESHOLD_`), so freed large buffers leave the RSS."
            if args.malloc_mmap_threshold is not None
            else "."
        )
    )
    throughput_text = (
        "Gradient throughput: wherefrom per-example gradients (`Attributor.gradients`, dense `(n, out, in)` per "
        f"module) over the train set {_fmt_time(wf_gr['times'])} s vs a plain forward + `loss.backward()` over "
        f"the same batches (same loss; only the tracked parameters require grad) {_fmt_time(plain['times'])} s: "
        f"**{best(plain) / best(wf_gr):.2f}** of plain throughput "
        f"({args.train / best(wf_gr):.1f} vs {args.train / best(plain):.1f} examples/s)."
    )
    versions = {**package_versions(), "kronfluence": kronfluence.__version__}
    lines = [
        f"# wherefrom vs kronfluence {kronfluence.__version__}: EK-FAC on `{args.model}`",
        "",
        setup_text,
        "",
        *[line for fisher in args.fisher for line in fisher_section(args, fisher, results, agreements[fisher])],
        throughput_text,
        "",
        *provenance_lines(command, versions),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import torch

    from wherefrom.core.store import atomic_write_text

    args = parse_args(argv)
    command = command_line("bench_kronfluence.py", argv, args).strip()
    results, agreements = {}, {}
    if args.malloc_mmap_threshold is not None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)  # read by glibc as each phase starts
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_kronfluence_") as tmp:
        plain_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        jobs = [
            (lib, phase, fisher)
            for fisher in args.fisher
            for lib, phase in [
                ("wherefrom", "fit"),
                ("kronfluence", "fit"),
                ("wherefrom", "score"),
                ("kronfluence", "score"),
                ("wherefrom", "fit+score"),
            ]
        ]
        jobs += [("plain", "gradients", None), ("wherefrom", "gradients", None)]
        for lib, phase, fisher in jobs:
            t0 = time.perf_counter()
            job_args = {**plain_args, "fisher": fisher or args.fisher[0]}
            results[lib, phase, fisher] = in_fresh_process(
                {"args": job_args, "workdir": tmp, "lib": lib, "phase": phase}
            )
            print(
                f"{lib:11s} {phase:9s} {fisher or '':9s} times {[round(t, 2) for t in results[lib, phase, fisher]['times']]} "
                f"peak RSS +{results[lib, phase, fisher]['rss_peak_mb']:.0f} MiB ({time.perf_counter() - t0:.0f} s incl. start-up)",
                flush=True,
            )
        from scipy.stats import spearmanr

        for fisher in args.fisher:
            ours, separate, theirs = (
                torch.load(Path(tmp) / f"{lib}_{phase}_{fisher}_scores.pt")
                for lib, phase in (("wherefrom", "fit+score"), ("wherefrom", "score"), ("kronfluence", "score"))
            )
            agreements[fisher] = {
                "spearman": float(spearmanr(ours.flatten().numpy(), theirs.flatten().numpy()).statistic),
                "max_rel_diff": float((ours - theirs).abs().max() / ours.abs().max()),
                "one_vs_separate": float((ours - separate).abs().max() / ours.abs().max()),
            }
    text = report(args, results, agreements, command, (load_before, os.getloadavg()[0]))
    atomic_write_text(text, args.output)
    print()
    print(text)
    print(f"written to {args.output}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
