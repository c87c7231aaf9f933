"""Tokenization of records, collation into padded batches, and ordered batch iteration.

Conventions (shared with :mod:`wherefrom.core.task`):

* An :class:`EncodedExample` holds ``input_ids = prompt_ids + completion_ids`` and ``labels`` of
  the same length, aligned with ``input_ids``: ``labels[t] == input_ids[t]`` on completion tokens
  (including the appended EOS) and ``-100`` on prompt tokens. The next-token shift happens in
  :mod:`wherefrom.core.task`, not here.
* Without a chat template, prompt and completion are tokenized separately, so the boundary
  between them is exact. The prompt is tokenized with the tokenizer's special tokens (a BOS is kept
  if the tokenizer adds one); the completion without them. With a chat template, the rendered
  conversation is tokenized as one text and the labels cover exactly the assistant content and its
  end-of-turn marker (:func:`encode_records`).
* Nothing is truncated unless asked (``truncate``): an example longer than ``max_length`` raises
  :class:`DataError`. Given the
  model, ``max_length`` is capped at the model's position table (:func:`model_positions`:
  ``config.n_positions`` / ``config.max_position_embeddings``) and every token id (padding
  included) must index its input embedding (:func:`model_vocabulary`); a row that breaks either is a
  :class:`DataError` naming the row and both numbers, raised before any pass.
* Batches are right-padded: ``input_ids`` / ``attention_mask`` / ``labels`` are ``(B, T)`` long
  tensors, ``attention_mask`` is 1 on real tokens, ``labels`` is ``-100`` on prompt and padding.

The reference study's input layout (Li et al., 2024, code plumprc/Failures-of-Influence-Functions-in-LLMs
at 93f9489, ``utils.get_preprocessed_dataset`` and ``finetune.py``) is available as options of
:func:`encode_records`, each off by default: ``template="[INST] {prompt} [/INST] {completion}"``
(:data:`REFERENCE_TEMPLATE`, the whole text tokenized once with the tokenizer's BOS),
``append_eos=False``, ``pad_left=True`` (each row left-padded with the padding id to exactly
``max_length`` tokens, attention 0 there; the reference pads with EOS, ``tokenizer.pad_token =
eos_token``), ``truncate=True`` (a longer row keeps its first ``max_length`` tokens, as the reference's
``tokenizer(..., truncation=True, max_length=128)`` does with the default right truncation side) and ``loss_tokens="all"`` (every token is a label, padding, prompt and template tags
included, as the reference's ``labels = input_ids`` does).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from wherefrom.core.data import CHAT_FIELDS, DataError, Record
from wherefrom.core.task import IGNORE_INDEX

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "LAYOUT_SETTINGS",
    "LOSS_TOKENS",
    "REFERENCE_TEMPLATE",
    "Batches",
    "EncodedExample",
    "PlainChatRows",
    "TokenBoundaryWarning",
    "check_layout",
    "collate",
    "encode_records",
    "iterate_batches",
    "model_positions",
    "model_vocabulary",
    "pad_id",
    "warn_split_boundaries",
]


@dataclass(frozen=True)
class EncodedExample:
    """A tokenized record.

    ``input_ids`` and ``labels`` have the same length ``T``; ``labels`` is ``-100`` on prompt tokens
    and equals ``input_ids`` on completion tokens (including an appended EOS). ``padding``: leading
    padding tokens (``pad_left``; attention 0 there). ``prompt_end``: the index after the last prompt
    token, padding included, when the labels do not show it (``loss_tokens="all"``), else ``None``.
    """

    id: str
    input_ids: list[int]
    labels: list[int]
    padding: int = 0
    prompt_end: int | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Number of leading tokens before the completion, padding included: ``prompt_end`` when set,
        else those with label ``-100``."""
        if self.prompt_end is not None:
            return self.prompt_end
        return sum(1 for label in self.labels if label == IGNORE_INDEX)

    @property
    def num_completion_tokens(self) -> int:
        """Number of tokens that carry a label (completion tokens, EOS included)."""
        return len(self.labels) - self.num_prompt_tokens


