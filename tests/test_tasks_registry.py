"""Registry: built-ins from YAML folders, user task files, and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moeguard.errors import MoeguardError
from moeguard.tasks import registry
from moeguard.tasks.base import SourceSpec, Task, TaskKind



def lm_task(name: str) -> dict:
    return {"name": name, "kind": "language_modeling", "fields": {"text": "text"},
            "source": {"type": "local", "path": "data", "format": "txt", "files": {"train": "a.txt"}}}


def one(name: str) -> str:
    return yaml.safe_dump(lm_task(name))


def many(*names: str) -> str:
    return yaml.safe_dump({"tasks": [lm_task(n) for n in names]})


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A registry whose built-ins come from two empty temp folders (presets, embedded)."""
    presets, embedded = tmp_path / "presets", tmp_path / "embedded"
    presets.mkdir()
    embedded.mkdir()
    monkeypatch.setattr(registry, "BUILTIN_DIRS", (presets, embedded))
    registry._reset_for_tests()
    yield presets, embedded
    registry._reset_for_tests()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_builtins_come_from_both_folders_including_lists(isolated):
    presets, embedded = isolated
    _write(presets / "one.yaml", one("alpha"))
    _write(embedded / "many.yaml", many("beta", "gamma"))
    assert [t.name for t in registry.list_tasks()] == ["alpha", "beta", "gamma"]
    assert registry.get_task("beta").kind is TaskKind.LANGUAGE_MODELING
    assert registry.task_origin("gamma").endswith("many.yaml")


def test_unknown_name_suggests_close_matches(isolated):
    presets, _ = isolated
    _write(presets / "t.yaml", one("wikitext-103"))
    with pytest.raises(MoeguardError) as err:
        registry.get_task("wikitext-10")
    assert "unknown task 'wikitext-10'" in err.value.message
    assert "did you mean wikitext-103" in err.value.hint


def test_real_builtins_include_the_study_benchmarks():
    registry._reset_for_tests()
    names = {t.name for t in registry.list_tasks()}
    expected = {f"glue-{n}" for n in ("sst2", "cola", "mrpc", "qqp", "mnli", "qnli", "rte", "wnli")}
    assert expected | {"wikitext-103", "xsum", "cnn-dailymail"} <= names
    mnli = registry.get_task("glue-mnli")
    assert mnli.splits["eval"] == "validation_matched" and len(mnli.labels) == 3
    assert registry.get_task("cnn-dailymail").source.hub_config == "3.0.0"


def test_user_file_paths_resolve_relative_to_the_yaml(isolated, tmp_path, monkeypatch):
    folder = tmp_path / "cfg"
    (folder / "data").mkdir(parents=True)
    file = _write(folder / "mine.yaml", one("mine"))
    monkeypatch.chdir(tmp_path)  # cwd has no data/ folder: the YAML's folder must win
    task = registry.get_task(str(file))
    assert Path(task.source.path) == (folder / "data").resolve()
    assert "mine" not in {t.name for t in registry.list_tasks()}  # loading a file registers nothing


def test_relative_path_falls_back_to_cwd(isolated, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "cfg").mkdir()
    file = _write(tmp_path / "cfg" / "mine.yaml", one("mine"))
    monkeypatch.chdir(tmp_path)
    assert Path(registry.get_task(str(file)).source.path) == (tmp_path / "data").resolve()


def test_multi_task_file_needs_a_selector(isolated, tmp_path):
    file = _write(tmp_path / "two.yaml", many("a", "b"))
    with pytest.raises(MoeguardError, match="defines 2 tasks"):
        registry.get_task(str(file))
    assert registry.get_task(f"{file}#b").name == "b"
    with pytest.raises(MoeguardError, match="no task named 'c'"):
        registry.get_task(f"{file}#c")


@pytest.mark.parametrize("content, expected", [
    ("name: [unclosed", "not valid YAML at line"),
    ("- just\n- a list\n", "holds a list, not a mapping"),
    ("tasks: 3\n", "not a non-empty list"),
    ("name: x\nkind: translation\nsource: {}\nfields: {}\n", "kind 'translation'"),
    # misspelled keys and roles were ignored, and their defaults applied
    ("name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: s, label: y}\nlabels: {0: ' no', 1: ' yes'}\nsplit: {train: a, eval: b}\n", r"unknown key 'split'.*did you mean splits"),
    ("name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: s, label: y}\nlabels: {0: ' no', 1: ' yes'}\ngeneration: {max_tokens: 64}\n", r"unknown key 'generation.max_tokens'.*max_new_tokens"),
    ("name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: s, label: y}\nlabels: {0: ' no', 1: ' yes'}\nsplits: {training: a, eval: b}\n", r"maps split role 'training'.*did you mean train"),
    ("name: t\nkind: classification\nsource: {type: local, pth: d}\nfields: {input: s, label: y}\n", r"unknown key 'source.pth'"),
    # non-text paths and file names were TypeError tracebacks (Path(2024), Path([...]))
    ("name: t\nkind: classification\nsource: {type: local, path: 2024}\nfields: {input: s, label: y}\n",
     r"bad.yaml'.*source.path 2024, not a name"),
    ("name: t\nkind: classification\nsource: {type: local, path: d, files: {train: [a.jsonl, b.jsonl]}}\n"
     "fields: {input: s, label: y}\n", r"source.files .*each must name"),
    # mixed label keys failed every resumable command's sorted-JSON key; {a[0]} took a character
    ("name: t\nkind: classification\nsource: {type: local, path: d}\nfields: {input: s, label: y}\n"
     "labels: {0: ' no', unsure: ' maybe'}\n", "label keys .* of different kinds"),
    ("name: t\nkind: classification\nsource: {type: local, path: d}\nfields: {input: s, label: y}\n"
     "prompt: '{s[0]} ?'\n", r"placeholder \{s\[0\]\}, which reaches into a column"),
    # the checks made when a task is built now name the file
    ("name: t\nkind: classification\nsource: {type: local, path: d}\nfields: {input: s, label: y}\nmax_length: 0\n",
     r"task definition '.*bad.yaml': task 't' has max_length 0"),
])
def test_bad_task_files_name_the_problem(isolated, tmp_path, content, expected):
    file = _write(tmp_path / "bad.yaml", content)
    with pytest.raises(MoeguardError, match=expected):
        registry.load_task_file(file)


def test_missing_task_file(isolated, tmp_path):
    with pytest.raises(MoeguardError, match="task file .*nope.yaml' is no such file"):
        registry.get_task(str(tmp_path / "nope.yaml"))
    with pytest.raises(MoeguardError, match="unknown task 'nyu-mll/glue'"):  # a hub name, not a task
        registry.get_task("nyu-mll/glue")


def test_register_task_refuses_silent_overwrite(isolated):
    task = Task(name="py-task", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "text"},
                source=SourceSpec(type="local", path="/nowhere", format="txt"))
    registry.register_task(task)
    assert registry.get_task("py-task") is task
    with pytest.raises(MoeguardError, match="already defined"):
        registry.register_task(task)
    other = Task(name="py-task", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "body"},
                 source=SourceSpec(type="local", path="/elsewhere", format="txt"))
    registry.register_task(other, overwrite=True)
    assert registry.get_task("py-task") is other


def test_duplicate_builtin_names_are_an_error(isolated):
    presets, embedded = isolated
    _write(presets / "a.yaml", one("same"))
    _write(embedded / "b.yaml", one("same"))
    for _ in range(2):  # keeps raising: the registry is not left half-loaded
        with pytest.raises(MoeguardError, match="defined in both"):
            registry.list_tasks()
