"""Loaders: every local format, normalization per kind, and every error path."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from moeguard.errors import MoeguardError
from moeguard.tasks import loaders
from moeguard.tasks.base import SourceSpec, Task, TaskKind
from moeguard.tasks.loaders import load_records


def cls_task(path: Path, fmt: str, files: dict, **over) -> Task:
    kw = dict(name="t", kind=TaskKind.CLASSIFICATION, fields={"input": "sentence", "label": "label"},
              source=SourceSpec(type="local", path=str(path), format=fmt, files=files),
              splits={"train": "train", "eval": "test"}, prompt="Review: {sentence}\nSentiment:",
              labels={0: " negative", 1: " positive"})
    kw.update(over)
    return Task(**kw)


@pytest.fixture
def sst(tmp_path):
    # A stray, unbalanced double quote as in real SST-2 rows, and the trailing space too.
    (tmp_path / "train.tsv").write_text(
        'sentence\tlabel\n"the movie \'s opening is great . \t1\nawful , "dull\t0\nfine\t1\n', encoding="utf-8")
    (tmp_path / "test.tsv").write_text('sentence\tlabel\nbad " film\t0\n', encoding="utf-8")
    return tmp_path


def test_tsv_keeps_stray_quotes_and_renders_prompt(sst):
    task = cls_task(sst, "tsv", {"train": "train.tsv", "test": "test.tsv"})
    train = load_records(task, "train")
    assert [r["label"] for r in train] == ["1", "0", "1"]
    # Cells are stripped, quotes kept verbatim; a QUOTE_MINIMAL reader would swallow rows here.
    assert train[0]["input"] == "Review: \"the movie 's opening is great .\nSentiment:"
    assert train[1]["input"] == 'Review: awful , "dull\nSentiment:'
    assert load_records(task, "eval") == [{"input": 'Review: bad " film\nSentiment:', "label": "0"}]
    assert len(load_records(task, "train", limit=2)) == 2


def test_csv_with_quoted_commas_and_pair_prompt(tmp_path):
    (tmp_path / "d.csv").write_text('s1,s2,y\n"a, b",c,yes\nd,"e ""q""",no\n', encoding="utf-8")
    task = cls_task(tmp_path, None, {"train": "d.csv", "test": "d.csv"}, fields={"input": "s1", "label": "y"},
                    prompt="{s1} / {s2}?", labels={"yes": " yes", "no": " no"})
    assert load_records(task, "eval") == [{"input": "a, b / c?", "label": "yes"},
                                          {"input": 'd / e "q"?', "label": "no"}]


def test_label_keys_compare_as_strings(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"sentence": "x", "label": 1}\n{"sentence": "y", "label": "0"}\n')
    task = cls_task(tmp_path, "jsonl", {"test": "d.jsonl"})
    assert [r["label"] for r in load_records(task, "eval")] == ["1", "0"]


def test_unknown_label_value_is_reported(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"sentence": "x", "label": -1}\n')
    with pytest.raises(MoeguardError, match="label '-1', which has no verbalizer"):
        load_records(cls_task(tmp_path, "jsonl", {"test": "d.jsonl"}), "eval")


def sum_task(path: Path, files: dict, **over) -> Task:
    kw = dict(name="s", kind=TaskKind.SUMMARIZATION, fields={"input": "source", "target": "target"},
              source=SourceSpec(type="local", path=str(path), format="jsonl", files=files),
              splits={"train": "train", "eval": "test"}, prompt="Abstract: {source}\nTL;DR:")
    kw.update(over)
    return Task(**kw)


