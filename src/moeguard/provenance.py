"""What every run records about itself: versions, git commit, resolved settings."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def git_commit() -> str | None:
    """moeguard's own commit (with -dirty for uncommitted changes) when it runs from a checkout; the
    commit pip recorded for an install from a git URL; else None. Installed into a virtual
    environment inside some other repository, git would have answered with that repository's HEAD."""
    root = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=5)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return _installed_commit()
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):   # no git on this machine (a runtime image): pip's record, if any
        return _installed_commit()
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _installed_commit() -> str | None:
    """The commit of a ``pip install git+...`` (PEP 610's direct_url.json), if that is how moeguard came."""
    import importlib.metadata as md
    import json

    try:
        text = md.distribution("moeguard").read_text("direct_url.json")
        return json.loads(text).get("vcs_info", {}).get("commit_id") if text else None
    except (md.PackageNotFoundError, ValueError, AttributeError):
        return None


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    # every package a recorded number can depend on: numpy's generators draw the bootstrap intervals, pandas
    # ranks for spearman, scipy solves trace's assignment and the merges' least squares and gives the period
    # tests' distributions, gguf dequantizes, nltk's Porter stemmer is ROUGE's (its variants differ by release)
    for pkg in ("moeguard", "torch", "transformers", "datasets", "safetensors", "tokenizers", "peft", "accelerate",
                "rouge-score", "nltk", "numpy", "scipy", "pandas", "gguf", "huggingface-hub", "ray"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# Work kept by an earlier run (an audit's stages, study jobs, a command's kept folder, a training state)
# is reused by a resumed one whatever moeguard made it: keys hold no version, so cached work survives a
# release that moves no number. What a resumed run reuses from another version is listed in its record
# (``run_record``'s "reused") and warned about once per version, so its numbers are never credited to
# a commit that did not make them. Cleared at each command's start (``start_command``).
_reused: list[dict[str, Any]] = []


def run_record(settings: dict) -> dict:
    """The run's settings, versions and commit; with "reused" when it resumed from work another version
    kept (``reusing``), which the versions and commit here did not make."""
    record = {"settings": settings, "versions": versions(), "git_commit": git_commit(),
              "command": " ".join(["moeguard", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("moeguard") else None}
    if "source" in maker():   # the commit does not name the code (provenance.maker)
        record["source"] = maker()["source"]
    if _reused:
        record["reused"] = reused()
    return record


def maker_of(record: Any) -> dict[str, Any] | None:
    """The :func:`maker` of the run whose :func:`run_record` ``record`` is (None: not one)."""
    if not isinstance(record, dict) or not isinstance(record.get("versions"), dict):
        return None
    made = {"git_commit": record.get("git_commit"), **{k: v for k, v in record["versions"].items() if k != "platform"}}
    return {**made, "source": record["source"]} if "source" in record else made


@functools.lru_cache(maxsize=1)
def maker() -> dict[str, Any]:
    """What made this process's numbers: the git commit and every version ``versions`` lists, the
    platform's kernel string aside (it changes with updates that move no number). Where the commit
    does not name the code (an install from a wheel or a folder has none, and moeguard's version string
    stays 0.1.0 between commits; a checkout with uncommitted changes is "-dirty" whatever they are),
    ``source``: a digest of the package's own Python files."""
    commit = git_commit()
    made = {"git_commit": commit, **{k: v for k, v in versions().items() if k != "platform"}}
    if commit is None or commit.endswith("-dirty"):
        made["source"] = source_digest()
    return made


def source_digest() -> str:
    """sha256 (16 hex digits) of every .py file of the installed package, by relative path."""
    import hashlib

    root, h = Path(__file__).resolve().parent, hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def start_command() -> None:
    """A new command: what earlier ones reused is not its own."""
    _reused.clear()


def reusing(what: str, made_by: Any, *, fix: str) -> None:
    """``what`` (a path), kept by a run whose :func:`maker` was ``made_by`` (None: one that recorded
    none, before 2026-12-08), is reused by this run. Another maker than this process's is listed in
    the run record and, the first time this command meets it, warned about with ``fix``."""
    here = maker()
    if made_by == here:
        return
    made_by = made_by if isinstance(made_by, dict) else None
    for group in _reused:
        if group["made_by"] == made_by:
            if what not in group["what"]:
                group["what"].append(what)
            return
    differs = None if made_by is None else {k: [made_by.get(k), here.get(k)] for k in sorted({*made_by, *here})
                                            if made_by.get(k) != here.get(k)}
    _reused.append({"made_by": made_by, "differs": differs, "what": [what]})
    import warnings

    warnings.warn(f"{what} was kept by {describe(differs)} and is reused: what it holds is that version's numbers "
                  f"(the run record's 'reused' lists all such work); to recompute it with this one, {fix}", stacklevel=2)


def describe(differs: dict[str, list] | None) -> str:
    """``reusing``'s ``differs`` in words: "moeguard commit abc (this run: def), torch 2.12.0 (2.13.0)"."""
    if differs is None:
        return "a moeguard that recorded no version (before 2026-12-08)"
    return "another version: " + ", ".join(f"{'commit' if k == 'git_commit' else k} {a} (this run: {b})"
                                           for k, (a, b) in differs.items())


def reused() -> list[dict[str, Any]]:
    """This command's reused work from other versions so far (copies)."""
    return [{**g, "what": list(g["what"])} for g in _reused]


def with_reused(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (a :func:`run_record` made before the run's work) as the run ends: with what it
    reused from other versions since, which a record made earlier could not list."""
    out = {k: v for k, v in record.items() if k != "reused"}
    if _reused:
        out["reused"] = reused()
    return out


def joined(makers: list[Any], me: dict[str, Any] | None = None) -> list[Any]:
    """``makers`` with ``me`` (default: this process's :func:`maker`) added unless listed: versions in
    the order they first made a piece of the work."""
    me = maker() if me is None else me
    return list(makers) if me in makers else [*makers, me]


def mark(folder: Path, *, fix: str) -> None:
    """``folder`` keeps pieces of work for a resume: the makers of what it already holds (listed in its
    ``io.MADE_BY`` file; pieces without one are a maker's that recorded none) are :func:`reusing`'s, and
    this process's maker is added to the list before it keeps anything there (made if missing)."""
    import json

    from moeguard.io import MADE_BY, STAMP

    f = folder / MADE_BY
    try:
        makers = json.loads(f.read_text(encoding="utf-8"))
        makers = makers if isinstance(makers, list) else [None]
    except (OSError, ValueError):
        makers = [None]
    # nothing kept there yet (a run killed before its first piece): no one's work is reused
    if not (folder.is_dir() and any(p.name not in (STAMP, MADE_BY) for p in folder.iterdir())):
        makers = []
    for m in makers:
        reusing(str(folder), m, fix=fix)
    if maker() not in makers:
        from moeguard.io import write_json

        folder.mkdir(parents=True, exist_ok=True)
        write_json(f, joined(makers))
