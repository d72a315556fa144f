"""From a read-only review of untrusted inputs: a received checkpoint's links out of its folder are
not copied into what moeguard writes; a config dtype that is no torch dtype, a prompt placeholder
with a format spec and a reference scan's unreadable score are one line."""

from __future__ import annotations

import json
import shutil

import pytest

from moeguard.cli import main
from moeguard.models.loading import EMBEDDED_MODEL_DIR


def _one_line(code, err, *needles):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("moeguard: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("mode", ["--streaming", "--in-memory"])
def test_a_link_out_of_the_checkpoint_is_not_copied_into_the_pruned_one(tmp_path, mode):
    secret = tmp_path / "secret.txt"
    secret.write_text("HF_TOKEN=hf_abc")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(EMBEDDED_MODEL_DIR, ckpt)
    (ckpt / "NOTES.txt").symlink_to(secret)
    (ckpt / "notes-here.md").write_text("the owner's notes")
    (ckpt / "LINK.md").symlink_to(ckpt / "notes-here.md")   # a link inside the folder is its own file
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {str(l): [0, 2, 4, 6] for l in range(4)}}))
    out = tmp_path / "out"
    assert main(["prune", "--model", str(ckpt), "--plan", str(plan), "--out", str(out), mode]) == 0
    assert not (out / "NOTES.txt").exists() and (out / "LINK.md").read_text() == "the owner's notes"
    assert "HF_TOKEN" not in "".join(p.read_text(errors="ignore") for p in out.iterdir() if p.is_file())
    if mode == "--streaming":
        assert "NOTES.txt" in json.loads((out / "moeguard_pruning.json").read_text())["skipped_files"]


def test_a_hub_snapshots_links_into_its_blobs_are_its_own_files(tmp_path):
    """The hub cache keeps every file of a snapshot as a link to ../../blobs/: they are copied."""
    from moeguard.pruning.checkpoint import side_files

    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for name, text in (("tokenizer.json", "{}"), ("README.md", "card")):
        (repo / "blobs" / f"sha-{name}").write_text(text)
        (snap / name).symlink_to(f"../../blobs/sha-{name}")
    (snap / "stolen.txt").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "elsewhere.txt").write_text("not the repo's")
    copy, skipped = side_files(snap, [])
    assert [p.name for p in copy] == ["README.md", "tokenizer.json"] and skipped == ["stolen.txt"]