def test_jsonl_list_fields_join_and_keep_all_references(tmp_path):
    rows = [{"source": ["First sentence.", "Second one."], "target": ["Ref A.", "Ref B."]},
            {"source": "Plain text.", "target": "Only ref."}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = load_records(sum_task(tmp_path, {"test": "test.jsonl"}), "eval")
    assert records[0] == {"input": "Abstract: First sentence. Second one.\nTL;DR:", "target": "Ref A.",
                          "references": ["Ref A.", "Ref B."], "source_text": "First sentence. Second one."}
    assert records[1]["references"] == ["Only ref."] and records[1]["source_text"] == "Plain text."


def test_gzipped_jsonl_is_read(tmp_path):
    with gzip.open(tmp_path / "test.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"source": "Zipped.", "target": "Z."}) + "\n")
    task = sum_task(tmp_path, {"test": "test.jsonl.gz"}, source=SourceSpec(
        type="local", path=str(tmp_path), files={"test": "test.jsonl.gz"}))  # format from the extension
    assert load_records(task, "eval")[0]["target"] == "Z."


def lm_task(path: Path, files: dict, max_length: int = 10, **over) -> Task:
    kw = dict(name="lm", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "text"}, max_length=max_length,
              source=SourceSpec(type="local", path=str(path), format="txt", files=files),
              splits={"train": "train", "eval": "train"})
    kw.update(over)
    return Task(**kw)


def test_txt_packs_paragraphs_into_chunks_of_about_max_length_times_4(tmp_path):
    paragraphs = [f"para {i} " + "w" * 14 for i in range(6)]  # 21 chars each
    (tmp_path / "a.txt").write_text(" \n" + "\n \n".join(paragraphs) + "\n\n\n", encoding="utf-8")
    records = load_records(lm_task(tmp_path, {"train": "a.txt"}, max_length=10), "train")
    # 40-character target: two paragraphs per chunk, never split inside a paragraph.
    assert [r["text"] for r in records] == ["\n\n".join(paragraphs[i:i + 2]) for i in (0, 2, 4)]


def test_split_slicing_on_local_files(tmp_path):
    # each paragraph fills a chunk (max_length 10: 40 characters), so each is one record
    paras = [f"para{i} " + "w" * 34 for i in range(10)]
    (tmp_path / "a.txt").write_text("\n\n".join(paras))
    task = lm_task(tmp_path, {"train": "a.txt"}, max_length=10, splits={"train": "train[:80%]", "eval": "train[8:]"})
    assert [r["text"] for r in load_records(task, "train")] == paras[:8]
    assert [r["text"] for r in load_records(task, "eval")] == paras[8:]


def test_package_source_reads_embedded_data(tmp_path, monkeypatch):
    data = tmp_path / "embedded" / "data" / "mini"
    data.mkdir(parents=True)
    with gzip.open(data / "e.jsonl.gz", "wt") as f:
        f.write('{"body": "packaged text"}\n')

    class FakeFiles:  # stands in for importlib.resources.files("moeguard.tasks")
        def __call__(self, package):
            assert package == "moeguard.tasks"
            return tmp_path

    monkeypatch.setattr(loaders.resources, "files", FakeFiles())
    task = Task(name="p", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "body"},
                source=SourceSpec(type="package", path="mini", files={"train": "e.jsonl.gz"}))
    assert load_records(task, "train") == [{"text": "packaged text"}]
    with pytest.raises(MoeguardError, match="moeguard/tasks/embedded/data/mini/gone.jsonl.gz. for split"):
        load_records(Task(name="p", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "body"},
                          splits={"train": "validation"},
                          source=SourceSpec(type="package", path="mini", files={"validation": "gone.jsonl.gz"})),
                     "train")


def test_disk_source_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"t": ["a", "", "b", "c"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    task = Task(name="d", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "t"},
                source=SourceSpec(type="disk", path=str(tmp_path / "dd")), splits={"train": "train", "eval": "train[2:]"})
    assert [r["text"] for r in load_records(task, "train")] == ["a", "b", "c"]  # blank rows dropped
    assert [r["text"] for r in load_records(task, "eval")] == ["b", "c"]
    with pytest.raises(MoeguardError, match="has no split 'test'.*splits present: train"):
        load_records(Task(name="d", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "t"},
                          source=SourceSpec(type="disk", path=str(tmp_path / "dd")),
                          splits={"eval": "test"}), "eval")


# ------------------------------------------------------------------ error paths

def test_missing_folder_names_the_path(tmp_path):
    task = lm_task(tmp_path / "nope", {"train": "a.txt"})
    with pytest.raises(MoeguardError) as err:
        load_records(task, "train")
    assert str(tmp_path / "nope") in err.value.message and "does not exist" in err.value.message
    assert "relative paths resolve against the YAML file" in err.value.hint


def test_missing_file_names_the_path_and_known_splits(tmp_path):
    task = lm_task(tmp_path, {"train": "a.txt"})
    with pytest.raises(MoeguardError) as err:
        load_records(task, "train")
    assert f"{tmp_path}/a.txt" in err.value.message and "splits with files: train" in err.value.hint


