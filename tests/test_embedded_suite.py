"""The embedded suite: deterministic builds, clean splits, balanced labels, no naive solutions."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from moeguard.tasks.base import Task, TaskKind
from moeguard.tasks.metrics import rouge
from moeguard.zoo import suite as build

EMBEDDED = build.EMBEDDED_DIR
SHIPPED = EMBEDDED / "data"
STDLIB_TASKS = ("stdlib-docs", "stdlib-code", "docstring-topic", "code-naming")
GENERATED_TASKS = ("arith-compare", "record-summary")
# The column that identifies a record's content, per task (overlap and emptiness checks).
KEY = {"stdlib-docs": "text", "stdlib-code": "text", "docstring-topic": "text",
       "code-naming": "code", "arith-compare": "question", "record-summary": "record"}


def files_of(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read(root: Path, task: str, split: str) -> list[dict]:
    with gzip.open(root / task / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def tasks_from_yaml() -> dict[str, Task]:
    out = {}
    for file in sorted(EMBEDDED.glob("*.yaml")):
        task = Task.from_dict(yaml.safe_load(file.read_text(encoding="utf-8")), origin=str(file))
        out[task.name] = task
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embedded-seed0")
    build.build_suite(out, seed=0)
    return out


@pytest.fixture(scope="module")
def shipped_manifest() -> dict:
    return json.loads((SHIPPED / "MANIFEST.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- determinism

def test_rebuild_in_fresh_process_is_byte_identical(built: Path, tmp_path: Path) -> None:
    # A second interpreter with another hash seed, through the CLI entry point: catches any
    # dependence on set/dict iteration order or on process state.
    env = dict(os.environ, PYTHONHASHSEED="12345")
    src = str(Path(build.__file__).resolve().parents[3])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "moeguard.zoo.suite", "--out", str(out), "--seed", "0"],
                   check=True, env=env, capture_output=True, text=True, timeout=120)
    again = files_of(out)
    assert again.pop("run.json")            # the command's run record (time, versions, commit): not the data
    assert again == files_of(built)


def test_shipped_data_matches_a_rebuild(built: Path, shipped_manifest: dict) -> None:
    python = shipped_manifest["python"]
    if python["version"] != platform.python_version():
        pytest.skip(f"shipped data was built from the Python {python['version']} stdlib, this is "
                    f"{platform.python_version()}; stdlib docstrings and code differ between versions")
    built_python = json.loads((built / "MANIFEST.json").read_text(encoding="utf-8"))["python"]
    if built_python["stdlib_sha256"] != python["stdlib_sha256"]:
        pytest.skip("this interpreter's stdlib files differ from those the shipped data was built "
                    "from (a distribution may patch or strip the stdlib)")
    rebuilt = json.loads((built / "MANIFEST.json").read_text(encoding="utf-8"))
    if rebuilt["zlib_version"] != shipped_manifest["zlib_version"]:
        # another zlib may compress the same records to other bytes: compare the contents
        for task, info in shipped_manifest["tasks"].items():
            for split, entry in info["splits"].items():
                mine = rebuilt["tasks"][task]["splits"][split]
                assert (mine["content_sha256"], mine["records"]) == (entry["content_sha256"], entry["records"])
        return
    assert files_of(built) == files_of(SHIPPED)


def test_manifest_describes_shipped_files(shipped_manifest: dict) -> None:
    assert set(shipped_manifest["tasks"]) == set(build.TASKS)
    listed = set()
    for task, info in shipped_manifest["tasks"].items():
        assert "License" in info["provenance"] or "license" in info["provenance"]
        for split, entry in info["splits"].items():
            data = (SHIPPED / entry["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
            assert len(read(SHIPPED, task, split)) == entry["records"]
            assert hashlib.sha256(gzip.decompress(data)).hexdigest() == entry["content_sha256"]
            listed.add(entry["file"])
    on_disk = {p for p in files_of(SHIPPED) if p != "MANIFEST.json"}
    assert on_disk == listed
    assert shipped_manifest["seed"] == 0 and shipped_manifest["stdlib_modules"]
    assert "PSF" in shipped_manifest["license"]["stdlib-derived"]
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total < 6_000_000


def test_other_seed_changes_generated_tasks(built: Path, tmp_path: Path) -> None:
    build.build_suite(tmp_path, seed=1)
    for task in GENERATED_TASKS:
        for split in build.SPLITS:
            assert (tmp_path / task / f"{split}.jsonl.gz").read_bytes() != (built / task / f"{split}.jsonl.gz").read_bytes()
    # the file split of the stdlib tasks is seeded too
    assert read(tmp_path, "stdlib-docs", "test") != read(built, "stdlib-docs", "test")


# --------------------------------------------------------------------------- splits and records

@pytest.mark.parametrize("task", build.TASKS)
def test_split_sizes(built: Path, task: str) -> None:
    assert 1500 <= len(read(built, task, "train")) <= 3000
    assert len(read(built, task, "validation")) == len(read(built, task, "test")) == 200


@pytest.mark.parametrize("task", build.TASKS)
def test_no_record_in_two_splits(built: Path, task: str) -> None:
    seen: dict[str, str] = {}
    for split in build.SPLITS:
        for r in read(built, task, split):
            key = " ".join(r[KEY[task]].split())
            assert seen.setdefault(key, split) == split, f"{task}: record in {seen[key]} and {split}"
    if task in STDLIB_TASKS:
        names = {split: {r["name"] for r in read(built, task, split)} for split in build.SPLITS}
        assert not (names["train"] & names["validation"] or names["train"] & names["test"]
                    or names["validation"] & names["test"])


def test_each_stdlib_file_feeds_one_split_across_tasks(built: Path) -> None:
    split_of: dict[str, str] = {}
    for task in STDLIB_TASKS:
        for split in build.SPLITS:
            for r in read(built, task, split):
                assert split_of.setdefault(r["source"], split) == split, (task, r["source"])
    # the eval texts of one task are not training texts of another
    # inside any chunk, whitespace normalized: a chunk packs several paragraphs, so an exact match of one
    # paragraph against the chunks fired only where a chunk was that one paragraph
    train_text = [" ".join(r["text"].split()) for r in read(built, "stdlib-docs", "train")]
    leaked = [(split, " ".join(r["text"].split())) for split in build.EVAL_SPLITS for r in read(built, "docstring-topic", split)
              if any(" ".join(r["text"].split()) in t for t in train_text)]
    # one of the 400: a one-sentence docstring of wsgiref/headers.py that another module's docstring
    # repeats word for word (measured 2026-12-07; rebuilding the suite would retrain the embedded model)
    assert leaked == [("validation", "This will quote the value if needed or if quote is true.")], leaked


@pytest.mark.parametrize("task", build.TASKS)
def test_records_are_well_formed(built: Path, task: str) -> None:
    spec = tasks_from_yaml()[task]
    for split in build.SPLITS:
        for r in read(built, task, split):
            for column in spec.fields.values():
                assert isinstance(r[column], str) and r[column].strip(), (task, split, r)
            if spec.kind is TaskKind.SUMMARIZATION:
                target = r[spec.fields["target"]]
                assert "\n" not in target and target == target.strip()
            if spec.kind is TaskKind.CLASSIFICATION:
                assert r[spec.fields["label"]] in spec.labels
            if spec.prompt is not None:
                rendered = spec.prompt.format(**r)
                assert rendered.endswith(":")
    for verbalizer in spec.labels.values():
        assert verbalizer.startswith(" ") and "\n" not in verbalizer


def test_yaml_definitions_match_the_data() -> None:
    tasks = tasks_from_yaml()
    assert set(tasks) == set(build.TASKS)
    for name, task in tasks.items():
        assert task.source.type == "package" and task.source.path == name
        for split in build.SPLITS:
            assert (SHIPPED / name / task.source.files[split]).is_file()
        assert task.prompt is None if task.kind is TaskKind.LANGUAGE_MODELING else task.prompt.endswith(":")
    assert set(tasks["docstring-topic"].labels) == set(build.TOPICS)
    assert set(tasks["arith-compare"].labels) == {"yes", "no"}


def test_loaders_read_the_package_tasks() -> None:
    from moeguard.tasks import loaders   # the project's own module: an import error fails, never skips

    tasks = tasks_from_yaml()
    assert len(tasks) == 6   # the loop below checks each
    for name, task in tasks.items():
        for role in ("train", "eval"):
            records = loaders.load_records(task, role, limit=4)
            assert len(records) == 4, name


# --------------------------------------------------------------------------- content rules

def test_classification_labels_are_balanced(built: Path) -> None:
    for task, labels in (("docstring-topic", list(build.TOPICS)), ("arith-compare", ["yes", "no"])):
        for split in build.SPLITS:
            records = read(built, task, split)
            counts = Counter(r["label"] for r in records)
            assert set(counts) == set(labels) and len(set(counts.values())) == 1, (task, split, counts)
            sequence = [r["label"] for r in records]
            if split == "train":
                # no periodic label pattern a model could read off neighbouring packed records
                same = sum(a == b for a, b in zip(sequence, sequence[1:])) / (len(sequence) - 1)
                assert same > 0.5 / len(labels), (task, same)
            else:
                # any prefix (evaluation with --limit) stays near balance
                head = Counter(sequence[:40])
                assert max(head.values()) - min(head.values()) <= 1


def test_code_naming_hides_the_name(built: Path) -> None:
    for split in build.SPLITS:
        for r in read(built, "code-naming", split):
            assert r["code"].lstrip().startswith(("def _(", "async def _(", "@"))
            assert "def _(" in r["code"]
            assert build.name_words(r["function"]) == r["target"].split()
            # the name survives only as another object's attribute (a wrapped call, `self.fp.close()`)
            for m in re.finditer(rf"(?<![A-Za-z0-9_]){re.escape(r['function'])}(?![A-Za-z0-9_])", r["code"]):
                before = r["code"][: m.start()].rstrip()
                assert before.endswith("."), (r["function"], r["code"])
                assert not re.search(r"(?:\bself|\bcls|\bsuper\(\))\s*\.$", before), (r["function"], r["code"])
            assert build.name_recoverable(r["code"], r["target"].split())
            assert not (r["function"].startswith("__") and r["function"].endswith("__"))
            assert not r["function"].lower().startswith("test")
            assert len(r["code"]) <= build.NAMING_MAX_CHARS
            assert 1 <= len(r["target"].split()) <= 8


@pytest.mark.parametrize("task,column", [("stdlib-code", "text"), ("code-naming", "code")])
def test_code_parses_and_has_no_docstring(built: Path, task: str, column: str) -> None:
    for split in build.SPLITS:
        for r in read(built, task, split):
            func = ast.parse(r[column]).body[0]
            assert isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
            first = func.body[0]
            assert not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                        and isinstance(first.value.value, str)), r[column]


def test_docs_are_prose_without_doctests(built: Path) -> None:
    for split in build.SPLITS:
        for r in read(built, "stdlib-docs", split):
            text = r["text"]
            assert build.DOC_MIN_CHARS <= len(text) <= build.DOC_MAX_CHARS * 1.3
            assert not re.search(r"(^|\s)>>> ", text), text  # quoted mentions of ">>>" are prose
            assert "\n" not in text and "  " not in text


def test_docstring_paragraphs_drop_doctest_examples() -> None:
    doc = "Add numbers.\n\n>>> add(1, 2)\n3\n>>> add(\n...   4, 5)\n9\n\nWorks on floats too."
    assert build.docstring_paragraphs(doc) == ["Add numbers.", "Works on floats too."]
    assert build.name_words("get_close_matches") == ["get", "close", "matches"]
    assert build.name_words("_getHTTPResponse") == ["get", "http", "response"]


def test_mask_name_hides_definition_and_recursion_only() -> None:
    code = ("def close(self):\n    self.fp.close()\n    self.close = 1\n    super().close()\n"
            "    x = close(y)  # close it\n    return 'close() failed'")
    assert build._mask_name(code, "close") == (
        "def _(self):\n    self.fp.close()\n    self._ = 1\n    super()._()\n"
        "    x = _(y)  # _ it\n    return '_() failed'")


def test_arith_compare_needs_a_real_comparison(built: Path) -> None:
    records = [r for split in build.SPLITS for r in read(built, split=split, task="arith-compare")]
    assert all(10 <= r["a"] <= 999 and 10 <= r["b"] <= 999 and r["a"] != r["b"] for r in records)
    assert all((r["a"] > r["b"]) == (r["label"] == "yes") for r in records)
    same = [r for r in records if len(str(r["a"])) == len(str(r["b"]))]
    assert all((r["kind"] == "same_length") == (len(str(r["a"])) == len(str(r["b"]))) for r in records)
    assert 0.55 <= len(same) / len(records) <= 0.65
    for kind in ("same_length", "different_length"):
        counts = Counter(r["label"] for r in records if r["kind"] == kind)
        assert counts["yes"] == counts["no"], (kind, counts)

    def accuracy(guess, rows) -> float:
        return sum(guess(r) == (r["label"] == "yes") for r in rows) / len(rows)

    # comparing digit counts only (yes on a tie), or the first digit only, is far from solving it
    assert accuracy(lambda r: len(str(r["a"])) >= len(str(r["b"])), records) < 0.75
    assert accuracy(lambda r: str(r["a"])[0] >= str(r["b"])[0], records) < 0.8
    assert accuracy(lambda r: str(r["a"])[0] >= str(r["b"])[0], same) < 0.75
    # hard negatives: many pairs differ by less than 10
    assert sum(abs(r["a"] - r["b"]) < 10 for r in same) / len(same) > 0.3


def test_lead_k_baselines_do_not_solve_summarization(built: Path) -> None:
    for task, source, target, ceiling in (("record-summary", "record", "summary", 0.25),
                                          ("code-naming", "code", "target", 0.2)):
        for split in build.EVAL_SPLITS:
            records = read(built, task, split)
            for k in (3, 5, 8):
                score = sum(build.rouge_l_f1(build.lead_k(r[source], k), r[target]) for r in records) / len(records)
                assert score < ceiling, (task, split, k, score)
                # and as tasks are scored (rouge-score's stems, Unicode words), which matches at least as many
                scored = rouge([build.lead_k(r[source], k) for r in records], [r[target] for r in records])["rougeL"]
                assert scored / 100 < ceiling, (task, split, k, scored)


def test_record_summary_names_the_maximum(built: Path) -> None:
    for r in read(built, "record-summary", "test"):
        values = [int("".join(ch for ch in item.split()[-1] if ch.isdigit()))
                  for item in r["record"].split(": ", 1)[1].rstrip(".").split(", ")]
        assert f" {max(values)} " in f" {r['summary']} "
        assert r["record"].split()[1].rstrip(":") in r["summary"]


def test_a_stripped_or_wrong_stdlib_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    """No os.py: refused before the scan; a stdlib without most of its packages: the short task
    and what to install, not a traceback; either way nothing is written."""
    from moeguard.cli import main

    assert main(["zoo", "suite", "--out", str(tmp_path / "a"), "--python-stdlib", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no os.py in it" in err and "--python-stdlib" in err, err
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "os.py").write_text('"""Operating system interfaces, a stand-in."""\n\ndef f(x):\n    """Return x."""\n    return x\n')
    assert main(["zoo", "suite", "--out", str(tmp_path / "b"), "--python-stdlib", str(lib)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "this standard library gives" in err and "python3-tk" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_cli_records_its_run_beside_the_manifest_not_in_it(tmp_path: Path, monkeypatch) -> None:
    """Every other output records versions and the git commit; the manifest itself stays the data's
    (byte-for-byte the same on every rebuild), so the record is run.json beside it."""
    import moeguard.zoo.suite as suite
    from moeguard.cli import main

    def fake(out, *, seed, python_stdlib):
        (Path(out) / "MANIFEST.json").write_text("{}")
        return {"tasks": {}}

    monkeypatch.setattr(suite, "build_suite", fake)
    assert main(["zoo", "suite", "--out", str(tmp_path / "s"), "--seed", "3"]) == 0
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    from moeguard.provenance import git_commit

    assert run["settings"]["seed"] == 3 and run["versions"]["torch"] and run["git_commit"] == git_commit()
    assert (tmp_path / "s" / "MANIFEST.json").read_text() == "{}"
