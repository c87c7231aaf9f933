"""Adapters that let peer libraries compute the same quantities as wherefrom (parity tests, benchmarks).

Import only where the peer is installed: ``kronfluence`` is an optional extra (see README).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wherefrom.core.task import per_example_loss


def kronfluence_lm_task(module_names: Sequence[str], generator: torch.Generator | None = None):
    """A ``kronfluence.task.Task`` equal to wherefrom's defaults for causal LMs.

    Training loss: the completion-token cross-entropy *summed* over the batch (targets drawn from the
    model when kronfluence asks for ``sample=True``, i.e. the true Fisher; from ``generator`` or the
    global RNG); measurement: the query's summed loss ``L(z_q) = -log p(completion | prompt)``, so
    kronfluence's scores carry wherefrom's sign (positive = proponent); tracked modules: exactly
    ``module_names``; attention mask: the batch's, so padding stays out of the covariances.
    """
    from kronfluence.task import Task

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return per_example_loss(logits, batch["labels"], "sum", sample=sample, generator=generator).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self) -> list[str]:
            return list(module_names)

        def get_attention_mask(self, batch) -> torch.Tensor:
            return batch["attention_mask"]

    return LanguageModelTask()