def test_split_without_a_file(tmp_path):
    task = lm_task(tmp_path, {"train": "a.txt"}, splits={"eval": "test"},
                   source=SourceSpec(type="local", path=str(tmp_path), files={"train": "a.txt"}))
    with pytest.raises(MoeguardError, match="names no file for split 'test'"):
        load_records(task, "eval")


def test_missing_column_lists_existing_columns(sst):
    task = cls_task(sst, "tsv", {"test": "test.tsv"}, prompt="{text}")
    with pytest.raises(MoeguardError, match=r"no column\(s\) \['text'\]; its columns are \['label', 'sentence'\]"):
        load_records(task, "eval")


def test_txt_column_hint(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(MoeguardError) as err:
        load_records(lm_task(tmp_path, {"train": "a.txt"}, fields={"text": "body"}), "train")
    assert "single column 'text'" in err.value.hint


@pytest.mark.parametrize("content", ["", "   \n\n  \n"])
def test_empty_split(tmp_path, content):
    (tmp_path / "a.txt").write_text(content)
    with pytest.raises(MoeguardError, match="is empty"):
        load_records(lm_task(tmp_path, {"train": "a.txt"}), "train")


def test_header_only_tsv_is_empty(sst):
    (sst / "test.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(MoeguardError, match="is empty"):
        load_records(cls_task(sst, "tsv", {"test": "test.tsv"}), "eval")


def test_unknown_format_and_unguessable_extension(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    with pytest.raises(MoeguardError, match="format 'parquet' is not supported"):
        load_records(lm_task(tmp_path, {"train": "a.parquet"}, source=SourceSpec(
            type="local", path=str(tmp_path), format="parquet", files={"train": "a.parquet"})), "train")
    (tmp_path / "wiki.tokens").write_text("x")
    with pytest.raises(MoeguardError, match="cannot tell the format of data file 'wiki.tokens'"):
        load_records(lm_task(tmp_path, {"train": "wiki.tokens"}, source=SourceSpec(
            type="local", path=str(tmp_path), files={"train": "wiki.tokens"})), "train")


def test_bad_json_line_is_located(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"source": "a", "target": "b"}\n{oops\n')
    with pytest.raises(MoeguardError, match="line 2 of .* is not valid JSON"):
        load_records(sum_task(tmp_path, {"test": "test.jsonl"}), "eval")


def test_not_utf8_and_corrupt_gzip(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(MoeguardError, match=r"not UTF-8 text \(unexpected end of data at byte 3, line 1\)"):
        load_records(lm_task(tmp_path, {"train": "a.txt"}), "train")
    # past the first chunk a line-by-line read decodes (8 KiB), the byte and line are the file's, not the chunk's;
    # a .gz file's of its decompressed bytes, and a character split over two of the megabyte reads is whole
    import gzip

    body = "".join(json.dumps({"text": f"row {i} caf\u00e9 " + "x" * 40}) + "\n" for i in range(30_000)).encode()
    bad = body + b'{"text": "caf\xe9"}\n'
    for name, data in (("c.jsonl", bad), ("d.jsonl.gz", gzip.compress(bad))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MoeguardError, match=f"at byte {len(body) + 13}, line 30001"):
            load_records(lm_task(tmp_path, {"train": name}, source=SourceSpec(type="local", path=str(tmp_path),
                                                                             files={"train": name})), "train")
    (tmp_path / "b.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(MoeguardError, match="could not read data file"):
        load_records(lm_task(tmp_path, {"train": "b.jsonl.gz"}, source=SourceSpec(
            type="local", path=str(tmp_path), files={"train": "b.jsonl.gz"})), "train")


def test_surplus_cells_are_reported(tmp_path):
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nok\t1\textra\n")
    with pytest.raises(MoeguardError, match="line 2 .* more cells than the header") as err:
        load_records(cls_task(tmp_path, "tsv", {"test": "test.tsv"}), "eval")
    assert "no header row, name its columns in source.columns" in err.value.hint


def test_bad_role_and_limit(sst):
    task = cls_task(sst, "tsv", {"test": "test.tsv"}, splits={"eval": "test"})
    with pytest.raises(MoeguardError, match="role 'dev'"):
        load_records(task, "dev")
    with pytest.raises(MoeguardError, match="maps no split to role 'train'"):
        load_records(task, "train")
    with pytest.raises(MoeguardError, match="limit is 0"):
        load_records(task, "eval", limit=0)


def test_hub_source_without_name():
    task = Task(name="h", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "text"}, source=SourceSpec(type="hub"))
    with pytest.raises(MoeguardError, match="hub source without a dataset name"):
        load_records(task, "eval")


def test_records_are_read_once_per_limit_and_again_when_the_file_changes(sst, monkeypatch):
    import os

    task = cls_task(sst, "tsv", {"train": "train.tsv", "test": "test.tsv"})
    reads = []
    real = loaders.iter_file
    monkeypatch.setattr(loaders, "iter_file", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    first = load_records(task, "train", limit=2)
    first[0]["label"] = "mutated"  # a caller's change does not reach the memo
    again = load_records(task, "train", limit=2)
    assert len(reads) == 1 and [r["label"] for r in again] == ["1", "0"]
    assert len(load_records(task, "train")) == 3 and len(reads) == 2  # another limit is another read
    f = sst / "train.tsv"
    f.write_text("sentence\tlabel\nnew row\t0\n", encoding="utf-8")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # a coarse clock still sees the edit
    assert [r["label"] for r in load_records(task, "train", limit=2)] == ["0"] and len(reads) == 3


def test_a_limited_read_stops_early_in_a_large_file_and_slices_still_hold(tmp_path):
    """The edge's one-record check and a --limit read only the rows they need (a bad row past them
    is not reached); a percentage or negative slice reads the whole file, as it must."""
    d = tmp_path / "d"
    d.mkdir()
    rows = [json.dumps({"q": f"q{i}", "l": str(i % 2)}) for i in range(10)]
    (d / "train.jsonl").write_text("\n".join(rows + ["{not json"]) + "\n", encoding="utf-8")
    def task(split):
        return Task(name="t", kind=TaskKind.CLASSIFICATION, fields={"input": "q", "label": "l"},
                    labels={"0": " no", "1": " yes"}, splits={"train": split, "eval": split},
                    source=SourceSpec(type="local", path=str(d), format="jsonl", files={"train": "train.jsonl"}))
    assert [r["input"] for r in load_records(task("train"), "eval", limit=3)] == ["q0", "q1", "q2"]
    assert [r["input"] for r in load_records(task("train[2:5]"), "eval")] == ["q2", "q3", "q4"]
    assert [r["input"] for r in load_records(task("train[4:]"), "eval", limit=2)] == ["q4", "q5"]
    for whole in ("train", "train[:50%]", "train[-3:]"):   # every row is read: the bad line is found
        with pytest.raises(MoeguardError, match=r"line 11 of .*train.jsonl"):
            load_records(task(whole), "eval")


@pytest.mark.parametrize("raised, offline, needle", [
    ("missing", False, "does not exist on the hub, or your account cannot see it"),
    ("gated", False, "is gated: your account has not been granted access"),
    ("missing", True, "offline mode is on"),                      # not asked: not cached, as before
    ("network", False, "the hub could not be reached, and it is not in the local cache"),
    # each read 'the hub is unreachable and it is not cached' (2026-12-07)
    ("429", False, r"limiting this machine's requests \(HTTP 429\).*\(wait a few minutes"),
    ("503", False, r"a server error \(HTTP 503\)"),
    ("script", False, "is defined by a loading script, which the installed datasets no longer runs"),
    ("other", False, r"the datasets library failed \[KeyError"),
])
def test_hub_failures_say_which_they_are(raised, offline, needle, monkeypatch):
    """A mistyped name online was reported as 'the hub is unreachable', with a save_to_disk hint."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def fail(*a, **k):
        if raised == "missing":
            raise DatasetNotFoundError("Dataset 'nyu-mll/gleu' doesn't exist on the Hub or cannot be accessed.")
        if raised == "gated":
            raise DatasetNotFoundError("Dataset 'org/x' is a gated dataset on the Hub. You must be authenticated.")
        if raised in ("429", "503"):
            from types import SimpleNamespace

            from huggingface_hub.errors import HfHubHTTPError

            raise HfHubHTTPError(f"{raised} Client Error", response=SimpleNamespace(headers={}, request=None,
                                                                                    status_code=int(raised)))
        if raised == "script":
            raise RuntimeError("Dataset scripts are no longer supported, but found gleu.py")
        if raised == "other":
            raise KeyError("features")
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1" if offline else "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    task = Task(name="h", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "text"},
                source=SourceSpec(type="hub", hub_name="nyu-mll/gleu"))
    with pytest.raises(MoeguardError, match=needle):
        load_records(task, "eval")


def test_a_calibration_sample_is_drawn_from_the_whole_split_not_its_first_records(tmp_path):
    """Calibration took a shuffle of the first 4 x samples records: a train split sorted by label
    (IMDB's) gave a one-class sample, and attribution chose experts for one class."""
    from moeguard.tasks.batches import calibration_batches
    from moeguard.tasks.loaders import sample_records

    rows = [{"sentence": f"review {i}", "label": int(i >= 300)} for i in range(600)]   # sorted by label
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    task = cls_task(tmp_path, "jsonl", {"train": "train.jsonl", "test": "test.jsonl"})
    drawn = sample_records(task, "train", 16, seed=0)
    assert len(drawn) == 16 and {r["label"] for r in drawn} == {"0", "1"}
    assert drawn == sample_records(task, "train", 16, seed=0) != sample_records(task, "train", 16, seed=1)
    assert len(sample_records(task, "eval", 50, seed=0)) == 10           # fewer than asked: all of them
    late = [r for r in drawn if int(r["input"].split()[2]) >= 64]       # beyond the old pool of 4 x 16
    assert late

    class Tok:   # calibration_batches only needs ids for the records it was given
        pad_token_id, bos_token_id, eos_token_id = 0, None, None

    seen = []
    import moeguard.tasks.batches as B

    real = B.task_sequences
    B.task_sequences = lambda tok, t, records: (seen.extend(records), [])[1]
    try:
        calibration_batches(Tok(), task, samples=16, seed=0)
    finally:
        B.task_sequences = real
    assert sorted(r["input"] for r in seen) == sorted(r["input"] for r in drawn)


def test_a_disk_dataset_saved_again_in_place_changes_the_tasks_identity(tmp_path):
    """save_to_disk rewrites its files in place: the folder's own time, the only stamp, stayed, and
    a resumed run (and the in-process cache) kept results of the old data."""
    datasets = pytest.importorskip("datasets")
    from moeguard.tasks.loaders import task_identity

    folder = str(tmp_path / "dd")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"t": ["a", "b", "c"]})}).save_to_disk(folder)
    task = Task(name="d", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "t"},
                source=SourceSpec(type="disk", path=folder), splits={"train": "train", "eval": "train"})
    before, records = task_identity(task), load_records(task, "eval")
    import os

    root_time = os.stat(folder).st_mtime_ns
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"t": ["x", "y", "z"]})}).save_to_disk(folder)
    os.utime(folder, ns=(root_time, root_time))      # as an in-place rewrite leaves it
    assert task_identity(task) != before
    assert [r["text"] for r in load_records(task, "eval")] == ["x", "y", "z"] != [r["text"] for r in records]