CONTENT_SENTINEL = "WHEREFROMASSISTANTCONTENT"
"""A stand-in assistant message: rendering it shows what the template puts around any content."""


WITHOUT_TEMPLATE = "chat_template=False: leave out --chat-template"
"""How every refusal of a chat template says to encode without one."""


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str) -> str:
    """The conversation as the tokenizer's chat template renders it; ``ValueError`` naming ``where`` and the tokenizer
    when the template fails (a syntax error, or one that raises, as Llama-2's and Mistral's do on roles they do not
    take): userP, it ended in a jinja2 traceback, exit 1, its run's record kept."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except Exception as error:  # jinja2's TemplateError, or a TypeError of the template's own Python (reviewW)
        raise ValueError(
            f"{where}: the chat template of tokenizer {getattr(tokenizer, 'name_or_path', '') or '(unnamed)'!r} "
            f"failed: {type(error).__name__}: {error}; fix it (chat_template.jinja or tokenizer_config.json) or "
            f"encode without it ({WITHOUT_TEMPLATE})"
        ) from error
    if not isinstance(text, str):  # defensive: some versions may wrap the result
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def _end_of_turn(suffix: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """Characters of ``suffix`` (what the template renders after the assistant content) up to and
    including its first special token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<end_of_turn>``...);
    0 when it holds none."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    specials += [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special and t.content]
    found = [(suffix.find(t), -len(t), t) for t in set(specials) if t in suffix]
    if not found:
        return 0
    at, _, token = min(found)
    return at + len(token)


def _around_content(tokenizer: PreTrainedTokenizerBase, prompt: str, where: str) -> tuple[str, str]:
    """The text the template renders before and after the assistant content of ``[user: prompt, assistant:
    CONTENT_SENTINEL]``; ``ValueError`` naming ``where`` when it does not render the assistant message once."""
    probe = _render(
        tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": CONTENT_SENTINEL}], where
    )
    if probe.count(CONTENT_SENTINEL) != 1:
        raise ValueError(f"the chat template does not render the assistant message once ({where})")
    before, after = probe.split(CONTENT_SENTINEL)
    return before, after


def _chat_texts(record: Record, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, bool]:
    """``(prompt_text, completion_text, has_marker)``: the conversation ``[user: prompt, assistant:
    completion]`` as the template renders it, cut where the assistant content starts and after its
    end-of-turn marker (``has_marker``: the template renders one). The template is rendered once with :data:`CONTENT_SENTINEL` as the assistant content,
    which shows the text before and after any content (header, trimming, marker)."""
    before, after = _around_content(tokenizer, record.prompt, record.named())
    full = _render(
        tokenizer,
        [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.completion}],
        record.named(),
    )
    if not (full.startswith(before) and full.endswith(after) and len(full) >= len(before) + len(after)):
        raise ValueError(
            f"{record.named()}: the chat template renders text around the assistant content that depends on "
            f"the content; wherefrom cannot tell which tokens are the answer ({WITHOUT_TEMPLATE})"
        )
    content = full[len(before) : len(full) - len(after)]
    marker_end = _end_of_turn(after, tokenizer)
    return before, content + after[:marker_end], marker_end > 0


def template_ends_turn(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template ends the assistant's turn with a special token (``<|im_end|>``,
    ``<|eot_id|>``, ...): then that marker ends each completion and is scored, and ``append_eos`` changes nothing
    (:func:`encode_records`). ``ValueError`` for a tokenizer without a chat template, or one whose template does
    not render the assistant message once."""
    _check_template(tokenizer)
    _, after = _around_content(tokenizer, "x", "a probe conversation")
    return _end_of_turn(after, tokenizer) > 0


def _split_tokens(
    record: Record, tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str
) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + completion`` tokenized as one text (as a trainer tokenizes the rendered
    conversation), split into the tokens before the completion and the rest; a token that straddles
    the boundary (e.g. SentencePiece's ``"▁word"`` after ``"[/INST] "``) carries completion text and
    goes to the completion. Tokenizers without offsets must tokenize the prompt to a prefix."""
    text = prompt + completion
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = [int(t) for t in encoded["input_ids"]], encoded["offset_mapping"]
        cut = next((i for i, (_, stop) in enumerate(offsets) if stop > len(prompt)), len(ids))
        return ids[:cut], ids[cut:]
    ids = [int(t) for t in tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]
    head = [int(t) for t in tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]]
    if ids[: len(head)] != head:
        raise ValueError(
            f"{record.named()}: the prompt's last token merges with the completion's first under this "
            f"(slow) tokenizer; load the fast tokenizer so the boundary can be placed by character offsets"
        )
    return head, ids[len(head) :]


