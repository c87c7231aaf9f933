"""Tests for wherefrom.models.finetune: LoRA on a tiny Llama, full fine-tuning on a tiny GPT-2."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from tests.conftest import make_records
from tests.models.tokenizers import appends_eos, version_1
from wherefrom.core.data import DataError, data_fingerprint
from wherefrom.core.encoding import TokenBoundaryWarning, encode_records, iterate_batches, pad_id
from wherefrom.core.store import OutputExists, record_checksum, recorded_checksums
from wherefrom.core.task import per_example_loss
from wherefrom.models.finetune import FinetuneConfig, FinetuneDiverged, finetune, read_trainer_state
from wherefrom.models.loading import ModelLoadError, Version1TokenizerRecord, load_model, tokenizer_fingerprint
from wherefrom.models.tiny import save_tiny, tiny_gpt2, tiny_llama, tiny_tokenizer
from wherefrom.studies.generated import rule_identification

MAX_LENGTH = 128  # the generated task fits the tiny models' 128 positions


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def records():
    train, _ = rule_identification(n_train=32, n_test=0, seed=0)
    return train


def lora_config(**overrides) -> FinetuneConfig:
    settings = {"epochs": 2, "learning_rate": 2e-2, "batch_size": 8, "max_length": MAX_LENGTH, "seed": 0}
    settings.update(overrides)
    return FinetuneConfig(**settings)


def mean_loss(model, tokenizer, records) -> float:
    examples = encode_records(records, tokenizer, max_length=MAX_LENGTH)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for _, batch in iterate_batches(examples, 16, pad_id(tokenizer)):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits
            total += per_example_loss(logits, batch["labels"], "sum").sum().item()
    return total / len(examples)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer, records):
    out = tmp_path_factory.mktemp("lora") / "run"
    model = tiny_llama(len(tokenizer))
    result = finetune(model, tokenizer, records, lora_config(), out, progress=False)
    return result, out


def test_lora_lowers_training_loss(lora_run, tokenizer, records):
    result, _ = lora_run
    before = mean_loss(tiny_llama(len(tokenizer)), tokenizer, records)
    after = mean_loss(result.model, tokenizer, records)
    assert after < before - 0.5
    assert len(result.epoch_losses) == 2
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert not result.reused and result.is_lora
    assert not result.model.training
    names = [n for n, _ in result.model.named_parameters()]
    assert any("lora_A" in n for n in names) and any("q_proj" in n for n in names)


def test_lora_writes_checkpoints_log_and_adapter(lora_run, records):
    result, out = lora_run
    assert result.output_dir == out
    assert result.weights_dir == out / "adapter"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert result.checkpoints == [out / "checkpoints" / f"epoch-{k}" for k in (1, 2)]
    for k, ckpt in enumerate(result.checkpoints, start=1):
        assert (ckpt / "adapter_model.safetensors").is_file()
        state = read_trainer_state(ckpt)
        assert state["epoch"] == k and state["step"] == 4 * k
        assert state["learning_rate"] == pytest.approx(2e-2)
        assert state["mean_loss"] == pytest.approx(result.epoch_losses[k - 1])

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 9))
    assert [row["epoch"] for row in log] == [1] * 4 + [2] * 4
    assert all(row["lr"] == pytest.approx(2e-2) and row["loss"] > 0 for row in log)
    epoch1 = [i for row in log[:4] for i in row["batch_ids"]]
    assert sorted(epoch1) == sorted(r.id for r in records)  # each example once per epoch
    assert epoch1 != [r.id for r in records]  # shuffled

    saved = json.loads((out / "finetune_config.json").read_text())
    assert saved["config"]["lora_rank"] == 4
    assert saved["config"]["lora_targets"] == ["q_proj", "v_proj"]
    assert saved["data_fingerprint"] == data_fingerprint(records)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_second_call_reuses(lora_run, tokenizer, records):
    first, out = lora_run
    model = tiny_llama(len(tokenizer))
    again = finetune(model, tokenizer, records, lora_config(), out, progress=False)
    assert again.reused
    assert again.epoch_losses == first.epoch_losses
    assert again.checkpoints == first.checkpoints
    assert not again.model.training
    a, b = lora_state(first.model), lora_state(again.model)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_loads_with_load_model(lora_run, tokenizer, records, tmp_path):
    from wherefrom.models.loading import load_model

    result, _ = lora_run
    base = save_tiny(tmp_path / "base", "llama")
    loaded = load_model(base, adapter=result.weights_dir, device="cpu")
    assert mean_loss(loaded.model, tokenizer, records[:8]) == pytest.approx(
        mean_loss(result.model, tokenizer, records[:8]), rel=1e-5
    )


def test_same_seed_gives_identical_weights(lora_run, tokenizer, records, tmp_path):
    first, _ = lora_run
    model = tiny_llama(len(tokenizer))
    other = finetune(model, tokenizer, records, lora_config(), tmp_path / "b", progress=False)
    assert not other.reused
    assert other.epoch_losses == first.epoch_losses
    a, b = lora_state(first.model), lora_state(other.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changed_config_or_data_retrains(tokenizer, records, tmp_path):
    out = tmp_path / "run"
    small = records[:8]
    first = finetune(tiny_llama(len(tokenizer)), tokenizer, small, lora_config(epochs=2), out, progress=False)
    assert len(first.checkpoints) == 2
    with pytest.raises(OutputExists, match=r"overwrite=True"):  # userK: the default replaced it without a word
        finetune(tiny_llama(len(tokenizer)), tokenizer, small, lora_config(epochs=1), out, progress=False)
    assert len(first.checkpoints) == 2 and (out / "checkpoints" / "epoch-2").is_dir()  # kept
    second = finetune(
        tiny_llama(len(tokenizer)), tokenizer, small, lora_config(epochs=1), out, progress=False, overwrite=True
    )
    assert not second.reused
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-1"]  # stale epoch-2 gone
    third = finetune(
        tiny_llama(len(tokenizer)),
        tokenizer,
        records[8:16],
        lora_config(epochs=1),
        out,
        progress=False,
        overwrite=True,
    )
    assert not third.reused  # other data
    fourth = finetune(
        tiny_llama(len(tokenizer), seed=1),
        tokenizer,
        records[8:16],
        lora_config(epochs=1),
        out,
        progress=False,
        overwrite=True,
    )
    assert not fourth.reused  # other base model


def test_a_finished_fine_tuning_with_damaged_weights_is_named_not_loaded(lora_run, tokenizer, records, tmp_path):
    """A final adapter cut short ended every analysis of a bench in PEFT's ``SafetensorError`` traceback (userJ);
    it is named, with the folder to delete, and nothing is trained or removed."""
    _, out = lora_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    weights = copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        ModelLoadError, match=rf"adapter_model\.safetensors: not a complete safetensors file .*{copy}"
    ) as e:
        finetune(tiny_llama(len(tokenizer)), tokenizer, records, lora_config(), copy, progress=False)
    assert "or pass overwrite=True (--overwrite on the command line) to fine-tune again" in str(e.value)
    assert weights.stat().st_size == 100 and sorted(p.name for p in copy.iterdir()) == sorted(
        p.name for p in out.iterdir()
    )
    # reviewT: overwrite=True, which permits replacing the folder's fine-tuning, was refused alike; it trains again
    again = finetune(
        tiny_llama(len(tokenizer)), tokenizer, records, lora_config(), copy, progress=False, overwrite=True
    )
    assert not again.reused and files_of(copy) == files_of(out)


def test_a_damaged_trainer_state_is_named(tmp_path):
    """A checkpoint's ``trainer_state.json`` (TracIn's learning rate) cut short raised a bare JSONDecodeError."""
    (tmp_path / "trainer_state.json").write_text('{"epoch": 1, "learn')
    with pytest.raises(ValueError, match=r"trainer_state\.json is not valid JSON"):
        read_trainer_state(tmp_path)


def test_full_finetune_gpt2(tokenizer, records, tmp_path):
    from wherefrom.models.loading import load_model

    out = tmp_path / "full"
    data = records[:16]
    config = lora_config(lora_rank=None, learning_rate=3e-3, checkpoint_every_epoch=True)
    result = finetune(tiny_gpt2(len(tokenizer)), tokenizer, data, config, out, progress=False)
    assert not result.is_lora and result.weights_dir == out / "model"
    before = mean_loss(tiny_gpt2(len(tokenizer)), tokenizer, data)
    assert mean_loss(result.model, tokenizer, data) < before
    for ckpt in result.checkpoints:
        assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer_config.json").is_file()
        assert (ckpt / "trainer_state.json").is_file()
    loaded = load_model(result.weights_dir, device="cpu")
    assert mean_loss(loaded.model, tokenizer, data) == pytest.approx(mean_loss(result.model, tokenizer, data), rel=1e-5)
    again = finetune(tiny_gpt2(len(tokenizer)), tokenizer, data, config, out, progress=False)
    assert again.reused
    a, b = result.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = out / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # a full fine-tuning's saved model cut short: named too
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a complete safetensors file"):
        finetune(tiny_gpt2(len(tokenizer)), tokenizer, data, config, out, progress=False)


def test_a_full_fine_tuning_is_the_same_whatever_its_unused_lora_settings(tokenizer, records, tmp_path):
    """reviewY: a full fine-tuning records ``lora_alpha``/``lora_targets``/``lora_dropout`` (a preset or a Python
    config sets them), which train nothing there, and an identical rerun with other values trained again (refused as
    other settings with ``overwrite=False``, as the command line runs it). It is reused now, the record kept; a LoRA
    run of another alpha is still another run."""
    data = records[:8]
    full = lora_config(epochs=1, lora_rank=None, learning_rate=3e-3)
    odd = replace(full, lora_alpha=32, lora_dropout=0.1, lora_targets=["c_attn"])
    first = finetune(tiny_gpt2(len(tokenizer)), tokenizer, data, odd, tmp_path / "full", progress=False)
    again = finetune(tiny_gpt2(len(tokenizer)), tokenizer, data, full, tmp_path / "full", progress=False)
    assert again.reused and again.epoch_losses == first.epoch_losses
    saved = json.loads((tmp_path / "full" / "finetune_config.json").read_text())["config"]
    assert (saved["lora_alpha"], saved["lora_dropout"], saved["lora_targets"]) == (32, 0.1, ["c_attn"])
    finetune(tiny_llama(len(tokenizer)), tokenizer, data, lora_config(epochs=1), tmp_path / "lora", progress=False)
    with pytest.raises(OutputExists, match="lora_alpha"):
        finetune(
            tiny_llama(len(tokenizer)),
            tokenizer,
            data,
            lora_config(epochs=1, lora_alpha=32),
            tmp_path / "lora",
            progress=False,
            overwrite=False,
        )


def test_bad_inputs(tokenizer, records, tmp_path):
    from wherefrom.models.tiny import with_lora

    with pytest.raises(DataError, match="max_length"):
        finetune(
            tiny_llama(len(tokenizer)),
            tokenizer,
            records[:2],
            lora_config(max_length=16),
            tmp_path / "long",
            progress=False,
        )
    assert not (tmp_path / "long" / "finetune_config.json").exists()
    with pytest.raises(ValueError, match="PeftModel"):
        finetune(
            with_lora(tiny_llama(len(tokenizer))),
            tokenizer,
            records[:2],
            lora_config(),
            tmp_path / "peft",
            progress=False,
        )
    with pytest.raises(ValueError, match="fine-tuning rows: no rows"):
        finetune(tiny_llama(len(tokenizer)), tokenizer, [], lora_config(), tmp_path / "e", progress=False)
    with pytest.raises(ValueError, match="epochs"):
        finetune(
            tiny_llama(len(tokenizer)), tokenizer, records[:2], lora_config(epochs=0), tmp_path / "z", progress=False
        )


def test_reference_settings_linear_decay_dropout_and_layout(tokenizer, records, tmp_path):
    """The reference study's fine-tuning settings: the rate falls linearly to 0 over all steps (logged per
    step), LoRA dropout reaches the adapter, and the left-padded all-token layout trains; a default config
    records none of these settings (so runs saved before them still match)."""
    config = lora_config(lr_schedule="linear", lora_dropout=0.1, pad_left=True, loss_tokens="all", append_eos=False)
    result = finetune(tiny_llama(len(tokenizer)), tokenizer, records, config, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = len(log)
    assert steps == 2 * 4
    assert [row["lr"] for row in log] == pytest.approx([2e-2 * (1 - s / steps) for s in range(steps)])
    assert read_trainer_state(result.checkpoints[1])["learning_rate"] == pytest.approx(2e-2 * 0.5)
    dropouts = [m for n, m in result.model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(m.p == 0.1 for m in dropouts)
    saved = json.loads((tmp_path / "run" / "finetune_config.json").read_text())["config"]
    assert saved["lr_schedule"] == "linear" and saved["pad_left"] is True
    assert "lr_schedule" not in lora_config().to_dict() and "template" not in lora_config().to_dict()
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        lora_config(lr_schedule="cosine").validate()


class Interrupted(Exception):
    """Raised in place of a step's loss, as a kill would stop the run there."""


