"""Read a task's records from the hub, a ``save_to_disk`` folder, local files or the package.

Every source yields raw rows (column -> value); :func:`load_records` then turns them into
the *normalized* records the evaluators consume (each kind's ``record`` method says how):

- language modeling: ``{"text"}``
- classification: ``{"input", "label"}`` (label as ``str``)
- summarization: ``{"input", "target", "references", "source_text"}``

How each local file format becomes rows (byte-order marks, header-less tables, text
chunking) is in ``formats.py``; the hub's and ``save_to_disk`` folders' rows, and split slicing, in
``hubrows.py``.
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from moeguard.errors import MoeguardError
from moeguard.tasks.base import ROLES, Task
from moeguard.tasks.formats import iter_file
from moeguard.tasks.hubrows import DatasetRows, disk_rows, hub_rows, parse_split, slice_bounds

_CHARS_PER_TOKEN = 4
_READ: dict[tuple, list[dict[str, Any]]] = {}   # load_records' memo, oldest first
_READ_MAX = 64
_READ_MAX_RECORDS = 20_000


def load_records(task: Task, role: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """The normalized records of ``task`` for ``role`` (``train`` or ``eval``).

    ``limit`` keeps the first ``limit`` records (the order of the source is kept, so the
    same limit always gives the same records).
    """
    split = _split_of(task, role)
    if limit is not None and limit < 1:
        raise MoeguardError(f"record limit is {limit}", hint="pass a positive limit, or none for all records")
    # read and normalized once per (task, role, limit) while the data is unchanged: a sweep scores
    # the same eval records for every plan; callers get their own list and dicts
    key = (repr(task), role, limit, _stamp(task, split))
    records = _READ.get(key)
    if records is None:
        rows, where = _rows(task, split)
        records = list(itertools.islice(_records(task, rows, split, where), limit))
        if not records:
            raise _empty(task, split, where)
        if len(records) <= _READ_MAX_RECORDS:  # a whole large corpus is not worth holding
            _remember(_READ, key, records)
    return _copies(records)


def _remember(store: dict, key: Any, records: list[dict[str, Any]]) -> None:
    """Keep ``records`` under ``key`` in a cache of at most ``_READ_MAX`` entries (the oldest goes)."""
    store[key] = records
    while len(store) > _READ_MAX:
        store.pop(next(iter(store)))


def _copies(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cached records as the caller's own: its own list and dicts (and lists in them)."""
    return [{k: list(v) if isinstance(v, list) else v for k, v in r.items()} for r in records]


_BASELINE: dict = {}   # baseline_records' results, by task, limit and data stamp (a few, as _READ)


def baseline_records(task: Task, limit: int | None) -> list[dict[str, Any]]:
    """The train records a baseline is fit on: the whole split when it holds at most ``limit`` (in its
    order), else ``limit`` drawn from all of it (seed 0). The first records of a large split are no
    sample of it: a CSV grouped by label gave the majority baseline the first label's class. Kept
    while the data is unchanged: a sweep fits the same baseline for every plan."""
    if limit is None:
        return load_records(task, "train")
    split = _split_of(task, "train")
    key = (repr(task), limit, _stamp(task, split))
    records = _BASELINE.get(key)
    if records is None:
        head = load_records(task, "train", limit=limit + 1)
        records = head if len(head) <= limit else sample_records(task, "train", limit, seed=0)
        _remember(_BASELINE, key, records)
    return _copies(records)


def sample_records(task: Task, role: str, n: int, *, seed: int) -> list[dict[str, Any]]:
    """``n`` records drawn uniformly from the whole of ``role``'s split with ``seed`` (all of them
    when it has fewer), read lazily (reservoir sampling: memory for ``n`` records, one pass). The
    first records of a split are not a sample of it: a train split sorted by label (IMDB's, a CSV
    grouped by class) gave calibration sets of one class."""
    import random

    split = _split_of(task, role)
    rows, where = _rows(task, split)
    rng = random.Random(seed)
    chosen: list[dict[str, Any]] = []
    if isinstance(rows, DatasetRows):   # a hub or disk Dataset: rows drawn by index, the rest never read
        order = rng.sample(range(len(rows)), len(rows))
        for begin in range(0, len(order), 2 * n):
            chosen += itertools.islice(_records(task, rows.take(order[begin:begin + 2 * n]), split, where,
                                                numbered=False), n - len(chosen))
            if len(chosen) >= n:
                break
    else:
        for seen, record in enumerate(_records(task, rows, split, where), 1):
            if len(chosen) < n:
                chosen.append(record)
            elif (j := rng.randrange(seen)) < n:
                chosen[j] = record
    if not chosen:
        raise _empty(task, split, where)
    return chosen


