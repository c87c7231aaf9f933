"""`index` rows of two more kinds: gradients divided by AdamW's saved second moment (`--precondition adam`,
LESS/TrackStar), checked against a hand computation on the tiny model (one row, one module), with its refusals;
and TracIn per checkpoint (rows `[sqrt(lr_c) g_c]_c`), whose store scores and top rows equal `scores` of method
tracin, and whose build, SIGKILLed part-way, resumes to the same bytes."""

from __future__ import annotations

import json
import re
import shutil
import signal
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

import wherefrom.engine.run as run_module
from tests.engine.robust_workspace import invoke, make_workspace, partials, spawn, wait_until
from wherefrom.core.data import load_records
from wherefrom.core.encoding import encode_records, iterate_batches, pad_id
from wherefrom.core.search import search_store
from wherefrom.core.store import FolderLocked, SettingsMismatch, is_intact
from wherefrom.core.task import per_example_loss
from wherefrom.core.vectors import VectorStore
from wherefrom.engine.api import AttributionConfig
from wherefrom.engine.run import Run, RunConfig
from wherefrom.methods.registry import make_method
from wherefrom.models.finetune import FinetuneConfig, finetune, read_trainer_state
from wherefrom.models.loading import load_model
from wherefrom.models.optimizer_state import OPTIMIZER_STATE_FILE, MissingOptimizerState
from wherefrom.models.tiny import save_tiny

