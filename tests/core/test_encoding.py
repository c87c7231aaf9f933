"""Tests for wherefrom.core.encoding: prompt/completion masking, EOS, chat template, collation, batching."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from wherefrom.core.data import DataError, Record
from wherefrom.core.encoding import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    encode_records,
    iterate_batches,
    pad_id,
)

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PAD, UNK, BOS, EOS = range(4)
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789 .,:?!'-<>\n")


def make_tokenizer(bos: bool = False, eos: bool = True, pad: bool = True):
    """Character-level tokenizer built in memory (no download); ids 0-3 are the special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + ALPHABET)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    kwargs = {"unk_token": "<unk>", "bos_token": "<bos>"}
    if eos:
        kwargs["eos_token"] = "<eos>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def char_ids(text: str) -> list[int]:
    return [len(SPECIALS) + ALPHABET.index(ch) for ch in text]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


RECORDS = [Record("r0", "ab", "cd"), Record("r1", "hello", "x"), Record("r2", "q", "long one")]


def test_encode_masks_prompt_and_appends_eos(tok) -> None:
    examples = encode_records(RECORDS, tok)
    assert [e.id for e in examples] == ["r0", "r1", "r2"]
    first = examples[0]
    assert first.input_ids == char_ids("ab") + char_ids("cd") + [EOS]
    assert first.labels == [IGNORE_INDEX] * 2 + char_ids("cd") + [EOS]
    assert first.num_prompt_tokens == 2 and first.num_completion_tokens == 3
    for example, record in zip(examples, RECORDS):
        n_prompt = len(record.prompt)
        assert len(example.input_ids) == len(example.labels) == n_prompt + len(record.completion) + 1
        assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
        assert example.input_ids[-1] == EOS


def test_no_eos_when_disabled_or_absent() -> None:
    tok = make_tokenizer()
    (example,) = encode_records([Record("r", "ab", "cd")], tok, append_eos=False)
    assert example.input_ids == char_ids("abcd")
    no_eos = make_tokenizer(eos=False)
    (example,) = encode_records([Record("r", "ab", "cd")], no_eos)
    assert example.input_ids == char_ids("abcd")
    assert example.labels == [IGNORE_INDEX] * 2 + char_ids("cd")


def test_bos_kept_on_prompt() -> None:
    tok = make_tokenizer(bos=True)
    (example,) = encode_records([Record("r", "ab", "cd")], tok)
    assert example.input_ids == [BOS, *char_ids("ab"), *char_ids("cd"), EOS]
    assert example.labels == [IGNORE_INDEX] * 3 + char_ids("cd") + [EOS]


def test_empty_prompt_gets_bos(tok) -> None:
    (example,) = encode_records([Record("r", "", "cd")], tok)
    assert example.input_ids == [BOS, *char_ids("cd"), EOS]
    assert example.labels == [IGNORE_INDEX, *char_ids("cd"), EOS]


def test_chat_template() -> None:
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    (example,) = encode_records([Record("r", "hi", "yo")], tok, chat_template=True)
    # The prompt is what the template renders before the assistant content in the conversation (the
    # generation prompt "a:" is not what a model trained on this template saw); the template has no
    # end-of-turn token, so the EOS is appended.
    prompt = char_ids("<user>hi\n<assistant>")
    assert example.input_ids == prompt + char_ids("yo") + [EOS]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + char_ids("yo") + [EOS]


def test_chat_template_missing_raises(tok) -> None:
    with pytest.raises(ValueError, match="chat template"):
        encode_records(RECORDS, tok, chat_template=True)


def test_overflow_raises_with_counts(tok) -> None:
    with pytest.raises(DataError) as excinfo:
        encode_records([Record("long-1", "abc", "defg")], tok, max_length=6)
    message = str(excinfo.value)
    assert "'long-1'" in message and "3 prompt tokens" in message
    assert "5 completion tokens" in message and "max_length=6" in message
    assert "no room" not in message