def test_a_config_dtype_that_is_no_torch_dtype_is_one_line(tmp_path, capsys):
    """'bf16' (a common typo) was transformers' getattr(torch, 'bf16'): an AttributeError traceback
    on every command, info included."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(EMBEDDED_MODEL_DIR, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(torch_dtype="bf16", dtype="bf16")
    (ckpt / "config.json").write_text(json.dumps(config))
    _one_line(main(["info", "--model", str(ckpt)]), capsys.readouterr().err,
              f"the config of {ckpt.resolve()} names dtype 'bf16', which is no torch dtype", "write bfloat16")


@pytest.mark.parametrize("placeholder", ["{question:>999999999}", "{question!r}", "{question:😀>9}"])
def test_a_prompt_placeholder_with_a_format_is_refused_when_the_task_is_read(tmp_path, placeholder):
    from moeguard.errors import MoeguardError
    from moeguard.tasks.registry import load_task_file

    src = EMBEDDED_MODEL_DIR.parent.parent / "tasks" / "embedded" / "arith-compare.yaml"
    text = src.read_text().replace('prompt: "{question}\\nAnswer:"', f'prompt: "{placeholder}\\nAnswer:"')
    assert placeholder in text
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(MoeguardError) as e:
        load_task_file(tmp_path / "t.yaml")
    assert e.value.message.endswith("with a format") and "write plain {question}" in e.value.hint


@pytest.mark.parametrize("score", ["1" + "0" * 400, "true"])
def test_a_reference_scan_with_an_unreadable_score_is_one_error(tmp_path, score):
    """A 400-digit integer overflowed math.isfinite (a traceback); true passed as a score."""
    from moeguard.errors import MoeguardError
    from moeguard.scan.run import SCHEMA, load_references

    f = tmp_path / "scan.json"
    f.write_text('{"schema": "%s", "suspicion": {"score": "chain"}, "experts": [{"layer": 0, "effect": {"score": %s}}]}'
                 % (SCHEMA, score))
    with pytest.raises(MoeguardError, match="has an expert row without an integer layer and a finite effect score"):
        load_references([f])


def test_a_config_declaring_more_layers_than_its_weights_hold_is_refused_before_any_build(tmp_path, capsys,
                                                                                           monkeypatch):
    """A received checkpoint's num_hidden_layers of 10,000,000 built that many modules on meta (trace,
    info, prune) before the missing tensors were found."""
    import moeguard.models.loading as loading

    ckpt = tmp_path / "ckpt"
    shutil.copytree(EMBEDDED_MODEL_DIR, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 10_000_000
    (ckpt / "config.json").write_text(json.dumps(config))
    real = loading.meta_model

    def built(config, *a, **k):
        assert config.num_hidden_layers < 100, "a model was built from the suspect's config"
        return real(config, *a, **k)

    monkeypatch.setattr(loading, "meta_model", built)
    for argv in (["info", "--model", str(ckpt)],
                 ["trace", "--original", "embedded", "--suspect", str(ckpt), "--out", str(tmp_path / "t")]):
        capsys.readouterr()
        _one_line(main(argv), capsys.readouterr().err,
                  f"{ckpt.resolve()}: config.json declares 10000000 layers, and its weights hold layers 0 to 3")


def test_a_symlink_farm_of_a_shared_model_keeps_its_tokenizer(tmp_path, recwarn):
    """Links out of the folder are not copied; a tokenizer and generation config linked from a shared
    folder (ln -s /shared/model/* ckpt/, an older hub download's local_dir) are written again through
    transformers: streamed, the output had no tokenizer, and every later command on it failed."""
    from transformers import AutoTokenizer

    shared = tmp_path / "shared"
    shutil.copytree(EMBEDDED_MODEL_DIR, shared)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in shared.iterdir():
        (ckpt / f.name).symlink_to(f)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep": {str(l): [0, 2, 4, 6] for l in range(4)}}))
    out = tmp_path / "out"
    assert main(["prune", "--model", str(ckpt), "--plan", str(plan), "--out", str(out), "--streaming"]) == 0
    want, got = AutoTokenizer.from_pretrained(shared), AutoTokenizer.from_pretrained(out)
    assert got("Is 12 greater than 7?")["input_ids"] == want("Is 12 greater than 7?")["input_ids"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == \
        json.loads((shared / "generation_config.json").read_text())["eos_token_id"]
    record = json.loads((out / "moeguard_pruning.json").read_text())
    left = set(record["skipped_files"])
    assert "tokenizer.json" not in left and "generation_config.json" not in left
    said = [str(w.message) for w in recwarn if "link(s) out of the checkpoint" in str(w.message)]
    assert len(said) == (1 if left - {".gitattributes"} else 0), said


def test_a_folder_laid_out_like_a_hub_snapshot_elsewhere_gets_no_allowance(tmp_path):
    """The hub cache's allowance (links into the repository) was granted to any folder under a
    'snapshots' folder: an archive unpacked in $HOME as snapshots/x/ reached every file under $HOME."""
    from moeguard.pruning.checkpoint import side_files

    home = tmp_path / "home"
    snap = home / "snapshots" / "x"
    snap.mkdir(parents=True)
    (home / ".token").write_text("hf_secret")
    (snap / "NOTES.txt").symlink_to("../../.token")
    copy, skipped = side_files(snap, [])
    assert copy == [] and skipped == ["NOTES.txt"]


def test_only_links_out_of_the_folder_are_said_as_such(tmp_path, recwarn):
    """A linked weight file of another format, or a linked folder, is left out for what it is, not
    said to lead out of the checkpoint."""
    from moeguard.pruning.checkpoint import resave_linked, side_files

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "elsewhere" / "NOTES.txt").write_text("notes")
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "pytorch_model.bin").symlink_to(tmp_path / "elsewhere" / "pytorch_model.bin")
    (src / "extra").symlink_to(tmp_path / "elsewhere")
    (src / "NOTES.txt").symlink_to(tmp_path / "elsewhere" / "NOTES.txt")
    _, skipped = side_files(src, [])
    assert sorted(skipped) == ["NOTES.txt", "extra", "pytorch_model.bin"]
    (tmp_path / "out").mkdir()
    assert resave_linked(src, tmp_path / "out", skipped) == skipped
    said = [str(w.message) for w in recwarn if "link(s) out of" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(f"{src}: NOTES.txt link(s)"), said