def test_a_dataset_sample_is_drawn_by_index_from_the_whole_split(tmp_path):
    """hub and disk Datasets: rows drawn by index (a 1.8M-line split is not read whole for 64 samples)."""
    datasets = pytest.importorskip("datasets")
    from moeguard.tasks.loaders import sample_records

    rows = {"sentence": [f"review {i}" for i in range(600)], "label": [int(i >= 300) for i in range(600)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)}) \
        .save_to_disk(str(tmp_path / "dd"))
    task = cls_task(tmp_path, None, {}, source=SourceSpec(type="disk", path=str(tmp_path / "dd")))
    drawn = sample_records(task, "train", 16, seed=0)
    assert len(drawn) == 16 and {r["label"] for r in drawn} == {"0", "1"} and len({r["input"] for r in drawn}) == 16
    assert drawn == sample_records(task, "train", 16, seed=0) != sample_records(task, "train", 16, seed=1)


def test_a_verbalizer_as_long_as_max_length_is_refused_for_training_examples_as_for_evaluation():
    """[-(max_length - len(verbalizer)):] is [-0:] at equality: the whole prompt was kept, uncut, for
    attribution, fine-tuning and hardening, where evaluation refuses such a task."""
    import dataclasses

    from moeguard.models.loading import load_tokenizer, resolve
    from moeguard.tasks.registry import get_task

    tok = load_tokenizer(str(resolve(None).path))
    task = get_task("arith-compare")
    record = {"input": "Is 7 greater than 3? Answer:", "label": next(iter(str(k) for k in task.labels))}
    ok = task.kind_spec.examples(tok, task, record)
    assert len(ok[0].ids) <= task.max_length
    long = {k: f" {v.strip()} is the answer" for k, v in task.labels.items()}   # several tokens each
    short = dataclasses.replace(task, labels=long, max_length=2)
    with pytest.raises(MoeguardError, match=r"task 'arith-compare': the verbalizer after a prompt, .* is \d+ tokens, "
                                            r"max_length is 2"):
        short.kind_spec.examples(tok, short, record)