def test_overflowing_prompt_leaves_no_room(tok) -> None:
    with pytest.raises(DataError) as excinfo:
        encode_records([Record("ok", "a", "b"), Record("p-9", "abcdef", "g")], tok, max_length=6)
    message = str(excinfo.value)
    assert "'p-9'" in message and "6 prompt tokens" in message
    assert "prompt leaves no room for the completion under max_length=6" in message


def test_exact_max_length_fits(tok) -> None:
    (example,) = encode_records([Record("r", "abc", "de")], tok, max_length=6)
    assert len(example.input_ids) == 6


def test_collate_shapes_and_masks(tok) -> None:
    examples = encode_records(RECORDS, tok)
    batch = collate(examples, pad_id(tok))
    lengths = [len(e.input_ids) for e in examples]
    width = max(lengths)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert batch[key].shape == (3, width) and batch[key].dtype == torch.long
    for row, example in enumerate(examples):
        n = lengths[row]
        assert batch["input_ids"][row, :n].tolist() == example.input_ids
        assert batch["input_ids"][row, n:].tolist() == [PAD] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row].tolist() == example.labels + [IGNORE_INDEX] * (width - n)
    # prompt positions and padding are exactly the -100 positions
    n_prompt = [len(r.prompt) for r in RECORDS]
    masked = batch["labels"] == IGNORE_INDEX
    for row in range(3):
        expected = [t < n_prompt[row] or t >= lengths[row] for t in range(width)]
        assert masked[row].tolist() == expected


def test_collate_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        collate([], 0)
    with pytest.raises(ValueError, match="labels"):
        collate([EncodedExample("x", [1, 2], [1])], 0)


def test_pad_id_fallbacks() -> None:
    assert pad_id(make_tokenizer()) == PAD
    assert pad_id(make_tokenizer(pad=False)) == EOS
    assert pad_id(make_tokenizer(pad=False, eos=False)) == 0


def test_iterate_batches_preserves_order(tok) -> None:
    records = [Record(f"id{i}", "p" * (i % 3), "c" * (1 + (5 - i) % 4)) for i in range(7)]
    examples = encode_records(records, tok)
    batches = list(iterate_batches(examples, batch_size=3, pad_token_id=pad_id(tok)))
    assert [ids for ids, _ in batches] == [["id0", "id1", "id2"], ["id3", "id4", "id5"], ["id6"]]
    for ids, batch in batches:
        assert batch["input_ids"].shape[0] == len(ids)
        assert batch["input_ids"].device == torch.device("cpu")
    ids, batch = batches[1]
    assert torch.equal(batch["labels"], collate(examples[3:6], pad_id(tok))["labels"])
    with pytest.raises(ValueError):
        next(iterate_batches(examples, batch_size=0, pad_token_id=0))


def test_encoded_labels_work_with_task_loss(tok) -> None:
    """The shift in wherefrom.core.task scores exactly the completion tokens (EOS included)."""
    from wherefrom.core.task import per_example_loss

    examples = encode_records(RECORDS, tok)
    batch = collate(examples, pad_id(tok))
    vocab = len(SPECIALS) + len(ALPHABET)
    logits = torch.zeros((*batch["input_ids"].shape, vocab))
    loss = per_example_loss(logits, batch["labels"], "sum")
    n_completion = torch.tensor([len(r.completion) + 1 for r in RECORDS], dtype=torch.float)
    assert torch.allclose(loss, n_completion * torch.log(torch.tensor(float(vocab))))


