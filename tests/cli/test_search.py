"""``--search``, ``--search-option`` and ``--prefilter-bm25`` of ``query`` and ``scores``: checked before
any work, refused on a run without a vector store, and the search they run (on an in-memory store)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli.conftest import invoke
from tests.core.test_search import Rows, clustered
from wherefrom.cli.run import end_name, print_search, print_tops, store_search
from wherefrom.core.data import Record, load_records
from wherefrom.core.vectors import STOPPED, VectorStore
from wherefrom.engine.run import Run
from wherefrom.methods.lexical import BM25, bm25_candidates

pytest.importorskip("faiss")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--search", "annoy"], "--search annoy: unknown value; choose one of exact, faiss"),
        (["--search", "faiss", "--search-option", "nprobe=0"], "option 'nprobe' got 0"),
        (["--search", "faiss", "--search-option", "probes=3"], "has no option(s) ['probes']"),
        (["--prefilter-bm25", "0"], "--prefilter-bm25 0: must be >= 1"),
        (["--search", "exact", "--search-option", "nprobe=3"], "it needs --search faiss (got --search exact)"),
        (["--search-option", "kind=pq"], "it needs --search faiss (got no --search)"),  # was silently ignored
        (["--search", "exact", "--search-option", "graph=angular"], "it needs --search faiss (got --search exact)"),
        (["--search-option", "m=4"], "it needs --search faiss (got no --search)"),  # not "kind=ivf does not use"
        (["--search", "faiss", "--search-option", "kind=ivf", "--search-option", "kind=hnsw"], "kind is given twice"),
        (["--search", "faiss", "--search-option", "hnsw.ef_search=8"], "has no option(s) ['hnsw.ef_search']"),
        (["--search", "faiss", "--search-option", "kind=pq", "--search-option", "nprobe=4"], "kind=pq does not use"),
        (["--no-recall"], "it needs --search faiss (got no --search)"),
        (["--search", "exact", "--no-recall"], "it needs --search faiss (got --search exact)"),
        (["--search", "exact"], "is not a wherefrom run directory"),
        (["--prefilter-bm25", "5"], "is not a wherefrom run directory"),
    ],
)
def test_search_flags_are_checked_before_any_work(workspace, tmp_path, flags, message):
    run = tmp_path / "run"  # no fit, no model: the checks come first
    for command in (["query", "a prompt", "a completion"], ["scores", "--queries", workspace / "queries.jsonl"]):
        result = invoke(*command, "--run", run, *flags)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
        assert not run.exists()


def store_of(train, dim=16, seed=0):
    rows, queries = clustered(len(train), dim, 4, seed)
    source = Rows(rows, 7)
    source.ids = [row.id for row in train]
    return source, queries


def test_prefilter_restricts_each_query_to_its_bm25_rows(workspace):
    train, queries = load_records(workspace / "train.jsonl"), load_records(workspace / "queries.jsonl")
    source, vectors = store_of(train)
    report = store_search(source, vectors[: len(queries)], queries, train, 4, None, None, prefilter_bm25=5)
    candidates = bm25_candidates(queries, train, 5)
    for found, allowed in zip(report.proponents.ids + report.opponents.ids, candidates + candidates):
        assert set(found) <= {train[j].id for j in allowed} and len(found) == 4
    full = store_search(source, vectors[: len(queries)], queries, train, 4, "exact", None, None)
    assert any(a != b for a, b in zip(full.proponents.ids, report.proponents.ids))  # the filter changed something
    # userL: the summary line of a prefiltered search read as a search of the whole store
    assert f"exact search: {report.seconds * 1000:.1f} ms among each query's candidate rows only (up to 5 of" in (
        report.summary(4)
    ) and f"of {len(train)} rows)" in report.summary(4)
    assert "candidate" not in full.summary(4)


def test_prefilter_says_when_a_querys_candidates_share_no_word_with_it(workspace, capsys):
    """A query whose words match no training row got N arbitrary rows (file order) as its BM25 candidates, and its
    'proponents' among them, with nothing said; now stderr says how many candidates matched."""
    train = load_records(workspace / "train.jsonl")
    source, vectors = store_of(train)
    unrelated = [Record("odd", "zzqx wvvy", " kkjj"), *load_records(workspace / "queries.jsonl")[:1]]
    candidates, matched = BM25().fit(train).matched_candidates(unrelated, 5)
    assert matched[0] == 0 and candidates[0] == [0, 1, 2, 3, 4] and matched[1] == 5
    store_search(source, vectors[:2], unrelated, train, 3, None, None, prefilter_bm25=5)
    said = " ".join(capsys.readouterr().err.split())
    assert "note: odd: BM25 matched 0 of its 5 candidate rows; the other 5 share no word with it" in said, said
    assert said.count("BM25 matched") == 1  # the query whose candidates all matched: nothing said


def test_faiss_search_prints_tops_and_recall(workspace, tmp_path, capsys):
    train, queries = load_records(workspace / "train.jsonl"), load_records(workspace / "queries.jsonl")
    source, vectors = store_of(train)
    report = store_search(
        source, vectors[: len(queries)], queries, train, 3, "faiss", {"nlist": 2, "nprobe": 2}, None, tmp_path
    )
    assert (tmp_path / "faiss-ivf.safetensors").is_file()
    assert torch.equal(report.recall, torch.ones(2, len(queries), dtype=torch.float64))
    print_search(report, [q.id for q in queries], 3, {row.id: row.label for row in train})
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 * len(queries)
    assert lines[0].startswith(f"{queries[0].id} proponents: {report.proponents.ids[0][0]}")
    assert lines[-1].startswith(f"{queries[-1].id} opponents: ")
    assert "faiss search:" in err and "recall@3 vs exact: proponents 1.000, opponents 1.000" in err


def test_pq_search_of_bm25_candidates_is_the_exact_search_and_builds_no_index(workspace, tmp_path, capsys):
    """A ``pq`` index ranks candidates by its float32 rows (fast scan takes no selector): the exact search of the
    candidates, so none is built (it was, unused) and the report says which search ran."""
    train, queries = load_records(workspace / "train.jsonl"), load_records(workspace / "queries.jsonl")
    source, vectors = store_of(train)
    args = (source, vectors[: len(queries)], queries, train, 4)
    report = store_search(*args, "faiss", {"kind": "pq"}, 6, tmp_path)
    exact = store_search(*args, "exact", None, 6, tmp_path)
    assert not list(tmp_path.iterdir())
    assert report.mode == "exact" and report.recall is None
    for end in ("proponents", "opponents"):
        assert torch.equal(getattr(report, end).rows, getattr(exact, end).rows)
    print_search(report, [q.id for q in queries], 4, {})
    assert "exact search: " in capsys.readouterr().err and "kind=pq ranks the candidates" in report.summary(4)
    given = store_search(*args, "faiss", {"kind": "pq", "refine": 8}, 6, tmp_path)  # named, not silently ignored
    assert "options ['refine'] unused" in given.summary(4) and not list(tmp_path.iterdir())


def test_search_lines_name_rows_on_the_wrong_side_of_zero():
    """A printed end holds ``opponents`` (``proponents``) only where every score is negative (positive); else it
    says how many are not, without a ``: `` inside the name (the lines split at the first one)."""
    assert end_name("opponents", [-2.0, -1.0]) == "opponents"
    assert end_name("opponents", [-2.0, 0.0, 3.0]) == "lowest scores (2 of 3 >= 0, not opponents)"
    assert end_name("proponents", [4.0, -1.0]) == "highest scores (1 of 2 <= 0, not proponents)"
    nan = float("nan")  # the padding of a short candidate list: not shown, not counted
    assert end_name("proponents", [4.0, nan]) == "proponents"
    assert end_name("opponents", [-1.0, 2.0, nan, nan]) == "lowest scores (1 of 2 >= 0, not opponents)"


def test_an_end_a_search_found_none_of_says_so(capsys):
    """An IVF search of BM25 candidates in cells it did not probe (nprobe 1) found none: the line ended in a bare
    ``q opponents: ``."""
    from types import SimpleNamespace

    from wherefrom.core.search import SearchResult

    found = SearchResult(torch.tensor([[0]]), torch.tensor([[2.0]]), [["a"]])
    none = SearchResult(torch.full((1, 2), -1), torch.full((1, 2), float("nan")), [[]], opponents=True)
    report = SimpleNamespace(
        ends=lambda: [("proponents", found), ("opponents", none)], summary=lambda k, similarity=False: "searched"
    )
    print_search(report, ["q"], 2, {})
    assert capsys.readouterr().out.splitlines() == ["q proponents: a (+2)", "q opponents: none found"]


def test_scores_lines_name_top_rows_that_are_not_proponents(capsys):
    """``scores``' line of a query whose top rows score <= 0 said nothing of it (``q: a (-1)``), while ``query``
    and ``--search`` named the end; now the line names it the same way, and an all-positive line is unchanged."""
    from wherefrom.core.scoring import Scores

    scores = Scores(["neg", "pos"], ["a", "b", "c"], ["m"], torch.tensor([[[-1.0, -2.0, 0.5], [3.0, 2.0, 1.0]]]))
    print_tops(scores, 2, {"a": "angry"})
    assert capsys.readouterr().out.splitlines() == [
        "neg highest scores (1 of 2 <= 0, not proponents): c (+0.5), a [angry] (-1)",
        "pos: a [angry] (+3), b (+2)",
    ]


def test_prefilter_needs_the_store_rows_in_training_order(workspace):
    train, queries = load_records(workspace / "train.jsonl"), load_records(workspace / "queries.jsonl")
    source, vectors = store_of(train)
    with pytest.raises(ValueError, match="not the vector store's rows in order"):
        store_search(source, vectors[: len(queries)], queries, train[::-1], 3, None, None, 5)


def computed(*_args):
    raise LookupError("queries computed")


def test_search_of_a_run_index_finds_the_full_scores_tops(workspace, tmp_path, monkeypatch):
    """End to end on the tiny GPT-2: fit, no index (named), index, then exact search = the tops of the
    full scores (same rows, same order), FAISS with its recall, and the BM25 prefilter."""
    run = tmp_path / "run"
    fitted = invoke("fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", run)
    assert fitted.exit_code == 0, fitted.output
    queries = workspace / "queries.jsonl"
    missing = invoke("scores", "--run", run, "--queries", queries, "--search", "exact")
    assert missing.exit_code == 2 and "has no vector store of training rows" in " ".join(missing.output.split())
    assert invoke("index", "--run", run, "--shard-size", 7).exit_code == 0
    full = invoke("scores", "--run", run, "--queries", queries, "--top-k", 5)
    assert full.exit_code == 0, full.output
    tops = {line.split(":")[0]: line.split(": ")[1] for line in full.stdout.splitlines() if ": " in line}
    exact = invoke("scores", "--run", run, "--queries", queries, "--top-k", 5, "--search", "exact")
    assert exact.exit_code == 0, exact.output
    proponents = [line for line in exact.stdout.splitlines() if " proponents: " in line]
    assert len(proponents) == 3
    for line in proponents:
        query, found = line.split(" proponents: ")
        assert [r.split(" ")[0] for r in found.split(", ")] == [r.split(" ")[0] for r in tops[query].split(", ")]
    faiss_run = invoke("scores", "--run", run, "--queries", queries, "--search", "faiss", "--search-option", "nlist=2")
    assert faiss_run.exit_code == 0, faiss_run.output
    assert "recall@10 vs exact" in " ".join(faiss_run.output.split())
    with monkeypatch.context() as patched:  # the saved index searched, no shard read or hashed, no exact search
        for name in ("verify", "shards", "blocks"):
            patched.setattr(VectorStore, name, lambda *args, name=name, **kwargs: pytest.fail(f"{name} was called"))
        quick = invoke("scores", "--run", run, "--queries", queries, "--search", "faiss", "--search-option", "nlist=2",
                       "--no-recall")  # fmt: skip
    assert quick.exit_code == 0, quick.output
    assert "index reused" in quick.output and "recall" not in quick.output
    assert quick.stdout == faiss_run.stdout  # the same tops
    dim = VectorStore.open(run / "index").dim
    for option, message in ((f"pq_m={dim + 1}", f"pq_m={dim + 1} must divide"), ("nlist=2", "")):
        with monkeypatch.context() as patched:  # a kind that cannot index the store: refused before the queries
            patched.setattr(Run, "query_vectors", computed)
            refused = invoke("scores", "--run", run, "--queries", queries, "--search", "faiss", "--search-option",
                             "kind=ivf-pq" if option.startswith("pq") else "kind=ivf", "--search-option", option)  # fmt: skip
        if message:
            assert refused.exit_code == 2 and message in " ".join(refused.output.split()), refused.output
        else:
            assert isinstance(refused.exception, LookupError)  # the check passed: the queries came next
    filtered = invoke("query", "a prompt", "a completion", "--run", run, "--prefilter-bm25", 4, "--top-k", 3)
    assert filtered.exit_code == 0, filtered.output
    none = invoke("query", "a prompt", "a completion", "--run", run, "--search", "exact", "--by-module", 0)
    assert none.exit_code == 0 and none.stdout == invoke("query", "a prompt", "a completion", "--run", run,
                                                         "--search", "exact").stdout  # fmt: skip
    assert filtered.stdout.count("query proponents: ") == 1
    check_search_json(run, tmp_path)
    for command, flags, shown in (  # every flag about the full scores is refused with a search, not ignored
        (("query", "a prompt", "a completion"), ("--by-module", 5), "--by-module 5 needs"),
        (("query", "a prompt", "a completion"), ("--per-token", "--html", "x.html"), "--per-token, --html x.html need"),
        (("scores", "--queries", queries), ("--name", "other"), "--name other needs"),
        (("scores", "--queries", queries), ("--overwrite",), "--overwrite needs"),
    ):
        ignored = invoke(*command, "--run", run, "--search", "exact", *flags)
        assert ignored.exit_code == 2 and shown in " ".join(ignored.output.split()), ignored.output
    assert not (run / "scores" / "other.json").exists()


def check_search_json(run, tmp_path):
    """``query --json`` with a search (refused before: userH): the full query JSON's rows and scores at each end
    (float32 sums in another order: 1e-5 relative), without ``top_modules``, with the search's mode, time and
    recall; a prefilter of fewer rows than --top-k gives shorter ends (no padding); the report reads it."""
    full = invoke("query", "a prompt", "a completion", "--run", run, "--json", "--top-k", 4, "--by-module", 0)
    searched = invoke("query", "a prompt", "a completion", "--run", run, "--json", "--top-k", 4, "--search", "exact")
    assert full.exit_code == 0 and searched.exit_code == 0, searched.output
    full, exact = json.loads(full.stdout), json.loads(searched.stdout)
    assert {k: exact[k] for k in ("query", "strategy", "sign")} == {k: full[k] for k in ("query", "strategy", "sign")}
    for end in ("proponents", "opponents"):
        assert [e["id"] for e in exact[end]] == [e["id"] for e in full[end]]
        assert [e["kind"] for e in exact[end]] == [e["kind"] for e in full[end]]
        assert [e["score"] for e in exact[end]] == pytest.approx([e["score"] for e in full[end]], rel=1e-5)
        assert all(e.keys() == {"id", "score", "kind", "label", "prompt", "completion"} for e in exact[end])
    assert exact["search"]["mode"] == "exact" and exact["search"]["recall"] is None and exact["search"]["seconds"] >= 0
    approximate = invoke("query", "a prompt", "a completion", "--run", run, "--json", "--search", "faiss",
                         "--search-option", "nlist=2")  # fmt: skip
    assert approximate.exit_code == 0, approximate.output
    recall = json.loads(approximate.stdout)["search"]["recall"]
    assert len(recall) == 2 and all(0 <= r <= 1 for r in recall)
    few = invoke("query", "a prompt", "a completion", "--run", run, "--json", "--prefilter-bm25", 2, "--top-k", 5)
    assert few.exit_code == 0, few.output
    assert [len(json.loads(few.stdout)[end]) for end in ("proponents", "opponents")] == [2, 2]
    (tmp_path / "q.json").write_text(searched.stdout)
    page = invoke("report", tmp_path / "q.json", "--out", tmp_path / "q.html")
    assert page.exit_code == 0 and (tmp_path / "q.html").exists(), page.output


def test_a_search_reads_each_shard_once_and_names_a_damaged_one_with_the_rebuild_command(
    workspace, tmp_path, monkeypatch
):
    """`--search exact` hashed every shard (verify) and then read it again for the search; now the search hashes a
    shard as it first reads it. A shard damaged in place (its size kept, so opening the store passes) still stops
    every search before any result, named with the command that rebuilds the run's index."""
    run = tmp_path / "run"
    fitted = invoke("fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", run)
    assert fitted.exit_code == 0, fitted.output
    assert invoke("index", "--run", run, "--shard-size", 7).exit_code == 0
    queries = workspace / "queries.jsonl"
    with monkeypatch.context() as patched:
        patched.setattr(VectorStore, "verify", lambda *args, **kwargs: pytest.fail("verify was called"))
        exact = invoke("scores", "--run", run, "--queries", queries, "--search", "exact")
    assert exact.exit_code == 0 and exact.stdout.count(" proponents: ") == 3, exact.output
    shard = run / "index" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    for flags in (("--search", "exact"), ("--search", "faiss", "--search-option", "nlist=2"), ("--prefilter-bm25", 4)):
        damaged = invoke("scores", "--run", run, "--queries", queries, *flags)
        said = " ".join(damaged.output.split())
        assert damaged.exit_code == 2 and "shard-00001.safetensors is damaged" in said, (flags, said)
        assert "; rebuild the store: rerun `wherefrom index --run" in said and said.count("rebuild") == 1, said
        assert "proponents" not in damaged.stdout


