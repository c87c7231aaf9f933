"""Every row of tests/refusals.py is refused as README.md's table says, and the table is up to date.

One workspace (module-scoped): a tiny GPT-2 saved in ``model/``, rows, one fitted run ``run/`` and the
damaged inputs the rows name. Each command row runs through typer's CliRunner in that folder and must
exit 2 with one ``error:`` line holding the fragment and no traceback; each call row must raise the
named exception with the fragment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import wherefrom.models.finetune as finetuning
from tests.conftest import make_records, scale_lora_b
from tests.refusals import BENCHED, FINETUNE, FIT, README, REFUSALS, Refusal, readme_section, render
from wherefrom.cli import app
from wherefrom.core.data import DataError, Record
from wherefrom.core.distributed import NotDistributable
from wherefrom.core.encoding import encode_records
from wherefrom.curvature.base import DegenerateCurvatureWarning
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.models.loading import load_model
from wherefrom.models.tiny import save_tiny, tiny_gpt2, tiny_llama, tiny_tokenizer, with_lora
from wherefrom.studies.generated import write_jsonl

ERRORS = {
    "DataError": DataError,
    "ValueError": ValueError,
    "TypeError": TypeError,
    "RuntimeError": RuntimeError,
    "DegenerateCurvatureWarning": DegenerateCurvatureWarning,
    "NotDistributable": NotDistributable,
}


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def save_adapter(folder, base_model, base_path=None) -> None:
    adapter = with_lora(base_model, r=2)
    adapter.save_pretrained(folder)
    if base_path is not None:
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base_path)
        (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    save_tiny(root / "model", arch="gpt2")
    write_jsonl(make_records(12, seed=1), root / "train.jsonl")
    write_jsonl(make_records(2, seed=2, prefix="q"), root / "queries.jsonl")
    good = b'{"id": "r%d", "prompt": "ab:", "completion": " cd"}'
    write_lines(
        root / "latin1.jsonl",
        [good % i for i in range(7)] + ['{"prompt": "caf\xe9", "completion": " x"}'.encode("latin-1")],
    )
    write_lines(root / "no-completion.jsonl", [good % 0, b'{"id": "r1", "prompt": "ab:"}'])
    (root / "utf16.jsonl").write_bytes((good % 0).decode().encode("utf-16-le"))  # no byte-order mark
    write_lines(
        root / "empty-label.jsonl", [good % 0, b'{"id": "r1", "prompt": "ab:", "completion": " cd", "label": ""}']
    )
    write_lines(root / "duplicate.jsonl", [good % 0, good % 0])
    write_lines(root / "control.jsonl", [good % 0, b'{"id": "q\\nnext", "prompt": "ab:", "completion": " cd"}'])
    write_lines(
        root / "twice.jsonl", [good % 0, b'{"id": "r1", "prompt": "ab:", "completion": " cd", "prompt": "ef:"}']
    )
    chat = b'{"id": "r1", "messages": [{"role": "user", "content": "ab:"}, {"role": "assistant", "content": " cd"}], '
    write_lines(root / "two-forms.jsonl", [good % 0, chat + b'"prompt": "ef:", "completion": " gh"}'])
    (root / "empty.jsonl").write_bytes(b"")
    # damaged model folders
    for name in ("no-weights", "truncated", "empty-weights", "no-template", "raising-template"):
        shutil.copytree(root / "model", root / name)
    (root / "no-weights" / "model.safetensors").unlink()
    weights = (root / "model" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "empty-weights" / "model.safetensors").write_bytes(b"")
    (root / "no-template" / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("no-template", "raising-template"):
        tokenizer_config = root / name / "tokenizer_config.json"
        tokenizer_config.write_text(
            json.dumps({k: v for k, v in json.loads(tokenizer_config.read_text()).items() if k != "chat_template"})
        )
    (root / "raising-template" / "chat_template.jinja").write_text(
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    )
    # adapters
    vocab = len(tiny_tokenizer())
    save_adapter(root / "gpt2-adapter", tiny_gpt2(vocab))
    shutil.copytree(root / "gpt2-adapter", root / "truncated-adapter")
    shutil.copytree(root / "gpt2-adapter", root / "tuned" / "adapter")  # a LoRA fine-tuning's output folder
    adapter_file = root / "truncated-adapter" / "adapter_model.safetensors"
    adapter_file.write_bytes(adapter_file.read_bytes()[:100])
    save_adapter(root / "llama-adapter", tiny_llama(vocab))
    shutil.copytree(root / "gpt2-adapter", root / "wide-adapter")
    wide = root / "wide-adapter" / "adapter_model.safetensors"
    save_file(
        {k: torch.zeros(v.shape[0], v.shape[1] + 8) if "lora_A" in k else v for k, v in load_file(wide).items()}, wide
    )
    save_tiny(root / "other-model", arch="gpt2", seed=1)
    save_adapter(root / "other-adapter", tiny_gpt2(vocab, seed=1), base_path=root / "other-model")
    # a fitted run, a damaged copy, a copy another process is writing
    cwd = os.getcwd()
    os.chdir(root)
    try:
        fitted = CliRunner().invoke(app, [*FIT, "run", "--threads", "1"])
        benched = CliRunner().invoke(app, [*BENCHED, "--threads", "1"])
        # a fine-tuning stopped in its second epoch (12 rows in batches of 8: 2 steps an epoch), leaving
        # its training state after epoch 1
        real, steps = finetuning.per_example_loss, []

        def stop_in_epoch_2(*args, **kwargs):
            steps.append(1)
            if len(steps) > 2:
                raise RuntimeError("stopped as a kill would stop it")
            return real(*args, **kwargs)

        with mock.patch.object(finetuning, "per_example_loss", stop_in_epoch_2):
            stopped = CliRunner().invoke(app, [*FINETUNE, "--threads", "1"])
    finally:
        os.chdir(cwd)
    assert fitted.exit_code == 0 and benched.exit_code == 0, fitted.output + benched.output
    assert isinstance(stopped.exception, RuntimeError), stopped.output
    assert (root / "interrupted" / "resume" / "epoch-1").is_dir()
    shutil.copytree(root / "run", root / "damaged")
    shutil.copytree(root / "run", root / "locked")
    damaged = next((root / "damaged").rglob("*.safetensors"))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1], timeout=0);"
            " l.acquire(); print('held', flush=True); time.sleep(600)",
            str(root / "locked" / ".wherefrom.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    (root / "locked" / ".wherefrom.lock.json").write_text(
        json.dumps({"pid": holder.pid, "command": "wherefrom index", "since": "now"})
    )
    yield root
    holder.kill()
    holder.wait()


@pytest.fixture(scope="module")
def python_scope(workspace):
    """The names the Python rows use (tests/refusals.py's docstring)."""
    loaded = load_model(workspace / "model", device="cpu")
    tokenizer = loaded.tokenizer
    odd_template = tiny_tokenizer()
    odd_template.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if m['content'] | length > 5 %}!{% endif %}\n{% endfor %}"
    )
    return {
        "att": Attributor(loaded.model, tokenizer),
        "tokenizer": tokenizer,
        "tied": tiny_gpt2(len(tokenizer), hidden=16, layers=1, tie_word_embeddings=True),
        "fresh_lora": with_lora(tiny_llama(len(tokenizer), hidden=16, layers=1), r=2, init_b_random=False),
        "small_lora": scale_lora_b(with_lora(tiny_llama(len(tokenizer), hidden=16, layers=1), r=2), 1e-30),
        "odd_template": odd_template,
        "encode_records": encode_records,
        "Attributor": Attributor,
        "AttributionConfig": AttributionConfig,
    }