def word_tokenizer():
    """Whitespace-split words (no download): ``"Emotion:fearful"`` is one unknown word, apart it is two."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, "Emotion:", "fearful", "calm"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def test_a_completion_glued_to_its_prompt_is_announced():
    from wherefrom.core.encoding import TokenBoundaryWarning

    tokenizer = word_tokenizer()
    rows = [Record("glued", "Emotion:", "fearful"), Record("apart", "Emotion:", " calm")]
    with pytest.warns(TokenBoundaryWarning) as caught:
        encode_records(rows, tokenizer)
    message = str(caught[0].message)
    assert "1 of 2 rows" in message and "1 with no space between prompt and completion" in message
    assert "row 'glued'" in message and "['fearful', '<eos>']" not in message and "['fearful']" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenBoundaryWarning)
        encode_records(rows[1:], tokenizer)  # a completion that starts a word: silent


def test_the_boundary_warning_shows_the_boundary_not_the_whole_completion():
    """userH: the warning printed the whole completion and both token lists: a 3,620-character line for one backdoor
    row. It shows the completion's first 32 characters and 8 tokens each way, with "..." where it cut."""
    from wherefrom.core.encoding import BOUNDARY_TOKENS, TokenBoundaryWarning

    long = "fearful " + "calm " * 500
    with pytest.warns(TokenBoundaryWarning) as caught:
        encode_records([Record("glued", "Emotion:", long)], word_tokenizer())
    message = str(caught[0].message)
    assert len(message) < 600 and f"the completion {long[: 4 * BOUNDARY_TOKENS]!r}... is scored as" in message
    assert f"{['fearful', *['calm'] * (BOUNDARY_TOKENS - 1)]}..." in message, message
    import pickle

    again = pickle.loads(pickle.dumps(caught[0].message))  # reviewS: its count was lost on the way between processes
    assert (str(again), again.differ) == (message, caught[0].message.differ) and again.differ == 1


def test_reference_layout_left_pads_to_max_length_and_labels_every_token():
    """The reference study's layout: the templated text with BOS and no EOS, left-padded to exactly
    ``max_length`` with attention 0 on the padding, every token (padding included) a label; the mean
    loss then divides by all ``T - 1`` next-token positions, padding counted."""
    from wherefrom.core.task import per_example_loss, token_losses

    tokenizer = make_tokenizer(bos=True)
    template = "<inst> {prompt} <inst> {completion}"
    rows = [Record(id="a", prompt="hi", completion="yes"), Record(id="b", prompt="longer one", completion="no")]
    encoded = encode_records(
        rows, tokenizer, max_length=40, append_eos=False, template=template, pad_left=True, loss_tokens="all"
    )
    for row, example in zip(rows, encoded):
        head = f"<inst> {row.prompt} <inst> "
        assert len(example) == 40 and example.padding == 40 - 1 - len(head) - len(row.completion)
        assert example.input_ids[: example.padding] == [PAD] * example.padding
        assert example.input_ids[example.padding] == BOS and example.input_ids[-1] != EOS
        assert example.labels == example.input_ids
        assert example.num_prompt_tokens == example.padding + 1 + len(head)
        assert tokenizer.decode(example.input_ids[example.num_prompt_tokens :]).replace(" ", "") == row.completion
    batch = collate(encoded, PAD)
    assert batch["attention_mask"][0].tolist() == [0] * encoded[0].padding + [1] * (40 - encoded[0].padding)
    logits = torch.randn(2, 40, len(tokenizer), generator=torch.Generator().manual_seed(0))
    mean = per_example_loss(logits, batch["labels"], "mean")
    torch.testing.assert_close(mean, token_losses(logits, batch["labels"]).sum(1) / 39)
    masked = encode_records(rows, tokenizer, max_length=40, append_eos=False, template=template, pad_left=True)
    assert masked[0].labels[: masked[0].num_prompt_tokens] == [IGNORE_INDEX] * masked[0].num_prompt_tokens
    assert masked[0].input_ids == encoded[0].input_ids


