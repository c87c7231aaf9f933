"""The eigen-spectrum of real gradient-index rows, for synthetic rows that follow it (issue 12, item 6).

Approximate search is judged on synthetic rows (``benchmarks/query_latency.py``); iid or low-rank-plus-
noise rows are a worst case, while real projected gradients are strongly anisotropic. This script
measures how anisotropic: on SmolLM2-135M it builds LoGra rows (``--dim`` x ``--dim`` per module of the
MLP projections matching ``--include``, the ``wherefrom index`` default ``--precondition fitted``: the
projected Fisher fitted on the same rows, then ``(F~ + lambda I)^-1 G~``; and the raw ``G~`` of
``--precondition none``) for ``--train`` emotion training rows, and records for each kind the
eigenvalues of the rows' second moment ``X^T X / n`` (uncentred: inner products see the mean too),
largest first, as shares of their sum, with

* the share of the sum in the top 1, 10 and 100 eigenvalues, and
* the power law ``lambda_i ~ i^-alpha`` fitted by least squares on ``log lambda_i`` over
  ``i = 1 .. n / 2`` (the smaller sample eigenvalues, near ``i = n``, are biased low).

``query_latency.py --rows fitted,none`` draws Gaussian rows with these spectra (the measured shares up
to ``i = n / 2``, the fitted law beyond, along a random rotation), reading ``results/row_spectrum.json``.

Usage::

    python benchmarks/row_spectrum.py       # 240 rows, the MLP of the last 4 blocks, 16x16: about 10 min

Writes ``benchmarks/results/row_spectrum.{md,json}``.
"""

from __future__ import annotations

import argparse

from common import begin, command_line, emotion_sample, results_arguments, timed, write_results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=240)
    p.add_argument("--dim", type=int, default=16, help="LoGra dim_in = dim_out (the index default)")
    p.add_argument("--include", default=r"layers\.(26|27|28|29)\.mlp\.", help="module-name regex")
    p.add_argument("--batch-size", type=int, default=8)
    results_arguments(p, "row_spectrum")
    return p.parse_args(argv)


def spectrum(rows) -> dict:
    """Eigenvalues of ``rows^T rows / n`` as shares of their sum (largest first), the top-1/10/100 shares
    and the power-law exponent fitted on the first half of the nonzero ones."""
    import numpy as np

    x = rows.double().numpy()
    values = np.linalg.eigvalsh(x.T @ x / len(x))[::-1] if x.shape[1] <= x.shape[0] else None
    if values is None:  # fewer rows than numbers per row: the same nonzero eigenvalues from the Gram matrix
        values = np.linalg.eigvalsh(x @ x.T / len(x))[::-1]
    values = np.clip(values, 0, None)
    share = values / values.sum()
    fit = np.arange(1, max(3, len(x) // 2) + 1)
    alpha = -np.polyfit(np.log(fit), np.log(share[: len(fit)]), 1)[0]
    return {
        "eigenvalue_shares": share.tolist(),
        "top1": float(share[:1].sum()),
        "top10": float(share[:10].sum()),
        "top100": float(share[:100].sum()),
        "alpha": float(alpha),
        "fitted_on": len(fit),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before, model, tokenizer = begin()
    import torch

    from wherefrom.engine.api import AttributionConfig
    from wherefrom.methods.projection import ProjectedInfluence

    train, _ = emotion_sample(args.train, 1)
    config = AttributionConfig(
        strategy="identity", fisher="empirical", include=[args.include], batch_size=args.batch_size, seed=0
    )
    logra = ProjectedInfluence.logra(model, tokenizer, config, dim_in=args.dim, dim_out=args.dim, curvature=True)
    seconds: list[float] = []
    with timed(seconds):
        logra.fit(train)
        raw, fitted = [], []
        for _ids, grads in logra.projected_gradients(train, description="projected train rows"):
            preconditioned = logra.precondition(grads)
            raw.append(torch.cat([grads[n] for n in logra.module_names], 1))
            fitted.append(torch.cat([preconditioned[n] for n in logra.module_names], 1))
    kinds = {"fitted": spectrum(torch.cat(fitted)), "none": spectrum(torch.cat(raw))}
    length = raw[0].shape[1]
    markdown = [
        "# Eigen-spectrum of real LoGra index rows (SmolLM2-135M, emotion, CPU)",
        "",
        f"{len(train)} emotion training rows (evenly spaced through the file), modules `{args.include}` "
        f"({len(logra.module_names)} Linear layers), LoGra {args.dim}x{args.dim} per module: rows of {length:,} "
        f"numbers; empirical Fisher fitted on the same rows. Eigenvalues of `X^T X / n` (uncentred), as "
        f"shares of their sum; `alpha`: least-squares slope of `log lambda_i` against `log i` over "
        f"`i = 1..{kinds['fitted']['fitted_on']}`. Wall time {seconds[0]:.0f} s (one torch thread).",
        "",
        "| rows (`--precondition`) | top-1 share | top-10 share | top-100 share | alpha (lambda_i ~ i^-alpha) |",
        "|---|---|---|---|---|",
        *(
            f"| {kind} | {s['top1']:.3f} | {s['top10']:.3f} | {s['top100']:.3f} | {s['alpha']:.2f} |"
            for kind, s in kinds.items()
        ),
        "",
        "First 20 shares (fitted): " + ", ".join(f"{v:.3g}" for v in kinds["fitted"]["eigenvalue_shares"][:20]),
    ]
    data = {"train": len(train), "include": args.include, "dim": args.dim, "row_length": length, **kinds}
    path = write_results(
        args.results / args.name, markdown, data, command_line("row_spectrum.py", argv, args), load_before
    )
    print("\n".join(markdown))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