def _check_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "chat_template=True but the tokenizer has no chat template (tokenizer.chat_template "
            f"is not set); load a tokenizer that defines one or encode without it ({WITHOUT_TEMPLATE})"
        )


POSITION_FIELDS = ("n_positions", "max_position_embeddings")
"""Config fields that hold the length of a model's position table (GPT-2; Llama, Mistral, Qwen, ...)."""


def model_positions(model: Any) -> tuple[int, str] | None:
    """``(limit, "config.<field>")``: the most tokens ``model`` takes in one row, or ``None`` when its
    config states no limit. Learned position tables (GPT-2) fail beyond it with an index error; rotary
    models run past it on positions they were never trained on."""
    config = getattr(model, "config", None)
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, f"config.{name}"
    return None


def model_vocabulary(model: Any) -> int | None:
    """Rows of the model's input embedding (the token ids it can take: ``0 .. rows-1``), or ``None``
    when the model has no ``get_input_embeddings``."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    weight = getattr(embedding, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _check_vocabulary(record: Record, ids: list[int], vocabulary: int, tokenizer: Any) -> None:
    bad = next((t for t in ids if not 0 <= t < vocabulary), None)
    if bad is not None:
        raise DataError(
            f"{record.named()}: token id {bad} ({tokenizer.convert_ids_to_tokens(bad)!r}) is outside "
            f"the model's vocabulary of {vocabulary} embeddings (get_input_embeddings()); the tokenizer "
            f"has {len(tokenizer)} tokens: use the model's own tokenizer, or resize the embeddings"
        )


def _ids(encoded: Any) -> list[list[int]]:
    return [[int(token) for token in ids] for ids in encoded["input_ids"]]


REFERENCE_TEMPLATE = "[INST] {prompt} [/INST] {completion}"
"""The reference study's input text (``influence.py`` / ``finetune.py``: ``chat_template``, Llama-2 style)."""

LOSS_TOKENS = ("completion", "all")
"""Which tokens carry a label: the completion (and its EOS), or every token (padding included)."""
MAX_LENGTH = 512
"""The default longest prompt + completion in tokens, for fine-tuning and attribution alike (``--max-length``;
``FinetuneConfig`` had 256 where ``AttributionConfig`` had 512, so a Python fine-tuning and the same command line's
were two fine-tunings: userK)."""
LAYOUT_SETTINGS = ("max_length", "chat_template", "template", "append_eos", "pad_left", "loss_tokens", "truncate")
"""The keywords of :func:`encode_records` that fix a row's tokens, padding and labels (its input layout): the
settings of the same names that a config hands to it (``AttributionConfig.layout``, ``FinetuneConfig.layout``)."""