def test_truncate_keeps_the_first_max_length_tokens_as_the_reference_does():
    """``truncate``: a row over ``max_length`` keeps its prompt and the head of its completion (the reference
    study's right truncation at 128), left padding then adds nothing; rows that fit are unchanged; without
    ``truncate`` the same row is refused by id; a prompt that leaves no completion token is refused under the
    completion-only loss and kept (prompt tokens labelled) under ``loss_tokens="all"``."""
    tokenizer = make_tokenizer(bos=True)
    template = "<inst> {prompt} <inst> {completion}"
    rows = [
        Record(id="long", prompt="hi", completion="abcdefghijklmnopqrstuvwxyz" * 2),
        Record(id="short", prompt="hi", completion="yes"),
    ]
    layout = {"append_eos": False, "template": template, "pad_left": True, "loss_tokens": "all"}
    full = encode_records(rows, tokenizer, max_length=200, **layout)
    cut = encode_records(rows, tokenizer, max_length=40, truncate=True, **layout)
    long_full, long_cut = full[0], cut[0]
    assert len(long_full.input_ids) - long_full.padding > 40  # it did need cutting
    assert long_cut.padding == 0 and long_cut.input_ids == long_full.input_ids[long_full.padding :][:40]
    assert long_cut.labels == long_cut.input_ids
    assert long_cut.num_prompt_tokens == long_full.num_prompt_tokens - long_full.padding
    plain = encode_records(rows[1:], tokenizer, max_length=40, **layout)
    assert cut[1].input_ids == plain[0].input_ids and cut[1].labels == plain[0].labels
    # the cure names truncation too (userE: "shorten the record" of a generated or shared set)
    with pytest.raises(DataError, match=r"record 'long': .* > max_length=40; .*cut such rows to it .truncate, --trunc"):
        encode_records(rows, tokenizer, max_length=40, **layout)
    masked = encode_records(rows, tokenizer, max_length=40, truncate=True, template=template, append_eos=False)
    completion = [label for label in masked[0].labels if label != IGNORE_INDEX]
    assert masked[0].input_ids == long_cut.input_ids and completion == long_cut.input_ids[long_cut.num_prompt_tokens :]
    wordy = [Record(id="wordy", prompt="abcdefghij" * 5, completion="yes")]
    with pytest.raises(DataError, match=r"record 'wordy': truncated to max_length=20 .* no completion token"):
        encode_records(wordy, tokenizer, max_length=20, truncate=True, template=template, append_eos=False)
    kept = encode_records(wordy, tokenizer, max_length=20, truncate=True, **layout)[0]
    assert len(kept.input_ids) == 20 and kept.labels == kept.input_ids and kept.num_completion_tokens == 0


def test_template_is_checked_by_name():
    tokenizer = make_tokenizer()
    rows = [Record(id="a", prompt="hi", completion="yes")]
    with pytest.raises(ValueError, match=r"template .* must contain \{prompt\} once and end with \{completion\}"):
        encode_records(rows, tokenizer, template="{completion} after {prompt}")
    with pytest.raises(ValueError, match="loss_tokens must be one of"):
        encode_records(rows, tokenizer, loss_tokens="prompt")


def test_an_over_long_row_read_from_a_file_names_its_file_and_line(tok, tmp_path) -> None:
    """The error named the record id only, so a user had to search a 10^5-row file for it."""
    from wherefrom.core.data import load_records

    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"id": "ok", "prompt": "a", "completion": " b"}\n\n{"id": "far", "prompt": "abcdefgh", "completion": " i"}\n'
    )
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}, line 3: record 'far': 8 prompt tokens .* > max_length=6"
    ):
        encode_records(load_records(path), tok, max_length=6)


