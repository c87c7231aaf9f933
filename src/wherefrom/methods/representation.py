"""RepSim: cosine similarity of hidden states (Hanawa et al., 2021, Evaluation of Similarity-based
Explanations), the representation baseline of Li et al. (2024, Do Influence Functions Work on Large
Language Models?).

``score(z_q, z_m) = cos(h(z_q), h(z_m))`` where ``h`` is one hidden layer of the model, pooled over
token positions. Larger = more similar: a similarity in ``[-1, 1]``, not an influence (no sign reasoning about
upweighting applies), so its outputs say "higher = more similar" and call its ends highest / lowest scores, not
proponents / opponents (:func:`wherefrom.methods.registry.similarity_family`).

* ``layer`` indexes ``model(..., output_hidden_states=True).hidden_states``: ``0`` is the embedding
  output, ``-1`` (default) the last layer (for Llama in Hugging Face, after the final norm).
* ``pooling``: ``"last_prompt"`` (default) the hidden state at the last prompt token, which is the
  state the model predicts the completion from (it depends on the prompt only: two rows with one
  prompt get cosine 1); ``"last"`` the last real token (the appended EOS, when the tokenizer has
  one); ``"mean"`` the mean over every real token (prompt and completion, padding masked out).
  A row whose prompt encodes to no tokens (empty prompt, tokenizer without BOS) uses position 0
  for ``"last_prompt"``.

Rows are tokenized exactly as for the gradient methods (:func:`wherefrom.core.encoding.encode_records`,
same ``max_length`` / ``chat_template`` / ``template`` / ``truncate`` rules), batched right-padded; PEFT models work
unchanged. The gradient methods' ``pad_left`` and ``loss_tokens`` do not apply: with ``template=
REFERENCE_TEMPLATE`` and the defaults (last layer, ``last_prompt``) this is the reference study's RepSim
(plumprc/Failures-of-Influence-Functions-in-LLMs, ``repsim.py``: ``[INST] {prompt} [/INST]`` alone,
unpadded, last layer, last token, cosine).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wherefrom.core.data import Record, check_records, records_key
from wherefrom.core.encoding import MAX_LENGTH, EncodedExample, encode_records, iterate_batches, pad_id
from wherefrom.core.scoring import Scores
from wherefrom.core.task import model_inputs
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.models.loading import eval_mode, model_fingerprint

Pooling = Literal["last_prompt", "last", "mean"]
POOLINGS: tuple[str, ...] = ("last_prompt", "last", "mean")

__all__ = ["POOLINGS", "Pooling", "RepSim"]


def check_layer(layer: int, states: int) -> None:
    """``ValueError`` (a bad ``layer`` option) when ``layer`` indexes none of a model's ``states`` hidden states
    (``0``: the embeddings)."""
    if not -states <= layer < states:
        raise ValueError(
            f"layer {layer} is out of range: the model returns {states} hidden states "
            f"(0 = embeddings, {states - 1} or -1 = last layer)"
        )


class RepSim:
    """Hidden-state cosine similarity; ``fit(train)`` caches the train representations.

    The cache is keyed by the train rows (ids and texts) and the layer/pooling; it is not invalidated
    when the model's weights change, so call :meth:`fit` again after changing them. ``progress``: what each pass
    over rows reports its batches to (:data:`wherefrom.curvature.base.Progress`; a run's progress bars).
    """

    name = "repsim"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        layer: int = -1,
        pooling: Pooling = "last_prompt",
        max_length: int = MAX_LENGTH,
        batch_size: int = 8,
        chat_template: bool = False,
        template: str | None = None,
        truncate: bool = False,
        progress: Progress = no_progress,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if isinstance(layers, int):  # a Hugging Face model returns its layers' states and the embeddings'
            check_layer(int(layer), layers + 1)  # userI: found only once the rows' pass ran, after a bench's tuning
        self.model = model
        self.tokenizer = tokenizer
        self.layer = int(layer)
        self.pooling: Pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size
        self.chat_template = chat_template
        self.template = template
        self.truncate = truncate
        self.progress = progress
        self._cache: tuple[tuple, list[str], torch.Tensor] | None = None

    @classmethod
    def from_config(cls, model: nn.Module, tokenizer, config, **overrides) -> RepSim:
        """From an :class:`~wherefrom.engine.api.AttributionConfig`: its ``max_length``, ``batch_size`` and
        ``chat_template``, ``template``, ``truncate``; ``layer``/``pooling`` from ``config.extra`` (keys ``"layer"``, ``"pooling"``)
        unless given in ``overrides``."""
        kwargs = {
            "layer": config.extra.get("layer", -1),
            "pooling": config.extra.get("pooling", "last_prompt"),
            "max_length": config.max_length,
            "batch_size": config.batch_size,
            "chat_template": config.chat_template,
            "template": config.template,
            "truncate": config.truncate,
        }
        kwargs.update(overrides)
        return cls(model, tokenizer, **kwargs)

    @property
    def module_name(self) -> str:
        return f"hidden_states[{self.layer}]"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- representations ----------------------------------------------------------------------
    def encode(self, records: Sequence[Record]) -> list[EncodedExample]:
        """``records`` tokenized as the attribution lays them out; labelled on every token (``loss_tokens="all"``):
        RepSim computes no loss, so a truncated row whose prompt fills ``max_length`` is represented, not refused
        for leaving no completion token (it failed under the reference-study preset, where the other methods
        scored the row). The prompt boundary, which ``last_prompt`` pools at, is kept either way."""
        return encode_records(
            records,
            self.tokenizer,
            self.max_length,
            self.chat_template,
            model=self.model,
            template=self.template,
            loss_tokens="all",
            truncate=self.truncate,
        )

    def _positions(self, examples: Sequence[EncodedExample]) -> list[int]:
        if self.pooling == "last_prompt":
            return [max(e.num_prompt_tokens - 1, 0) for e in examples]
        return [len(e) - 1 for e in examples]

    def representations(self, records: Sequence[Record]) -> tuple[list[str], torch.Tensor]:
        """Ids and pooled hidden states ``(n, hidden)`` (float32, CPU, not normalised)."""
        encoded = self.encode(records)
        ids: list[str] = []
        parts: list[torch.Tensor] = []
        with eval_mode(self.model), torch.no_grad():
            for start, (batch_ids, batch) in zip(
                range(0, len(encoded), self.batch_size),
                self.progress(
                    iterate_batches(encoded, self.batch_size, pad_id(self.tokenizer), self.device), "hidden states"
                ),
            ):
                out = self.model(**model_inputs(self.model, batch), output_hidden_states=True)
                states = out.hidden_states
                check_layer(self.layer, len(states))
                hidden = states[self.layer].float()  # (B, T, d)
                if self.pooling == "mean":
                    mask = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                else:
                    positions = torch.tensor(
                        self._positions(encoded[start : start + len(batch_ids)]), device=hidden.device
                    )
                    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
                ids += batch_ids
                parts.append(pooled.cpu())
        if not parts:
            return ids, torch.zeros(0, 0)
        return ids, torch.cat(parts)

    # --- method contract ------------------------------------------------------------------------
    def fit(self, train: Sequence[Record]) -> None:
        """Compute and cache the (normalised) train representations.

        Raises :class:`~wherefrom.core.data.DataError` for no rows, an invalid row or a repeated id."""
        train = check_records(train, "training rows")
        ids, reps = self.representations(train)
        self._cache = (self._key(train), ids, F.normalize(reps, dim=-1))

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The cached normalised train representations ``(n, hidden)`` float32, with their ids, layer and pooling."""
        if self._cache is None:
            raise RuntimeError("repsim is not fitted: call fit(train) first")
        _key, ids, reps = self._cache
        return {"representations": reps}, {"ids": list(ids), "layer": self.layer, "pooling": self.pooling}

    def restore_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any], train: Sequence[Record]) -> None:
        """Adopt saved representations of ``train``; ``ValueError`` when their layer, pooling or ids differ."""
        if (state["layer"], state["pooling"]) != (self.layer, self.pooling):
            raise ValueError(
                f"repsim: saved layer/pooling {state['layer']}/{state['pooling']} differ from {self.layer}/{self.pooling}"
            )
        if state["ids"] != [r.id for r in train]:
            raise ValueError("repsim: the saved representations are of other training rows")
        self._cache = (self._key(train), list(state["ids"]), tensors["representations"])

    def _key(self, train: Sequence[Record]) -> tuple:
        """What the training representations depend on: the layer, pooling and input layout, the rows, and every
        weight of the model (:func:`wherefrom.models.loading.model_fingerprint`: kept representations were reused
        after the weights changed, mixing two models' representations in one score)."""
        layout = (self.max_length, self.chat_template, self.template, self.truncate)
        return self.layer, self.pooling, layout, records_key(train), model_fingerprint(self.model)

    def _train_representations(self, train: Sequence[Record]) -> tuple[list[str], torch.Tensor]:
        if self._cache is not None and self._cache[0] == self._key(train):
            return self._cache[1], self._cache[2]
        ids, reps = self.representations(train)
        return ids, F.normalize(reps, dim=-1)

    # --- rows of a vector store -----------------------------------------------------------------
    def vector_blocks(self) -> list[tuple[str, tuple[int]]]:
        """The layout of a row: one block ``hidden_states[layer]`` of the hidden size."""
        return [(self.module_name, (int(self.model.config.hidden_size),))]

    def vector_settings(self) -> dict[str, Any]:
        return {"method": self.name, "layer": self.layer, "pooling": self.pooling}

    def train_vectors(
        self, train: Sequence[Record], precondition: bool = True, unit: bool = True
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """``(ids, rows (b, hidden))`` per batch: unit-normalised pooled hidden states (a cosine needs them
        unit, so ``unit`` and ``precondition`` change nothing: RepSim has no curvature).
        ``score = query_vectors(...) @ row`` is :meth:`scores`' cosine."""
        for start in range(0, len(train), self.batch_size):
            ids, reps = self.representations(train[start : start + self.batch_size])
            yield ids, F.normalize(reps, dim=-1)

    def query_vectors(self, queries: Sequence[Record], unit: bool = True) -> tuple[list[str], torch.Tensor]:
        """Ids and unit-normalised query representations ``(q, hidden)``. Raises
        :class:`~wherefrom.core.data.DataError` before any pass for no queries, an invalid row or a repeated id."""
        ids, reps = self.representations(check_records(queries, "query rows"))
        return ids, F.normalize(reps, dim=-1)

    def scores(self, queries: Sequence[Record], train: Sequence[Record]) -> Scores:
        """Cosine similarities ``(n_query, n_train)`` as :class:`Scores` with one "module",
        ``hidden_states[layer]`` (``per_module`` shape ``(1, q, n)``). Raises
        :class:`~wherefrom.core.data.DataError` before any pass for an empty ``queries`` or ``train``, an
        invalid row or a repeated id."""
        queries, train = check_records(queries, "query rows"), check_records(train, "training rows")
        self.encode(train)  # every row checked against the model before any pass
        query_ids, query_reps = self.representations(queries)
        train_ids, train_reps = self._train_representations(train)
        cosine = (
            F.normalize(query_reps, dim=-1) @ train_reps.T
            if len(query_ids) and len(train_ids)
            else torch.zeros(len(query_ids), len(train_ids))
        )
        return Scores(query_ids, train_ids, [self.module_name], cosine.unsqueeze(0))
