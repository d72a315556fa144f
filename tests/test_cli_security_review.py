"""From read-only reviews of cli/ and of moeguard as a reader of untrusted files: every case is one
line and exit 2 (or refused before work), and an audit never empties a folder it reads."""

from __future__ import annotations

import json

import pytest

from moeguard.cli import main
from moeguard.errors import MoeguardError


def _one_line(capsys, code, needle):
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err, err


def test_an_audit_out_holding_an_input_is_refused_before_anything_is_cleared(tmp_path, capsys):
    """A hardened checkpoint an earlier audit wrote in its stages, given back as --hardened with the same
    --out and --overwrite: the stages (and the checkpoint) were deleted, and the run failed at the
    defense stage after every other one."""
    run = tmp_path / "run"
    hardened = run / "stages" / "harden" / "hardened"
    hardened.mkdir(parents=True)
    (hardened / "config.json").write_text("{}")
    (run / ".moeguard-audit").write_text("{}")
    capsys.readouterr()
    _one_line(capsys, main(["audit", "--hardened", str(hardened), "--out", str(run), "--overwrite"]),
              "lies in what the run folder")
    assert (hardened / "config.json").exists()
    # a config file kept beside the run is not what the audit clears: it is not refused for that
    from moeguard.audit.run import _check_inputs

    (run / "audit.yaml").write_text("seed: 1\n")
    _check_inputs(run, [str(run / "audit.yaml")])
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _one_line(capsys, main(["audit", "--model", str(model), "--out", str(model / "audit")]),
              "is inside the model folder")


def test_eval_refuses_a_task_named_twice_before_the_weights_load(tmp_path, monkeypatch, capsys):
    from moeguard.models.handle import ModelHandle

    monkeypatch.setattr(ModelHandle, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    capsys.readouterr()
    _one_line(capsys, main(["eval", "--tasks", "arith-compare,arith-compare"]), "more than once")
    # two task files whose names differ only in case: one kept file on macOS (task-Docs.json is task-docs.json)
    for folder, name in (("a", "docs"), ("b", "Docs")):   # folders apart: on APFS docs.yaml is Docs.yaml
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "t.yaml").write_text(
            f"name: {name}\nkind: language_modeling\nsource: {{type: local, path: d, format: txt}}\nfields: {{text: text}}\n")
        (tmp_path / folder / "d").mkdir()
        (tmp_path / folder / "d" / "test.txt").write_text("some text\n" * 20)
    _one_line(capsys, main(["eval", "--tasks", f"{tmp_path / 'a' / 't.yaml'},{tmp_path / 'b' / 't.yaml'}"]),
              "name tasks 'docs' and 'Docs', which differ only in case")


def test_gpus_per_job_that_ray_cannot_take_is_one_line():
    from moeguard.studies.engine import make_backend

    for bad in (float("nan"), float("inf"), 0.00001, -1.0):
        with pytest.raises(MoeguardError, match="--gpus-per-job is"):
            make_backend("ray", gpus=bad)


def test_a_task_file_whose_description_is_not_text_is_one_line(tmp_path):
    from moeguard.tasks.registry import load_task_file

    f = tmp_path / "t.yaml"
    # a mapping of mixed keys (sorted in every resume key: a TypeError), or an alias bomb expanded there
    f.write_text("name: t\nkind: classification\ndescription: {1: a, b: c}\n"
                 "source: {type: local, path: ., format: csv, files: {test: d.csv}}\nsplits: {eval: test}\n"
                 "fields: {input: x, label: y}\nlabels: {0: ' no', 1: ' yes'}\nprompt: '{x}'\n")
    with pytest.raises(MoeguardError, match="task 't' has description of type dict, expected text"):
        load_task_file(f)


def test_digit_like_keys_in_plans_are_one_line_not_a_value_error(tmp_path):
    from moeguard.config import is_decimal
    from moeguard.pruning.plan import PrunePlan

    assert is_decimal("12") and not is_decimal("²") and not is_decimal("١") and not is_decimal(3)
    with pytest.raises(MoeguardError, match="layer '²' -> \\[0\\] is not a list of expert indices"):
        PrunePlan.from_dict({"keep": {"²": [0]}}, origin="plan.json")


def test_a_fingerprint_whose_metadata_is_not_an_object_is_one_line(tmp_path):
    from moeguard.trace.fingerprint import META, TENSORS, Fingerprint

    (tmp_path / META).write_text("[]")
    (tmp_path / TENSORS).write_bytes(b"")
    with pytest.raises(MoeguardError, match="holds a JSON list, expected an object"):
        Fingerprint.load(tmp_path)
    (tmp_path / META).write_bytes(b"\xff\xfe{")
    with pytest.raises(MoeguardError, match="fingerprint metadata .* is not valid JSON"):
        Fingerprint.load(tmp_path)


def test_a_model_routing_to_all_its_experts_has_no_keep_level_and_says_so(tmp_path):
    """A checkpoint pruned down to its top-k (Mixtral kept 2 of 8, top-2): the default grid was empty
    and the sweep measured nothing, silently."""
    from moeguard.edge import resolve_grid, resolve_model
    from moeguard.models.loading import load_model
    from moeguard.testing import tiny_model

    tiny_model("mixtral", num_local_experts=2, num_experts_per_tok=2).save_pretrained(tmp_path / "m")
    load_model(None)[1].save_pretrained(tmp_path / "m")
    handle = resolve_model(str(tmp_path / "m"))
    with pytest.raises(MoeguardError, match="routes every token to all of its 2 experts"):
        resolve_grid(handle, tasks=["arith-compare"], methods=["frequency"], keeps=None)


def test_every_embedded_file_is_package_data():
    """The embedded suite's README (provenance and licences, which the shipped model card points to) was
    left out of the wheel: package-data matched every other embedded file."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import moeguard

    root = Path(moeguard.__file__).parent
    patterns = tomllib.loads((root.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moeguard"]
    for folder in ("tasks/embedded", "zoo/embedded", "tasks/presets"):
        for f in (root / folder).rglob("*"):
            rel = f.relative_to(root).as_posix()
            if f.is_file() and "__pycache__" not in rel and not rel.endswith(".py"):
                assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), rel
