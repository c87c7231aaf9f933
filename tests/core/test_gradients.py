"""Per-example gradients from hooks equal autograd, one example at a time, with padding present."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_model
from wherefrom.core.encoding import collate, pad_id
from wherefrom.core.gradients import flatten_blocks, shared_token_factors, split_rows, token_factors
from wherefrom.engine.api import AttributionConfig, Attributor


def autograd_gradient(model, modules, example, pad: int, query: bool = False) -> torch.Tensor:
    """Flat gradient of one unpadded example's summed loss (or of -f for a query), Linear orientation."""
    from wherefrom.core.task import per_example_loss

    batch = collate([example], pad)
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = per_example_loss(logits, batch["labels"]).sum()
    grads = torch.autograd.grad(loss, params)
    flat, i = [], 0
    for m in modules:
        weight = grads[i]
        bias = grads[i + 1] if m.has_bias else None
        i += 1 + int(m.has_bias)
        flat.append(m.from_param_layout(weight, bias).flatten())
    return torch.cat(flat)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "lora", "opt"])
def test_identity_equals_autograd_dot_products(kind, tokenizer, train_records, query_records):
    """opt: its fc1/fc2 see ``(B * T, hidden)``; they were taken for B * T rows of one position (scores of
    ``B * T`` rows, or a batch that failed on unequal sizes)."""
    model = build_model(kind)
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="identity", batch_size=5))
    if kind == "lora":
        assert all(".lora_" in m.name for m in attributor.modules)
    if kind == "gpt2":
        assert all(m.is_conv1d for m in attributor.modules) and any(m.has_bias for m in attributor.modules)
    if kind == "opt":
        assert {"fc1", "fc2"} <= {m.name.rsplit(".", 1)[-1] for m in attributor.modules}
    scores = attributor.scores(query_records, train_records)

    pad = pad_id(tokenizer)
    train = torch.stack(
        [autograd_gradient(model, attributor.modules, e, pad) for e in attributor.encode(train_records)]
    )
    queries = torch.stack(
        [autograd_gradient(model, attributor.modules, e, pad) for e in attributor.encode(query_records)]
    )
    expected = queries @ train.T
    assert train.abs().sum() > 0
    # batches of 5 over rows of different lengths: padding is present in every batch
    torch.testing.assert_close(scores.total, expected, rtol=1e-4, atol=1e-5)
    assert scores.train_ids == [r.id for r in train_records]
    assert scores.query_ids == [r.id for r in query_records]


def test_padding_does_not_change_gradients(tokenizer, train_records):
    model = build_model("llama")
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="identity", batch_size=1))
    alone = torch.cat([g[attributor.module_names[0]] for _, g in attributor.gradients(train_records)])
    attributor.config.batch_size = len(train_records)
    padded = torch.cat([g[attributor.module_names[0]] for _, g in attributor.gradients(train_records)])
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-6)


def test_flatten_blocks_and_split_rows_round_trip():
    blocks = {"b": torch.randn(3, 2, 4), "a": torch.randn(3, 5)}
    rows = flatten_blocks(blocks, ["b", "a"])
    assert rows.shape == (3, 13) and torch.equal(rows[:, :8], blocks["b"].reshape(3, 8))
    back = split_rows(rows, [("b", (2, 4)), ("a", (5,))])
    assert all(torch.equal(back[n], blocks[n]) for n in blocks)
    with pytest.raises(ValueError, match=r"rows of length 13 do not split into blocks of sizes \[8, 4\]"):
        split_rows(rows, [("b", (2, 4)), ("a", (4,))])


