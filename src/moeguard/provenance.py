"""What every run records about itself: versions, git commit, resolved settings."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("moeguard", "torch", "transformers", "datasets", "safetensors", "tokenizers", "peft", "accelerate",
                "rouge-score", "ray"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run_record(settings: dict) -> dict:
    return {"settings": settings, "versions": versions(), "git_commit": git_commit(),
            "command": " ".join(["moeguard", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("moeguard") else None}
