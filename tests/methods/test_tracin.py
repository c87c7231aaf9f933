"""TracIn over the checkpoints of a real (tiny) LoRA fine-tuning run, and gradient cosine similarity.

The hand side loads each checkpoint with peft directly, reads its learning rate from the JSON file,
and takes per-example gradients of the LoRA weights with plain autograd, one unpadded example at a
time, in float64 sums.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from wherefrom.core.encoding import collate, encode_records, pad_id
from wherefrom.core.task import per_example_loss
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.methods.tracin import TracIn, finetune_checkpoints, tracin_scores
from wherefrom.models.finetune import FinetuneConfig, finetune
from wherefrom.models.loading import load_model
from wherefrom.models.tiny import save_tiny
from wherefrom.studies.generated import rule_identification

MAX_LENGTH = 128


def lora_gradients(model, examples, pad: int) -> dict[str, torch.Tensor]:
    """``{module name: (n, P) float64}`` per-example gradients of every LoRA weight, by autograd."""
    params = {n[: -len(".weight")]: p for n, p in model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    rows = []
    for example in examples:
        batch = collate([example], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        grads = torch.autograd.grad(per_example_loss(logits, batch["labels"]).sum(), list(params.values()))
        rows.append([g.detach().double().flatten() for g in grads])
    return {name: torch.stack([r[i] for r in rows]) for i, name in enumerate(params)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracin")
    base_dir = save_tiny(root / "base")
    loaded = load_model(base_dir, device="cpu")
    tokenizer = loaded.tokenizer
    train, queries = rule_identification(n_train=16, n_test=3, seed=0)
    config = FinetuneConfig(epochs=2, learning_rate=2e-2, batch_size=8, max_length=MAX_LENGTH, seed=0)
    result = finetune(loaded.model, tokenizer, train, config, root / "run", progress=False)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pad = pad_id(tokenizer)
    train_examples = encode_records(train, tokenizer, MAX_LENGTH)
    query_examples = encode_records(queries, tokenizer, MAX_LENGTH)
    hand = []
    for ckpt in result.checkpoints:
        lr = json.loads((ckpt / "trainer_state.json").read_text())["learning_rate"]
        with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(ckpt)).eval()
        hand.append((lr, lora_gradients(model, query_examples, pad), lora_gradients(model, train_examples, pad), model))
    return base_dir, tokenizer, train, queries, result, hand


def attribution_config(**overrides) -> AttributionConfig:
    return AttributionConfig(**{"strategy": "identity", "max_length": MAX_LENGTH, "batch_size": 8, **overrides})


def test_tracin_equals_hand_sum_over_checkpoints(run):
    base_dir, tokenizer, train, queries, result, hand = run
    assert finetune_checkpoints(result.output_dir) == result.checkpoints and len(hand) == 2
    scores = tracin_scores(base_dir, result.checkpoints, tokenizer, queries, train, attribution_config())
    assert scores.query_ids == [r.id for r in queries] and scores.train_ids == [r.id for r in train]
    expected = {n: sum(lr * q[n] @ g[n].T for lr, q, g, _ in hand) for n in hand[0][1]}
    assert sorted(expected) == sorted(scores.module_names)
    for i, name in enumerate(scores.module_names):
        torch.testing.assert_close(scores.per_module[i].double(), expected[name], rtol=1e-4, atol=1e-6)
    total = sum(expected.values())
    torch.testing.assert_close(scores.total.double(), total, rtol=1e-4, atol=1e-6)
    assert total.abs().max() > 0 and (total > 0).any() and (total < 0).any()

    # The same from in-memory (model, lr) pairs and through the two-phase class.
    in_memory = tracin_scores(
        None, [(model, lr) for lr, _, _, model in hand], tokenizer, queries, train, attribution_config()
    )
    torch.testing.assert_close(in_memory.per_module, scores.per_module, rtol=1e-5, atol=1e-7)
    method = TracIn(base_dir, result.checkpoints, tokenizer, attribution_config(), learning_rates=[1.0, 0.0])
    method.fit(train)
    first_only = method.scores(queries, train).total.double()
    _, q1, g1, _ = hand[0]
    torch.testing.assert_close(first_only, sum(q1[n] @ g1[n].T for n in q1), rtol=1e-4, atol=1e-6)

    # By name, with the LoRA checkpoints applied to a copy of the (base) model handed to make_method.
    from wherefrom.methods.registry import make_method

    named = make_method(
        "tracin",
        load_model(base_dir, device="cpu").model,
        tokenizer,
        attribution_config(),
        checkpoints=result.checkpoints,
    )
    named.fit(train)
    torch.testing.assert_close(named.scores(queries, train).per_module, scores.per_module, rtol=1e-5, atol=1e-7)

    # Handed the fine-tuned model (the final adapter on the base, as a run given --adapter holds it): the
    # checkpoints go on a copy of its base, not on the adapted model (whose wrapped names they did not fit).
    adapted = load_model(base_dir, adapter=result.weights_dir, device="cpu").model
    named = make_method("tracin", adapted, tokenizer, attribution_config(), checkpoints=result.checkpoints)
    named.fit(train)
    torch.testing.assert_close(named.scores(queries, train).per_module, scores.per_module, rtol=1e-5, atol=1e-7)
    assert any("lora_" in name for name, _ in adapted.named_parameters())  # the run's model keeps its adapter


def test_tracin_sign_is_proponent(run):
    """A small SGD step on z_m at a checkpoint lowers L(z_q) exactly when wherefrom's TracIn term there is positive
    (the step is taken along the hand autograd gradient; the term is the library's, its learning rate divided out)."""
    base_dir, tokenizer, train, queries, result, hand = run
    lr, q, g, model = hand[0]
    first = TracIn(base_dir, result.checkpoints, tokenizer, attribution_config(), learning_rates=[lr, 0.0])
    first.fit(train)
    tracin = first.scores(queries, train).total.double() / lr
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.double()
    try:
        params = {n[: -len(".weight")]: p for n, p in model.named_parameters() if "lora_" in n}
        batch = collate(encode_records(queries, tokenizer, MAX_LENGTH), pad_id(tokenizer))

        def query_loss_after(step: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(eps * step[n])
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = per_example_loss(logits, batch["labels"])
                for n, p in params.items():
                    p.sub_(eps * step[n])
            return loss

        for m in range(3):
            descent = {n: -g[n][m].reshape(p.shape) for n, p in params.items()}  # a gradient step on z_m
            eps = 1e-3 / float(torch.cat([s.flatten() for s in descent.values()]).norm())
            # first-order drop of L(z_q) per unit step size
            drop = (query_loss_after(descent, -eps) - query_loss_after(descent, eps)) / (2 * eps)
            term = tracin[:, m]
            # q and g are float32 gradients: a dot product that cancels (a term near 0 among terms near 7) keeps
            # their absolute round-off, so the tolerance scales with the size of the products summed, not with
            # the sum (measured: 7.7e-5 off at a term of 0.025 whose products sum to 2.6 in absolute value)
            scale = sum(q[n].abs() @ g[n][m].abs() for n in q)
            assert ((drop - term).abs() <= 2e-3 * term.abs() + 1e-4 * scale).all(), (drop, term, scale)
            assert (torch.sign(lr * term) == torch.sign(drop)).all()
    finally:
        model.float()
        model.load_state_dict(saved)


def test_gradsim_cosine(run):
    _, tokenizer, train, queries, _, hand = run
    _, q, g, model = hand[-1]
    attributor = Attributor(model, tokenizer, attribution_config(normalize="cosine"))
    scores = attributor.scores(queries, train)
    names = attributor.module_names
    flat_q = torch.cat([q[n] for n in names], dim=1)
    flat_g = torch.cat([g[n] for n in names], dim=1)
    norms = flat_q.norm(dim=1)[:, None] * flat_g.norm(dim=1)[None, :]
    expected = flat_q @ flat_g.T / norms
    assert scores.total.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(scores.total.double(), expected, rtol=1e-4, atol=1e-6)
    for i, n in enumerate(names):  # each module's part: its own dot product over the same two global norms
        torch.testing.assert_close(scores.per_module[i].double(), q[n] @ g[n].T / norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.per_module.sum(0), scores.total)

    # Norms travel with the queries; a plain dict (no norms) falls back to the blocks' own norms.
    ids, pre = attributor.preconditioned_queries(queries)
    plain = attributor.scores_from_gradients(ids, dict(pre), attributor.gradients(train))
    torch.testing.assert_close(plain.total, scores.total, rtol=1e-5, atol=1e-6)
    # Self-similarity of a row is 1.
    self_sim = attributor.scores(train[:3], train[:3]).total
    torch.testing.assert_close(torch.diagonal(self_sim), torch.ones(3), rtol=1e-5, atol=1e-5)

    # TracIn with cosine: sum_k lr_k cos_k.
    cos_tracin = tracin_scores(
        None, [(m, lr) for lr, _, _, m in hand], tokenizer, queries, train, attribution_config(normalize="cosine")
    )
    expected_sum = 0
    for lr, qk, gk, _ in hand:
        fq, fg = torch.cat([qk[n] for n in names], 1), torch.cat([gk[n] for n in names], 1)
        expected_sum = expected_sum + lr * (fq @ fg.T) / (fq.norm(dim=1)[:, None] * fg.norm(dim=1)[None, :])
    torch.testing.assert_close(cos_tracin.total.double(), expected_sum, rtol=1e-4, atol=1e-6)


def test_config_rejects_unknown_normalisation():
    with pytest.raises(ValueError, match="normalize"):
        AttributionConfig(normalize="relative")  # type: ignore[arg-type]


def test_checkpoints_and_learning_rates_are_checked_before_any_model_work(tmp_path):
    """userH: a ``[folder, lr]`` pair from the command line (JSON gives a list) ended in ``Path(list)``'s
    ``TypeError``; ``learning_rates=[nan]`` failed only after every score ("non-finite scores"); a negative rate
    flipped its checkpoint's terms where ``index`` refused it; a folder given twice counted twice. Each is refused,
    naming the checkpoint, when the method is made."""
    from wherefrom.methods.tracin import checked_checkpoints, learning_rate

    one, two = tmp_path / "epoch-1", tmp_path / "epoch-2"
    refused = {
        "tracin checkpoint 0 is [": ([[str(one), 0.01]], None),
        "tracin learning_rates[0]: learning rate nan": ([one], [float("nan")]),
        "tracin learning_rates[1]: learning rate -0.1": ([one, two], [0.1, -0.1]),
        "tracin learning_rates[0]: learning rate True": ([one], [True]),
        "tracin checkpoint 0: learning rate inf": ([(torch.nn.Linear(1, 1), float("inf"))], None),
        "given more than once": ([one, str(tmp_path / "." / "epoch-1")], None),
        "got 1 learning rates for 2 checkpoints": ([one, two], [0.1]),
    }
    for said, (checkpoints, rates) in refused.items():
        with pytest.raises(ValueError) as error:
            TracIn(None, checkpoints, None, learning_rates=rates)
        assert said in str(error.value), (said, str(error.value))
    assert checked_checkpoints([str(one), two], [0, 2.5]) == [one.resolve(), two.resolve()]
    # reviewS: numpy and torch numbers are rates, and learning_rates override a pair's rate (None there)
    import numpy as np

    assert [learning_rate(v, "here") for v in (3, np.float32(0.5), np.int64(0), torch.tensor(0.25))] == [
        3,
        0.5,
        0,
        0.25,
    ]
    linear = torch.nn.Linear(1, 1)
    assert checked_checkpoints([(linear, None)], np.array([1e-4], dtype=np.float32))[0][0] is linear
    for value in ("0.1", torch.tensor([0.1, 0.2])):
        with pytest.raises(ValueError, match="learning rate"):
            learning_rate(value, "here")
    with pytest.raises(FileNotFoundError, match=r"tracin checkpoint .*epoch-1: no such folder"):
        TracIn(None, [one], None).fit([])


def test_checkpoints_tuned_with_another_row_layout_are_warned_of(run):
    """userH: tracin checked the layout of an ``--adapter`` only; its checkpoints, fine-tuned with the EOS appended
    here, were attributed without it (another loss) without a word. Each checkpoint's fine-tuning is checked."""
    from wherefrom.models.finetune import LayoutMismatch

    base_dir, tokenizer, train, _queries, result, _hand = run
    with pytest.warns(LayoutMismatch, match=r"epoch-1 was fine-tuned .*append_eos True there, False here") as said:
        TracIn(base_dir, result.checkpoints, tokenizer, attribution_config(append_eos=False)).fit(train)
    assert len(result.checkpoints) == 2 and len(said) == 1  # reviewS: once per fine-tuning, not per checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutMismatch)
        TracIn(base_dir, result.checkpoints, tokenizer, attribution_config()).fit(train)
