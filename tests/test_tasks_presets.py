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


@pytest.mark.parametrize("name", ["glue-sst2", "wikitext-103", "cnn-dailymail"])
def test_hub_presets_fail_with_one_clear_line_offline(offline, name):
    with pytest.raises(MoeguardError) as err:
        load_records(get_task(name), "eval", limit=2)
    line = err.value.one_line()
    assert "\n" not in line
    assert "offline mode is on" in line and get_task(name).source.hub_name in line
    assert "save_to_disk" in line and "type: disk" in line


def test_examples_parse_and_point_at_the_shared_data():
    names = {get_task(str(f)).name for f in EXAMPLES}
    assert names == {"sst2-local", "wikitext103-local", "shakespeare-local", "scitldr-local", "agnews-local"}
    for file in EXAMPLES:
        assert Path(get_task(str(file)).source.path).resolve().parent == SHARED.resolve()
    assert not {"sst2-local"} & {t.name for t in list_tasks()}  # examples are never built-ins


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
