"""`moeguard sweep`: the knowledge-loss study's outputs, random band and physical checks."""

import csv
import json

import pytest

from moeguard.cli import main
from moeguard.analysis import above_baseline, retention
from moeguard.analysis import auc, spearman


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    code = main(["sweep", "--tasks", "arith-compare,record-summary", "--methods", "frequency,ablation",
                 "--keep", "2,4", "--samples", "8", "--eval-limit", "8", "--collateral-limit", "4",
                 "--random-seeds", "2", "--no-deletion-curves", "--physical-checks", "2", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def routes_run(tmp_path_factory):
    """Both routes; classification tasks only, whose evaluation is cheap (merged models are not cached)."""
    out = tmp_path_factory.mktemp("sweep") / "routes"
    assert main(["sweep", "--tasks", "arith-compare,docstring-topic", "--methods", "frequency", "--keep", "2,4",
                 "--samples", "8", "--eval-limit", "8", "--collateral-limit", "4", "--random-seeds", "1",
                 "--no-deletion-curves", "--physical-checks", "0", "--route", "prune,merge",
                 "--merge-methods", "average,router-weighted", "--merge-tokens", "16", "--out", str(out)]) == 0
    return out


def test_sweep_json_has_every_point_and_the_random_band(run):
    doc = json.loads((run / "sweep.json").read_text())
    assert doc["schema"] == "moeguard.sweep/1"
    assert "merge" not in doc and "routes" not in doc and doc["settings"]["routes"] == ["prune"]   # the default
    pts = {(p["task"], p["method"], p["keep"]) for p in doc["points"]}
    assert pts == {(t, m, k) for t in ("arith-compare", "record-summary") for m in ("frequency", "ablation") for k in (2, 4)}
    for p in doc["points"]:
        other = "record-summary" if p["task"] == "arith-compare" else "arith-compare"
        assert set(p["collateral"]) == {other}
        assert 0 < p["param_reduction_pct"] < 100 and p["params"] < p["params_full"]
        assert str(p["keep"]) in doc["random_summary"][p["task"]]
    assert len(doc["random"]) == 2 * 2 * 2
    assert doc["faithfulness"]["arith-compare"]["ablation"]["spearman_vs_ablation"] == pytest.approx(1.0)
    # frequency's agreement, recomputed from the score files written beside sweep.json: the per-layer rank
    # correlation with ablation, averaged over the layers where it is defined
    from moeguard.analysis import spearman

    for t in ("arith-compare", "record-summary"):
        freq, abl = (json.loads((run / "scores" / t / f"{m}.json").read_text())["scores"] for m in ("frequency", "ablation"))
        per_layer = [spearman(abl[l], freq[l]) for l in abl]
        known = [r for r in per_layer if r is not None]
        assert known, t   # some layer ranks its experts differently from a constant
        assert doc["faithfulness"][t]["frequency"]["spearman_vs_ablation"] == pytest.approx(sum(known) / len(known)), t
    assert doc["run"]["settings"]["seed"] == 0 and doc["run"]["versions"]["transformers"]


def test_the_merge_route_scores_every_merge_and_names_the_stronger_route(routes_run, tmp_path):
    run = routes_run
    doc = json.loads((run / "sweep.json").read_text())
    merge = doc["merge"]
    pts = {(p["task"], p["method"], p["merge_method"], p["keep"]) for p in merge["points"]}
    assert pts == {(t, "frequency", mm, k) for t in ("arith-compare", "docstring-topic")
                   for mm in ("average", "router-weighted") for k in (2, 4)}
    assert len(merge["random"]) == 2 * 1 * 2 * 2   # tasks x seeds x merge methods x keeps
    assert merge["calibration"]["arith-compare"]["sampled_tokens"] == 16
    # every task and keep has its row (the loop below checks each)
    assert {t: set(by_keep) for t, by_keep in doc["routes"].items()} == {"arith-compare": {"2", "4"},
                                                                           "docstring-topic": {"2", "4"}}
    for task, by_keep in doc["routes"].items():
        for k, row in by_keep.items():
            best = {r: max(p["retention"] for p in pts_ if p["task"] == task and p["keep"] == int(k))
                    for r, pts_ in (("prune", doc["points"]), ("merge", merge["points"]))}
            assert row["prune"]["retention"] == best["prune"] and row["merge"]["retention"] == best["merge"]
            # the attacker's envelope: never below either route
            assert row["envelope"] == max(best.values())
            assert row["winner"] == ("merge" if best["merge"] > best["prune"] else
                                     "prune" if best["merge"] < best["prune"] else "tie")
    rows = list(csv.DictReader(open(run / "points.csv")))
    assert {r["method"] for r in rows} >= {"merge:average:frequency", "merge:router-weighted:random:0"}

    # the sweep's merge is the command's merge: the same checkpoint scores the same
    p = next(p for p in merge["points"] if p["task"] == "arith-compare" and p["method"] == "frequency"
             and p["merge_method"] == "router-weighted" and p["keep"] == 2)
    out = tmp_path / "merged"
    assert main(["merge", "--scores", str(run / "scores" / "arith-compare" / "frequency.json"), "--keep", "2",
                 "--method", "router-weighted", "--samples", "8", "--tokens", "16", "--out", str(out)]) == 0
    rec = json.loads((out / "moeguard_merging.json").read_text())
    assert {li: [g["from"] for g in gs] for li, gs in rec["merges"].items()} == p["merges"]
    res = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--tasks", "arith-compare", "--limit", "8", "--out", str(res)]) == 0
    assert json.loads(res.read_text())["tasks"]["arith-compare"]["score"] == pytest.approx(p["score"])


def test_masked_points_match_physical_pruning(run):
    doc = json.loads((run / "sweep.json").read_text())
    # --physical-checks is per pruned task (one rule with the audit): 2 tasks x 2
    assert sorted(c["task"] for c in doc["physical_checks"]) == ["arith-compare"] * 2 + ["record-summary"] * 2
    for c in doc["physical_checks"]:
        assert c["abs_diff"] < 1e-9 and c["params_physical"] == c["params_expected"]


def test_sweep_writes_csv_scores_and_plots(run):
    rows = list(csv.DictReader(open(run / "points.csv")))
    assert {r["method"] for r in rows} >= {"frequency", "ablation", "random:0", "random:1"}
    assert (run / "scores" / "arith-compare" / "ablation.json").exists()
    for name in ["importance_arith-compare", "retention_record-summary", "collateral_keep2"]:
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_is_deterministic(run, tmp_path):
    out = tmp_path / "again"
    assert main(["sweep", "--tasks", "arith-compare,record-summary", "--methods", "frequency,ablation",
                 "--keep", "2,4", "--samples", "8", "--eval-limit", "8", "--collateral-limit", "4",
                 "--random-seeds", "2", "--no-deletion-curves", "--physical-checks", "0", "--out", str(out)]) == 0
    a, b = json.loads((run / "sweep.json").read_text()), json.loads((out / "sweep.json").read_text())
    assert [p["score"] for p in a["points"]] == [p["score"] for p in b["points"]]
    assert a["random"] == b["random"]


def test_sweep_refuses_impossible_levels_before_loading(tmp_path, capsys):
    assert main(["sweep", "--keep", "0,8", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["moeguard: error: keep level 0 is impossible for 8 experts per layer (mixtral, top-2) "
                                "Fix: keep from 1 to 7 experts per layer"], err
    assert main(["sweep", "--methods", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "unknown attribution method 'nope'" in err and "frequency, gate" in err, err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


def test_retention_is_direction_aware():
    assert retention(45.0, 90.0, higher_is_better=True) == 50.0
    assert retention(200.0, 100.0, higher_is_better=False) == 50.0   # perplexity doubled
    assert above_baseline(50.0, 90.0, 50.0, higher_is_better=True) == 0.0
    assert above_baseline(100.0, 100.0, 1000.0, higher_is_better=False) == 100.0


def test_auc_and_spearman():
    assert auc([2, 4, 6], [100.0, 100.0, 100.0]) == 100.0
    assert auc([2, 4], [0.0, 100.0]) == 50.0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_sweep_takes_task_files(tmp_path):
    """Tasks given as YAML paths (local data) work through every stage, physical checks included."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"q": f"Is {a} greater than {b}?", "label": "yes" if a > b else "no"}
            for a, b in [(12, 7), (3, 30), (55, 54), (8, 80), (91, 19), (4, 40), (70, 7), (2, 20)]]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = tmp_path / "cmp.yaml"
    task.write_text(f"name: local-compare\nkind: classification\nsource: {{type: local, path: {data}, format: jsonl, "
                    "files: {train: train.jsonl, test: test.jsonl}}\nsplits: {train: train, eval: test}\n"
                    "fields: {input: q, label: label}\nprompt: \"{q}\\nAnswer:\"\nlabels: {'yes': ' yes', 'no': ' no'}\n")
    out = tmp_path / "run"
    assert main(["sweep", "--tasks", f"{task},arith-compare", "--methods", "frequency", "--keep", "4",
                 "--samples", "4", "--eval-limit", "8", "--collateral-limit", "4", "--random-seeds", "1",
                 "--no-deletion-curves", "--physical-checks", "2", "--out", str(out)]) == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert set(doc["full"]) == {"local-compare", "arith-compare"}
    # 2 points re-scored on physically pruned copies, one per task (an empty list would pass the next line)
    assert sorted(c["task"] for c in doc["physical_checks"]) == ["arith-compare", "local-compare"]
    assert all(c["abs_diff"] < 1e-9 for c in doc["physical_checks"])
