"""Faults under interruption (issue 10, kind 10): real `wherefrom fit` / `wherefrom index` processes
are killed with SIGKILL once the folder shows they are part-way (polled, no hooks), then rerun; the
resumed factors, index shards and scores are bit-identical (CPU) to an uninterrupted run, and no
temporary file is ever read as a finished one. Also: a fit resumed at each persisted stage in
process (true Fisher, so the per-example draw counts of the sampled labels must travel with the stages)."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from wherefrom.core.data import load_records
from wherefrom.core.store import StageFolder, is_intact
from wherefrom.curvature import make_curvature
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.models.loading import load_model

from .robust_workspace import (
    fit_args,
    invoke,
    make_workspace,
    partials,
    spawn,
    tensors_equal,
    wait_until,
)

ROWS = 160
SLOW = ("--strategy", "ekfac", "--batch-size", "1")  # one row per batch: passes long enough to be caught part-way


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("kill"), n_train=ROWS)
    code, out = invoke(*fit_args(root, "clean", *SLOW))
    assert code == 0, out
    code, out = invoke("index", "--run", root / "clean", "--shard-size", "5")
    assert code == 0, out
    code, out = invoke("scores", "--run", root / "clean", "--queries", root / "queries.jsonl")
    assert code == 0, out
    return root


def kill(process) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def test_fit_and_index_killed_then_resumed_are_bit_identical(root):
    run = root / "killed"
    factors = run / "factors"
    # 1. Killed during the covariance pass (its settings are recorded first, before any stage).
    first = spawn(*fit_args(root, "killed", *SLOW))
    wait_until(lambda: is_intact(factors / "settings.json"), first)
    kill(first)
    assert not (factors / "curvature.json").exists()
    # 2. Rerun, killed again once the covariances and eigenbases stages are finished (correction running).
    second = spawn(*fit_args(root, "killed", *SLOW))
    wait_until(lambda: is_intact(factors / "stages" / "eigenbases.safetensors"), second)
    kill(second)
    assert not (factors / "curvature.json").exists(), "the fit finished before the kill; the test did not interrupt it"
    assert is_intact(factors / "stages" / "covariances.safetensors")
    # 3. Resumed in process: reuses both stages and gives the uninterrupted run's factors bit for bit.
    code, out = invoke(*fit_args(root, "killed", *SLOW))
    assert code == 0 and "ekfac fitted" in out, out
    assert tensors_equal(factors / "curvature.safetensors", root / "clean" / "factors" / "curvature.safetensors")
    assert not (factors / "stages").exists() and not partials(run)

    # 4. `index` killed after a few shards, then resumed.
    index = run / "index"
    third = spawn("index", "--run", run, "--shard-size", "5")
    wait_until(lambda: is_intact(index / "shard-00003.safetensors"), third)
    kill(third)
    assert not (index / "index.json").exists(), "the index finished before the kill"
    finished = sorted(p.name for p in index.glob("shard-*") if is_intact(p))
    code, out = invoke("index", "--run", run, "--shard-size", "5")
    left = ROWS // 5 - len(finished)
    assert code == 0 and f"{left} shard{'s' * (left != 1)} written now" in out, out
    for k in range(ROWS // 5):
        name = f"shard-{k:05d}.safetensors"
        assert tensors_equal(index / name, root / "clean" / "index" / name), name
    assert not partials(run)

    # 5. Same seed, same command: the scores are bit-identical to the uninterrupted run's.
    code, out = invoke("scores", "--run", run, "--queries", root / "queries.jsonl")
    assert code == 0, out
    assert tensors_equal(run / "scores" / "scores.safetensors", root / "clean" / "scores" / "scores.safetensors")
    ids = json.loads((run / "scores" / "scores.json").read_text())["train_ids"]
    assert len(ids) == ROWS == len(set(ids))


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
@pytest.mark.parametrize("resume_after", ["covariances", "eigenbases", "eigenvalue correction"])
def test_fit_resumes_from_each_stage_identically(root, tmp_path, strategy, resume_after):
    """Persist every stage, keep only those up to ``resume_after``, refit: identical state, and the
    stages kept were really reused (the covariance pass, which samples labels, is not rerun)."""
    if strategy == "kfac" and resume_after == "eigenvalue correction":
        pytest.skip("K-FAC has no eigenvalue correction stage")
    loaded = load_model(str(root / "model"), device="cpu")
    rows = load_records(root / "train.jsonl")[:24]
    attributor = Attributor(loaded.model, loaded.tokenizer, AttributionConfig(strategy=strategy, batch_size=4))
    stages = StageFolder(tmp_path / "stages")
    clean = attributor.fit(rows, make_curvature(strategy), stages=stages)
    order = ["covariances", "eigenbases", "eigenvalue correction"]
    for later in order[order.index(resume_after) + 1 :]:
        stages.path(later).unlink(missing_ok=True)
    passes = []
    attributor.progress = lambda batches, description: (passes.append(description), iter(batches))[1]
    resumed = attributor.fit(rows, make_curvature(strategy), stages=stages)
    assert passes == (
        ["eigenvalue correction"] if strategy == "ekfac" and resume_after != "eigenvalue correction" else []
    )
    assert resumed.state.keys() == clean.state.keys()
    for key in clean.state:
        assert torch.equal(resumed.state[key], clean.state[key]), key
    assert resumed.info == clean.info
    # The same fit without stages (a fresh generator) is the uninterrupted reference.
    reference = attributor.fit(rows, make_curvature(strategy))
    for key in clean.state:
        assert torch.equal(reference.state[key], clean.state[key]), key


def test_finetune_killed_then_rerun_resumes_bit_identical(root):
    """`wherefrom finetune` killed with SIGKILL once an epoch's training state is saved, then rerun: it says it
    resumed, and every file it leaves (weights, checkpoints, AdamW states, log, config) is the uninterrupted
    run's, bit for bit (LoRA dropout and linear decay on, so the generator and schedule must travel too)."""

    def args(name: str) -> list:
        return [
            "finetune", "--train", root / "train.jsonl", "--model", root / "model", "--out", root / name,
            "--epochs", "6", "--batch-size", "1", "--lora-dropout", "0.1", "--lr-schedule", "linear",
            "--device", "cpu",
        ]  # fmt: skip

    code, out = invoke(*args("finetune-clean"))
    assert code == 0 and "trained:" in out, out
    process = spawn(*args("finetune-killed"))
    wait_until(lambda: any((root / "finetune-killed" / "resume").glob("epoch-*")), process)
    kill(process)
    assert not (root / "finetune-killed" / "finetune_config.json").exists(), "the run finished before the kill"
    code, out = invoke(*args("finetune-killed"))
    assert code == 0 and "resumed an interrupted identical run after epoch" in out, out
    files = {
        folder: {str(p.relative_to(root / folder)): p.read_bytes() for p in (root / folder).rglob("*") if p.is_file()}
        for folder in ("finetune-clean", "finetune-killed")
    }
    for name in [name for name in files["finetune-clean"] if name.endswith("adapter_config.json")]:
        # peft writes target_modules, a set, in the process's string-hash order: compare them as sets
        clean, killed = (
            {**c, "target_modules": sorted(c["target_modules"])}
            for c in map(json.loads, (files["finetune-clean"].pop(name), files["finetune-killed"].pop(name)))
        )
        assert killed == clean, name
    assert files["finetune-killed"] == files["finetune-clean"]