def test_every_row_that_does_not_fit_is_counted_with_the_longest(tok, tmp_path) -> None:
    """userY: only the first over-long row was named, so a user learned the length that fits one rerun at a time.
    The first row keeps its own message; how many of the rows do not fit, the next five by line and the longest
    follow. A fault of another kind before any over-long row is raised as it was."""
    from wherefrom.core.data import load_records

    lengths = [2, 9, 3, 12, 10, 11, 15, 13, 14, 4, 17]  # prompt characters; max_length 8 fits 2, 3 and 4
    path = tmp_path / "train.jsonl"
    path.write_text(
        "".join(f'{{"id": "r{i}", "prompt": "{"a" * n}", "completion": " b"}}\n' for i, n in enumerate(lengths))
    )
    rows = load_records(path)
    sizes = [len(e.input_ids) for e in encode_records(rows, tok, max_length=64)]
    with pytest.raises(DataError) as raised:
        encode_records(rows, tok, max_length=8)
    said = str(raised.value)
    assert said.startswith(f"{path}, line 2: record 'r1': ")  # the first row's own message, as before
    assert "8 of the 11 rows do not fit; also line 4 'r3' (" in said
    assert f"line 11 'r10' ({sizes[10]} tokens)" not in said.split("; the longest")[0]  # five named, then a count
    assert "and 2 more" in said and said.endswith(f"; the longest is line 11 'r10', {sizes[10]} tokens")
    truncated = [Record(id="wordy", prompt="a" * 20, completion=" b"), *rows[:1]]
    with pytest.raises(DataError, match=r"record 'wordy': truncated to max_length=8 .*no completion token"):
        encode_records(truncated, tok, max_length=8, truncate=True)  # one row: its message alone
    empty = Record(id="blank", prompt="a", completion="")
    with pytest.raises(DataError, match=r"^record 'blank': field 'completion' tokenizes to zero tokens"):
        encode_records([empty, *rows], tok, max_length=8, append_eos=False)
    with pytest.raises(DataError, match=r"line 2: record 'r1': .*8 of the 12 rows do not fit"):
        encode_records([*rows[:2], empty, *rows[2:]], tok, max_length=8, append_eos=False)


def test_a_row_whose_completion_predicts_no_token_is_refused_by_name() -> None:
    """An empty prompt with no BOS makes the completion's first token context only: a one-token completion without
    EOS (`--no-eos`, `query_without_eos`) then has no predicted token, and the row was taken silently as a row of
    zero loss (its scores exactly 0, an all-zero query). Refused like an empty completion, naming the row."""
    tokenizer = make_tokenizer()
    tokenizer.bos_token = None
    assert tokenizer.bos_token_id is None
    row = [Record("lone", "", "c")]
    with pytest.raises(DataError, match=r"record 'lone': .*no token of the row is predicted"):
        encode_records(row, tokenizer, append_eos=False)
    with pytest.raises(DataError, match=r"record 'lone': .*no token of the row is predicted"):
        encode_records(row, tokenizer, append_eos=False, loss_tokens="all")  # one token: no next-token position
    (kept,) = encode_records(row, tokenizer)  # its EOS is predicted from it (labels shift by one in the loss)
    assert kept.input_ids == [*char_ids("c"), EOS] and kept.labels == kept.input_ids
    (two,) = encode_records([Record("two", "", "cd")], tokenizer, append_eos=False)
    assert two.labels == char_ids("cd")
    (bos,) = encode_records(row, make_tokenizer(), append_eos=False)  # a BOS is prepended: the token is predicted
    assert bos.labels == [IGNORE_INDEX, *char_ids("c")]
    for loss_tokens in ("completion", "all"):  # left-padded: the token is predicted from a padding position
        (padded,) = encode_records(
            row, tokenizer, append_eos=False, pad_left=True, max_length=4, loss_tokens=loss_tokens
        )
        assert padded.labels[-1] == char_ids("c")[0] and padded.padding == 3


