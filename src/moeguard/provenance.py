"""What every run records about itself: versions, git commit, resolved settings."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path


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


def run_record(settings: dict) -> dict:
    return {"settings": settings, "versions": versions(), "git_commit": git_commit(),
            "command": " ".join(["moeguard", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("moeguard") else None}
