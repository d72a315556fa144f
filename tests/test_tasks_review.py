"""Review of tasks/: short table rows, repeated YAML keys, one file under two names, a numeric hub
config and skipped summarization rows are said, not silently read."""

from __future__ import annotations

import json

import pytest

from moeguard.errors import MoeguardError
from moeguard.tasks.loaders import load_records, shared_data
from moeguard.tasks.registry import get_task

CLS = ("kind: classification\nfields: {input: sentence, label: label}\nlabels: {'0': ' no', '1': ' yes'}\n"
       "prompt: '{sentence} Answer:'\n")


def _task(folder, name: str, body: str):
    f = folder / f"{name}.yaml"
    f.write_text(f"name: {name}\n{body}")
    return get_task(str(f))


def test_a_short_csv_row_is_refused_not_read_as_empty_text(tmp_path):
    """DictReader filled the lost cells with None: the record was scored on an empty sentence."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("label,sentence\n1,a fine film\n0\n")
    t = _task(tmp_path, "short-csv", CLS + "source: {type: local, path: d, format: csv}\nsplits: {train: train, eval: train}\n")
    with pytest.raises(MoeguardError, match=r"line 3 of .*train.csv' has 1 cell\(s\), fewer than the header's 2 "
                                            r"\(no 'sentence'\)"):
        load_records(t, "train")


def test_a_repeated_yaml_key_is_refused(tmp_path):
    """safe_load kept the last of two 'splits:' lines (or of two labels with one key) silently."""
    f = tmp_path / "dup.yaml"
    f.write_text("name: dup\n" + CLS + "source: {type: local, path: d, format: csv}\nsplits: {train: train, eval: eval}\n"
                 "splits: {train: train, eval: train}\n")
    with pytest.raises(MoeguardError, match="not valid YAML at line 8") as e:
        get_task(str(f))
    assert "the key 'splits' is repeated" in e.value.one_line()
    f.write_text("name: dup2\nkind: classification\nfields: {input: s, label: l}\nlabels: {0: ' no', 0: ' yes'}\n"
                 "source: {type: local, path: d, format: csv}\nsplits: {train: train, eval: eval}\n")
    with pytest.raises(MoeguardError, match="the key 0 is repeated"):
        get_task(str(f))


def test_one_file_under_two_names_is_seen_as_shared_train_and_eval(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.jsonl").write_text("".join(json.dumps({"sentence": f"s{i}", "label": i % 2}) + "\n" for i in range(6)))
    t = _task(tmp_path, "two-names", CLS + "source: {type: local, path: d, format: jsonl, files: {a: ./t.jsonl, b: t.jsonl}}\n"
              "splits: {train: a, eval: b}\n")
    assert shared_data(t) is not None
    (tmp_path / "d" / "u.jsonl").write_text((tmp_path / "d" / "t.jsonl").read_text())
    t = _task(tmp_path, "two-files", CLS + "source: {type: local, path: d, format: jsonl, files: {a: t.jsonl, b: u.jsonl}}\n"
              "splits: {train: a, eval: b}\n")
    assert shared_data(t) is None


def test_a_hub_config_yaml_read_as_a_number_is_refused(tmp_path):
    with pytest.raises(MoeguardError, match=r"source.hub.config 1.1, not a name"):
        _task(tmp_path, "numeric-config", CLS + "source: {type: hub, hub: {name: org/data, config: 1.10}}\n"
              "splits: {train: train, eval: validation}\n")


def test_summarization_rows_without_a_reference_are_counted_in_a_warning(tmp_path):
    (tmp_path / "d").mkdir()
    rows = [{"text": f"record {i}", "summary": "" if i % 3 == 0 else f"summary {i}"} for i in range(9)]
    (tmp_path / "d" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = _task(tmp_path, "blank-refs", "kind: summarization\nfields: {input: text, target: summary}\n"
              "source: {type: local, path: d, format: jsonl}\nsplits: {eval: eval}\nprompt: '{text}\\nSummary:'\n")
    with pytest.warns(UserWarning, match=r"task 'blank-refs': 3 row\(s\) of split 'eval' .* make no record"):
        assert len(load_records(t, "eval")) == 6


def test_rouge_reads_words_in_any_script_and_is_unchanged_on_ascii_text():
    """rouge-score's tokenizer keeps [a-z0-9] only: Russian scored 0 for every model, 'résumé' was 'r sum'."""
    from rouge_score import rouge_scorer

    from moeguard.tasks.metrics import rouge

    default = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for pred, ref in (("Tuesday at 15 degrees", "On Tuesday it was 15 Degrees (max), parse_header"),
                      ("the runners were running", "A runner runs; RUNNING-fast"), ("", "nothing")):
        got, want = rouge([pred], [ref]), default.score(ref, pred)
        for k in ("rouge1", "rouge2", "rougeL"):
            assert got[k] == pytest.approx(100 * want[k].fmeasure), (pred, k)
    assert rouge(["Новости дня"], ["Новости дня"])["rougeL"] == pytest.approx(100)
    assert default.score("Новости дня", "Новости дня")["rougeL"].fmeasure == 0          # what it was
    assert rouge(["un résumé"], ["le résumé"])["rouge1"] == pytest.approx(50)
    assert 50 < rouge(["今天天气很好"], ["今天天气不好"])["rougeL"] < 100                # one character a token


def test_yaml_merge_keys_still_load_and_an_audit_config_refuses_a_repeated_key(tmp_path):
    from moeguard.audit.config import load_yaml

    f = tmp_path / "multi.yaml"
    f.write_text("defaults: &d\n  kind: classification\n  fields: {input: sentence, label: label}\n"
                 "  labels: {'0': ' no', '1': ' yes'}\n  prompt: '{sentence} Answer:'\n"
                 "  source: {type: local, path: d, format: jsonl}\n  splits: {train: train, eval: eval}\n"
                 "tasks:\n  - <<: *d\n    name: merged-a\n  - <<: *d\n    name: merged-b\n")
    assert get_task(f"{f}#merged-b").kind == "classification"
    a = tmp_path / "audit.yaml"
    a.write_text("keeps: [2, 4]\nseed: 1\nkeeps: [4]\n")
    with pytest.raises(MoeguardError, match="the key 'keeps' is repeated"):
        load_yaml(a)
