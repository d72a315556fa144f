"""From a read-only review of the core (io, config readers, the CLI's warnings, provenance): each
failure is one line naming what happened, and nothing is lost when a swap or a move fails."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from moeguard.errors import MoeguardError


def test_a_lock_the_file_system_cannot_take_is_not_reported_as_another_run(tmp_path, monkeypatch):
    import fcntl

    from moeguard.io import hold_lock

    def no_locks(f, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(MoeguardError) as e:
        hold_lock(tmp_path / ".x.lock", busy="another moeguard run is writing x", hint="wait")
    said = e.value.one_line()
    assert "No locks available" in said and "does not take file locks" in said and "another" not in said, said

    def busy(f, how):
        raise OSError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", busy)
    with pytest.raises(MoeguardError, match="another moeguard run is writing x"):
        hold_lock(tmp_path / ".x.lock", busy="another moeguard run is writing x", hint="wait")


def test_a_lock_file_that_cannot_be_made_is_one_line(tmp_path):
    from moeguard.io import hold_lock

    (tmp_path / "f").write_text("a file")
    with pytest.raises(MoeguardError, match="cannot make the lock file"):
        hold_lock(tmp_path / "f" / ".x.lock", busy="busy", hint="wait")


def test_audit_out_inside_a_file_is_one_line_before_any_work(tmp_path, capsys):
    from moeguard.cli import main

    (tmp_path / "notes.txt").write_text("x")
    assert main(["audit", "--out", str(tmp_path / "notes.txt" / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which is a file, not a folder" in err and "Traceback" not in err, err


def test_an_unreadable_json_yaml_or_task_file_is_one_line(tmp_path, monkeypatch):
    from moeguard.audit.config import load_yaml
    from moeguard.io import read_json
    from moeguard.tasks.registry import load_task_file

    for name in ("a.json", "a.yaml", "t.yaml"):
        (tmp_path / name).write_text("{}")

    def denied(self, *a, **k):   # what mode 000 gives a user who is not root (these tests may run as root)
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(MoeguardError, match=r"plan .*a.json cannot be read \(Permission denied\)"):
        read_json(tmp_path / "a.json", what="plan", hint="h")
    with pytest.raises(MoeguardError, match="cannot be read"):
        load_yaml(tmp_path / "a.yaml")
    with pytest.raises(MoeguardError, match="cannot be read"):
        load_task_file(tmp_path / "t.yaml")


def test_deeply_nested_yaml_is_one_line_and_a_folder_is_named(tmp_path):
    from moeguard.audit.config import load_yaml
    from moeguard.io import read_json
    from moeguard.tasks.registry import load_task_file

    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(MoeguardError, match="nested too deeply"):
        load_yaml(deep)
    with pytest.raises(MoeguardError, match="not valid YAML"):
        load_task_file(deep)
    with pytest.raises(MoeguardError, match=f"plan {tmp_path} is a folder"):
        read_json(tmp_path, what="plan", hint="h")


def test_an_audit_config_setting_one_option_twice_is_refused(tmp_path):
    from moeguard.audit.config import load_yaml

    f = tmp_path / "a.yaml"
    f.write_text("eval-limit: 8\neval_limit: 16\n")
    with pytest.raises(MoeguardError, match="sets eval_limit twice"):
        load_yaml(f)
    f.write_text("eval-limit: 8\nseed: 1\n")
    assert load_yaml(f) == {"eval_limit": 8, "seed": 1}


def test_a_swap_does_not_collide_with_a_copy_an_interrupted_one_left(tmp_path):
    from moeguard.io import atomic_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    # what an interrupt during the last swap's removal left, under this process's id
    stale = tmp_path / f".out.old-{os.getpid()}"
    stale.mkdir()
    (stale / "x").write_text("x")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_an_output_another_run_wrote_meanwhile_is_not_replaced_without_overwrite(tmp_path, monkeypatch):
    """Two runs to one --out, neither with --overwrite: both passed the check at their start, and the later
    to finish swapped the first one's finished output aside and deleted it."""
    from moeguard import io

    out = tmp_path / "out"
    with pytest.raises(MoeguardError, match="appeared while this run worked") as e:
        with io.atomic_dir(out) as tmp:
            (tmp / "mine.txt").write_text("mine")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")   # the other run finished first
    assert "--overwrite" in e.value.hint
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with io.atomic_dir(out, overwrite=True) as tmp:   # asked: replaced
        (tmp / "mine.txt").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]

    f = tmp_path / "r.json"
    real = io.os.fdopen

    def meanwhile(*a, **k):   # the other run writes the file between the check and the rename
        f.write_text("theirs")
        return real(*a, **k)
    monkeypatch.setattr(io.os, "fdopen", meanwhile)
    with pytest.raises(MoeguardError, match="appeared while this run worked"):
        io.write_text(f, "mine", overwrite=False)
    monkeypatch.undo()
    assert f.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.json"]
    io.write_text(tmp_path / "new.json", "mine", overwrite=False)
    assert (tmp_path / "new.json").read_text() == "mine" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_interrupt_between_the_renames_of_a_swap_waits_for_the_second(tmp_path):
    """Ctrl-C (or the SIGTERM the CLI turns into one) after the old output was renamed aside and before the new
    one was renamed in: the old one stayed hidden as .out.old-*, and atomic_dir's clean-up deleted the new one.
    In a process of its own: the CLI's main thread takes the signal (a pytest-xdist worker's may not)."""
    import subprocess
    import sys

    script = """
import os, signal, sys
from pathlib import Path
from moeguard import io
out = Path(sys.argv[1]) / "out"
out.mkdir()
(out / "old.txt").write_text("old")
import threading, torch
torch.ones(64, 64) @ torch.ones(64, 64)   # torch's threads, and one of our own: a signal mask is per thread
idle = threading.Event()
threading.Thread(target=idle.wait, daemon=True).start()
real, calls = os.replace, []
def replace(a, b):
    calls.append(Path(b).name)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGINT)   # lands between the two renames
    real(a, b)
try:
    with io.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        io.os.replace = replace
except KeyboardInterrupt:
    print("interrupted after", len(calls), "renames")
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "interrupted after 2 renames", (done.stdout, done.stderr)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]   # the new output is in place
    # the interrupt is raised once the swap is whole and the old copy removed
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_output_that_is_an_input_by_another_case_is_refused(tmp_path, monkeypatch):
    """On a case-insensitive file system (macOS's APFS) ./OLMoE is ./olmoe: compared by name the check passed,
    and --overwrite moved the input model aside and deleted it. Faked here by a samefile that ignores case."""
    from moeguard.io import check_not_inputs

    monkeypatch.setattr(os.path, "samefile", lambda a, b: str(a).lower() == str(b).lower())
    model = tmp_path / "olmoe"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "runs").mkdir()
    with pytest.raises(MoeguardError, match="is \\(or holds\\) the input"):
        check_not_inputs(tmp_path / "OLMOE", [str(model)])
    with pytest.raises(MoeguardError, match="is inside the model folder"):
        check_not_inputs(tmp_path / "OLMOE" / "run", [str(model)])
    check_not_inputs(tmp_path / "runs" / "x", [str(model)])   # another folder passes


def test_a_resumable_folder_keeps_its_stamp_when_the_move_fails(tmp_path, monkeypatch):
    from moeguard import io

    out = tmp_path / "out"
    with pytest.raises(OSError):
        with io.resumable_dir(out, settings={"a": 1}) as part:
            (part / "step").write_text("done")
            monkeypatch.setattr(io.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    monkeypatch.undo()
    # the kept step survives: the same settings resume it
    with io.resumable_dir(out, settings={"a": 1}) as part:
        assert (part / "step").read_text() == "done"
    assert sorted(p.name for p in out.iterdir()) == ["step"]


def test_library_warnings_keep_their_source_in_a_checkout_named_moeguard():
    from moeguard.cli import _format_warning

    theirs = _format_warning("deprecated", UserWarning, "/home/u/moeguard/.venv/lib/python3.11/site-packages/"
                                                        "transformers/x.py", 5, "")
    assert "transformers/x.py:5" in theirs and not theirs.startswith("moeguard: warning"), theirs
    import moeguard.io as mine

    assert _format_warning("kept", UserWarning, mine.__file__, 1) == "moeguard: warning: kept\n"


def test_the_commit_pip_recorded_when_git_is_not_installed(monkeypatch):
    import subprocess

    from moeguard import provenance

    def no_git(*a, **k):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory: 'git'")

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.setattr(provenance, "_installed_commit", lambda: "abc123")
    assert provenance.git_commit() == "abc123"


def test_an_input_that_cannot_be_looked_at_is_skipped_not_a_traceback(tmp_path, monkeypatch):
    """A pruning record's source under another user's mode-700 home: Path.exists raised PermissionError
    (Python 3.11 swallows only a missing path), a traceback where realign should run on --full-score."""
    from moeguard.io import check_not_inputs

    real_stat, locked = os.stat, "/root/models/Mixtral-8x7B"

    def stat(p, *a, **k):   # that path alone cannot be looked at; every other check stays real
        if str(p).startswith(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_stat(p, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    check_not_inputs(tmp_path / "out", [locked])
    # and the check still works beside it: an output that is another input is refused
    (tmp_path / "out").mkdir()
    with pytest.raises(MoeguardError, match="is \\(or holds\\) the input"):
        check_not_inputs(tmp_path / "out", [locked, str(tmp_path / "out")])
