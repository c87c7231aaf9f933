"""Which modules we attribute through, and capture of their inputs and output gradients.

A tracked module has a weight ``W`` that acts on its input ``a`` as ``out = W a (+ b)``. Three kinds
are supported:

* ``nn.Linear`` (weight stored ``(out, in)``), including PEFT LoRA ``lora_A`` / ``lora_B`` layers,
  which are plain ``nn.Linear`` modules inside a ``ModuleDict``;
* Hugging Face ``Conv1D`` (GPT-2), whose weight is stored transposed, ``(in, out)``.

Every gradient wherefrom handles is in the **Linear orientation** ``(out, in + has_bias)``: the
bias, when present and trainable, is an extra input column of ones. :meth:`TrackedModule.to_param_layout`
maps such a matrix back to the module's own ``(weight, bias)`` layout.

Shared parameters: the per-example gradient of a tracked module is built from *its own* calls
(``sum_t g_t a_t^T`` over every call, so a module called several times in one forward pass gets the
sum of its uses, the full gradient of its weight). A parameter that is also used by *another*
module (tied input/output embeddings: ``lm_head.weight is embed_tokens.weight``; two layers sharing
one weight) would get only this module's share, so :func:`select_modules` refuses to track it,
naming both owners.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

try:  # transformers is a hard dependency, but keep tracking usable on bare torch models.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

LORA_PATTERN = re.compile(r"\.lora_[AB]\.")
DEFAULT_EXCLUDE = (r"lm_head", r"embed", r"wte", r"wpe")
LOSS_SCALES = (2.0**8, 1.0)
"""The scales of the objective tried in turn when a tracked output is float16 (``autocast="float16"``, a float16
model): the first whose output gradients are all finite is taken, and divided out in float32 (exactly: powers of
two). Float16's smallest normal number is 6.1e-5 and its smallest subnormal 6.0e-8: unscaled, output gradients
below them lost digits or became 0 (a LoRA ``lora_A`` block of gradients about 1e-8 scored 0, and EK-FAC's scores
moved 27% from float32's on a tiny Llama). Its largest is 65504: the output gradients of a summed token loss reach
1-3 in attention layers, so 2^16 (kronfluence's ``amp_scale``) overflowed on every batch tried (a second backward
pass each); 2^8 leaves a margin of about 100. A batch that overflows even so is taken again unscaled, as
``torch.amp.GradScaler`` backs off, here per batch: the result depends on the batch alone, so a resumed or
distributed pass takes the same scales."""


@dataclass
class TrackedModule:
    """A module whose weight gradient is attributed through.

    ``shape`` is ``(out, in + has_bias)``: the Linear-orientation gradient shape.
    """

    name: str
    module: nn.Module
    is_conv1d: bool
    has_bias: bool

    @property
    def in_features(self) -> int:
        w = self.module.weight
        return w.shape[0] if self.is_conv1d else w.shape[1]

    @property
    def out_features(self) -> int:
        w = self.module.weight
        return w.shape[1] if self.is_conv1d else w.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features + int(self.has_bias))

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this module's gradient covers, weight first."""
        params = [self.module.weight]
        if self.has_bias:
            params.append(self.module.bias)
        return params

    def to_param_layout(self, grad: torch.Tensor) -> list[torch.Tensor]:
        """Split a ``(..., out, in + has_bias)`` matrix into ``[weight, bias?]`` in module layout."""
        weight = grad[..., : self.in_features]
        if self.is_conv1d:
            weight = weight.transpose(-1, -2)
        parts = [weight]
        if self.has_bias:
            parts.append(grad[..., self.in_features])
        return parts

    def from_param_layout(self, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
        """Inverse of :meth:`to_param_layout`: ``(out, in + has_bias)``."""
        w = weight_grad.transpose(-1, -2) if self.is_conv1d else weight_grad
        if self.has_bias:
            assert bias_grad is not None
            w = torch.cat([w, bias_grad.unsqueeze(-1)], dim=-1)
        return w


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer wherefrom tracks (and LoRA wraps): ``nn.Linear`` or transformers'
    ``Conv1D`` (GPT-2's, weight stored ``(in, out)``)."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output layer (its ``get_output_embeddings()``: the vocabulary projection), or ``None`` when it
    has none or does not say."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): [qualified names]}`` over every distinct module that holds the parameter.

    A module registered under several names counts once (its calls are all captured by one hook);
    a list of two or more names means the parameter is shared (tied) between different modules.
    """
    owners: dict[int, list[str]] = {}
    seen: set[tuple[int, int, str]] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            key = (id(param), id(module), param_name)
            if key in seen:
                continue
            seen.add(key)
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    return owners


def check_unshared(model: nn.Module, tracked: Sequence[TrackedModule]) -> None:
    """Raise ``ValueError`` if a tracked module's weight or bias is also a parameter of another module.

    The hook-based gradient of the tracked module would miss the other module's use of the shared
    parameter (e.g. the embedding lookup of a tied ``lm_head.weight``), so its scores would be wrong.
    """
    owners = parameter_owners(model)
    ties = [names for m in tracked for p in m.parameters() if len(names := owners.get(id(p), [])) > 1]
    if ties:
        described = "; ".join(" is ".join(names) for names in ties[:5])
        raise ValueError(
            f"cannot track a parameter that another module also uses: {described} (tied weights, e.g. "
            "tie_word_embeddings=True). Per-example gradients come from each tracked module's own inputs and "
            "output gradients, so the other use would be missing from the gradient. Exclude the module (lm_head "
            "and embeddings are excluded by default) or untie the weights before attributing"
        )


def name_patterns(value: str | Sequence[str] | None, setting: str) -> list[str] | None:
    """``include``/``exclude`` (named ``setting`` in errors) as a list of regular expressions: one string is one
    pattern (it was iterated character by character: ``include="q_proj"`` selected every module whose name holds
    a ``q``, ``_``, ``p``, ...), ``None`` stays ``None``. ``ValueError`` naming ``setting`` for anything else than a
    string or a list/tuple of strings, and for a pattern that is not a valid regular expression."""
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{setting} must be a regular expression or a list of them, got {value!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{setting}: {pattern!r} is not a valid regular expression ({error})") from None
    return list(patterns)


class UntrainedSelection(UserWarning):
    """:func:`select_modules`' default chose linear layers a PEFT adapter leaves frozen (the adapter has no LoRA
    linear layer: IA3, prompt tuning, LoRA on embeddings only)."""


def select_modules(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[TrackedModule]:
    """Modules to track, in ``named_modules`` order.

    ``include``/``exclude`` are regular expressions searched in the module's qualified name (one string is one
    pattern: :func:`name_patterns`).
    Default: if the model has LoRA layers, their ``lora_A``/``lora_B`` Linear modules (the trained
    parameters); otherwise every ``nn.Linear``/``Conv1D`` except the LM head and embeddings (on a PEFT model whose
    adapter has no LoRA linear layer, with an :class:`UntrainedSelection` warning).
    Biases are tracked when present, unless frozen beside a trainable weight (a fine-tuning that trained the
    weights alone); a module frozen whole is tracked with its bias, as when it is trainable. Raises
    ``ValueError`` when nothing matches, and when a chosen module's parameter is shared with another module
    (:func:`check_unshared`).
    """
    include, exclude = name_patterns(include, "include"), name_patterns(exclude, "exclude")
    candidates = [(n, m) for n, m in model.named_modules() if is_linear(m)]
    if include is None:
        lora = [(n, m) for n, m in candidates if LORA_PATTERN.search(n + ".")]
        chosen = lora or [(n, m) for n, m in candidates if not any(re.search(p, n) for p in DEFAULT_EXCLUDE)]
        adapters = getattr(model, "peft_config", None)
        if not lora and adapters:  # userK: an adapter made elsewhere (IA3, LoRA on embeddings) was left unsaid
            kinds = sorted({str(getattr(c, "peft_type", type(c).__name__)).split(".")[-1] for c in adapters.values()})
            warnings.warn(
                f"the model's PEFT adapter ({', '.join(kinds)}) has no LoRA linear layer, so the default selection "
                "is the base model's linear layers, which the adapter leaves frozen: the scores attribute weights "
                "the fine-tuning did not train; name the modules to track with include (--include)",
                UntrainedSelection,
                stacklevel=2,
            )
    else:
        chosen = [(n, m) for n, m in candidates if any(re.search(p, n) for p in include)]
    if exclude:
        chosen = [(n, m) for n, m in chosen if not any(re.search(p, n) for p in exclude)]
    if not chosen:
        raise ValueError(
            f"no Linear/Conv1D module matches include={include} exclude={exclude}; "
            f"available: {[n for n, _ in candidates][:20]}{' ...' if len(candidates) > 20 else ''}"
        )
    tracked = []
    for name, module in chosen:
        is_conv1d = bool(Conv1D) and isinstance(module, Conv1D)
        bias = getattr(module, "bias", None)
        # a bias frozen beside a trainable weight was not trained: left out; frozen with its weight (a model frozen
        # whole, for inference or by PEFT) it is tracked as the weight is (it was dropped: scores changed by
        # 0.24 relative on Qwen2's q/k/v once the model was frozen)
        trained = bias is not None and (bias.requires_grad or not module.weight.requires_grad)
        tracked.append(TrackedModule(name, module, is_conv1d, trained))
    check_unshared(model, tracked)
    return tracked


def selection_signature(modules: Sequence[TrackedModule]) -> list[list]:
    """JSON-friendly description of a selection: ``[[name, out, in_with_bias], ...]``."""
    return [[m.name, *m.shape] for m in modules]


@dataclass
class _Calls:
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


class Capture:
    """Collects, during one forward pass, each tracked module's input and (graph-attached) output."""

    def __init__(self, modules: Sequence[TrackedModule]):
        self.modules = list(modules)
        self.calls: dict[str, _Calls] = {m.name: _Calls() for m in self.modules}

    def _hook(self, tracked: TrackedModule):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            a = args[0].detach()
            if tracked.has_bias:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            self.calls[tracked.name].inputs.append(a)
            self.calls[tracked.name].outputs.append(output)

        return hook

    def output_gradients(
        self, objective: torch.Tensor, retain_graph: bool = False
    ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Backpropagate a scalar ``objective``; return ``{name: [(a, g), ...]}`` per call.

        ``retain_graph``: keep the forward graph for another objective of the same pass.

        ``a``: ``(B, T, in + has_bias)`` (or ``(B, in)`` for 2-D inputs); ``g = d objective / d out``,
        ``(B, T, out)``, in float32 where ``out`` is float16 (taken with the objective scaled by one of
        :data:`LOSS_SCALES`; the graph is kept for the unscaled pass until the scaled one is found finite). Only the
        paths to tracked outputs are differentiated; no ``.grad`` is written. Unless ``retain_graph``, the outputs
        are let go, so the graph is freed with the objective.
        Raises ``ValueError`` naming the tracked modules the forward pass did not call (without a call there is no
        gradient: a bare ``torch.cat`` error followed).
        """
        idle = [m.name for m in self.modules if not self.calls[m.name].outputs]
        if idle:
            raise ValueError(
                f"tracked module(s) {idle[:5]}{' ...' if len(idle) > 5 else ''} never ran in the forward pass "
                f"({len(idle)} of {len(self.modules)} tracked): they have no gradient to attribute with (e.g. the LoRA "
                "layers of an adapter that is loaded but not active, or a layer the model holds but does not call); "
                "leave them out of the module selection (include/exclude)"
            )
        names, outputs = [], []
        for m in self.modules:
            for out in self.calls[m.name].outputs:
                if not out.requires_grad:
                    raise RuntimeError(
                        f"output of tracked module {m.name!r} does not require grad; "
                        + (
                            "the pass ran under torch.inference_mode(), which records no gradient: call outside it"
                            if out.is_inference()
                            else "its weight must have requires_grad=True"
                        )
                    )
                names.append(m.name)
                outputs.append(out)
        if not outputs:
            raise RuntimeError("no tracked module ran in the forward pass")
        scales = LOSS_SCALES if any(out.dtype == torch.float16 for out in outputs) else (1.0,)
        for k, scale in enumerate(scales):
            last = k == len(scales) - 1
            scaled = objective if scale == 1.0 else objective * scale
            grads = torch.autograd.grad(scaled, outputs, allow_unused=True, retain_graph=retain_graph or not last)
            if last or _all_finite(grads):
                break
        grads = [torch.zeros_like(out) if g is None else g.detach() for out, g in zip(outputs, grads)]
        if len(scales) > 1:
            grads = [g.float() / scale for g in grads]
        if not retain_graph:
            for m in self.modules:
                self.calls[m.name].outputs.clear()
        del outputs
        result: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m.name: [] for m in self.modules}
        counters = {m.name: 0 for m in self.modules}
        for name, g in zip(names, grads):
            a = self.calls[name].inputs[counters[name]]
            counters[name] += 1
            result[name].append((a, g))
        return result


def _all_finite(tensors: Sequence[torch.Tensor | None]) -> bool:
    checks = [torch.isfinite(t).all() for t in tensors if t is not None]
    return not checks or bool(torch.stack(checks).all())  # one device sync


@contextmanager
def capturing(modules: Sequence[TrackedModule], model: nn.Module | None = None) -> Iterator[Capture]:
    """Context in which forward passes record tracked inputs/outputs; tracked weights require grad.

    With ``model`` given, its other parameters are frozen inside the context, so the forward pass
    keeps no activations for layers below the lowest tracked module (less memory and time).
    """
    capture = Capture(modules)
    handles = []
    tracked = {id(p) for m in modules for p in m.parameters()}
    others = [p for p in model.parameters() if id(p) not in tracked] if model is not None else []
    previous: list[tuple[nn.Parameter, bool]] = [(p, p.requires_grad) for p in others]
    for p in others:
        p.requires_grad_(False)
    for m in modules:
        for p in m.parameters():
            previous.append((p, p.requires_grad))
            p.requires_grad_(True)
        handles.append(m.module.register_forward_hook(capture._hook(m)))
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()
        for p, flag in previous:
            p.requires_grad_(flag)
