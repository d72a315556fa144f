"""Each period's requests as the clients' test and an alert's cause need them in a later run:
``monitor score --period`` writes, beside ``periods.jsonl``, a ``period_requests`` folder with one file
per period that a later run's baseline can take (``carried``), and a run given that ``periods.jsonl``
as ``--history`` reads them back (``read``). A daily run then replays only the new day's log and its
periods get the rows one run over all the days gets, clients' test and cause included: before, a
history's periods brought no requests, so in a daily run neither test had matches.

Each file (``INDEX.npz``, numpy's format, read without pickle) holds the period's requests in the
order the run held them: their embeddings [n, dim] and residuals [n, L, E] as float64 (what the run
computed, so the numbers are the same), their clients' names, the period's start and the profile's
neighbour digest. No text and no request ids, but the embeddings are made from the prompts: keep the
folder as you keep the log. Size: (dim + L x E) x 8 bytes a request, 0.8 KB on the embedded model and
2.5 KB for Mixtral's 32 x 8 cells (250 MB a day of 100,000 requests); a period is kept while a later
baseline can take it, so a folder holds about ``--baseline`` periods. A run links the history's files
into its own folder (a copy where the file system cannot link), so each day's folder is whole.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Collection

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.monitor.periodclients import REQUESTS_FOLDER
from moeguard.monitor.periodhistory import mark_accepted
from moeguard.monitor.periods import joins

Held = tuple[np.ndarray, np.ndarray, list]   # one period's embeddings [n, dim], residuals [n, L, E], clients [n]


def carried(rows: list[dict[str, Any]], baseline: int) -> list[int]:
    """The periods (by index) a later run's baseline can take: every period with a state (tested, or one
    of the first, which join untested) from the oldest of the last ``baseline`` that join a baseline
    (``periods.joins``) on, alerted ones included (an owner can still accept one; ``--accept`` of an
    older period finds no requests, and the tests then go without them)."""
    stated = [int(r["index"]) for r in rows if r.get("state") is not None]
    kept = [int(r["index"]) for r in rows if r.get("state") is not None and joins(r)][-baseline:]
    if not kept:   # none joins: the last ``baseline``, which an --accept could bring in
        return stated[-baseline:]
    return [i for i in stated if i >= kept[0]]


def _file(folder: Path, index: int) -> Path:
    return folder / REQUESTS_FOLDER / f"{index}.npz"


def wanted(rows: list[dict[str, Any]], *, baseline: int, accept: Collection[str] = ()) -> list[dict[str, Any]]:
    """The history's periods (``periodhistory.read_history``'s rows) that this run's first baseline takes,
    as ``periods.Baseline`` takes them: the last ``baseline`` with a state that join (``--accept``
    included, marked as ``score_periods`` marks them). Only their requests are read: later baselines in
    the run only drop the oldest."""
    return [r for r in mark_accepted(rows, set(accept)) if "_state" in r and joins(r)][-baseline:]


def held_requests(history: Path, rows: list[dict[str, Any]]) -> tuple[int, int]:
    """How many requests ``read`` would bring of the history's periods ``rows`` (those with a file), from
    the rows' counts, and of how many periods: what the run will hold, known before any file is read
    (``footprint.check``)."""
    there = [int(r["requests"]) for r in rows if _file(history.parent, int(r["index"])).is_file()]
    return sum(there), len(there)


def read(history: Path, rows: list[dict[str, Any]], *, dim: int, shape: tuple[int, int]) -> dict[int, Held]:
    """The requests its run kept of the history's periods ``rows`` (``wanted``; ``history``: its
    periods.jsonl), by index, each checked against its row (one-line errors before the model loads).
    A period without a file brings none."""
    out: dict[int, Held] = {}
    for row in rows:
        path = _file(history.parent, int(row["index"]))
        if not path.is_file():
            continue
        fix = (f"delete {path} (that period's requests are then not among the matches) or pass the periods.jsonl "
               "of the run that wrote the folder")
        n = int(row["requests"])
        try:
            with np.load(path, allow_pickle=False) as z:
                x, resid, clients = z["x"], z["resid"], z["clients"]
                start, digest = str(z["start"]), str(z["digest"])
            why = ("its start is " + start if start != row["start"] else
                   "it was kept with another profile's neighbour references" if digest != row.get("neighbours") else
                   f"its embeddings are {x.shape}, not {(n, dim)}" if x.shape != (n, dim) else
                   f"its residuals are {resid.shape}, not {(n, *shape)}" if resid.shape != (n, *shape) else
                   f"it names {clients.shape} clients, not {n}" if clients.shape != (n,) else
                   "its embeddings or residuals are not numbers" if x.dtype.kind != "f" or resid.dtype.kind != "f" else
                   "its clients are not names" if clients.dtype.kind != "U" else
                   "it holds a value that is not finite" if not (np.isfinite(x).all() and np.isfinite(resid).all()) else None)
        except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError, zipfile.BadZipFile) as e:
            # TypeError/AttributeError: a lone .npy under the name (np.load gives an array, not an archive)
            said = ("not numpy's .npz format, and a pickle is never read" if "pickle" in str(e) else
                    f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
            raise MoeguardError(f"{path} is not a period's requests as `monitor score --period` writes them ({said})",
                                hint=fix) from None
        if why is not None:
            raise MoeguardError(f"{path} does not belong to {history}'s period {row['start']} ({why})", hint=fix)
        out[int(row["index"])] = (np.asarray(x, dtype=np.float64), np.asarray(resid, dtype=np.float64), clients.tolist())
    return out


def save(out: Path, rows: list[dict[str, Any]], *, x: np.ndarray, resid: np.ndarray, clients: list,
         parts: dict[int, np.ndarray], baseline: int, digest: str, history: Path | None) -> dict[str, Any]:
    """Write into the run's folder ``out`` the files of the ``carried`` periods: this run's written
    (``parts``: each period's requests by index, into ``x`` [N, dim], ``resid`` [N, L, E] and ``clients``
    [N]), the history's linked from beside ``history``. What was kept, for the summary. ``out`` is the
    run's own partial folder (``io.resumable_dir``): what an interrupted attempt left in it is removed
    first, so no stale file stays and no link is written through."""
    folder = out / REQUESTS_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    kept = []
    for index in carried(rows, baseline):
        path = _file(out, index)
        if index in parts:
            folder.mkdir(exist_ok=True)
            idx = parts[index]
            start = next(r["start"] for r in rows if int(r["index"]) == index)
            with open(path, "wb") as f:   # the run's folder is renamed into place whole (io.resumable_dir)
                np.savez(f, x=np.asarray(x[idx], dtype="<f8"), resid=np.asarray(resid[idx], dtype="<f8"),
                         clients=np.array([str(clients[i]) for i in idx], dtype=str), start=np.array(start),
                         digest=np.array(digest))
        elif history is not None and _file(history.parent, index).is_file():
            folder.mkdir(exist_ok=True)
            try:   # a history's file is never rewritten, so a link is safe and costs no space
                os.link(_file(history.parent, index), path)
            except OSError:
                shutil.copy2(_file(history.parent, index), path)
        else:
            continue
        kept.append(index)
    size = sum(_file(out, i).stat().st_size for i in kept)
    return {"periods": len(kept), "first": kept[0] if kept else None, "mib": round(size / 2**20, 2)}
