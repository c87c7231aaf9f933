"""Tiny models and a character-level tokenizer built in code, for tests, examples and benchmarks.

Nothing here touches the network or the disk (except :func:`save_tiny`). Everything is seeded, so
the same arguments give the same weights bit for bit, and the global torch RNG is left alone.

Example::

    tok = tiny_tokenizer()
    model = with_lora(tiny_llama(len(tok)))
    batch = tok(["2+2=4"], return_tensors="pt")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from wherefrom.models.loading import quiet_peft

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "TINY_CHARS",
    "TINY_CHAT_TEMPLATE",
    "UNK_ID",
    "save_tiny",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_tokenizer",
    "with_lora",
]

PAD_ID = 0
"""Id of ``<pad>`` in :func:`tiny_tokenizer`."""
EOS_ID = 1
"""Id of ``<eos>`` in :func:`tiny_tokenizer`."""
UNK_ID = 2
"""Id of ``<unk>`` in :func:`tiny_tokenizer`."""

TINY_CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'-=>+*/()\n"
"""The characters :func:`tiny_tokenizer` knows, in id order after the three special tokens."""

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
"""Chat template of :func:`tiny_tokenizer`: ``"user: hi\\nassistant: yo<eos>\\n"``, and
``"assistant: "`` appended for ``add_generation_prompt=True``."""


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` (56 tokens) built with ``tokenizers``.

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then one token per character of
    :data:`TINY_CHARS` (lowercase letters, digits, space, ``.,:;!?'-=>+*/()`` and newline).
    Input is lower-cased; any other character becomes ``<unk>``. No special tokens are added
    when encoding, and decoding concatenates characters, so ``decode(encode(s)) == s`` for text
    made of known characters. Has a small :data:`TINY_CHAT_TEMPLATE`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<unk>": UNK_ID}
    for ch in TINY_CHARS:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    # "[\s\S]" : every single character, newline included (Oniguruma regex).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build(model_class, config, seed: int):
    """Instantiate ``model_class(config)`` with seeded weights, fp32, eval mode, tiny-tokenizer pad id."""
    with _seeded(seed):
        model = model_class(config)
    model.to(torch.float32)
    model.config.pad_token_id = PAD_ID
    model.eval()
    return model


def tiny_llama(
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` (fp32, eval mode, 128 positions).

    Grouped-query attention with ``kv_heads`` key/value heads; untied embeddings by default;
    ``pad_token_id``/``eos_token_id`` match :func:`tiny_tokenizer`. Same ``seed``, same weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
    )
    return _build(LlamaForCausalLM, config, seed)


def tiny_gpt2(
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> GPT2LMHeadModel:
    """A randomly initialised ``GPT2LMHeadModel`` (fp32, eval mode, 128 positions).

    Its attention and MLP projections are HF ``Conv1D`` layers (weights stored ``(in, out)``);
    all dropout probabilities are 0 so gradients are deterministic even in train mode. Untied
    embeddings by default; ``pad_token_id``/``eos_token_id`` match :func:`tiny_tokenizer`.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=EOS_ID,
    )
    return _build(GPT2LMHeadModel, config, seed)


def tiny_opt(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0) -> nn.Module:
    """A randomly initialised ``OPTForCausalLM`` (fp32, eval mode, 128 positions, dropout 0): its decoder layers
    fold the positions into the rows before ``fc1``/``fc2``, which see ``(B * T, hidden)``; ``pad_token_id``/
    ``eos_token_id`` match :func:`tiny_tokenizer`."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        ffn_dim=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=128,
        word_embed_proj_dim=hidden,
        dropout=0.0,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=EOS_ID,
    )
    return _build(OPTForCausalLM, config, seed)


def _is_gpt2(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "gpt2"


def with_lora(
    model: nn.Module,
    r: int = 4,
    alpha: int = 8,
    target_modules: list[str] | None = None,
    seed: int = 0,
    init_b_random: bool = True,
) -> PeftModel:
    """Wrap ``model`` in a LoRA ``peft.PeftModel`` (dropout 0, eval mode); modifies ``model``.

    Default targets: ``["q_proj", "v_proj"]`` for Llama-style models, ``["c_attn"]`` for GPT-2.
    Only the LoRA parameters require grad. PEFT initialises every ``lora_B`` to zero, which makes
    the adapter a no-op and every ``lora_A`` gradient zero; with ``init_b_random=True`` (default)
    each ``lora_B`` weight is re-drawn from N(0, 0.02^2) so both A and B get nonzero gradients.
    Seeded by ``seed``; the global RNG is left alone.
    """
    from peft import LoraConfig, get_peft_model

    gpt2 = _is_gpt2(model)
    if target_modules is None:
        target_modules = ["c_attn"] if gpt2 else ["q_proj", "v_proj"]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        fan_in_fan_out=gpt2,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _seeded(seed), quiet_peft():
        peft_model = get_peft_model(model, config)
        if init_b_random:
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(mean=0.0, std=0.02)
    peft_model.eval()
    return peft_model


def save_tiny(folder: str | Path, arch: Literal["llama", "gpt2"] = "llama", seed: int = 0) -> Path:
    """Save :func:`tiny_tokenizer` and a tiny ``arch`` model to ``folder`` (HF format).

    ``wherefrom.models.loading.load_model(folder)`` then loads them. Returns the folder.
    """
    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    if arch == "llama":
        model = tiny_llama(len(tokenizer), seed=seed)
    elif arch == "gpt2":
        model = tiny_gpt2(len(tokenizer), seed=seed)
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', not {arch!r}")
    model.config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
