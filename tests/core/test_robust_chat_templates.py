"""With a chat template, the scored tokens are exactly what the template renders for the assistant
turn (content after the template's own trimming, plus its end-of-turn marker), and the prompt is
exactly what it renders before: for ChatML (SmolLM2, Qwen), Llama-3, Llama-2, Gemma, Zephyr,
Mistral and the tiny test template. Tokenizers are built here (no hub access)."""

from __future__ import annotations

import pytest

from wherefrom.core.data import Record
from wherefrom.core.encoding import IGNORE_INDEX, encode_records, template_ends_turn
from wherefrom.models.tiny import tiny_tokenizer

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN = SMOLLM2.replace(
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA2 = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
ZEPHYR = (  # as published, with the newlines between tags (HF renders with trim_blocks / lstrip_blocks)
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"

# family: (template, bos, eos, extra special tokens, expected (prompt text, scored text) for (p, c)),
# the expected texts written out from each format's documentation, not from the code under test.
FAMILIES = {
    "smollm2": (
        SMOLLM2,
        None,
        "<|im_end|>",
        ["<|im_start|>"],
        lambda p, c: (f"{SMOL_SYSTEM}<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", f"{c}<|im_end|>"),
    ),
    "qwen": (
        QWEN,
        None,
        "<|im_end|>",
        ["<|im_start|>"],
        lambda p, c: (f"{QWEN_SYSTEM}<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", f"{c}<|im_end|>"),
    ),
    "llama3": (
        LLAMA3,
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|start_header_id|>", "<|end_header_id|>"],
        lambda p, c: (
            (
                "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                f"{p.strip()}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            f"{c.strip()}<|eot_id|>",
        ),
    ),
    "llama2": (
        LLAMA2,
        "<s>",
        "</s>",
        ["[INST]", "[/INST]"],
        lambda p, c: (f"<s>[INST] {p.strip()} [/INST] ", f"{c.strip()} </s>"),
    ),
    "gemma": (
        GEMMA,
        "<bos>",
        "<eos>",
        ["<start_of_turn>", "<end_of_turn>"],
        lambda p, c: (
            f"<bos><start_of_turn>user\n{p.strip()}<end_of_turn>\n<start_of_turn>model\n",
            f"{c.strip()}<end_of_turn>",
        ),
    ),
    "zephyr": (
        ZEPHYR,
        "<s>",
        "</s>",
        ["<|user|>", "<|assistant|>", "<|system|>"],
        lambda p, c: (f"<|user|>\n{p}</s>\n<|assistant|>\n", f"{c}</s>"),
    ),
    "mistral": (MISTRAL, "<s>", "</s>", ["[INST]", "[/INST]"], lambda p, c: (f"<s>[INST] {p} [/INST]", f"{c}</s>")),
    "tiny": (None, None, None, [], lambda p, c: (f"user: {p}\nassistant: ", f"{c}<eos>")),
}
RECORDS = [Record("a", "ab cd:", " ef"), Record("b", " gh ij?\n", " kl mn. \n"), Record("c", "", "op")]


def family_tokenizer(family: str):
    """The character tokenizer with the family's special tokens and chat template."""
    template, bos, eos, extra, _ = FAMILIES[family]
    tok = tiny_tokenizer()
    if template is None:
        return tok
    specials = {"additional_special_tokens": [*extra, *(t for t in (bos, eos) if t and t not in extra)]}
    if bos:
        specials["bos_token"] = bos
    specials["eos_token"] = eos
    tok.add_special_tokens(specials)
    tok.chat_template = template
    return tok


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scored_tokens_are_the_rendered_assistant_turn(family: str) -> None:
    tok = family_tokenizer(family)
    expect = FAMILIES[family][4]
    for record, example in zip(RECORDS, encode_records(RECORDS, tok, chat_template=True)):
        prompt_text, scored_text = expect(record.prompt, record.completion)
        prompt, scored = ids(tok, prompt_text), ids(tok, scored_text)
        assert example.input_ids == prompt + scored, (family, record.id)
        assert example.labels == [IGNORE_INDEX] * len(prompt) + scored, (family, record.id)
        # the end-of-turn marker is scored, and it is the last token: nothing after it is fed
        marker = {"gemma": "<end_of_turn>", "tiny": "<eos>"}.get(family, FAMILIES[family][2])
        assert example.input_ids[-1] == tok.convert_tokens_to_ids(marker)
        # the whole row is the rendered conversation, cut after the marker
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.completion}],
            tokenize=False,
        )
        assert rendered.startswith(prompt_text + scored_text)