def _split_of(task: Task, role: str) -> str:
    """The source split ``task`` maps to ``role``, or one line saying which roles there are."""
    if role not in ROLES:
        raise MoeguardError(f"record role '{role}' is not known", hint=f"use one of {', '.join(ROLES)}")
    if role not in task.splits:
        raise MoeguardError(f"task '{task.name}' maps no split to role '{role}' (splits: {task.splits})",
                            hint=f"add '{role}: <split name>' under 'splits:'")
    return str(task.splits[role])


def _empty(task: Task, split: str, where: str) -> MoeguardError:
    return MoeguardError(f"split '{split}' of task '{task.name}' ({where}) is empty (no rows with "
                         f"{task.kind_spec.record_needs})", hint="point the split at a file or dataset split with data in it")


# --------------------------------------------------------------------------- sources

def _rows(task: Task, split: str) -> tuple[Iterable[dict[str, Any]], str]:
    src = task.source
    if src.type == "hub":
        return hub_rows(task, split)
    if src.type == "disk":
        return disk_rows(task, split)
    file, label, sliced = _data_file(task, split)
    rows = iter_file(file, src.format, task.max_length * _CHARS_PER_TOKEN, src.columns)
    if sliced is None or all(b is None or (not b.endswith("%") and not b.startswith("-")) for b in sliced):
        # read lazily: the edge's one-record check and a --limit stop early in a large file
        start, stop = slice_bounds(sliced, 0)
        return itertools.islice(rows, start, stop), label
    return _slice(list(rows), sliced), label   # a percentage or a negative bound needs the row count


def _data_file(task: Task, split: str) -> tuple[Any, str, tuple]:
    """The file of a local or package task's ``split``, its label for messages, and the slice."""
    src = task.source
    base, sliced = parse_split(split)
    if src.type == "package":
        root: Any = resources.files("moeguard.tasks").joinpath("embedded", "data")
        if src.path:
            root = root.joinpath(*Path(src.path).parts)
        label = f"moeguard/tasks/embedded/data/{src.path or ''}"
    else:
        if not src.path:
            raise MoeguardError(f"task '{task.name}' has a local source without 'path'",
                                hint="set source.path to the folder holding the data files")
        root = Path(src.path).expanduser()
        label = str(root)
        if not root.exists():
            raise MoeguardError(f"data folder '{root}' of task '{task.name}' does not exist",
                                hint="fix source.path (relative paths resolve against the YAML file's "
                                     "folder, then the current directory)")
    name = src.files.get(base) or (f"{base}.{src.format}" if src.format else None)
    if name is None:
        raise MoeguardError(f"task '{task.name}' names no file for split '{base}' (files: {src.files})",
                            hint=f"add '{base}: <file name>' under source.files")
    file = root.joinpath(*Path(name).parts) if not Path(name).is_absolute() else Path(name)
    if not file.is_file():
        known = ", ".join(sorted(src.files)) or "none"
        raise MoeguardError(f"data file '{label.rstrip('/')}/{name}' for split '{base}' of task "
                            f"'{task.name}' does not exist",
                            hint=f"create it or fix source.files (splits with files: {known})")
    return file, f"{label.rstrip('/')}/{name}", sliced