def test_a_hub_task_s_identity_holds_its_cached_dataset_commit(tmp_path, monkeypatch):
    """A hub dataset with a new commit (or a cache downloaded again) resumed work done on the old data:
    the identity held only the task's definition. The cache is read, never the network."""
    from huggingface_hub import constants

    from moeguard.tasks.base import SourceSpec, Task, TaskKind
    from moeguard.tasks.loaders import task_identity

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    task = Task(name="h", kind=TaskKind.CLASSIFICATION, fields={"input": "sentence", "label": "label"},
                source=SourceSpec(type="hub", hub_name="org/sst"), splits={"train": "train", "eval": "validation"},
                prompt="{sentence}", labels={0: " no", 1: " yes"})
    assert task_identity(task)["files"] == {"eval": None, "train": None}     # not cached: as before
    ref = tmp_path / "datasets--org--sst" / "refs"
    ref.mkdir(parents=True)
    (ref / "main").write_text("abc123\n")
    assert task_identity(task)["files"] == {"eval": "abc123", "train": "abc123"}
    (ref / "main").write_text("def456\n")
    assert task_identity(task)["files"]["eval"] == "def456"


def test_a_hub_task_names_a_revision_which_is_loaded_and_keyed(monkeypatch, tmp_path):
    """XSum is defined by a loading script, which datasets 4+ no longer runs: its preset could never load,
    and the error's fix (the refs/convert/parquet revision) could not be written in a task file."""
    import datasets
    from huggingface_hub import constants

    from moeguard.tasks import loaders
    from moeguard.tasks.registry import get_task

    xsum = get_task("xsum")
    assert xsum.source.hub_revision == "refs/convert/parquet"
    seen = []

    def fake(name, config, split, revision=None):
        seen.append((name, config, split, revision))
        return datasets.Dataset.from_list([{"document": "An article.", "summary": "A summary."}] * 3)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert len(load_records(xsum, "eval")) == 3 and seen == [("EdinburghNLP/xsum", None, "test", "refs/convert/parquet")]
    # the resume stamp is that branch's commit in the cache, not main's
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "datasets--EdinburghNLP--xsum" / "refs"   # huggingface_hub keeps refs/<revision>
    (refs / "refs" / "convert").mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    (refs / "refs" / "convert" / "parquet").write_text("b" * 40)
    assert loaders._stamp(xsum, "test") == "b" * 40
    with pytest.raises(MoeguardError, match="source.hub.revision 5"):
        Task.from_dict({"name": "x", "kind": "summarization", "fields": {"input": "d", "target": "s"},
                        "source": {"type": "hub", "hub": {"name": "a/b", "revision": 5}}})