def test_a_run_without_vector_rows_is_refused_by_name_not_sent_to_index(workspace, tmp_path):
    """A bm25 run has no vector store and `index` refuses it: `--search` says so instead of pointing at `index`."""
    run = tmp_path / "bm25-run"
    fitted = invoke("fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", run,
                    "--method", "bm25")  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    searched = invoke("scores", "--run", run, "--queries", workspace / "queries.jsonl", "--search", "exact")
    text = " ".join(searched.output.split())
    assert searched.exit_code == 2 and "is a 'bm25' run" in text and "wherefrom index" not in text, text


def test_a_store_stopped_on_a_row_it_cannot_hold_is_named_not_sent_back_to_the_same_command(workspace, tmp_path):
    """`index --dtype float16` stops on a preconditioned row beyond 65504 (a tiny absolute damping); `scores`/`query
    --search` then said to finish the store with that same float16 command, which stops on the same row again. They,
    and an `index` rerun with other settings, now give the reason the build stopped (delete, rebuild in a wider
    dtype); the recorded command comes back once a build starts again."""
    run = tmp_path / "run"
    fitted = invoke("fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", run,
                    "--method", "logra", "--damping", "1e-12")  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    stopped = invoke("index", "--run", run, "--dtype", "float16")
    reason = "beyond the largest float16 (65504); this store cannot hold it: delete"
    assert stopped.exit_code != 0 and reason in " ".join(stopped.output.split()), stopped.output
    for command in (("scores", "--queries", workspace / "queries.jsonl"), ("query", "a prompt", "a completion")):
        refused = invoke(*command, "--run", run, "--search", "exact")
        text = " ".join(refused.output.split())
        assert refused.exit_code == 2 and "has no finished vector store" in text and reason in text, text
        assert "its build stopped on a row it cannot store" in text and "`wherefrom index" not in text, text
    other = invoke("index", "--run", run, "--dtype", "bfloat16")
    text = " ".join(other.output.split())
    assert other.exit_code == 2 and "dtype: recorded 'float16', now 'bfloat16'" in text, text
    assert reason in text and f"or delete {run / 'index'} to index with the new settings" in text, text
    assert (run / "index" / STOPPED).exists()  # a refused rerun leaves the record


