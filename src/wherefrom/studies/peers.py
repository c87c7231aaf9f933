"""Adapters that let peer libraries compute the same quantities as wherefrom (parity tests, benchmarks).

Import only where the peer is installed: ``kronfluence`` is an optional extra (see README).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wherefrom.core.task import labelled_predictions, prediction_losses


def kronfluence_lm_task(module_names: Sequence[str], generator: torch.Generator | None = None):
    """A ``kronfluence.task.Task`` equal to wherefrom's defaults for causal LMs.

    Training loss: the completion-token cross-entropy *summed* over the batch (targets drawn from the
    model when kronfluence asks for ``sample=True``, i.e. the true Fisher; from ``generator`` or the
    global RNG); measurement: the query's summed loss ``L(z_q) = -log p(completion | prompt)``, so
    kronfluence's scores carry wherefrom's sign (positive = proponent); tracked modules: exactly
    ``module_names``; attention mask: the batch's, so padding stays out of the covariances. The logits are
    wherefrom's own (:func:`wherefrom.core.task.labelled_predictions`: the output layer at the labelled
    positions only), so a timing compares the libraries' passes, not their losses.
    """
    from kronfluence.task import Task

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            pred, targets = labelled_predictions(model, batch, batch["labels"])
            return prediction_losses(pred, targets, sample=sample, generator=generator).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self) -> list[str]:
            return list(module_names)

        def get_attention_mask(self, batch) -> torch.Tensor:
            return batch["attention_mask"]

    return LanguageModelTask()