def test_a_hub_revision_that_does_not_exist_says_so(monkeypatch):
    """datasets turns a missing revision into DatasetNotFoundError: the message said the dataset did not
    exist and pointed at source.hub.name and a login."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def missing(*a, **k):
        raise DatasetNotFoundError("Revision 'refs/convert/parquett' doesn't exist for dataset 'EdinburghNLP/xsum' on the Hub.")
    monkeypatch.setattr(datasets, "load_dataset", missing)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    task = Task(name="x", kind=TaskKind.SUMMARIZATION, fields={"input": "document", "target": "summary"},
                source=SourceSpec(type="hub", hub_name="EdinburghNLP/xsum", hub_revision="refs/convert/parquett"))
    with pytest.raises(MoeguardError, match="at revision refs/convert/parquett .*the hub has no such revision") as e:
        load_records(task, "eval")
    assert e.value.hint.startswith("check source.hub.revision")


def test_reading_a_gz_data_file_closes_the_file_under_it():
    """GzipFile leaves a file it was given open: a ResourceWarning at every read of an embedded task."""
    import gc
    import warnings

    from moeguard.tasks.registry import get_task

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert len(load_records(get_task("arith-compare"), "train", limit=5)) == 5
        gc.collect()
    assert not [w for w in seen if issubclass(w.category, ResourceWarning)], [str(w.message) for w in seen]