@pytest.mark.parametrize("method", ["repsim", "bm25", "gradsim"])
def test_a_similarity_methods_outputs_call_no_row_a_proponent(workspace, tmp_path, method):
    """userM: a bm25/repsim run's score record said ``"sign": "positive = proponent"``, its top-k CSV called every
    high row a ``proponent`` and ``query --json`` did too (only the report said "a similarity"). Every output of a
    similarity method's scores now says ``higher = more similar`` and calls its ends ``highest``/``lowest``
    (scores, query, query --json, its view, the search of a repsim index); an influence-style method (gradsim)
    keeps proponents and opponents."""
    similar = method != "gradsim"
    run = tmp_path / method
    fitted = invoke("fit", "--train", workspace / "train.jsonl", "--model", workspace / "model", "--run", run,
                    "--method", method)  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    scored = invoke("scores", "--run", run, "--queries", workspace / "queries.jsonl", "--top-k", 3)
    assert scored.exit_code == 0, scored.output
    record = json.loads((run / "scores" / "scores.json").read_text())
    assert record["sign"].startswith("higher = more similar" if similar else "positive = proponent"), record["sign"]
    kinds = {line.split(",")[1] for line in (run / "scores" / "scores.top.csv").read_text().splitlines()[1:]}
    assert (kinds <= {"highest", "lowest"}) == similar and kinds, kinds
    assert not similar or "highest scores" in scored.stdout, scored.stdout  # gradsim's: only where a top row is <= 0
    asked = invoke("query", "a prompt", "a completion", "--run", run, "--json", "--top-k", 3, "--by-module", 0)
    assert asked.exit_code == 0, asked.output
    report = json.loads(asked.stdout)
    assert report["sign"] == record["sign"] and report["sign"] != ""
    assert ({e["kind"] for end in ("proponents", "opponents") for e in report[end]} <= {"highest", "lowest"}) == similar
    printed = invoke("query", "a prompt", "a completion", "--run", run, "--top-k", 3, "--by-module", 0)
    assert printed.exit_code == 0 and (not similar or "highest scores" in printed.stdout), printed.stdout
    (tmp_path / "q.json").write_text(asked.stdout)
    assert invoke("report", tmp_path / "q.json", "--out", tmp_path / "q.html").exit_code == 0
    page = (tmp_path / "q.html").read_text()
    assert ("similarity, not influence)" in page) == similar  # the note under the title (the page's head names both)
    assert not similar or ("Lowest scores" in page and "Proponents" not in page and "not opponents" not in page)
    analysed = invoke("influence", "--run", run)  # reviewV: layer tables of |influence| over a similarity's rows
    assert analysed.exit_code == (2 if similar else 0), analysed.output
    assert ("its scores are a" in " ".join(analysed.output.split())) == similar
    attributed = invoke("attribute", "--train", workspace / "train.jsonl", "--queries", workspace / "queries.jsonl",
                        "--model", workspace / "model", "--method", method, "--out", tmp_path / "attributed")  # fmt: skip
    assert attributed.exit_code == 0 and (not similar or "highest scores" in attributed.stdout), attributed.output
    assert json.loads((tmp_path / "attributed" / "scores.json").read_text())["sign"] == record["sign"]
    if method != "repsim":
        return
    assert invoke("index", "--run", run, "--shard-size", 7).exit_code == 0
    searched = invoke("query", "a prompt", "a completion", "--run", run, "--search", "exact", "--top-k", 3)
    assert searched.exit_code == 0 and "query highest scores: " in searched.stdout, searched.stdout
    assert "query lowest scores: " in searched.stdout and "proponent" not in searched.stdout
    found = json.loads(invoke("query", "a prompt", "a completion", "--run", run, "--json", "--search", "exact").stdout)
    assert {e["kind"] for end in ("proponents", "opponents") for e in found[end]} == {"highest", "lowest"}
    approximate = invoke("query", "a prompt", "a completion", "--run", run, "--search", "faiss", "--search-option",
                         "nlist=2")  # fmt: skip
    said = " ".join(approximate.output.split())  # reviewV: the summary line said "proponents ..., opponents ..."
    assert approximate.exit_code == 0 and "vs exact: highest scores " in said and "proponents" not in said, said
