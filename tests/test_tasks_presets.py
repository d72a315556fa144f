"""Built-in hub presets and the example task files."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeguard.errors import MoeguardError
from moeguard.tasks import get_task, list_tasks, load_records, registry
from moeguard.tasks.base import TaskKind

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "tasks").glob("*.yaml"))
SHARED = ROOT.parent / "shared" / "data"
PRESETS = ["glue-sst2", "glue-cola", "glue-mrpc", "glue-qqp", "glue-mnli", "glue-qnli", "glue-rte", "glue-wnli",
           "wikitext-103", "xsum", "cnn-dailymail"]


@pytest.fixture
def offline(monkeypatch):
    """Offline mode, also for a `datasets` that was imported before the variables were set."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    # An empty cache: a machine that happens to have GLUE cached must still take the error path.
    monkeypatch.setenv("HF_DATASETS_CACHE", "/nonexistent-moeguard-test-cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path("/nonexistent-moeguard-test-cache"))


def test_presets_are_well_formed():
    registry._reset_for_tests()
    for name in PRESETS:
        task = get_task(name)
        assert task.source.type == "hub" and task.source.hub_name
        if task.kind is TaskKind.CLASSIFICATION:
            assert task.prompt and all(v.startswith(" ") for v in task.labels.values())
            assert task.splits["eval"].startswith("validation")  # GLUE test labels are hidden
    pair_columns = {"glue-mrpc": ("sentence1", "sentence2"), "glue-qqp": ("question1", "question2"),
                    "glue-mnli": ("premise", "hypothesis"), "glue-qnli": ("question", "sentence"),
                    "glue-rte": ("sentence1", "sentence2"), "glue-wnli": ("sentence1", "sentence2")}
    for name, columns in pair_columns.items():
        assert all("{" + c + "}" in get_task(name).prompt for c in columns), name
    # lm-evaluation-harness' glue/sst2 (it was "Review: ...\nSentiment:", while the docs said the harness's)
    assert get_task("glue-sst2").prompt == "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:"


@pytest.mark.parametrize("name", ["glue-sst2", "wikitext-103", "cnn-dailymail"])
def test_hub_presets_fail_with_one_clear_line_offline(offline, name):
    with pytest.raises(MoeguardError) as err:
        load_records(get_task(name), "eval", limit=2)
    line = err.value.one_line()
    assert "\n" not in line
    assert "offline mode is on" in line and get_task(name).source.hub_name in line
    assert "save_to_disk" in line and "type: disk" in line


def _fabricate(task, folder: Path, rows: int = 200) -> None:
    """Small files in the task's declared format, holding the columns its fields and prompt read
    (label cells take the task's label values in turn; jsonl text cells are lists, as SciTLDR's)."""
    import csv
    import json
    import string

    src = task.source
    folder.mkdir(parents=True)
    prompt_columns = [n for _, n, _, _ in string.Formatter().parse(task.prompt or "") if n]
    columns = list(src.columns or dict.fromkeys([*task.fields.values(), *prompt_columns]))
    label_col, labels = task.fields.get("label"), [str(k) for k in task.labels]

    def cell(column: str, i: int) -> str:
        return labels[i % len(labels)] if column == label_col else f"{column} number {i} ."

    for name in set(src.files.values()):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            if src.format == "txt":
                f.write("\n\n".join(f"Paragraph {i}: " + "some words here " * 15 for i in range(rows)) + "\n")
            elif src.format == "jsonl":
                f.writelines(json.dumps({c: cell(c, i) if c == label_col else [cell(c, i), "Another sentence ."]
                                         for c in columns}) + "\n" for i in range(rows))
            else:
                w = csv.writer(f, delimiter="\t" if src.format == "tsv" else ",")
                if src.columns is None:
                    w.writerow(columns)  # a header row, unless the task names header-less columns
                w.writerows([cell(c, i) for c in columns] for i in range(rows))


def test_examples_are_self_contained_and_load_data_of_their_format(tmp_path):
    """What docs/tasks.md promises of examples/tasks/: each file documents where its data comes
    from and, copied anywhere with its data at its relative ``path``, reads that data for both
    roles; none depends on a machine path, and none is a built-in."""
    import shutil

    import yaml

    names = {get_task(str(f)).name for f in EXAMPLES}
    assert names == {"sst2-local", "wikitext103-local", "shakespeare-local", "scitldr-local", "agnews-local"}
    assert not names & {t.name for t in list_tasks()}  # examples are never built-ins
    for file in EXAMPLES:
        text = file.read_text(encoding="utf-8")
        assert "https://" in text, f"{file.name} does not say where to download its data"
        raw = Path(yaml.safe_load(text)["source"]["path"])
        assert not raw.is_absolute() and "~" not in raw.parts, f"{file.name} points at a machine path: {raw}"
        # nest the copy deep enough that its relative path lands inside tmp_path
        ups = sum(1 for part in raw.parts if part == "..")
        copy = tmp_path.joinpath(file.stem, *["d"] * ups, file.name)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, copy)
        data = (copy.parent / raw).resolve()
        assert (tmp_path / file.stem).resolve() in data.parents
        _fabricate(get_task(str(file)), data)
        task = get_task(str(copy))
        assert Path(task.source.path) == data  # resolved against the copied file's own folder
        train, evals = load_records(task, "train"), load_records(task, "eval")
        assert train and evals, file.name
        if task.kind is TaskKind.CLASSIFICATION:
            assert {r["label"] for r in train} == {str(k) for k in task.labels}
            assert all(" number " in r["input"] for r in evals)  # the prompt was filled from the data
        elif task.kind is TaskKind.SUMMARIZATION:
            assert all(r["references"] and r["source_text"] in r["input"] for r in evals)
        else:
            assert all("Paragraph" in r["text"] for r in evals)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder not present (optional)")
def test_examples_read_the_real_files():
    sst = load_records(get_task(str(ROOT / "examples/tasks/sst2-local.yaml")), "eval")
    assert len(sst) == 872 and sum(r["label"] == "1" for r in sst) == 444
    tldr = load_records(get_task(str(ROOT / "examples/tasks/scitldr-local.yaml")), "eval", limit=3)
    assert all(r["references"] and r["source_text"] in r["input"] for r in tldr)
    shakespeare = get_task(str(ROOT / "examples/tasks/shakespeare-local.yaml"))
    train, test = load_records(shakespeare, "train"), load_records(shakespeare, "eval")
    assert not {r["text"] for r in train} & {r["text"] for r in test}  # the 90/10 slices do not overlap
    wiki = load_records(get_task(str(ROOT / "examples/tasks/wikitext103-local.yaml")), "eval", limit=5)
    assert all(1000 <= len(r["text"]) for r in wiki[:-1])
