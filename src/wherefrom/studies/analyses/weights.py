"""Analysis (c): the size of the fine-tuning weight change per module against the behaviour change.

Per module (a LoRA-adapted layer, or for full fine-tuning any module with parameters of its own):

* ``delta_norm = ||Delta W||_F``: LoRA ``sum_adapters scaling * B @ A`` (the update LoRA adds to the
  base weight), full fine-tuning ``W_tuned - W_base``; ``relative = ||Delta W||_F / ||W_base||_F``.

Behaviour on the test prompts, encoded as the bench's attribution encodes its queries (its input layout:
template or chat template, EOS, truncation, padding, labels; they were encoded with ``max_length`` alone, so
under ``--preset reference-study`` the behaviour was measured on rows the model was never tuned on), from the
log-probabilities at the labelled (completion) positions, i.e. the bench's query measurement ``f`` (under
``loss_tokens="all"`` every token is labelled and counts):

* ``delta_f`` per query: ``f_tuned - f_other`` in nats, ``f = log p(completion | prompt)`` (summed
  over completion tokens); positive = the tuned model finds the completion likelier;
* ``kl_per_token``: ``KL(p_tuned || p_other)`` in nats, averaged over every completion token of
  every test row (the next-token distributions that predict the completion).

"Other" is the base model (every change reverted) for each checkpoint ``epoch-k`` and the final
model, and, for the final model only, the model with **one** module's change reverted (an ablation:
the behaviour change that module's update carries). The report gives the Spearman correlation across
modules between ``delta_norm`` (and ``relative``) and the ablation effect: does the size of a
module's parameter change track its effect on behaviour? (The reference study found it does not.)

Cache (resumable): ``seed-<s>/weights/<checkpoint>.json`` (``epoch-<k>`` or ``final``, the final one
with the ablation), keyed by the bench settings and ``n_queries``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wherefrom.core.commandline import command_line
from wherefrom.core.encoding import encode_records, iterate_batches, pad_id
from wherefrom.core.gradients import Batch
from wherefrom.core.task import completion_predictions
from wherefrom.models.finetune import read_trainer_state
from wherefrom.models.loading import eval_mode, is_peft
from wherefrom.studies.analyses.common import Bench, first_queries, load_checkpoint, open_bench, write_report
from wherefrom.studies.metrics import mean_stat, spearman
from wherefrom.studies.toolkit import (
    cached,
    free_memory,
    interval_cell,
    markdown_table,
    number,
    refuse_replacing,
    store,
)

__all__ = [
    "ParameterChange",
    "behaviour_change",
    "completion_log_probs",
    "full_changes",
    "lora_changes",
    "measure_model",
    "reverted",
    "run_weights",
]

NAME = "weights"
_FORMAT_VERSION = 3
LogProbs = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""Per batch: ``(log_probs (N, V) float64, targets (N,), rows (N,))`` at the ``N`` completion positions;
``rows`` are indices of the examples in the whole sequence of batches."""


@dataclass
class ParameterChange:
    """One module's fine-tuning change: its size and a context manager that undoes it temporarily."""

    name: str
    delta_norm: float
    base_norm: float
    revert: Callable[[], AbstractContextManager[None]]

    @property
    def relative(self) -> float:
        """``||Delta W||_F / ||W_base||_F`` (``inf`` for a zero base weight with a change, 0 without)."""
        if self.base_norm > 0:
            return self.delta_norm / self.base_norm
        return math.inf if self.delta_norm > 0 else 0.0


