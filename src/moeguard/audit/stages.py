"""Stages of an audit run that survive kills and config changes.

Each stage writes into a temporary folder ``stages/.NAME.tmp-*`` and, when complete, a
``done.json`` recording its *key* (a hash of the settings it reads and of the keys of the
stages it builds on) is written inside it and the folder is renamed to ``stages/NAME``. So:

- a stage folder without a matching ``done.json`` is never trusted (a kill mid-stage leaves
  only a temporary folder, removed at the next start);
- re-running the same command skips every stage whose key still matches;
- a changed setting changes the key of the stages that read it and of those downstream,
  and only those run again.

Long stages keep their finished jobs under ``jobs/`` (see :mod:`moeguard.studies.engine`), so
a stage that was killed half-way resumes from its last finished job.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from moeguard.io import _move_into_place, digest, whole_json, write_json
from moeguard.provenance import maker, reusing

DONE = "done.json"


@dataclass
class StageResult:
    name: str
    key: str
    path: Path
    cached: bool
    seconds: float

    def read(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())


class StageStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.stages = self.root / "stages"
        self.jobs = self.root / "jobs"
        self.stages.mkdir(parents=True, exist_ok=True)
        # a stage killed before it completed; a stage swapped out by a rerun killed mid-swap (io's
        # _move_into_place: a hardened checkpoint of several GB was left behind)
        for stale in [*self.stages.glob(".*.tmp-*"), *self.stages.glob(".*.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        self.log: list[dict[str, Any]] = []

    def key(self, name: str, settings: Any, upstream: list[StageResult] = ()) -> str:
        return digest({"stage": name, "settings": settings, "upstream": {u.name: u.key for u in upstream}})

    def done(self, name: str, key: str) -> bool:
        """Whether stage ``name`` finished with ``key``, its files as it left them. Anything damaged
        (a marker that is not a JSON object, a stage file deleted or cut short) means not done: the
        stage runs again instead of the resumed run failing on it."""
        return self._info(name, key) is not None

    def _info(self, name: str, key: str) -> dict[str, Any] | None:
        folder = self.stages / name
        try:
            info = json.loads((folder / DONE).read_text(encoding="utf-8"))
        except (OSError, ValueError):         # missing, unreadable, not UTF-8, not JSON
            return None
        if not isinstance(info, dict) or info.get("key") != key:
            return None
        files = info.get("files", {})         # absent in stages finished before 2026-12-04
        if not isinstance(files, dict) or any(not isinstance(size, int) or not (folder / rel).is_file()
                                              or (folder / rel).stat().st_size != size for rel, size in files.items()):
            return None
        # a stage written before every output was strict JSON, whose files hold NaN or Infinity, runs
        # again: its readers now take null for a number that is not finite (io.dumps)
        if not all(whole_json(folder / rel) for rel in files if rel.endswith(".json")):
            return None
        return info

    def run(self, name: str, settings: Any, fn: Callable[[Path], None], *,
            upstream: list[StageResult] = ()) -> StageResult:
        """``fn(folder)`` writes the stage's files into ``folder``; skipped when already done."""
        key = self.key(name, settings, list(upstream))
        final = self.stages / name
        info = self._info(name, key)
        if info is not None:
            reusing(str(final), info.get("made_by"), fix="pass --overwrite to start the run over")
            seconds = info.get("seconds", 0.0)
            result = StageResult(name, key, final, True, seconds if isinstance(seconds, (int, float)) else 0.0)
        else:
            tmp = self.stages / f".{name}.tmp-{key}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            started = time.perf_counter()
            try:
                fn(tmp)
                seconds = round(time.perf_counter() - started, 2)
                files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
                write_json(tmp / DONE, {"stage": name, "key": key, "settings": settings, "seconds": seconds,
                                        "upstream": {u.name: u.key for u in upstream}, "files": files,
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "made_by": maker()})
                _move_into_place(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            result = StageResult(name, key, final, False, seconds)
        self.log.append({"stage": name, "key": key, "cached": result.cached, "seconds": result.seconds})
        return result