def _stamp(task: Task, split: str) -> Any:
    """What says a cached read is still current: a local file's size and time, a save_to_disk
    folder's time, a hub dataset's cached commit; the package's files do not change while
    moeguard runs."""
    src = task.source
    if src.type == "local":
        st = Path(_data_file(task, split)[0]).stat()
        return st.st_size, st.st_mtime_ns
    if src.type == "disk" and src.path:
        # save_to_disk rewrites its files in place, which leaves the folder's own time as it was: the
        # size and time of every file of the folder (a DatasetDict) and of the split's folder
        root = Path(src.path).expanduser()
        base = parse_split(split)[0]
        files = [p for d in (root, root / base) if d.is_dir() for p in sorted(d.iterdir()) if p.is_file()]
        return tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if src.type == "hub" and src.hub_name:
        return _hub_revision(src.hub_name, src.hub_revision or "main")
    return None


def _hub_revision(name: str, revision: str = "main") -> str | None:
    """The commit a hub dataset's ``revision`` (``main``, a branch such as ``refs/convert/parquet``, a
    tag; a 40-hex commit is its own) resolves to in the Hugging Face cache, or None where it is not cached there (read only, never the network): a dataset that got a new commit, or a cache
    downloaded again, must not resume work done on the old data, as a model's commit does not."""
    from huggingface_hub import constants

    if re.fullmatch(r"[0-9a-f]{40}", revision):   # a commit names itself
        return revision
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}" / "refs" / revision
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


# --------------------------------------------------------------------------- identity, split overlap, slicing

def task_identity(task: Task) -> dict[str, Any]:
    """What a task's records depend on, for resume keys: its whole definition, and per role the
    stamp of its data (a local file's size and modification time, a save_to_disk folder's time:
    an edited YAML or data file must not resume work done on the old one; contents are not
    hashed, a data set can be gigabytes)."""
    import dataclasses

    files = {}
    for role, split in sorted(task.splits.items()):
        try:
            files[role] = _stamp(task, split)
        except (OSError, MoeguardError):   # unreadable now: said when the records are read
            files[role] = None
    return {"definition": dataclasses.asdict(task), "files": files}


def shared_data(task: Task) -> str | None:
    """Why ``task``'s train and eval roles may hold the same records (the same split, or file,
    with slices that overlap), or None. Everything fit on train (an attacker's labels, calibration
    batches, the baselines) would then have seen the eval records."""
    if "train" not in task.splits or "eval" not in task.splits:
        return None
    (a, sa), (b, sb) = parse_split(task.splits["train"]), parse_split(task.splits["eval"])
    if task.source.type in ("local", "package"):
        a, b = task.source.files.get(a, a), task.source.files.get(b, b)
        if task.source.type == "local" and a != b:   # one file under two names (./t.jsonl and t.jsonl)
            try:
                same = Path(_data_file(task, task.splits["train"])[0]).resolve() == \
                    Path(_data_file(task, task.splits["eval"])[0]).resolve()
            except (OSError, MoeguardError):   # a missing file: said when its records are read
                same = False
            if same:
                a = b
    if a != b:
        return None
    said = f"train '{task.splits['train']}' and eval '{task.splits['eval']}' read {a!r}"
    if sa is None or sb is None:
        return said
    units = {x.endswith("%") for x in (*sa, *sb) if x is not None}
    if len(units) > 1:
        return said + " with slices in different units, which may overlap"

    def overlap(n: int) -> bool:   # on a split of n rows, as Python slices them (clamped to the rows)
        def interval(sl):
            lo, hi = (None if x is None else int(x.rstrip("%")) for x in sl)
            lo, hi = (0 if lo is None else lo), (n if hi is None else hi)
            lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
            return min(max(lo, 0), n), min(max(hi, 0), n)

        (a0, a1), (b0, b1) = interval(sa), interval(sb)
        return max(a0, b0) < min(a1, b1)

    if units == {True}:
        return said + " with overlapping slices" if overlap(100) else None
    # rows counted from the start and from the end ('train[:100]', 'train[-100:]') overlap on a small enough
    # split: the relation changes only where the split's size meets a sum of bounds, so those sizes decide
    bounds = [abs(int(x)) for x in (*sa, *sb) if x is not None]
    sizes = {10**12} | {max(1, x + y + d) for x in [0, *bounds] for y in [0, *bounds] for d in (-1, 0, 1)}
    if not any(overlap(n) for n in sizes):
        return None
    return said + (" with overlapping slices" if overlap(10**12) else " with slices that overlap unless the split has "
                   "enough rows (some count from its end)")