@contextmanager
def _swapped(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Inside: each parameter holds the given value; afterwards its own value again."""
    saved = [p.detach().clone() for p, _ in pairs]
    try:
        with torch.no_grad():
            for p, value in pairs:
                p.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for (p, _), old in zip(pairs, saved):
                p.copy_(old)


@contextmanager
def reverted(changes: Sequence[ParameterChange]) -> Iterator[None]:
    """Undo every change in ``changes`` inside the block (all of them: the base model)."""
    with ExitStack() as stack:
        for change in changes:
            stack.enter_context(change.revert())
        yield


def _short(name: str) -> str:
    return name.removeprefix("base_model.model.")


def lora_changes(model: nn.Module) -> list[ParameterChange]:
    """The LoRA-adapted layers of a ``peft`` model, in module order: ``Delta W = sum_a scaling_a B_a A_a``
    over the active adapters; reverting zeroes their ``B`` (the layer then computes its base output)."""
    from peft.tuners.lora import LoraLayer

    changes = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not adapters:
            continue
        if getattr(module, "merged", False):
            raise ValueError(f"LoRA layer {name} is merged into its base weight: its change cannot be separated")
        if any(module.use_dora.get(a, False) for a in adapters):
            raise ValueError(f"LoRA layer {name} uses DoRA, which this analysis does not support")
        with torch.no_grad():
            delta = sum(
                module.scaling[a] * (module.lora_B[a].weight.double() @ module.lora_A[a].weight.double())
                for a in adapters
            )
            base = module.get_base_layer().weight.double()
        zeros = [(module.lora_B[a].weight, torch.zeros_like(module.lora_B[a].weight)) for a in adapters]
        changes.append(
            ParameterChange(_short(name), float(delta.norm()), float(base.norm()), lambda z=zeros: _swapped(z))
        )
    return changes


def full_changes(tuned: nn.Module, base: nn.Module) -> list[ParameterChange]:
    """Per module with parameters of its own (``recurse=False``; a tied parameter counts once, at its
    first module): ``Delta W = W_tuned - W_base`` over those parameters; reverting copies the base values in.

    Raises ``ValueError`` when ``base`` lacks a parameter of ``tuned`` or its shape differs.
    """
    base_params = dict(base.named_parameters(remove_duplicate=False))
    seen: set[int] = set()
    changes = []
    for name, module in tuned.named_modules():
        pairs = []
        for local, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{name}.{local}" if name else local
            other = base_params.get(full)
            if other is None or other.shape != param.shape:
                raise ValueError(f"base model has no parameter {full!r} of shape {tuple(param.shape)}")
            pairs.append((param, other.detach().to(param.device, param.dtype)))
        if pairs:
            with torch.no_grad():
                delta = math.sqrt(sum(float((p.double() - b.double()).square().sum()) for p, b in pairs))
                size = math.sqrt(sum(float(b.double().square().sum()) for _, b in pairs))
            changes.append(ParameterChange(name, delta, size, lambda pairs=pairs: _swapped(pairs)))
    return changes


def _log_probs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log_probs (N, V) float64, targets (N,), batch rows (N,))`` at the completion positions."""
    logits, targets, rows = completion_predictions(model, batch)
    return torch.log_softmax(logits.double(), dim=-1).cpu(), targets.cpu(), rows.cpu()


def completion_log_probs(model: nn.Module, batches: Sequence[tuple[list[str], Batch]]) -> LogProbs:
    """The model's log-probabilities at every completion position of ``batches`` (:data:`LogProbs`), held
    in memory: ``8 x V`` bytes per completion token (SmolLM2: 0.4 MB a token)."""
    out, start = [], 0
    with torch.no_grad(), eval_mode(model):
        for ids, batch in batches:
            log_probs, targets, rows = _log_probs(model, batch)
            out.append((log_probs, targets, rows + start))
            start += len(ids)
    return out


def behaviour_change(
    reference: LogProbs, model: nn.Module, batches: Sequence[tuple[list[str], Batch]]
) -> dict[str, Any]:
    """How ``model`` (in its current state) differs from the ``reference`` outputs on the same ``batches``.

    Returns ``delta_f`` per example (``f_reference - f_model``, nats), its mean and mean absolute
    value, and ``kl_per_token`` = mean over completion tokens of ``KL(p_reference || p_model)`` (nats).
    """
    n = sum(len(ids) for ids, _ in batches)
    f_ref, f_model = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    kl, tokens = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for (_ids, batch), (ref, targets, rows) in zip(batches, reference, strict=True):
            other, _, _ = _log_probs(model, batch)
            f_ref.index_add_(0, rows, ref.gather(1, targets[:, None])[:, 0])
            f_model.index_add_(0, rows, other.gather(1, targets[:, None])[:, 0])
            kl += float((ref.exp() * (ref - other)).sum())
            tokens += int(targets.numel())
    delta = f_ref - f_model
    return {
        "delta_f": delta.tolist(),
        "mean_delta_f": float(delta.mean()),
        "mean_abs_delta_f": float(delta.abs().mean()),
        "kl_per_token": kl / max(tokens, 1),
        "n_tokens": tokens,
    }


def measure_model(
    model: nn.Module,
    changes: Sequence[ParameterChange],
    batches: Sequence[tuple[list[str], Batch]],
    ablate: bool = False,
) -> dict[str, Any]:
    """One model's record: each module's change, the behaviour change against the base model (every
    change reverted) and, with ``ablate``, per module the behaviour change its own revert causes, with
    the Spearman correlations across modules between change size and ablation effect."""
    tuned = completion_log_probs(model, batches)
    with reverted(changes):
        behaviour = behaviour_change(tuned, model, batches)
    modules = [
        {"name": c.name, "delta_norm": c.delta_norm, "base_norm": c.base_norm, "relative": c.relative} for c in changes
    ]
    record: dict[str, Any] = {
        "modules": modules,
        "behaviour": behaviour,
        "total_delta_norm": math.sqrt(sum(c.delta_norm**2 for c in changes)),
        "mean_relative": sum(c.relative for c in changes) / len(changes) if changes else None,
    }
    if ablate:
        for entry, change in zip(modules, changes):
            with change.revert():
                effect = behaviour_change(tuned, model, batches)
            entry["ablation"] = {k: effect[k] for k in ("mean_delta_f", "mean_abs_delta_f", "kl_per_token")}
        record["spearman"] = _correlations(modules)
    return record


def _correlations(modules: list[dict[str, Any]]) -> dict[str, float | None]:
    size = [m["delta_norm"] for m in modules]
    relative = [m["relative"] for m in modules]
    kl = [m["ablation"]["kl_per_token"] for m in modules]
    abs_f = [m["ablation"]["mean_abs_delta_f"] for m in modules]
    return {
        "delta_norm_vs_kl": spearman(size, kl),
        "delta_norm_vs_abs_delta_f": spearman(size, abs_f),
        "relative_vs_kl": spearman(relative, kl),
    }


def run_weights(
    bench: Bench | str,
    n_queries: int | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run analysis (c) on a bench folder (resuming from its cache) on the first ``n_queries`` test rows
    (``None``: all); returns what ``weights.json`` holds and writes ``weights.json`` / ``weights.md``.
    ``overwrite=False`` (the default, as ``wherefrom analyze`` without ``--overwrite``): a seed's unit made with other settings is
    refused before that seed's work (:func:`wherefrom.studies.toolkit.refuse_replacing`), not replaced."""
    bench = open_bench(bench)
    if n_queries is not None and n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    say = log or (lambda _line: None)
    c = bench.config
    names = [f"epoch-{k}" for k in range(1, c.epochs + 1)] + ["final"]
    records: dict[str, dict[str, Any]] = {}
    for seed in c.seeds:
        task = bench.task(seed)
        taken = first_queries(task.test, n_queries, say)
        queries = task.test[:taken] if taken else task.test
        key = {**bench.seed_key(seed, task), "analysis": NAME, "format": _FORMAT_VERSION, "n_queries": taken}
        units = {n: (bench.unit_path(seed, NAME, n), {**key, "checkpoint": n}) for n in names}
        if not overwrite:
            refuse_replacing(units.values())
        done = {n: cached(path, unit_key) for n, (path, unit_key) in units.items()}
        if any(v is None for v in done.values()):
            loaded, tuned = bench.finetuned(seed, task, say)
            layout = c.attribution_config(seed).layout()  # the bench's queries as its attribution encoded them
            encoded = encode_records(queries, loaded.tokenizer, model=tuned.model, **layout)
            batches = list(
                iterate_batches(encoded, c.batch_size, pad_id(loaded.tokenizer), next(tuned.model.parameters()).device)
            )
            folders = dict(zip(names, [*tuned.checkpoints, None]))
            base = None
            for name in names:
                if done[name] is not None:
                    continue
                model = tuned.model if folders[name] is None else load_checkpoint(bench, folders[name])
                if not is_peft(model) and base is None:
                    base = bench.base_model()
                changes = lora_changes(model) if is_peft(model) else full_changes(model, base)
                record = measure_model(model, changes, batches, ablate=name == "final")
                record.update(
                    seed=seed,
                    checkpoint=name,
                    train_loss=read_trainer_state(folders[name]).get("mean_loss") if folders[name] else None,
                )
                done[name] = store(bench.unit_path(seed, NAME, name), {**key, "checkpoint": name}, record)
                say(
                    f"seed {seed} {name}: ||dW|| {record['total_delta_norm']:.4g}, KL {record['behaviour']['kl_per_token']:.4g}"
                )
                model = changes = None
                free_memory()
            loaded = tuned = base = None
            free_memory()
        else:
            say(f"seed {seed}: reused every record")
        records.update({f"{seed}/{n}": done[n] for n in names})
    payload = {
        "command": command or command_line("analyze weights", [("--bench", bench.folder)]),
        "n_queries": n_queries,
        "checkpoints": names,
        "records": records,
        **_summary(c.seeds, names, records),
    }
    write_report(bench, NAME, payload, _markdown(bench, payload))
    return payload


def _summary(seeds: Sequence[int], names: Sequence[str], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    per_checkpoint = {}
    for name in names:
        mine = [records[f"{s}/{name}"] for s in seeds]
        per_checkpoint[name] = {
            "train_loss": mean_stat([r["train_loss"] for r in mine]),
            "total_delta_norm": mean_stat([r["total_delta_norm"] for r in mine]),
            "mean_relative": mean_stat([r["mean_relative"] for r in mine]),
            **{
                k: mean_stat([r["behaviour"][k] for r in mine])
                for k in ("mean_delta_f", "mean_abs_delta_f", "kl_per_token")
            },
        }
    finals = [records[f"{s}/final"] for s in seeds]
    per_module = {}
    for i, module in enumerate(finals[0]["modules"]):
        entries = [r["modules"][i] for r in finals]
        per_module[module["name"]] = {
            "delta_norm": mean_stat([e["delta_norm"] for e in entries]),
            "relative": mean_stat([e["relative"] for e in entries]),
            **{
                k: mean_stat([e["ablation"][k] for e in entries])
                for k in ("mean_delta_f", "mean_abs_delta_f", "kl_per_token")
            },
        }
    correlation = {k: mean_stat([r["spearman"][k] for r in finals], within=(-1.0, 1.0)) for k in finals[0]["spearman"]}
    return {"per_checkpoint": per_checkpoint, "per_module": per_module, "spearman": correlation}


_DW_NORM = "\\|\\|dW\\|\\|"  # ||dW|| with its bars escaped for a Markdown table cell
_W_NORM = "\\|\\|W\\|\\|"


def _markdown(bench: Bench, payload: dict[str, Any]) -> str:
    g = ".4g"
    lines = [
        f"# wherefrom analyze weights: {bench.config.task}",
        "",
        f"Command: `{payload['command']}`",
        "",
        (
            f"Mean [95% t interval] over seeds ({len(bench.config.seeds)}). `dW`: the fine-tuning weight change "
            "(LoRA: scaling x B A); `df` = f_tuned - f_base with f = log p(completion | prompt) on the test rows, "
            "nats; KL(p_tuned || p_base) per completion token, nats."
        ),
        "",
        markdown_table(
            [
                "checkpoint",
                "training loss",
                f"{_DW_NORM}_F (all modules)",
                f"mean {_DW_NORM} / {_W_NORM}",
                "mean df",
                "mean \\|df\\|",
                "KL per token",
            ],
            [
                [
                    name,
                    interval_cell(e["train_loss"]),
                    interval_cell(e["total_delta_norm"], g),
                    interval_cell(e["mean_relative"], g),
                    interval_cell(e["mean_delta_f"]),
                    interval_cell(e["mean_abs_delta_f"]),
                    interval_cell(e["kl_per_token"], g),
                ]
                for name, e in payload["per_checkpoint"].items()
            ],
        ),
    ]
    lines += [
        "",
        (
            "Does the size of a module's change track its effect? Spearman across modules (per seed, then "
            "mean over seeds) between the change size and the behaviour change its revert causes at the final model:"
        ),
        "",
    ]
    labels = {
        "delta_norm_vs_kl": "||dW||_F vs ablation KL",
        "delta_norm_vs_abs_delta_f": "||dW||_F vs ablation mean |df|",
        "relative_vs_kl": "||dW|| / ||W|| vs ablation KL",
    }
    for k, stat in payload["spearman"].items():
        lines.append(f"- {labels.get(k, k)}: {interval_cell(stat)}")
    lines += [
        "",
        (
            "Per module at the final model (ablation: that module's change reverted, the others kept; "
            "df = f_tuned - f_ablated):"
        ),
        "",
    ]
    rows = []
    for name, e in payload["per_module"].items():
        mean = {k: (v or {}).get("mean") for k, v in e.items()}
        rows.append(
            [
                name,
                number(mean["delta_norm"], g),
                number(mean["relative"], g),
                number(mean["kl_per_token"], g),
                number(mean["mean_delta_f"]),
                number(mean["mean_abs_delta_f"]),
            ]
        )
    header = [
        "module",
        f"{_DW_NORM}_F",
        f"{_DW_NORM} / {_W_NORM}",
        "ablation KL per token",
        "ablation mean df",
        "ablation mean \\|df\\|",
    ]
    lines.append(markdown_table(header, rows))
    return "\n".join(lines) + "\n"