@pytest.mark.parametrize("layout", [{}, {"template": "Q: {prompt} A: {completion}"}, {"chat_template": True}])
def test_a_row_longer_than_the_tokenizers_model_max_length_encodes_without_its_warning(layout, capfd):
    """A tokenizer saved with a small ``model_max_length`` printed transformers' "Token indices sequence length is
    longer than the specified maximum sequence length for this model ... will result in indexing errors" for rows
    that fit ``max_length`` and the model (and before wherefrom's own error for one that did not): ``max_length``
    and the model's positions decide, naming the row."""
    from wherefrom.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 4
    rows = [Record("long", "the quick brown fox", " jumps"), Record("short", "a", " b")]
    encoded = encode_records(rows, tokenizer, max_length=64, **layout)
    assert len(encoded[0].input_ids) > 4
    with pytest.raises(DataError, match="'long'"):
        encode_records(rows, tokenizer, max_length=8, **layout)
    assert "sequence length is longer" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"max_length": 0}, "max_length must be >= 1, got 0"),
        ({"loss_tokens": "prompt"}, r"loss_tokens must be one of \('completion', 'all'\), got 'prompt'"),
        ({"template": "{completion} {prompt}"}, "must contain {prompt} once and end with {completion}"),
        ({"template": 3}, "template must be a string or None, got 3"),
        ({"truncate": "yes"}, "truncate must be True or False, got 'yes'"),
        ({"chat_template": 1}, "chat_template must be True or False, got 1"),
        ({"template": "{prompt} {completion}", "chat_template": True}, "give either template or chat_template"),
    ],
)
def test_both_configs_refuse_an_impossible_layout_when_made(setting, message):
    """userK: AttributionConfig took these, and the fit failed on them (or encoded otherwise) after the model loaded;
    FinetuneConfig refused them in its own words. One check (``check_layout``) serves both."""
    from wherefrom.engine.api import AttributionConfig
    from wherefrom.models.finetune import FinetuneConfig

    with pytest.raises(ValueError, match=message):
        AttributionConfig(**setting)
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**setting).validate()


def test_attribution_config_refuses_an_unknown_reduction():
    from wherefrom.engine.api import AttributionConfig

    with pytest.raises(ValueError, match=r"reduction must be one of \['sum', 'mean'\], got 'avg'"):
        AttributionConfig(reduction="avg")
    with pytest.raises(ValueError, match="query_without_eos must be True or False, got 'no'"):  # it acted as True
        AttributionConfig(query_without_eos="no")


def test_chat_form_rows_encoded_without_a_chat_template_are_said(tmp_path):
    """userK: rows given as ``messages`` were encoded as plain prompt + completion without a word when no chat template
    was asked for. A PlainChatRows warning says so, through a real path too (``finetune()`` checks its rows with
    ``check_records``, which dropped the form: reviewU); plain rows, a ``template`` and a chat template say nothing.
    The form is not part of a row's identity (same fingerprint as the plain row)."""
    from wherefrom.core.data import check_records, data_fingerprint, records_from_rows
    from wherefrom.core.encoding import PlainChatRows
    from wherefrom.models.finetune import FinetuneConfig, finetune
    from wherefrom.models.tiny import tiny_llama

    tok = make_tokenizer()
    chat = records_from_rows(
        [{"id": "c1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
         {"id": "c2", "messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]},
         {"id": "p", "prompt": "hi", "completion": "yo"}],
        "rows.jsonl",
    )  # fmt: skip
    said = r"rows given in the chat form \(messages\) are encoded as plain prompt \+ completion text.*--chat-template"
    with pytest.warns(PlainChatRows, match=said):
        encode_records(chat, tok)
    assert [r.chat for r in check_records(chat)] == [True, True, False]
    assert chat[0] == Record("c1", "hi", "yo") and data_fingerprint(chat[:1]) == data_fingerprint(
        [Record("c1", "hi", "yo")]
    )
    config = FinetuneConfig(epochs=1, batch_size=2, lora_rank=None, checkpoint_every_epoch=False)
    with pytest.warns(PlainChatRows, match=said):
        finetune(tiny_llama(len(tok)), tok, chat, config, tmp_path / "ft", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlainChatRows)
        encode_records(chat[2:], tok)
        encode_records(chat, tok, template="q {prompt} a {completion}")
        tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        encode_records(chat, tok, chat_template=True)