@pytest.mark.parametrize("kind", ["llama", "lora"])
def test_shared_token_factors_equal_separate_passes(kind, tokenizer, train_records):
    """One forward pass, a backward pass per loss: each loss's factors equal its own pass's, bit for bit."""
    model = build_model(kind)
    attributor = Attributor(model, tokenizer, AttributionConfig(fisher="true", batch_size=6))
    _ids, batch = next(iter(attributor.batches(train_records)))
    sampled, data = attributor.fisher_loss_fn(), attributor.train_loss_fn()
    shared = shared_token_factors(model, attributor.modules, batch, [sampled, data])
    alone = [token_factors(model, attributor.modules, batch, loss) for loss in (attributor.fisher_loss_fn(), data)]
    for (factors, losses), (expected, expected_losses) in zip(shared, alone):
        assert torch.equal(losses, expected_losses)
        for name, f in expected.items():
            assert torch.equal(factors[name].a, f.a) and torch.equal(factors[name].g, f.g)
            assert torch.equal(factors[name].token_mask, f.token_mask)
    name = attributor.module_names[0]
    assert not torch.equal(shared[0][0][name].g, shared[1][0][name].g)  # sampled labels differ from the data's


@pytest.mark.parametrize("kind", ["llama", "lora"])
def test_modules_fed_one_input_share_its_factor(kind, tokenizer, train_records):
    """q/k/v (llama), LoRA's lora_A of q and v: one joined ``a`` tensor, equal to each module's own capture
    (a pass that tracks the module alone); a module with another input has its own."""
    model = build_model(kind)
    attributor = Attributor(model, tokenizer, AttributionConfig(fisher="empirical", batch_size=6))
    _ids, batch = next(iter(attributor.batches(train_records)))
    loss = attributor.train_loss_fn()
    factors, _ = token_factors(model, attributor.modules, batch, loss)
    first = "q_proj.lora_A" if kind == "lora" else "q_proj"
    groups: dict[int, list[str]] = {}
    for name, f in factors.items():
        groups.setdefault(id(f.a), []).append(name)
    shared = next(names for names in groups.values() if any(first in n for n in names))
    assert len(shared) == (2 if kind == "lora" else 3) and len(groups) < len(factors)
    for module in attributor.modules:
        if module.name in shared:
            alone, _ = token_factors(model, [module], batch, loss)
            assert torch.equal(alone[module.name].a, factors[module.name].a)


def test_shared_token_factors_refuse_losses_with_other_model_inputs(tokenizer, train_records):
    model = build_model("llama")
    attributor = Attributor(model, tokenizer, AttributionConfig(batch_size=6))
    _ids, batch = next(iter(attributor.batches(train_records)))

    def shorter(model, batch):  # runs the model on other inputs than the first loss
        return model(input_ids=batch["input_ids"][:, :-1], attention_mask=batch["attention_mask"][:, :-1]).logits.sum(
            (1, 2)
        )

    with pytest.raises(ValueError, match="same arguments"):
        shared_token_factors(model, attributor.modules, batch, [attributor.train_loss_fn(), shorter])


@pytest.mark.parametrize("method", ["ekfac", "gradsim", "trak"])
def test_a_tracked_module_that_never_runs_is_named(method):
    """A selected module the forward pass never calls (a second, inactive LoRA adapter that `include` matches; a
    layer the model holds but does not use) crashed every method with a bare `torch.cat(): expected a non-empty list
    of Tensors`. It is refused naming the module, before any result."""
    from wherefrom.core.data import Record
    from wherefrom.methods.registry import make_method
    from wherefrom.models.tiny import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), hidden=16, intermediate=32, layers=1)
    model.model.unused_head = torch.nn.Linear(16, 4)  # held, never called by forward
    config = AttributionConfig(include=[r"unused_head", r"mlp\.down_proj"])
    rows = [Record("r0", "ab cd:", " ef"), Record("r1", "gh:", " ij kl")]
    with pytest.raises(ValueError, match=r"tracked module\(s\) \['model\.unused_head'\] never ran in the forward"):
        built = make_method(method, model, tokenizer, config)
        built.fit(rows)
        built.scores(rows[:1], rows)