def _slice(rows: list[dict[str, Any]], sliced: tuple[str | None, str | None] | None) -> list[dict[str, Any]]:
    start, stop = slice_bounds(sliced, len(rows))
    return rows[start:stop]


# --------------------------------------------------------------------------- normalizing

def _records(task: Task, rows: Iterable[dict[str, Any]], split: str, where: str, *,
             numbered: bool = True) -> Iterator[dict[str, Any]]:
    """The rows as the kind's records, rows that make none skipped. Every row is checked for the
    columns the task reads (a JSONL row without a key failed deep in the kind's reader with a
    KeyError); ``numbered``: the error names the row's place in the split (not for sampled rows)."""
    normalize = task.kind_spec.record
    needed = _needed_columns(task)
    skipped = 0
    for i, row in enumerate(rows):
        _check_columns(task, row, split, where, needed=needed, row_number=i + 1 if numbered else 1)
        record = normalize(task, row, split, where)
        if record is not None:
            yield record
        else:
            skipped += 1
    # said: a summarization row whose every reference is blank scored nothing and shrank n_samples silently
    # (a running text's blank lines are skipped by design, as its docs say)
    if skipped and not task.kind_spec.running_text:
        import warnings

        warnings.warn(f"task '{task.name}': {skipped} row(s) of split '{split}' ({where}) make no record "
                      f"(a {task.kind} row needs {task.kind_spec.record_needs}) and are skipped", stacklevel=2)


def _needed_columns(task: Task) -> list[str]:
    spec = task.kind_spec
    needed = [col for key, col in task.fields.items()
              if key in ("text", "label", "target") or (key == "input" and (task.prompt is None
                                                                            or spec.reads_raw_input))]
    if task.prompt is not None and spec.prompted:
        for _, name, _, _ in string.Formatter().parse(task.prompt):
            if name is not None:
                # "{a.b}"/"{a[0]}" reach into the column "a".
                needed.append(re.split(r"[.\[]", name, maxsplit=1)[0])
    return list(dict.fromkeys(n for n in needed if n))


def _check_columns(task: Task, row: dict[str, Any], split: str, where: str, *, needed: list[str],
                   row_number: int = 1) -> None:
    missing = [c for c in needed if c not in row]
    if missing:
        which = "" if row_number == 1 else f"row {row_number} of "
        raise MoeguardError(
            f"{which}split '{split}' of task '{task.name}' ({where}) has no column(s) {missing}; "
            f"its columns are {sorted(map(str, row))}",
            hint="fix 'fields:'/'prompt:' to use existing columns" +
                 (" (txt files have the single column 'text')" if "text" in row and len(row) == 1 else ""),
        )


def cell_text(value: Any) -> str:
    """A cell as text: a list (SciTLDR's list of sentences) joined with spaces, ``None`` as ""."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "" if value is None else str(value)


def prompt_text(task: Task, record: dict[str, Any]) -> str:
    """What a user of ``task`` would send for ``record``: its prompted input, or, for a kind whose
    records are running text (language modeling), the text itself."""
    return record.get("input" if task.kind_spec.prompted else "text") or ""


def render_input(task: Task, row: dict[str, Any], input_col: str) -> str:
    """A row's model input: the task's ``prompt`` filled with the row's (stripped) cells, or
    the ``input_col`` cell as is when the task has no prompt."""
    if task.prompt is None:
        return cell_text(row[input_col]).strip()
    # Cells are stripped: TSV/CSV cells often carry stray edge spaces (SST-2 ends every
    # sentence with one) that would otherwise sit between the text and the prompt's suffix.
    values = {k: cell_text(v).strip() for k, v in row.items()}
    try:
        return task.prompt.format(**values)
    except (IndexError, ValueError) as exc:
        raise MoeguardError(f"prompt of task '{task.name}' is not a valid format string ({exc})",
                            hint="write columns as {name}; double literal braces as {{ and }}") from None