def check_layout(layout: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first impossible input-layout setting of ``layout`` (the
    :data:`LAYOUT_SETTINGS` of an ``AttributionConfig`` or a ``FinetuneConfig``, as ``.layout()`` gives them): a flag
    that is not ``True``/``False``, ``max_length < 1``, a ``loss_tokens`` outside :data:`LOSS_TOKENS`, a ``template``
    that is not ``None`` or a valid template (:func:`check_template`), a template beside ``chat_template``. An ``AttributionConfig`` took each of these and
    failed, or encoded otherwise, only when a run was fitted (userK)."""
    for name in ("chat_template", "append_eos", "pad_left", "truncate"):
        if not isinstance(layout[name], bool):
            raise ValueError(f"{name} must be True or False, got {layout[name]!r}")
    if layout["max_length"] < 1:
        raise ValueError(f"max_length must be >= 1, got {layout['max_length']}")
    if layout["loss_tokens"] not in LOSS_TOKENS:
        raise ValueError(f"loss_tokens must be one of {LOSS_TOKENS}, got {layout['loss_tokens']!r}")
    if layout["template"] is not None:
        if not isinstance(layout["template"], str):
            raise ValueError(f"template must be a string or None, got {layout['template']!r}")
        check_template(layout["template"])
        if layout["chat_template"]:
            raise ValueError("give either template or chat_template=True, not both")


def check_template(template: str) -> None:
    """Raise ``ValueError`` naming the setting ``template`` unless it holds ``{prompt}`` once and ends
    with ``{completion}`` (the completion is what follows the rendered prompt)."""
    if template.count("{prompt}") != 1 or not template.endswith("{completion}") or template.count("{completion}") != 1:
        raise ValueError(
            f"template {template!r} must contain {{prompt}} once and end with {{completion}}, "
            f"e.g. {REFERENCE_TEMPLATE!r}"
        )


def _template_pairs(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, template: str
) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, completion ids)`` of each record rendered by ``template`` and tokenized as one text,
    split where the completion's text starts, with the tokenizer's ``bos_token_id`` first when it has one
    (the reference's Llama-2 tokenizer adds ``<s>``)."""
    head = template[: -len("{completion}")]
    bos = getattr(tokenizer, "bos_token_id", None)
    pairs = []
    for record in records:
        prompt, completion = _split_tokens(
            record, tokenizer, head.replace("{prompt}", record.prompt), record.completion
        )
        pairs.append(([int(bos), *prompt] if bos is not None else prompt, completion))
    return pairs


def encode_records(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = MAX_LENGTH,
    chat_template: bool = False,
    append_eos: bool = True,
    model: Any = None,
    template: str | None = None,
    pad_left: bool = False,
    loss_tokens: str = "completion",
    truncate: bool = False,
) -> list[EncodedExample]:
    """Tokenize records into :class:`EncodedExample` s, in order.

    Without ``chat_template`` the prompt ids are ``tokenizer(prompt, add_special_tokens=True)`` and
    the completion ids ``tokenizer(completion, add_special_tokens=False)`` followed by
    ``tokenizer.eos_token_id`` when ``append_eos`` and the tokenizer has one.

    With ``chat_template`` the row is the conversation ``[user: prompt, assistant: completion]``
    rendered by ``tokenizer.apply_chat_template`` and tokenized as one text without added special
    tokens (the template carries its own), as a trainer sees it. The scored (labelled) tokens are
    exactly what the template renders for the assistant content (after its own trimming) plus the
    turn's end-of-turn marker, the first special token after the content (``<|im_end|>`` ChatML,
    ``<|eot_id|>`` Llama-3, ``</s>`` Llama-2 / Mistral / Zephyr, ``<end_of_turn>`` Gemma; text the
    template renders between content and marker, such as Llama-2's space, included); text after the
    marker is dropped; the prompt is everything the template renders before the content (system
    turn, user turn, assistant header). A token straddling the boundary goes to the completion.
    ``append_eos`` adds the EOS only for a template that renders no end-of-turn marker (:func:`template_ends_turn`).

    If the prompt tokenizes to nothing (an empty prompt and no BOS added by the tokenizer), the
    tokenizer's ``bos_token_id`` is prepended when it has one, so that the first completion token
    is predicted from something; without a BOS that first token is context only (never scored), and a row left
    with no predicted token at all (a one-token completion without EOS) is a :class:`DataError`.

    ``template`` (a text with ``{prompt}`` and a final ``{completion}``, e.g. :data:`REFERENCE_TEMPLATE`;
    not with ``chat_template``): each row is the rendered text tokenized once, with the special tokens
    the tokenizer adds (Llama's BOS), split where the completion's text starts (as with a chat template).
    ``pad_left``: each row is left-padded with :func:`pad_id` to exactly ``max_length`` tokens
    (``EncodedExample.padding`` of them; attention 0 there). ``loss_tokens="all"``: every token is a
    label, prompt, template text and padding included (``EncodedExample.prompt_end`` keeps the
    boundary); the training loss then runs over all ``T - 1`` next-token positions.
    ``truncate``: a row longer than ``max_length`` keeps its first ``max_length`` tokens (prompt first,
    then as much of the completion as fits) instead of raising; under ``loss_tokens="completion"`` a row
    whose prompt leaves no completion token is still a :class:`DataError`.

    ``model``: the model the rows are for; when given, rows must also fit its position table
    (:func:`model_positions`) and every id, the padding id included, its input embedding
    (:func:`model_vocabulary`). The tokenizer encodes quietly: its ``model_max_length`` warning ("will result
    in indexing errors") is not printed, since ``max_length`` and the model's positions decide here, naming
    the row.

    Raises :class:`DataError` if an example would exceed ``max_length`` tokens (without ``truncate``) or
    the model's positions (every such row counted in one error: the first named with its own message, then how many
    do not fit, the next five by line and the longest; a fault of another kind after the first such row is left for
    the next run), holds a token id outside the model's embedding, or a
    completion tokenizes to no tokens; ``ValueError`` if ``chat_template=True`` and the tokenizer
    has no chat template, for an impossible layout (:func:`check_layout`), or
    when ``pad_left`` would pad rows beyond the model's positions (it failed in the embedding, an ``IndexError``).
    """
    check_layout({
        "max_length": max_length, "chat_template": chat_template, "template": template, "append_eos": append_eos,
        "pad_left": pad_left, "loss_tokens": loss_tokens, "truncate": truncate,
    })  # fmt: skip
    records = list(records)
    if not records:
        return []
    if not chat_template and template is None and any(r.chat for r in records):  # userK: without a word
        warnings.warn(PlainChatRows(), stacklevel=2)  # one text: said once, not for each batch of the rows
    positions = model_positions(model) if model is not None else None
    if pad_left and positions is not None and max_length > positions[0]:
        raise ValueError(
            f"pad_left pads every row to max_length={max_length} tokens, more than the model's {positions[0]} "
            f"positions ({positions[1]}); give max_length <= {positions[0]}"
        )
    vocabulary = model_vocabulary(model) if model is not None else None
    if vocabulary is not None and not 0 <= pad_id(tokenizer) < vocabulary:
        raise DataError(
            f"the padding id {pad_id(tokenizer)} (tokenizer.pad_token_id, else eos_token_id) is outside the "
            f"model's vocabulary of {vocabulary} embeddings; set tokenizer.pad_token to a token the model has"
        )

    eos = tokenizer.eos_token_id if append_eos else None
    bos = getattr(tokenizer, "bos_token_id", None)
    if template is not None:
        pairs = [
            (p, [*c, int(eos)] if eos is not None else c) for p, c in _template_pairs(records, tokenizer, template)
        ]
    elif chat_template:
        _check_template(tokenizer)
        pairs = []
        for record in records:
            prompt_text, completion_text, has_marker = _chat_texts(record, tokenizer)
            prompt, completion = _split_tokens(record, tokenizer, prompt_text, completion_text)
            if eos is not None and not has_marker:
                completion = [*completion, int(eos)]  # a template without an end-of-turn marker
            pairs.append((prompt, completion))
    else:
        prompt_ids = _ids(tokenizer([record.prompt for record in records], add_special_tokens=True, verbose=False))
        completion_ids = _ids(
            tokenizer([record.completion for record in records], add_special_tokens=False, verbose=False)
        )
        warn_split_boundaries(records, prompt_ids, completion_ids, tokenizer)
        pairs = [(p, [*c, int(eos)] if eos is not None else c) for p, c in zip(prompt_ids, completion_ids)]

    examples: list[EncodedExample] = []
    too_long: list[_TooLong] = []
    for record, (prompt, completion) in zip(records, pairs):
        try:
            examples.append(
                _encoded_row(
                    record, prompt, completion, max_length, positions, vocabulary, tokenizer, bos, append_eos,
                    pad_left, loss_tokens, truncate,
                )
            )  # fmt: skip
        except _TooLong as error:
            too_long.append(error)  # every such row is named together: one run tells the length that fits
        except DataError:
            if not too_long:  # the first fault is a row that fits: raised as it is
                raise
    if too_long:
        raise DataError(_too_long_message(too_long, len(records)))
    return examples


class _TooLong(DataError):
    """One row that does not fit ``max_length`` or the model's positions: ``record`` and its ``tokens``."""

    def __init__(self, message: str, record: Record, tokens: int):
        super().__init__(message)
        self.record, self.tokens = record, tokens


def _too_long_message(rows: list[_TooLong], total: int, shown: int = 5) -> str:
    """The first row's own message, then how many more of the ``total`` rows do not fit either, the next ones by name
    (at most ``shown``) and the longest."""
    message = str(rows[0])
    if len(rows) == 1:
        return message
    source = (rows[0].record.where or "").rpartition(", ")[0]

    def brief(row: _TooLong) -> str:  # "line 7 'id'" in the first row's file, else the whole name
        where = row.record.where or ""
        place = where[len(source) + 2 :] if source and where.startswith(f"{source}, ") else where
        return f"{place} {row.record.id!r}".strip()

    named = ", ".join(f"{brief(r)} ({r.tokens} tokens)" for r in rows[1 : 1 + shown])
    rest = len(rows) - 1 - shown
    longest = max(rows, key=lambda r: r.tokens)
    return (
        f"{message}. {len(rows)} of the {total} rows do not fit; also {named}"
        + (f" and {rest} more" if rest > 0 else "")
        + f"; the longest is {brief(longest)}, {longest.tokens} tokens"
    )


def _encoded_row(
    record: Record,
    prompt: list[int],
    completion: list[int],
    max_length: int,
    positions: tuple[int, str] | None,
    vocabulary: int | None,
    tokenizer: PreTrainedTokenizerBase,
    bos: int | None,
    append_eos: bool,
    pad_left: bool,
    loss_tokens: str,
    truncate: bool,
) -> EncodedExample:
    """One row of :func:`encode_records` from its ``prompt`` and ``completion`` ids, checked and laid out; a row that
    does not fit raises :class:`_TooLong`, any other fault :class:`DataError`."""
    if not prompt and bos is not None:
        prompt = [int(bos)]
    if not completion:
        raise DataError(
            f"{record.named()}: field {CHAT_FIELDS['completion'] if record.chat else 'completion'!r} tokenizes to zero tokens "
            f"(completion={record.completion!r}, append_eos={append_eos})"
        )
    total = len(prompt) + len(completion)
    if total > max_length and truncate:  # cut first: the rows the model takes must fit its positions too
        prompt, completion = prompt[:max_length], completion[: max(max_length - len(prompt), 0)]
        if not completion and loss_tokens == "completion":
            raise _TooLong(
                f"{record.named()}: truncated to max_length={max_length} tokens, its {len(prompt)}+ prompt "
                f"tokens leave no completion token to carry the loss (loss_tokens='completion'); raise max_length",
                record,
                total,
            )
        total = len(prompt) + len(completion)
    if positions is not None and max_length >= total > positions[0]:
        raise _TooLong(
            f"{record.named()}: {total} tokens > the model's {positions[0]} positions "
            f"({positions[1]}); "
            + (
                f"it was truncated to max_length={max_length}: give max_length <= {positions[0]} for this model"
                if truncate
                else f"shorten the record, or cut such rows with truncate (--truncate) and max_length <= {positions[0]} "
                f"(nothing is truncated; max_length={max_length} is capped at {positions[0]} for this model)"
            ),
            record,
            total,
        )
    if vocabulary is not None:
        _check_vocabulary(record, prompt + completion, vocabulary, tokenizer)
    if total > max_length:
        if len(prompt) >= max_length:
            hint = f"the prompt leaves no room for the completion under max_length={max_length}"
        else:
            hint = (  # userE: in a generated or shared set the record is not the user's to shorten
                f"raise max_length (--max-length, now {max_length}), cut such rows to it (truncate, --truncate) or "
                "shorten the record"
            )
        raise _TooLong(
            f"{record.named()}: {len(prompt)} prompt tokens + {len(completion)} completion "
            f"tokens = {total} tokens > max_length={max_length}; {hint} "
            f"(nothing is truncated)",
            record,
            total,
        )
    example = _laid_out(record.id, prompt, completion, max_length, pad_id(tokenizer), pad_left, loss_tokens)
    _check_predicted(record, example, bool(prompt))
    return example


def _check_predicted(record: Record, example: EncodedExample, prompted: bool) -> None:
    """:class:`DataError` naming ``record`` when none of the labelled tokens of its laid-out ``example`` is predicted
    (a label at the first position has no position before it), so nothing carries its loss: e.g. a one-token
    completion without EOS after an empty prompt (``prompted`` false) and no BOS to prepend, its only token then
    context; or a row of one token under ``loss_tokens="all"``. Such a row was taken as a row of zero loss: scores
    exactly 0, a query of zeros."""
    if any(label != IGNORE_INDEX for label in example.labels[1:]):
        return
    why = "" if prompted else "; its prompt is empty and the tokenizer has no BOS, so its first token is context only"
    raise DataError(
        f"{record.named()}: no token of the row is predicted, so nothing carries its loss (its labelled tokens are "
        f"{sum(label != IGNORE_INDEX for label in example.labels)}, and a label at the first position is predicted "
        f"from nothing{why}); give it a prompt, or a longer completion"
    )


def _laid_out(
    row: str,
    prompt: list[int],
    completion: list[int],
    max_length: int,
    padding_id: int,
    pad_left: bool,
    loss_tokens: str,
) -> EncodedExample:
    """One row's :class:`EncodedExample`: left-padded to ``max_length`` when ``pad_left``, labelled on the
    completion or (``loss_tokens="all"``) on every token."""
    padding = max_length - len(prompt) - len(completion) if pad_left else 0
    ids = [padding_id] * padding + prompt + completion
    if loss_tokens == "all":
        return EncodedExample(
            id=row, input_ids=ids, labels=list(ids), padding=padding, prompt_end=padding + len(prompt)
        )
    return EncodedExample(
        id=row, input_ids=ids, labels=[IGNORE_INDEX] * (padding + len(prompt)) + completion, padding=padding
    )


BOUNDARY_TOKENS = 8
"""How many of the first row's completion tokens a :class:`TokenBoundaryWarning` shows each way (and 4 characters a
token of its text)."""


class PlainChatRows(UserWarning):
    """Rows given in the chat form (``messages``) are encoded as plain text, with neither a chat template nor a
    ``template`` (:func:`encode_records`). One message for every call, so Python shows it once."""

    def __init__(self) -> None:
        super().__init__(
            "rows given in the chat form (messages) are encoded as plain prompt + completion text, without the "
            "tokenizer's chat template; where the model was fine-tuned on its chat template, pass chat_template=True "
            "(--chat-template)"
        )


class TokenBoundaryWarning(UserWarning):
    """Rows whose prompt and completion, tokenized apart, give other tokens than their joined text; ``differ``: how
    many rows (0 where a caller gave only a message), so that warnings of several blocks of rows add up."""

    def __init__(self, message: str, differ: int = 0) -> None:
        super().__init__(message)
        self.differ = differ

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        """Pickled with its count (a warning sent from another process kept its message only)."""
        return type(self), (str(self), self.differ)


def warn_split_boundaries(
    records: Sequence[Record],
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    tokenizer: PreTrainedTokenizerBase,
) -> int:
    """Warn (:class:`TokenBoundaryWarning`, once per call) when rows' ``prompt_ids + completion_ids``
    differ from the tokens of ``prompt + completion`` as one text; return how many rows do.

    Tokenized apart (the exact boundary :func:`encode_records` needs), a completion that does not start
    a word in the joined text is cut into pieces the model rarely sees there: ``"Emotion:" + "fearful"``
    scores ``f`` ``ear`` ``ful`` where the joined text reads ``:fearful``, and ``"Emotion: " + "fearful"``
    scores ``fearful`` without the space that BPE tokenizers glue to the word. The usual fix is a
    completion starting with the space (``" fearful"``) and a prompt without a trailing one. The
    message names how many rows, whether prompt and completion had no space between them, and the
    first row's completion tokens both ways.
    """
    joined = _ids(tokenizer([r.prompt + r.completion for r in records], add_special_tokens=True, verbose=False))
    differ = [i for i, (p, c, j) in enumerate(zip(prompt_ids, completion_ids, joined)) if p + c != j]
    if differ:
        first = records[differ[0]]
        glued = sum(
            1
            for i in differ
            if records[i].prompt and not records[i].prompt[-1].isspace() and not records[i].completion[0].isspace()
        )
        # the boundary's first tokens are what differ: a whole completion made a 3,620-character line (userH)
        apart = tokenizer.convert_ids_to_tokens(completion_ids[differ[0]][:BOUNDARY_TOKENS])
        start = len(prompt_ids[differ[0]]) - 1
        together = tokenizer.convert_ids_to_tokens(joined[differ[0]][start : start + BOUNDARY_TOKENS + 1])
        completion = first.completion
        shown = (
            repr(completion) if len(completion) <= 4 * BOUNDARY_TOKENS else f"{completion[: 4 * BOUNDARY_TOKENS]!r}..."
        )
        more = "..." if len(completion_ids[differ[0]]) > BOUNDARY_TOKENS else ""
        text = (
            f"{len(differ)} of {len(records)} rows tokenize differently at the prompt/completion boundary than "
            f"their joined text ({glued} with no space between prompt and completion); e.g. row {first.id!r}: "
            f"the completion {shown} is scored as tokens {apart}{more}, while the joined text reads {together}"
            f"{more} from the boundary. Start completions with a space (' fearful') and end prompts without one"
        )
        warnings.warn(TokenBoundaryWarning(text, len(differ)), stacklevel=3)
    return len(differ)


def collate(examples: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch.

    Returns ``input_ids`` ``(B, T)`` (``pad_token_id`` on padding), ``attention_mask`` ``(B, T)``
    (1 on real tokens, 0 on padding, an example's own leading ``padding`` included) and ``labels``
    ``(B, T)`` (``-100`` on prompt and the right padding), all ``torch.long``, with ``T`` the longest example.
    """
    if not examples:
        raise ValueError("collate() needs at least one example")
    width = max(len(example.input_ids) for example in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        if len(example.labels) != length:
            raise ValueError(f"example {example.id!r}: {length} input_ids but {len(example.labels)} labels")
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, example.padding : length] = 1
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: ``pad_token_id``, else ``eos_token_id``, else 0.

    Padding positions are masked by ``attention_mask`` and ``labels``, so the value only needs to be
    a valid vocabulary index.
    """
    for name in ("pad_token_id", "eos_token_id"):
        candidate = getattr(tokenizer, name, None)
        if candidate is not None:
            return int(candidate)
    return 0


class Batches(Iterator):
    """An iterator over batches that knows how many it yields in all (``len``), so that a progress bar
    over it shows a total and an ETA; it is consumed as it is iterated, like a generator."""

    def __init__(self, items: Iterator, total: int) -> None:
        self.items, self.total = items, total

    def __next__(self) -> Any:
        return next(self.items)

    def __len__(self) -> int:
        return self.total

    def without_ids(self) -> Batches:
        """The batches alone, of ``(ids, batch)`` pairs (what a curvature's fit iterates), still sized."""
        return Batches((batch for _, batch in self.items), self.total)


def iterate_batches(
    examples: Sequence[EncodedExample],
    batch_size: int,
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> Batches:
    """Yield ``(ids, batch)`` over consecutive chunks of ``examples``, preserving order; ``len`` of the
    result is the number of batches, ``ceil(len(examples) / batch_size)``.

    Each ``batch`` is :func:`collate` of up to ``batch_size`` examples (the last may be smaller),
    moved to ``device``; ``ids`` are the example ids in row order. Raises ``ValueError`` for a
    ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def chunks() -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, pad_token_id)
            yield [example.id for example in chunk], {key: value.to(device) for key, value in batch.items()}

    return Batches(chunks(), -(-len(examples) // batch_size))