def test_a_module_called_on_rows_that_are_not_the_batchs_is_named(tokenizer, train_records):
    """A tracked module called on a tensor whose leading size is neither the batch's rows nor its rows x positions
    (here: positions first) cannot be split into per-example gradients; it is refused naming the module and the
    shape, not taken for that many rows."""
    model = build_model("llama")
    mlp = model.model.layers[0].mlp
    down = mlp.down_proj

    class PositionsFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down_proj = down

        def forward(self, x):
            return self.down_proj(x.transpose(0, 1)).transpose(0, 1)

    mlp.down_proj = torch.nn.Identity()
    model.model.layers[0].positions_first = PositionsFirst()
    original = mlp.forward
    mlp.forward = lambda x: model.model.layers[0].positions_first(original(x))
    attributor = Attributor(
        model, tokenizer, AttributionConfig(include=["positions_first"], batch_size=5, strategy="identity")
    )
    with pytest.raises(
        ValueError, match=r"module 'model\.layers\.0\.positions_first\.down_proj' was called on inputs of leading size"
    ):
        attributor.scores(train_records[:2], train_records)


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama"])
def test_left_padded_rows_score_as_unpadded_ones(kind, tokenizer, train_records, query_records):
    """`pad_left` (the reference study's layout) on GPT-2, whose positions are absolute: the model read a row's
    tokens at positions shifted by its padding, so scores changed with `max_length` (0.23 relative between 64 and
    128) and matched no unpadded pass. Positions now count from each row's first real token: the scores equal
    the unpadded autograd dot products at any `max_length`, as for OPT and Llama (which never shifted); the
    representations of `repsim` do not depend on `max_length` either."""
    from wherefrom.methods.registry import make_method

    model = build_model(kind)
    modules = Attributor(model, tokenizer, AttributionConfig(strategy="identity")).modules
    pad = pad_id(tokenizer)
    plain = Attributor(model, tokenizer, AttributionConfig(strategy="identity"))
    train = torch.stack([autograd_gradient(model, modules, e, pad) for e in plain.encode(train_records)])
    queries = torch.stack([autograd_gradient(model, modules, e, pad) for e in plain.encode(query_records)])
    represented = []
    for max_length in (32, 96):
        config = AttributionConfig(strategy="identity", batch_size=5, pad_left=True, max_length=max_length)
        scores = Attributor(model, tokenizer, config).scores(query_records, train_records)
        torch.testing.assert_close(scores.total, queries @ train.T, rtol=1e-4, atol=1e-5)
        repsim = make_method("repsim", model, tokenizer, config)
        repsim.fit(train_records)
        represented.append(repsim.scores(query_records, train_records).total)
    torch.testing.assert_close(represented[0], represented[1], rtol=1e-4, atol=1e-6)


def test_left_padding_beyond_the_models_positions_is_named(tokenizer, train_records):
    """`pad_left` pads every row to `max_length`; at the default 512 on a 128-position model it failed in the
    embedding with a bare `IndexError: index out of range in self`."""
    model = build_model("gpt2")
    attributor = Attributor(model, tokenizer, AttributionConfig(pad_left=True))
    with pytest.raises(
        ValueError, match=r"pad_left pads every row to max_length=512 tokens, more than the model's 128"
    ):
        attributor.scores(train_records[:1], train_records)


def test_one_string_is_one_module_pattern(tokenizer):
    """`include="q_proj"` was iterated letter by letter: the patterns q, _, p, r, o, j matched every Linear module,
    the output layer included, silently; `exclude="mlp"` was shown as ['m', 'l', 'p']."""
    from wherefrom.core.tracking import select_modules

    model = build_model("llama")
    one = [m.name for m in select_modules(model, include="q_proj")]
    assert one == [m.name for m in select_modules(model, include=["q_proj"])] and len(one) == 1
    config = AttributionConfig(include="q_proj", exclude="mlp")
    assert config.include == ["q_proj"] and config.exclude == ["mlp"]
    assert [m.name for m in Attributor(model, tokenizer, config).modules] == one
    with pytest.raises(ValueError, match=r"include must be a regular expression or a list of them, got 3"):
        AttributionConfig(include=3)