def test_generation_prompt_is_the_prompt_where_the_template_agrees() -> None:
    # for templates whose generation prompt is the assistant header, prompt == the generation render
    for family in ("smollm2", "qwen", "llama3", "gemma", "tiny"):
        tok = family_tokenizer(family)
        (example,) = encode_records(RECORDS[:1], tok, chat_template=True)
        generation = tok.apply_chat_template(
            [{"role": "user", "content": RECORDS[0].prompt}], tokenize=False, add_generation_prompt=True
        )
        assert example.input_ids[: example.num_prompt_tokens] == ids(tok, generation), family


def test_template_without_end_marker_gets_eos() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
    (example,) = encode_records([Record("r", "ab", " cd")], tok, chat_template=True)
    assert example.input_ids == ids(tok, "### user:\nab\n\n### assistant:\n") + ids(tok, " cd") + [tok.eos_token_id]
    (no_eos,) = encode_records([Record("r", "ab", " cd")], tok, chat_template=True, append_eos=False)
    assert no_eos.input_ids == example.input_ids[:-1]


def test_a_template_that_ends_the_turn_is_told_from_one_that_does_not() -> None:
    """:func:`template_ends_turn`, which ``finetune`` asks before it refuses ``--no-eos`` beside a chat template that
    ends the turn (userK: it changed nothing and was recorded, then warned of as another layout)."""
    assert all(template_ends_turn(family_tokenizer(family)) for family in ("smollm2", "llama3", "gemma", "tiny"))
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
    assert not template_ends_turn(tok)
    (kept,) = encode_records([Record("r", "ab", " cd")], family_tokenizer("smollm2"), chat_template=True)
    (same,) = encode_records(
        [Record("r", "ab", " cd")], family_tokenizer("smollm2"), chat_template=True, append_eos=False
    )
    assert same.input_ids == kept.input_ids  # why it is refused where a fine-tuning is made


def test_content_dependent_template_is_refused() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if m['content'] | length > 5 %}!{% endif %}\n{% endfor %}"
    )
    with pytest.raises(ValueError, match="record 'r': the chat template renders text around the assistant content"):
        encode_records([Record("r", "ab", " cd")], tok, chat_template=True)


def sentencepiece_like(template: str):
    """A BPE tokenizer with a Metaspace pre-tokenizer: a word token carries its leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"])
    core.train_from_iterator(["ab cd ef gh", "ef gh ij kl", "what is ab cd", "kl ab ef"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", ["llama2", "mistral"])
def test_boundary_token_is_what_the_trainer_sees(template: str) -> None:
    tok = sentencepiece_like(FAMILIES[template][0])
    record = Record("r", "what is ab cd", " ef gh")
    (example,) = encode_records([record], tok, chat_template=True)
    prompt_text, scored_text = FAMILIES[template][4](record.prompt, record.completion)
    # the row is the rendered conversation tokenized as one text (as an SFT trainer tokenizes it)
    whole = ids(tok, prompt_text + scored_text)
    assert example.input_ids == whole
    if template == "llama2":  # tokenizing the two parts apart would feed a stray "▁" token
        assert ids(tok, prompt_text) + ids(tok, scored_text) != whole
    scored = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tok.decode(scored).replace(" ", "") == scored_text.replace(" ", "")
    assert scored[-1] == tok.eos_token_id
    # the prompt tokens are the rendered prefix; a word token that carries the space before the answer
    # (Llama-2's "[/INST] ef") belongs to the answer
    n_prompt = example.num_prompt_tokens
    assert example.input_ids[:n_prompt] == ids(tok, prompt_text.rstrip(" "))
    assert tok.convert_ids_to_tokens(scored[0]).lstrip("\u2581").startswith("e")


@pytest.mark.parametrize(
    "template, error",
    [
        ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError: unexpected '}'"),
        (
            "{{ raise_exception('Conversation roles must alternate') }}",
            "TemplateError: Conversation roles must alternate",
        ),
    ],
)
def test_a_template_that_fails_to_render_is_named_with_the_row(template: str, error: str) -> None:
    """userP: a chat template with a syntax error, or one that raises (Llama-2's, Mistral's on roles they do not
    take), ended in a jinja2 traceback; it is a ValueError naming the row, the tokenizer and what failed."""
    tok = tiny_tokenizer()
    tok.chat_template = template
    with pytest.raises(ValueError, match=r"^record 'a': the chat template of tokenizer ") as raised:
        encode_records(RECORDS, tok, chat_template=True)
    assert error in str(raised.value) and "leave out --chat-template" in str(raised.value)
