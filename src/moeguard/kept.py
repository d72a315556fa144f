"""Finished pieces of a run, kept on disk so that the same command, interrupted, resumes from them.

Every piece is named by a digest of what it depends on besides its folder's own key (``key``): a
piece of other settings is never read, and one a power loss left empty or cut short is computed
again, not a traceback. Arrays are ``.npz`` read without unpickling (:func:`kept_arrays`); documents
are JSON. A piece is kept only where it reads back exactly as it was computed, so a resumed run's
numbers equal an uninterrupted run's:

- :func:`arrays`: numpy arrays (float64 sums, int ids: exact);
- :class:`KeptJSON`: a JSON document, with ``exact=True`` written only when JSON holds it exactly (a NaN
  score would come back as null: not kept, computed again).

:func:`note` names a folder of kept pieces in an interrupt's message (``io.kept_progress``) while
nothing else the command keeps is later; :func:`forget` removes it once the run is in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from moeguard import io
from moeguard.io import _open_partials, digest, dumps, strict_loads, write_json


def kept_arrays(folder: Path | None, name: str, compute) -> dict[str, Any]:
    """The arrays ``compute()`` returns (a dict of numpy arrays), kept as ``folder/.NAME.npz`` once
    computed and read from there on a resumed run (never unpickled). ``folder`` None: computed.
    (:func:`arrays` names them by a digest of what they depend on.)"""
    f = folder / f".{name}.npz" if folder is not None else None
    if f is not None:
        found = read_npz(f)
        if found is not None:
            return found
    out = compute()
    if f is not None:
        write_npz(f, out)
    return out


def read_npz(f: Path) -> dict[str, Any] | None:
    """The arrays of ``f`` (never unpickled), or None when it is absent or a power loss cut it short
    (then removed: computed again, not a traceback)."""
    import zipfile

    import numpy as np

    if not f.exists():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        f.unlink(missing_ok=True)
        return None


def write_npz(f: Path, values: dict[str, Any]) -> None:
    """``values`` (numpy arrays) as ``f``, renamed into place whole."""
    import numpy as np

    tmp = f.with_name(f.name + ".tmp.npz")
    np.savez(tmp, **values)
    tmp.replace(f)


def _name(name: str, key: Any) -> str:
    return name if key is None else f"{name}-{digest(key)}"


def arrays(folder: Path | None, name: str, compute: Callable[[], dict[str, Any]], *, key: Any = None) -> dict[str, Any]:
    """``compute()``'s arrays, kept in ``folder`` (made if needed) under ``name`` and ``key`` and read
    back on a resumed run; ``folder`` None: computed, nothing kept."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    return kept_arrays(folder, _name(name, key), compute)


def read_arrays(folder: Path, name: str, *, key: Any = None) -> dict[str, Any] | None:
    """The arrays kept under ``name`` and ``key``, or None (absent, or torn)."""
    return read_npz(folder / f".{_name(name, key)}.npz")


def write_arrays(folder: Path, name: str, values: dict[str, Any], *, key: Any = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_npz(folder / f".{_name(name, key)}.npz", values)


class KeptJSON:
    """One JSON document kept at ``path`` under ``key`` (its digest is stored beside the value)."""

    def __init__(self, path: Path, key: Any):
        self.path, self.key = Path(path), digest(key)

    def read(self) -> Any | None:
        try:
            doc = strict_loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("key") != self.key:
                return None
            value = doc["value"]
        except (OSError, ValueError, KeyError):   # absent, or a power loss left it cut short
            return None
        from moeguard.provenance import reusing

        reusing(str(self.path), doc.get("made_by"), fix="delete it")
        return value

    def write(self, value: Any, *, exact: bool = False) -> bool:
        """Keep ``value``; with ``exact``, only when JSON gives it back equal (False: not kept)."""
        if exact and json.loads(dumps(value)) != value:   # NaN (never equal to itself), infinity
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from moeguard.provenance import maker

        write_json(self.path, {"key": self.key, "value": value, "made_by": maker()})
        return True

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)


def document(folder: Path | None, name: str, key: Any) -> KeptJSON | None:
    """The JSON piece ``folder/NAME-DIGEST.json`` kept under ``key`` (named by its digest, as
    :func:`arrays` names arrays); None without a folder: nothing is kept."""
    return KeptJSON(folder / f"{_name(name, key)}.json", key) if folder is not None else None


def note(folder: Path) -> None:
    """Name ``folder`` in an interrupt's message as kept work, once it holds some."""
    if folder not in _open_partials:
        _open_partials.append(folder)


def forget(folder: Path) -> None:
    """``folder`` and its pieces are gone: the run they were kept for is in place."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder in _open_partials:
        _open_partials.remove(folder)


def held_for(out: Path):
    """One run at a time for what is kept beside ``out`` (``.OUT.kept.lock``, removed after): a second
    run to the same output is a one-line error before it reads, replaces or removes the first's."""
    if not out.name:   # callers check their --out first; "." or "/" has no name to put a lock beside
        from moeguard.errors import MoeguardError

        raise MoeguardError(f"output '{out}' names no file or folder of its own", hint="pass --out NEW_FOLDER")
    return io.held(out.with_name(f".{out.name}.kept.lock"), busy=f"another moeguard run is writing {out}",
                   hint="wait for it to finish (or stop it), or give this run another --out")