def test_a_peft_adapter_without_lora_linear_layers_is_said_when_base_layers_are_tracked():
    """userK: on an adapter made elsewhere (IA3 here; LoRA on embeddings alike) the default selection fell back to the
    base model's linear layers, which the adapter leaves frozen, without a word. It warns (UntrainedSelection); a LoRA
    adapter's selection and an explicit include do not."""
    import warnings

    from peft import IA3Config, LoraConfig, get_peft_model

    from wherefrom.core.tracking import UntrainedSelection, select_modules
    from wherefrom.models.tiny import tiny_llama

    ia3 = get_peft_model(
        tiny_llama(50), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    with pytest.warns(UntrainedSelection, match=r"adapter \(IA3\) has no LoRA linear layer.*include \(--include\)"):
        chosen = select_modules(ia3)
    assert chosen and not any("ia3" in m.name for m in chosen)
    lora = get_peft_model(tiny_llama(50), LoraConfig(r=2, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedSelection)
        assert all(".lora_" in m.name for m in select_modules(lora))
        assert select_modules(ia3, include="q_proj")


def test_a_model_frozen_whole_scores_as_a_trainable_one(tokenizer, train_records, query_records):
    """`model.requires_grad_(False)` (inference habit, or PEFT's loading) kept every weight tracked (the capture
    switches it on) but dropped every bias: GPT-2's scores changed silently. A bias frozen with its weight is
    tracked as the weight is; one frozen beside a trainable weight (a fine-tuning of the weights alone) is not."""
    model = build_model("gpt2")
    config = AttributionConfig(strategy="identity", batch_size=5)
    trainable = Attributor(model, tokenizer, config)
    expected = trainable.scores(query_records, train_records).total
    assert any(m.has_bias for m in trainable.modules)
    model.requires_grad_(False)
    frozen = Attributor(model, tokenizer, config)
    assert [m.has_bias for m in frozen.modules] == [m.has_bias for m in trainable.modules]
    torch.testing.assert_close(frozen.scores(query_records, train_records).total, expected, rtol=1e-5, atol=1e-6)
    for m in frozen.modules:
        m.module.weight.requires_grad_(True)
    assert not any(m.has_bias for m in Attributor(model, tokenizer, config).modules)


def test_a_module_that_sees_some_tokens_of_one_row_gets_that_rows_gradient(tokenizer, train_records, query_records):
    """An expert of a mixture sees some of the batch's tokens, gathered as ``(n, d)``: with one row per batch
    they are all that row's (they were taken for n rows: a failed batch, or scores of the wrong rows), so the
    scores equal the autograd dot products; with more rows per batch the leading size is refused by name unless
    it happens to be the batch's row count (the README says so)."""
    model = build_model("llama")
    mlp = model.model.layers[0].mlp

    class EveryOtherToken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            chosen = torch.arange(0, flat.shape[0], 2)
            out = torch.zeros(flat.shape[0], self.inner.out_features, dtype=x.dtype)
            return out.index_copy(0, chosen, self.inner(flat[chosen])).reshape(*x.shape[:-1], -1)

    mlp.down_proj = EveryOtherToken(mlp.down_proj)
    attributor = Attributor(
        model, tokenizer, AttributionConfig(strategy="identity", include=["down_proj.inner"], batch_size=1)
    )
    pad = pad_id(tokenizer)
    train = torch.stack(
        [autograd_gradient(model, attributor.modules, e, pad) for e in attributor.encode(train_records)]
    )
    queries = torch.stack(
        [autograd_gradient(model, attributor.modules, e, pad) for e in attributor.encode(query_records)]
    )
    scores = attributor.scores(query_records, train_records)
    torch.testing.assert_close(scores.total, queries @ train.T, rtol=1e-4, atol=1e-5)


def test_numpy_numbers_are_taken_as_python_numbers():
    """`AttributionConfig(damping=np.float32(0.1))` passed the type check, then the fit refused it as an option of
    the wrong kind, and `batch_size=np.int64(4)` made the config unwritable as JSON."""
    import json

    import numpy as np

    config = AttributionConfig(damping=np.float32(0.5), batch_size=np.int64(4), seed=np.int32(3))
    assert (config.damping, config.batch_size, config.seed) == (0.5, 4, 3)
    assert all(type(getattr(config, k)) in (int, float) for k in ("damping", "batch_size", "seed"))
    json.dumps(config.to_dict())