LORA_A = "base_model.model.model.layers.1.mlp.down_proj.lora_A.default"
ADAM = AttributionConfig(
    include=[r"layers\.1\.mlp\.down_proj\.lora_A"], batch_size=4, max_length=64, strategy="identity"
)
TRACIN = AttributionConfig(include=[r"layers\.1\.mlp\.down_proj"], batch_size=4, max_length=64)
RATES = [0.5, 2.0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama, 10 rows, a 2-epoch LoRA fine-tuning of its down projections (3 steps an epoch, so the
    checkpoints' AdamW states are at steps 3 and 6), and two full-model "checkpoints" for tracin."""
    root = make_workspace(tmp_path_factory.mktemp("adam"), n_train=10)
    loaded = load_model(root / "model", device="cpu")
    config = FinetuneConfig(epochs=2, learning_rate=1e-2, batch_size=4, max_length=64, lora_targets=["down_proj"])
    finetune(loaded.model, loaded.tokenizer, load_records(root / "train.jsonl"), config, root / "ft", progress=False)
    for k in (1, 2):
        save_tiny(root / f"checkpoint-{k}", arch="llama", seed=k)
    return root


def adam_run(root, folder, attribution=ADAM, adapter="ft/adapter", **options) -> Run:
    if options:
        config = RunConfig.for_method(
            options.pop("method"), str(root / "train.jsonl"), attribution, options, model=str(root / "model")
        )
        config = replace(config, adapter=str(root / adapter), device="cpu")
    else:
        config = RunConfig(
            str(root / "train.jsonl"), str(root / "model"), str(root / adapter), "cpu", attribution=attribution
        )
    run = Run.create(folder, config)
    run.fit()
    return run


def hand_gradient(root, adapter, row) -> torch.Tensor:
    """d L(row) / d W of the LoRA A matrix of layer 1's down projection, by autograd on the summed
    completion-token loss (L of the README), ``(r, in)``."""
    loaded = load_model(root / "model", adapter=root / adapter, device="cpu")
    weight = dict(loaded.model.named_parameters())[f"{LORA_A}.weight"]
    weight.requires_grad_(True)
    examples = encode_records([row], loaded.tokenizer, max_length=64)
    [(_ids, batch)] = list(iterate_batches(examples, 1, pad_id(loaded.tokenizer)))
    logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example_loss(logits, batch["labels"], "sum").sum().backward()
    return weight.grad.detach().clone()


def hand_divisor(checkpoint) -> torch.Tensor:
    """AdamW's ``sqrt(v / (1 - beta2^t)) + eps`` for that matrix, with torch's defaults beta2 = 0.999,
    eps = 1e-8 and the step count of the checkpoint's trainer_state.json."""
    with safe_open(str(checkpoint / OPTIMIZER_STATE_FILE), "pt") as stored:
        v = stored.get_tensor(f"{LORA_A}.weight")
    step = read_trainer_state(checkpoint)["step"]
    return (v / (1 - 0.999**step)).sqrt() + 1e-8


def test_finetune_checkpoints_keep_adams_state(workspace):
    for epoch, step in ((1, 3), (2, 6)):
        folder = workspace / "ft" / "checkpoints" / f"epoch-{epoch}"
        assert is_intact(folder / OPTIMIZER_STATE_FILE)  # checksummed like the other artefacts
        with safe_open(str(folder / OPTIMIZER_STATE_FILE), "pt") as stored:
            adam = json.loads(stored.metadata()["adam"])
            names = list(stored.keys())
        assert adam == {"step": step, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
        assert f"{LORA_A}.weight" in names and all("lora_" in n for n in names)


def test_adam_rows_equal_a_hand_computation(workspace, tmp_path):
    """Row 0 of the index (one row, one module) = g / (sqrt(v_hat) + eps) of the last checkpoint (the default
    for a run on the fine-tuning's final adapter), within 1e-5 of its largest entry; a query's score is the
    plain query gradient's product with it (LESS's convention)."""
    run = adam_run(workspace, tmp_path / "run")
    assert run.build_index(shard_size=4, precondition="adam") == 3
    store = VectorStore.open(tmp_path / "run" / "index")
    last = (workspace / "ft" / "checkpoints" / "epoch-2").resolve()
    assert store.settings["precondition"] == "adam" and store.settings["optimizer_state"]["checkpoint"] == str(last)
    train = load_records(workspace / "train.jsonl")
    expected = hand_gradient(workspace, "ft/adapter", train[0]) / hand_divisor(last)
    row = next(store.shards())[1][0]
    assert torch.allclose(row, expected.flatten(), rtol=0, atol=1e-5 * float(expected.abs().max()))
    query = load_records(workspace / "queries.jsonl")[0]
    score = Run.open(tmp_path / "run", device="cpu").scores([query]).total[0, 0]
    by_hand = hand_gradient(workspace, "ft/adapter", query).flatten() @ expected.flatten()
    assert torch.isclose(score, by_hand, rtol=1e-4), (float(score), float(by_hand))


def test_adam_of_an_earlier_checkpoint_and_the_refusals(workspace, tmp_path):
    first = workspace / "ft" / "checkpoints" / "epoch-1"
    run = adam_run(workspace, tmp_path / "run")
    run.build_index(shard_size=10, precondition="adam", optimizer_checkpoint=first)
    expected = hand_gradient(workspace, "ft/adapter", run.train[0]) / hand_divisor(first)
    row = next(VectorStore.open(tmp_path / "run" / "index").shards())[1][0]
    assert torch.allclose(row, expected.flatten(), rtol=0, atol=1e-5 * float(expected.abs().max()))

    with pytest.raises(ValueError, match=r"LoGra's Kronecker projection .* never forms it.*index a trak run"):
        adam_run(workspace, tmp_path / "logra", method="logra", dim_in=2, dim_out=2).build_index(precondition="adam")
    with pytest.raises(ValueError, match="take the place of a curvature; this run applies 'kfac'"):
        adam_run(workspace, tmp_path / "kfac", replace(ADAM, strategy="kfac")).build_index(precondition="adam")
    with pytest.raises(ValueError, match="--optimizer-checkpoint applies to --precondition adam only"):
        run.build_index(optimizer_checkpoint=first)
    # a file, or the final adapter, holds no state: the checkpoints that do are named (not "fine-tune again")
    last = workspace / "ft" / "checkpoints" / "epoch-2"
    other = adam_run(workspace, tmp_path / "other")
    for given, said in ((last / OPTIMIZER_STATE_FILE, "is a file"), (workspace / "ft" / "adapter", "holds no AdamW")):
        with pytest.raises(MissingOptimizerState, match=f"{re.escape(str(given))} {said}") as refused:
            other.build_index(precondition="adam", optimizer_checkpoint=given)
        assert str(last) in str(refused.value) and "fine-tune again" not in str(refused.value)
    assert not (tmp_path / "other" / "index").exists()
    # another --optimizer-checkpoint is an option: the recorded command reuses the finished store
    with pytest.raises(SettingsMismatch, match=r"optimizer_state\.checkpoint") as refused:
        run.build_index(shard_size=10, precondition="adam")
    # the recorded --device left out: a finished store is reused on any device (on a machine without the recorded
    # CUDA device, the command with it was refused)
    assert f"It is finished: `{run.index_command(device=False)}` reuses it" in str(refused.value)
    assert f"--optimizer-checkpoint {first.resolve()}" in run.index_command()
    # userL: the default after adam was named "precondition: recorded 'adam', now absent; unit_norm: recorded False,
    # now absent" (a raw store records them for adam only; unit_norm never changed)
    with pytest.raises(SettingsMismatch, match=r"precondition: recorded 'adam', now 'fitted'") as refused:
        run.build_index(shard_size=10)
    assert "unit_norm" not in str(refused.value) and "now absent;" not in str(refused.value).split("optimizer_state")[0]
    assert f"It is finished: `{run.index_command(device=False)}` reuses it" in str(refused.value)
    raw = adam_run(workspace, tmp_path / "raw")
    raw.build_index(shard_size=10)
    with pytest.raises(SettingsMismatch, match=r"precondition: recorded 'fitted', now 'adam'") as refused:
        raw.build_index(shard_size=10, precondition="adam")
    assert "unit_norm" not in str(refused.value)
    raw.build_index(shard_size=10)  # the same settings: reused
    old = tmp_path / "old"  # a fine-tuning saved before checkpoints kept the optimizer state
    shutil.copytree(workspace / "ft", old / "ft")
    (old / "ft" / "checkpoints" / "epoch-2" / OPTIMIZER_STATE_FILE).unlink()
    shutil.copytree(workspace / "model", old / "model")
    shutil.copy(workspace / "train.jsonl", old / "train.jsonl")
    old_run = adam_run(old, tmp_path / "old-run")
    with pytest.raises(MissingOptimizerState, match=r"checkpoints/epoch-2 holds no AdamW state"):
        old_run.build_index(precondition="adam")
    assert not (tmp_path / "old-run" / "index").exists()  # refused before anything was written
    code, out = invoke("index", "--run", tmp_path / "old-run", "--precondition", "adam")
    assert code == 2 and "holds no AdamW state" in out, out


def test_trak_adam_rows_project_the_divided_gradient(workspace, tmp_path):
    """trak: row 0 = P vec(g / (sqrt(v_hat) + eps)) (divided before the projection), P the run's projection."""
    run = adam_run(workspace, tmp_path / "run", method="trak", dim=8)
    run.build_index(shard_size=10, precondition="adam")
    divided = hand_gradient(workspace, "ft/adapter", run.train[0]) / hand_divisor(
        workspace / "ft" / "checkpoints" / "epoch-2"
    )
    expected = run.method.projection.project_flat(LORA_A, divided.reshape(1, -1))[0]
    row = next(VectorStore.open(tmp_path / "run" / "index").shards())[1][0]
    assert row.shape == (8,) and torch.allclose(row, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_tracin_adam_rows_divide_each_checkpoint_by_its_own_state(workspace, tmp_path):
    """LESS: checkpoint c's block of a row is sqrt(lr_c) g_c / (sqrt(v_hat_c) + eps), v_hat_c of checkpoint c."""
    checkpoints = [workspace / "ft" / "checkpoints" / f"epoch-{k}" for k in (1, 2)]
    options = {"checkpoints": [str(c) for c in checkpoints], "learning_rates": RATES, "base": str(workspace / "model")}
    run = adam_run(workspace, tmp_path / "run", method="tracin", **options)
    run.build_index(shard_size=10, precondition="adam")
    store = VectorStore.open(tmp_path / "run" / "index")
    [[name, count, out, inp]] = store.settings["rows_layout"]["blocks"]
    assert name == LORA_A and count == 2 and len(store.settings["optimizer_state"]) == 2
    row = next(store.shards())[1][0].reshape(count, out, inp)
    for c, checkpoint in enumerate(checkpoints):
        adapter = checkpoint.relative_to(workspace)
        expected = RATES[c] ** 0.5 * hand_gradient(workspace, adapter, run.train[0]) / hand_divisor(checkpoint)
        assert torch.allclose(row[c], expected, rtol=0, atol=1e-5 * float(expected.abs().max())), c


def tracin_run(root, folder, attribution=TRACIN, **extra) -> Run:
    options = {"checkpoints": [str(root / "checkpoint-1"), str(root / "checkpoint-2")], "learning_rates": RATES}
    options.update(extra)
    config = RunConfig.for_method("tracin", str(root / "train.jsonl"), attribution, options, model=str(root / "model"))
    run = Run.create(folder, replace(config, device="cpu"))
    run.fit()
    return run


def test_a_tracin_fit_counts_its_checkpoints_not_the_run_models_modules(workspace, tmp_path):
    """`fit` printed the run model's tracked modules (14 where tracin tracked a checkpoint's 8 LoRA modules)."""
    checkpoints = json.dumps([str(workspace / "checkpoint-1"), str(workspace / "checkpoint-2")])
    code, out = invoke(
        "fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", tmp_path / "run",
        "--device", "cpu", "--method", "tracin", "--option", f"checkpoints={checkpoints}",
        "--option", f"learning_rates={json.dumps(RATES)}",
    )  # fmt: skip
    assert code == 0 and "tracin fitted: 2 checkpoints, 10 rows" in out and "modules" not in out, out


@pytest.mark.parametrize("cosine", [False, True])
def test_tracin_store_scores_and_tops_equal_tracins(workspace, tmp_path, cosine):
    """float32 rows: per-module scores within 1e-5 of the largest of `scores` with method tracin (sum_c lr_c
    q_c . g_c, or with normalize="cosine" and --unit-norm sum_c lr_c cos); the exact search's top 3 rows of
    each query have tracin's 3 best scores (rows with equal text tie), its best row is tracin's."""
    attribution = replace(TRACIN, normalize="cosine") if cosine else TRACIN
    run = tracin_run(workspace, tmp_path / "run", attribution)
    if cosine:
        with pytest.raises(ValueError, match="needs --unit-norm"):
            run.build_index(shard_size=4)
    assert run.build_index(shard_size=4, unit_norm=cosine) == 3
    assert not (tmp_path / "run" / "index-parts").exists()  # the per-checkpoint parts go once the index is complete
    queries = load_records(workspace / "queries.jsonl")
    loaded = load_model(workspace / "model", device="cpu")
    options = {"checkpoints": [str(workspace / f"checkpoint-{k}") for k in (1, 2)], "learning_rates": RATES}
    expected = make_method("tracin", loaded.model, loaded.tokenizer, attribution, **options).scores(queries, run.train)
    reopened = Run.open(tmp_path / "run", device="cpu")
    got = reopened.scores(queries)
    assert got.module_names == expected.module_names and got.train_ids == expected.train_ids
    scale = float(expected.per_module.abs().max())
    assert torch.allclose(got.per_module, expected.per_module, rtol=0, atol=1e-5 * scale)
    store = reopened.open_index()
    _ids, vectors = reopened.query_vectors(queries, store)
    found = search_store(store, vectors, 3, "exact").proponents.rows
    best = expected.total.topk(3, dim=1).values  # rows compared by tracin's scores: equal rows may tie
    assert torch.allclose(expected.total.gather(1, found), best, rtol=0, atol=1e-5 * scale)
    assert torch.equal(found[:, 0], expected.total.argmax(dim=1))


def test_a_tracin_index_build_that_lost_the_runs_writer_lock_writes_no_part(workspace, tmp_path, monkeypatch):
    """The per-checkpoint parts (RUN/index-parts/, the long model passes) are written by writers of their own, which
    kept no guard: an orphaned rank went on writing them after a rerun took the run. They now take the index
    writer's guard (store.holder_guard), so a build whose lock changed hands writes no part shard."""
    run = tracin_run(workspace, tmp_path / "run")

    def lost(folder):
        def check():
            raise FolderLocked(f"{folder}'s writer lock changed hands (a rerun)")

        return check

    monkeypatch.setattr(run_module, "holder_guard", lost)
    with pytest.raises(FolderLocked, match="changed hands"):
        run.build_index(shard_size=4)
    assert not list((tmp_path / "run").rglob("shard-*.safetensors"))


def test_tracin_index_killed_then_resumed_is_byte_identical(workspace, tmp_path):
    """A real `wherefrom index` process of a tracin run SIGKILLed while it writes checkpoint 0's blocks, then
    the same command: the store equals an uninterrupted build byte for byte (every file but the lock)."""
    for name in ("clean", "killed"):
        tracin_run(workspace, tmp_path / name)
    code, out = invoke("index", "--run", tmp_path / "clean", "--shard-size", "1")
    assert code == 0 and "10 shards written now" in out, out
    part = tmp_path / "killed" / "index-parts" / "checkpoint-0"
    process = spawn("index", "--run", tmp_path / "killed", "--shard-size", "1")
    wait_until(lambda: is_intact(part / "shard-00002.safetensors"), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    index = tmp_path / "killed" / "index"
    if (index / "index.json").exists():
        pytest.skip("the index finished before the kill")
    code, out = invoke("index", "--run", tmp_path / "killed", "--shard-size", "1")
    assert code == 0 and "10 shards written now" in out, out

    def stored(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}

    assert stored(index) == stored(tmp_path / "clean" / "index") and not partials(tmp_path / "killed")
    assert not (tmp_path / "killed" / "index-parts").exists()


def test_tracin_damaged_shard_is_rebuilt_from_its_checkpoints(workspace, tmp_path):
    """With the parts gone (the index was complete), a flipped byte in one shard: `index` names it and rebuilds
    that shard alone (each checkpoint's block of it again), to the same bytes."""
    run = tracin_run(workspace, tmp_path / "run")
    run.build_index(shard_size=4)
    shard = tmp_path / "run" / "index" / "shard-00001.safetensors"
    clean = shard.read_bytes()
    shard.write_bytes(clean[:-5] + bytes([clean[-5] ^ 1]) + clean[-4:])
    again = Run.open(tmp_path / "run", device="cpu", factors=False)
    assert again.build_index(shard_size=4) == 1
    assert any("shard-00001.safetensors is damaged" in n for n in again.notices) and shard.read_bytes() == clean
    assert not (tmp_path / "run" / "index-parts").exists()


def test_projected_tracin_rows(workspace, tmp_path):
    """--option dim=16: rows of (C, 16) per module; the store's scores equal the projected method's (1e-5 of the
    largest); at a dim beyond the module's size (identity) the projected path equals unprojected TracIn."""
    run = tracin_run(workspace, tmp_path / "run", dim=16)
    run.build_index(shard_size=4)
    store = VectorStore.open(tmp_path / "run" / "index")
    assert store.settings["rows_layout"]["blocks"] == [["model.layers.1.mlp.down_proj", 2, 16]] and store.dim == 32
    queries = load_records(workspace / "queries.jsonl")
    loaded = load_model(workspace / "model", device="cpu")
    options = {"checkpoints": [str(workspace / f"checkpoint-{k}") for k in (1, 2)], "learning_rates": RATES}

    def tracin(**extra):
        return make_method("tracin", loaded.model, loaded.tokenizer, TRACIN, **options, **extra)

    expected = tracin(dim=16).scores(queries, run.train)
    got = Run.open(tmp_path / "run", device="cpu").scores(queries)
    scale = float(expected.per_module.abs().max())
    assert torch.allclose(got.per_module, expected.per_module, rtol=0, atol=1e-5 * scale)
    full, unprojected = tracin(dim=4096).scores(queries, run.train), tracin().scores(queries, run.train)
    assert full.module_names == unprojected.module_names
    assert torch.allclose(full.per_module, unprojected.per_module, rtol=0, atol=1e-5 * scale)


def run_index(folder):
    """A call that builds ``folder``'s index (shards of 4 rows), the run opened without its fitted state."""
    return lambda: Run.open(folder, device="cpu", factors=False).build_index(shard_size=4)


def test_a_tracin_checkpoint_rewritten_in_place_is_a_changed_setting(workspace, tmp_path):
    """A tracin index's rows are gradients at each checkpoint's weights, but its settings named a checkpoint by
    path and learning rate only: a checkpoint rewritten in place left a finished store serving rows of the old
    weights to queries of the new ones, and a killed build resumed after the change mixed both. Each checkpoint's
    weights fingerprint is now a setting: the store is refused naming it, by queries and by `index`. The fitted run
    itself refuses first (userH: its learning rates were read from the old checkpoints), naming the folder; once it
    is fitted again, as its message says, the store is refused as above."""
    from wherefrom.models.loading import ModelLoadError

    for k in (1, 2):
        shutil.copytree(workspace / f"checkpoint-{k}", tmp_path / f"checkpoint-{k}")
    options = {"checkpoints": [str(tmp_path / f"checkpoint-{k}") for k in (1, 2)], "learning_rates": RATES}
    config = RunConfig.for_method(
        "tracin", str(workspace / "train.jsonl"), TRACIN, options, model=str(workspace / "model")
    )
    run = Run.create(tmp_path / "run", replace(config, device="cpu"))
    run.fit()
    run.build_index(shard_size=4)
    Run.open(tmp_path / "run", device="cpu").open_index()  # unchanged: served
    weights = tmp_path / "checkpoint-1" / "model.safetensors"
    weights.write_bytes((tmp_path / "checkpoint-2" / "model.safetensors").read_bytes())
    for opening in (lambda: Run.open(tmp_path / "run", device="cpu"), run_index(tmp_path / "run")):
        with pytest.raises(ModelLoadError, match=r"checkpoint-1'\] hold other weights than when the run was fitted"):
            opening()
    shutil.rmtree(tmp_path / "run" / "method")  # as the refusal says: its fit again
    Run.create(tmp_path / "run", replace(config, device="cpu")).fit()
    reopened = Run.open(tmp_path / "run", device="cpu")
    index = tmp_path / "run" / "index"
    recorded = f"wherefrom index --run {tmp_path / 'run'} --shard-size 4 --dtype float32 --precondition fitted"
    with pytest.raises(SettingsMismatch, match=r"rows_layout\.projection\.weights") as refused:
        reopened.open_index()
    assert f"delete {index} and rerun `{recorded}" in str(refused.value)  # no bare "rebuild it": the way to
    with pytest.raises(SettingsMismatch, match=r"rows_layout\.projection\.weights") as refused:
        Run.open(tmp_path / "run", device="cpu", factors=False).build_index(shard_size=4)
    # no option brings the old weights back: the hint said the recorded command "reuses it", which refused again
    assert "reuses it" not in str(refused.value) and "No `wherefrom index` option chooses what differs" in str(
        refused.value
    )
    assert f"delete {index} and rerun" in str(refused.value) and recorded in str(refused.value)
    shutil.rmtree(index)  # followed: the store is rebuilt from the current weights and served
    Run.open(tmp_path / "run", device="cpu", factors=False).build_index(shard_size=4)
    Run.open(tmp_path / "run", device="cpu").open_index()


def test_a_tracin_row_its_float16_index_cannot_hold_names_the_index_to_delete(workspace, tmp_path, monkeypatch):
    """A tracin index is built through one store per checkpoint (RUN/index-parts/checkpoint-C/) in the index's dtype.
    A row beyond float16's range stopped the part's build with advice to delete that part folder, after which the same
    index still stopped, and `scores --search` said to finish it with the same command. The advice names RUN/index
    (the parts of other settings are discarded when it is rebuilt), and the index records why it stopped."""
    from wherefrom.methods.tracin import TracIn

    run = tracin_run(workspace, tmp_path / "run")
    original = TracIn.checkpoint_rows

    def huge(self, *args, **kwargs):
        for ids, rows in original(self, *args, **kwargs):
            yield ids, rows * 1e12

    monkeypatch.setattr(TracIn, "checkpoint_rows", huge)
    index = run.folder / "index"
    with pytest.raises(ValueError, match=rf"beyond the largest float16 .*: delete {re.escape(str(index))} and rebuild"):
        run.build_index(shard_size=4, dtype="float16")
    assert "beyond the largest float16" in run.resume_advice() and "wherefrom index" not in run.resume_advice()


def test_query_refuses_to_split_scores_an_adam_index_gave(workspace, tmp_path):
    """userA: `query --per-token` on a run with an adam index printed the adam score (43.1) beside token parts that
    summed to the plain gradient score (4.64): the split is of gradients recomputed at the run's settings. Now
    --per-token and --html (which splits the same way) are refused naming the index; a run whose index holds the
    raw gradients still splits, each row's parts summing to its score."""
    from tests.cli.conftest import invoke as cli  # the whole result: stdout apart

    query = load_records(workspace / "queries.jsonl")[0]
    asked = ("query", query.prompt, query.completion, "--top-k", "2", "--device", "cpu")
    for precondition in ("adam", "fitted"):
        folder = tmp_path / precondition
        adam_run(workspace, folder).build_index(shard_size=4, precondition=precondition)
        for flags in (["--per-token"], ["--html", str(tmp_path / "q.html")], ["--per-token", "--json"]):
            result = cli(*asked, "--run", folder, *flags)
            if precondition == "adam":
                said = " ".join(result.output.split())
                assert result.exit_code == 2, result.output
                assert f"{flags[0]} split each score over tokens" in said and "precondition adam" in said
            else:
                assert result.exit_code == 0, result.output
        assert not (tmp_path / "q.html").exists() or precondition == "fitted"
    plain = cli(*asked, "--run", tmp_path / "adam", "--json")
    assert plain.exit_code == 0, plain.output  # the adam scores themselves, as before
    out = cli(*asked, "--run", tmp_path / "fitted", "--json", "--per-token").stdout
    split = json.loads(out[out.index("{") :])
    for entry in split["proponents"]:
        assert sum(v for _, v in entry["tokens"]) == pytest.approx(entry["score"], rel=1e-3)