def count_steps(monkeypatch, stop_after: int | None = None) -> dict[str, int]:
    """Count the training steps of the next :func:`finetune` calls (each step computes one loss); with
    ``stop_after``, interrupt the run at the step after that many."""
    import wherefrom.models.finetune as module

    real, calls = module.per_example_loss, {"steps": 0}

    def counting(*args, **kwargs):
        if stop_after is not None and calls["steps"] >= stop_after:
            raise Interrupted
        calls["steps"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "per_example_loss", counting)
    return calls


def files_of(folder) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


RESUMABLE = {
    "lora with dropout and linear decay": (tiny_llama, {"lr_schedule": "linear", "lora_dropout": 0.1}),
    "full gpt2": (tiny_gpt2, {"lora_rank": None, "learning_rate": 3e-3, "weight_decay": 0.01}),
    "lora without checkpoints": (tiny_llama, {"checkpoint_every_epoch": False}),
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_interrupted_run_resumes_after_its_last_epoch_bit_for_bit(
    name, tokenizer, records, tmp_path, monkeypatch, caplog
):
    """A run stopped in its second epoch resumes after epoch 1, is stopped again in its third and resumes after
    epoch 2 (parameters, AdamW's moments, the schedule and the dropout generator restored), trains only epoch 3,
    and leaves the uninterrupted run's bytes: weights, checkpoints, optimizer states, log and config."""
    make, settings = RESUMABLE[name]
    config = lora_config(epochs=3, **settings)  # 32 rows, batch 8: 4 steps an epoch
    clean = finetune(make(len(tokenizer)), tokenizer, records, config, tmp_path / "clean", progress=False)
    out = tmp_path / "killed"
    for stop_after, resumed_after in ((6, None), (5, 1)):  # stopped at steps 7 and 10 of 12
        caplog.clear()
        with caplog.at_level("INFO", logger="wherefrom.models.finetune"):
            interrupt(make, tokenizer, records, config, out, monkeypatch, stop_after)
        assert ("resuming" in caplog.text) == (resumed_after is not None), caplog.text
        assert resumed_after is None or f"after epoch {resumed_after}" in caplog.text
        assert (out / "resume").is_dir() and not (out / "finetune_config.json").exists()
    with monkeypatch.context() as patch:
        steps = count_steps(patch)
        resumed = finetune(make(len(tokenizer)), tokenizer, records, config, out, progress=False)
    assert resumed.resumed_after == 2 and not resumed.reused and steps["steps"] == 4
    assert resumed.epoch_losses == clean.epoch_losses
    assert [c.relative_to(out) for c in resumed.checkpoints] == [
        c.relative_to(tmp_path / "clean") for c in clean.checkpoints
    ]
    assert files_of(out) == files_of(tmp_path / "clean")  # resume/ is gone, nothing else differs
    a, b = clean.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def interrupt(make, tokenizer, records, config, out, monkeypatch, stop_after: int) -> None:
    """Run :func:`finetune` into ``out`` and stop it at the step after ``stop_after`` steps."""
    with monkeypatch.context() as patch:
        count_steps(patch, stop_after=stop_after)
        with pytest.raises(Interrupted):
            finetune(make(len(tokenizer)), tokenizer, records, config, out, progress=False)


def test_a_training_state_of_other_settings_or_damaged_is_not_resumed(
    tokenizer, records, tmp_path, monkeypatch, caplog
):
    """The state of an interrupted run with other settings is refused by name without ``overwrite`` and discarded
    (logged) with it; a damaged newest state falls back to an older intact one (as a kill between writing the
    new state and deleting the old leaves them), and with none intact the run starts again. Each run ends with
    the clean run's bytes."""
    config = lora_config(epochs=3)
    clean = finetune(tiny_llama(len(tokenizer)), tokenizer, records, config, tmp_path / "clean", progress=False)
    expected = files_of(tmp_path / "clean")

    other = tmp_path / "other"
    interrupt(tiny_llama, tokenizer, records, lora_config(epochs=3, learning_rate=1e-2), other, monkeypatch, 5)
    before = files_of(other)
    with pytest.raises(OutputExists, match=r"resume/epoch-1.*config\.learning_rate: recorded 0\.01, now 0\.02"):
        finetune(tiny_llama(len(tokenizer)), tokenizer, records, config, other, progress=False, overwrite=False)
    assert files_of(other) == before  # refused: nothing deleted or written
    with caplog.at_level("WARNING", logger="wherefrom.models.finetune"):
        again = finetune(tiny_llama(len(tokenizer)), tokenizer, records, config, other, progress=False, overwrite=True)
    assert again.resumed_after == 0 and again.epoch_losses == clean.epoch_losses
    assert "config.learning_rate: recorded 0.01, now 0.02" in caplog.text
    assert files_of(other) == expected

    damaged = tmp_path / "damaged"
    interrupt(tiny_llama, tokenizer, records, config, damaged, monkeypatch, 5)  # leaves resume/epoch-1
    older = tmp_path / "epoch-1"
    shutil.copytree(damaged / "resume" / "epoch-1", older)
    interrupt(tiny_llama, tokenizer, records, config, damaged, monkeypatch, 5)  # resumes, leaves resume/epoch-2
    assert sorted(p.name for p in (damaged / "resume").iterdir()) == ["epoch-2"]
    shutil.copytree(older, damaged / "resume" / "epoch-1")
    state = damaged / "resume" / "epoch-2" / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF  # bit rot in the last tensor
    state.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level("INFO", logger="wherefrom.models.finetune"):
        resumed = finetune(tiny_llama(len(tokenizer)), tokenizer, records, config, damaged, progress=False)
    assert resumed.resumed_after == 1 and "epoch-2/state.safetensors" in caplog.text
    assert files_of(damaged) == expected

    rotten = tmp_path / "rotten"
    interrupt(tiny_llama, tokenizer, records, config, rotten, monkeypatch, 5)
    (rotten / "resume" / "epoch-1" / "state.json").write_text("{}")
    fresh = finetune(tiny_llama(len(tokenizer)), tokenizer, records, config, rotten, progress=False)
    assert fresh.resumed_after == 0 and files_of(rotten) == expected


def test_non_finite_losses_survive_a_resume(tokenizer, records, tmp_path, monkeypatch):
    """A diverging run (losses become NaN) resumed after an interruption writes the same log, losses and config
    as the uninterrupted one (the state keeps NaN as NaN, not as null)."""
    config = lora_config(epochs=3, lora_rank=None, learning_rate=1e4)
    clean = finetune(tiny_gpt2(len(tokenizer)), tokenizer, records, config, tmp_path / "clean", progress=False)
    assert any(loss != loss for loss in clean.epoch_losses), "the run did not diverge; the test tests nothing"
    interrupt(tiny_gpt2, tokenizer, records, config, tmp_path / "killed", monkeypatch, 9)
    resumed = finetune(tiny_gpt2(len(tokenizer)), tokenizer, records, config, tmp_path / "killed", progress=False)
    assert resumed.resumed_after == 2
    assert files_of(tmp_path / "killed") == files_of(tmp_path / "clean")
    again = finetune(tiny_gpt2(len(tokenizer)), tokenizer, records, config, tmp_path / "killed", progress=False)
    assert again.reused


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["c_attn", "q_proj"]])
def test_a_lora_target_that_names_no_module_is_refused_before_the_output_folder(tokenizer, records, tmp_path, targets):
    """GPT-2 with the default targets (LLaMA's q_proj/v_proj) gave PEFT's "Target modules ... not found", naming
    neither --lora-target nor GPT-2's modules, and left an empty output folder; a target beside one that matches
    was ignored silently. Each unmatched target is named with the model's linear layers, before anything is made."""
    with pytest.raises(
        ValueError,
        match=r"\['q_proj'(, 'v_proj')?\] .*--lora-target.*gpt2 model.*named c_attn, c_fc, c_proj, lm_head \(",
    ) as error:
        finetune(tiny_gpt2(len(tokenizer)), tokenizer, records[:2], lora_config(lora_targets=targets), tmp_path / "o")
    assert "'c_attn'" not in str(error.value) and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"lora_targets": ["embed_tokens"]},
            r"\['embed_tokens'\] .*not linear layers, e\.g\. model\.embed_tokens \(Embedding\)",
        ),
        ({"lora_targets": ["mlp"]}, r"\['mlp'\] .*not linear layers.*LlamaMLP.*named .*q_proj"),
        ({"lora_rank": 100000}, r"lora_rank 100000 \(--lora-rank\) is above .*: at most \d+"),
        ({"lora_alpha": 0}, r"lora_alpha must be >= 1, got 0"),
        ({"batch_size": 2.5}, r"batch_size must be an integer, got 2\.5"),
        ({"epochs": "2"}, r"epochs must be an integer, got '2'"),
        ({"lora_rank": 2.5}, r"lora_rank must be an integer or None, got 2\.5"),
        ({"lora_rank": False}, r"lora_rank must be an integer or None, got False"),  # was a full fine-tuning
        ({"seed": -1}, r"seed must be >= 0, got -1"),
        ({"learning_rate": True}, r"learning_rate must be a number, got True"),
    ],
)
def test_a_setting_the_model_or_training_cannot_take_is_named_before_the_output_folder(
    tokenizer, records, tmp_path, overrides, message
):
    """userK: LoRA on ``embed_tokens`` trained an adapter attribution never reads, ``mlp`` ended in PEFT's module
    dump, rank 100000 was killed for memory, ``lora_alpha=0`` trained nothing (every epoch's loss the same), and
    wrong types failed inside training, each leaving an empty folder: each is named first, nothing made."""
    with pytest.raises(ValueError, match=message):
        finetune(tiny_llama(len(tokenizer)), tokenizer, records[:2], lora_config(**overrides), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_finetune_names_a_wrong_model_config_or_output_dir(tokenizer, records, tmp_path):
    """userK: a LoadedModel, a dict config and a file as output_dir raised AttributeError or FileExistsError."""
    from wherefrom.models.loading import LoadedModel

    loaded = LoadedModel(tiny_llama(len(tokenizer)), tokenizer, "tiny", "tiny", None, "f", "t")
    with pytest.raises(TypeError, match=r"got LoadedModel: pass its \.model"):
        finetune(loaded, tokenizer, records[:2], lora_config(), tmp_path / "o")
    with pytest.raises(TypeError, match="config must be a FinetuneConfig, got dict"):
        finetune(loaded.model, tokenizer, records[:2], {"epochs": 1}, tmp_path / "o")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        finetune(loaded.model, tokenizer, records[:2], lora_config(), tmp_path / "afile")
    with pytest.raises(ValueError, match=f"afile/o: {tmp_path / 'afile'} is a file, not a folder"):
        finetune(
            loaded.model, tokenizer, records[:2], lora_config(), tmp_path / "afile" / "o"
        )  # was NotADirectoryError
    assert FinetuneConfig(lora_targets="q_proj").lora_targets == ["q_proj"]  # was ['_', 'j', 'o', 'p', 'q', 'r']


def test_lora_rank_0_fine_tunes_every_weight_in_every_command(tmp_path):
    """Every command's help says `--lora-rank 0` fine-tunes every weight; finetune, groundtruth and word-order
    turned 0 into None each on its own, and bench passed it on: refused ("lora_rank must be >= 1 or None, got 0").
    FinetuneConfig takes 0 as None, so bench's fine-tuning is a full one."""
    from wherefrom.studies.bench import BenchConfig

    assert FinetuneConfig(lora_rank=0).lora_rank is None
    settings = BenchConfig(task="rules", out=str(tmp_path), lora_rank=0).finetune_config(0)
    settings.validate()
    assert settings.lora_rank is None


def test_a_tokenizer_that_encodes_otherwise_retrains_and_a_version_1_record_is_reused(tokenizer, records, tmp_path):
    """A fine-tuning is reused only with a tokenizer that encodes as the recorded one did (version 2 of the
    fingerprint; version 1 took one that adds ``<eos>`` for the same); one finished before version 2 (its
    ``finetune_config.json`` holding the version-1 digest) is still reused."""
    out, small = tmp_path / "run", records[:8]
    first = finetune(tiny_llama(len(tokenizer)), tokenizer, small, lora_config(epochs=1), out, progress=False)
    shutil.copytree(out, tmp_path / "old")
    other = appends_eos(tiny_tokenizer())
    assert version_1(other) == version_1(tokenizer)
    with pytest.warns(TokenBoundaryWarning):  # the <eos> it appends is not in the completion's tokens
        retrained = finetune(
            tiny_llama(len(other)), other, small, lora_config(epochs=1), out, progress=False, overwrite=True
        )
    assert not retrained.reused

    config = tmp_path / "old" / "finetune_config.json"
    saved = json.loads(config.read_text())
    saved["tokenizer_fingerprint"] = version_1(tokenizer)
    config.write_text(json.dumps(saved))
    with pytest.warns(Version1TokenizerRecord, match=r"finetune_config\.json records its tokenizer with version 1"):
        again = finetune(
            tiny_llama(len(tokenizer)), tokenizer, small, lora_config(epochs=1), tmp_path / "old", progress=False
        )
    assert again.reused and again.epoch_losses == first.epoch_losses
    assert json.loads(config.read_text())["tokenizer_fingerprint"] == version_1(tokenizer)
    with pytest.warns(Version1TokenizerRecord):  # the record read is of version 1
        trained = finetune(
            tiny_llama(len(tokenizer)),
            tokenizer,
            small,
            lora_config(epochs=2),
            tmp_path / "old",
            progress=False,
            overwrite=True,
        )  # trained anew (other settings): it records version 2
    assert not trained.reused
    assert json.loads(config.read_text())["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)


def test_an_interrupted_run_of_version_1_resumes(tokenizer, records, tmp_path, monkeypatch):
    """A fine-tuning killed before version 2 of the tokenizer fingerprint (its training state's identity holding the
    version-1 digest) resumes after its last epoch, as it did."""
    config, out = lora_config(epochs=2), tmp_path / "killed"
    interrupt(tiny_llama, tokenizer, records, config, out, monkeypatch, stop_after=5)  # stopped in epoch 2
    (state,) = (out / "resume").glob("*/state.json")
    saved = json.loads(state.read_text())
    saved["identity"]["tokenizer_fingerprint"] = version_1(tokenizer)
    state.write_text(json.dumps(saved))
    if state.name in recorded_checksums(state.parent):
        record_checksum(state)  # as the version that wrote it recorded it
    with pytest.warns(Version1TokenizerRecord, match=r"state\.json records its tokenizer with version 1"):
        resumed = finetune(tiny_llama(len(tokenizer)), tokenizer, records, config, out, progress=False)
    assert resumed.resumed_after == 1
    finished = json.loads((out / "finetune_config.json").read_text())
    assert finished["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)  # it trained now: version 2


def test_lora_targets_in_another_order_or_repeated_are_the_same_fine_tuning(tokenizer, records, tmp_path):
    """PEFT adapts the set of modules the targets name, so ``--lora-target v_proj --lora-target q_proj`` trains what
    the default ``q_proj, v_proj`` does; it was another fine-tuning's identity, and retrained."""
    reordered = lora_config(epochs=1, lora_targets=["v_proj", "q_proj", "v_proj"])
    assert reordered.lora_targets == ["q_proj", "v_proj"] and reordered.to_dict() == lora_config(epochs=1).to_dict()
    out, small = tmp_path / "run", records[:4]
    finetune(tiny_llama(len(tokenizer)), tokenizer, small, lora_config(epochs=1), out, progress=False)
    again = finetune(tiny_llama(len(tokenizer)), tokenizer, small, reordered, out, progress=False)
    assert again.reused


def test_a_fine_tuning_whose_loss_turns_non_finite_stops_naming_the_step(tokenizer, records, tmp_path):
    """``--learning-rate inf`` was taken and the fine-tuning ran on with a NaN loss without a word, so the error came
    later, from the scores. A non-finite learning rate is refused by ``validate``; a finite one that diverges says so
    once, at the first non-finite loss (the run goes on as configured: resumed, it equals an uninterrupted one)."""
    for rate in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
            lora_config(learning_rate=rate).validate()
    with pytest.warns(
        FinetuneDiverged, match=r"fine-tuning diverged: the loss of step \d+ \(epoch \d\) is (nan|inf)"
    ) as said:
        finetune(
            tiny_llama(len(tokenizer)),
            tokenizer,
            records[:8],
            lora_config(learning_rate=1e35, epochs=1, batch_size=2),
            tmp_path / "run",
            progress=False,
        )
    assert sum(isinstance(w.message, FinetuneDiverged) for w in said) == 1


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--learning-rate", "inf", "--learning-rate inf: must be a finite number > 0, got inf"),
        ("--learning-rate", "nan", "--learning-rate nan: must be a finite number > 0, got nan"),
        ("--learning-rate", "-1", "--learning-rate -1.0: must be a finite number > 0, got -1.0"),
        ("--weight-decay", "inf", "--weight-decay inf: must be a finite number >= 0, got inf"),
    ],
)
def test_a_non_finite_fine_tuning_number_is_refused_before_any_work(tmp_path, flag, value, said):
    from typer.testing import CliRunner

    from wherefrom.cli import app

    out = tmp_path / "ft"
    result = CliRunner().invoke(
        app, ["finetune", "--train", str(tmp_path / "none.jsonl"), "--out", str(out), flag, value]
    )
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_without_overwrite_a_run_of_the_same_inputs_missing_a_checkpoint_is_trained_again(tmp_path):
    """reviewU: with ``overwrite=False`` (the ``finetune`` command, and ``bench``/``groundtruth`` now) a finished run
    of the same inputs that could not be reused (a checkpoint deleted) was refused with no reason; it is trained
    again (nothing is lost). A record that cannot be read is refused, naming that."""
    model_dir = save_tiny(tmp_path / "base", arch="llama")
    loaded = load_model(model_dir, device="cpu")
    rows = make_records(8, seed=3)
    config = FinetuneConfig(epochs=2, batch_size=4, max_length=64)
    out = tmp_path / "run"
    finetune(loaded.model, loaded.tokenizer, rows, config, out, progress=False)
    shutil.rmtree(out / "checkpoints" / "epoch-1")
    again = finetune(load_model(model_dir, device="cpu").model, loaded.tokenizer, rows, config, out, overwrite=False)
    assert not again.reused and (out / "checkpoints" / "epoch-1").is_dir()
    (out / "finetune_config.json").write_text("{not json")
    with pytest.raises(OutputExists, match=r"finetune_config.json \(its record is unreadable\); pass overwrite=True"):
        finetune(load_model(model_dir, device="cpu").model, loaded.tokenizer, rows, config, out, overwrite=False)


@pytest.mark.parametrize("full", [False, True])
def test_a_fine_tuning_deletes_nothing_it_did_not_make(tokenizer, records, tmp_path, full):
    """userA: `finetune --model proj/model --out proj --full` replaced the base model by the fine-tuned one (the
    user's file beside its weights gone), and a user's own `adapter/` in `--out` was deleted, without --overwrite.
    The base model's folder where the run writes is refused; folders of its names that no fine-tuning recorded are
    refused by name, also with overwrite, and kept. A killed run's folders (a checkpoint's trainer state) are not
    the user's: the rerun clears and trains."""
    config = lora_config(epochs=1, lora_rank=None if full else 4)
    base = save_tiny(tmp_path / "proj" / "model", "llama")
    (base / "MY_NOTES.txt").write_text("keep")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for out, said in (
        (tmp_path / "proj", "is where the fine-tuning writes"),
        (base, "files would mix with the model's"),
    ):
        loaded = load_model(base, device="cpu")
        with pytest.raises(ValueError, match=rf"base model's folder .*{said}"):
            finetune(loaded.model, loaded.tokenizer, records[:8], config, out, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before

    out = tmp_path / "mine"
    for name in ("adapter", "model", "checkpoints"):
        (out / name).mkdir(parents=True)
        (out / name / "mine.txt").write_text(name)
    for overwrite in (False, True):
        with pytest.raises(OutputExists, match=r"mine/adapter, .*mine/model, .*mine/checkpoints would be deleted"):
            finetune(
                tiny_llama(len(tokenizer)), tokenizer, records[:8], config, out, progress=False, overwrite=overwrite
            )
    assert sorted(p.read_text() for p in out.rglob("mine.txt")) == ["adapter", "checkpoints", "model"]
    (out / "checkpoints" / "epoch-1.pt").write_text("the user's own checkpoint")  # reviewZ: no fine-tuning's record
    with pytest.raises(OutputExists, match=r"mine/checkpoints would be deleted"):
        finetune(tiny_llama(len(tokenizer)), tokenizer, records[:8], config, out, progress=False, overwrite=True)
    assert (out / "checkpoints" / "epoch-1.pt").is_file()

    killed = tmp_path / "killed"  # as a run killed after its first epoch's checkpoint leaves it
    finetune(tiny_llama(len(tokenizer)), tokenizer, records[:8], config, killed, progress=False)
    (killed / "finetune_config.json").unlink()
    again = finetune(tiny_llama(len(tokenizer)), tokenizer, records[:8], config, killed, progress=False)
    assert not again.reused and (killed / "finetune_config.json").is_file()
    # reviewY: killed while a rerun cleared the folder (its record first, then the weights and checkpoints)
    (killed / "finetune_config.json").unlink()
    (killed / "checkpoints" / "epoch-1" / "trainer_state.json").unlink()
    cleared = finetune(tiny_llama(len(tokenizer)), tokenizer, records[:8], config, killed, progress=False)
    assert not cleared.reused and (killed / "checkpoints" / "epoch-1" / "trainer_state.json").is_file()


def test_the_longest_row_has_one_default_in_python_and_on_the_command_line():
    """userK: ``FinetuneConfig().max_length`` was 256 where ``AttributionConfig`` and ``--max-length`` had 512, so
    the same fine-tuning made in Python and on the command line were two (the second refused over max_length)."""
    from wherefrom.cli.settings import SETTINGS
    from wherefrom.engine.api import AttributionConfig
    from wherefrom.studies.bench import BenchConfig

    lengths = {FinetuneConfig().max_length, AttributionConfig().max_length, BenchConfig(task="t", out="o").max_length}
    assert lengths == {SETTINGS["max_length"].default} == {512}


def test_no_eos_beside_a_chat_template_that_ends_the_turn_is_refused_before_the_output_folder(records, tmp_path):
    """userK: ``--chat-template --no-eos`` trained with the end-of-turn marker scored (the same loss as without
    ``--no-eos``) and recorded ``append_eos: False``; a later fit warned of a layout mismatch that was none."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    config = lora_config(chat_template=True, append_eos=False)
    with pytest.raises(ValueError, match=r"append_eos=False \(--no-eos\) changes nothing with this chat template"):
        finetune(tiny_llama(len(tokenizer)), tokenizer, records[:2], config, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_numpy_settings_are_stored_as_python_numbers_and_one_target_name_is_a_list_of_one():
    """reviewT: numpy numbers passed the type check but stayed numpy's, so the fine-tuning died writing its JSON
    record after its first epoch; ``BenchConfig(lora_targets="q_proj")`` was still split into characters."""
    import numpy as np

    from wherefrom.studies.bench import BenchConfig

    config = FinetuneConfig(epochs=np.int64(2), learning_rate=np.float32(0.5), lora_rank=np.int32(4))
    config.validate()
    assert [type(getattr(config, n)) for n in ("epochs", "learning_rate", "lora_rank")] == [int, float, int]
    json.dumps(config.to_dict())
    assert BenchConfig(task="t", out="o", lora_targets="q_proj").lora_targets == ["q_proj"]