@pytest.mark.parametrize("row", REFUSALS, ids=lambda row: row.what)
def test_each_refusal(row: Refusal, workspace, python_scope, monkeypatch) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # the CUDA row holds on a GPU machine too
    for key, value in row.env:
        monkeypatch.setenv(key, value)
    if row.call:
        scope = {"rows": make_records(3, seed=1), "Record": Record, **python_scope}
        if row.error.endswith("Warning"):
            with pytest.warns(ERRORS[row.error], match=re.escape(row.fragment)):
                exec(row.call, scope)
            return
        with pytest.raises(ERRORS[row.error]) as error:
            exec(row.call, scope)
        assert row.fragment in str(error.value)
        return
    try:
        result = CliRunner().invoke(app, [*row.command, "--threads", "1"])
        written = (workspace / "new").exists()
    finally:
        shutil.rmtree(workspace / "new", ignore_errors=True)
    output = result.output
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), output
    assert "Traceback" not in output, output
    assert "error:" in output and row.fragment in " ".join(output.split()), output
    assert row.settled or not written, "a refused command wrote its output folder"


def test_readme_table_is_up_to_date() -> None:
    expected = render()
    assert readme_section(README.read_text(encoding="utf-8")) == expected, (
        "README.md's 'What wherefrom refuses, and why' table is out of date; run `python -m tests.refusals`. "
        f"Expected:\n{expected}"
    )


def test_rows_are_distinct_and_cover_the_kinds() -> None:
    assert len({row.what + row.kind for row in REFUSALS}) == len(REFUSALS)
    assert all(bool(row.command) != bool(row.call) for row in REFUSALS)
