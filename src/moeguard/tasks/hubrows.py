"""Rows from the hub (``datasets.load_dataset``) and from ``save_to_disk`` folders, and the split
slicing syntax (``train[:90%]``) every source shares; ``loaders.py`` turns rows into records. Apart
from ``loaders.py`` because ``datasets`` is imported here only, when a hub or disk task is read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from moeguard.errors import MoeguardError
from moeguard.tasks.base import Task
from moeguard.tasks.formats import first_line

# ``train[:90%]``, ``train[100:200]``: the datasets split-slicing syntax, also for local files.
_SLICE = re.compile(r"^(?P<split>[^\[\]]+)\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\]$")


def hub_rows(task: Task, split: str) -> tuple[Iterable[dict[str, Any]], str]:
    src = task.source
    if not src.hub_name:
        raise MoeguardError(f"task '{task.name}' has a hub source without a dataset name",
                            hint="set source.hub.name (e.g. nyu-mll/glue)")
    where = f"hub dataset {src.hub_name}" + (f" ({src.hub_config})" if src.hub_config else "") \
        + (f" at revision {src.hub_revision}" if src.hub_revision else "")
    import datasets  # slow to import: only when a hub task is actually read

    try:
        config = None if src.hub_config is None else str(src.hub_config)  # YAML may read 1.0 as a float
        ds = datasets.load_dataset(src.hub_name, config, split=split, revision=src.hub_revision)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise MoeguardError(f"{where} has no split '{split}' (task '{task.name}')",
                                hint=f"fix 'splits:'; the dataset says: {first_line(exc)}") from None
        raise MoeguardError(f"could not load {where} for task '{task.name}': {first_line(exc)}",
                            hint="check source.hub.name and source.hub.config") from None
    except Exception as exc:  # noqa: BLE001 - network, auth and cache errors share no base class
        offline = _offline()
        from datasets.exceptions import DatasetNotFoundError
        from huggingface_hub.errors import GatedRepoError

        if isinstance(exc, GatedRepoError) or (isinstance(exc, DatasetNotFoundError) and "gated" in str(exc).lower()):
            raise MoeguardError(f"{where} (task '{task.name}') is gated: your account has not been granted access",
                                hint="accept its terms on the hub and log in (`hf auth login`), or use a local copy") from None
        if isinstance(exc, DatasetNotFoundError) and src.hub_revision and "revision" in str(exc).lower():
            raise MoeguardError(f"{where} (task '{task.name}'): the hub has no such revision [{first_line(exc)}]",
                                hint="check source.hub.revision (a branch such as refs/convert/parquet, a tag or a "
                                     "commit)") from None
        if isinstance(exc, DatasetNotFoundError) and not offline:   # the hub answered: no such dataset
            raise MoeguardError(f"{where} (task '{task.name}') does not exist on the hub, or your account cannot see it "
                                f"[{first_line(exc)}]",
                                hint="check source.hub.name (org/name, as on huggingface.co/datasets), and log in "
                                     "for a private one (`hf auth login`)") from None
        if isinstance(exc, RuntimeError) and "dataset scripts are no longer supported" in str(exc).lower():   # datasets 4+
            raise MoeguardError(f"{where} (task '{task.name}') is defined by a loading script, which the installed "
                                f"datasets no longer runs [{first_line(exc)}]",
                                hint="use a version of the dataset in data files (often its refs/convert/parquet "
                                     "revision: 'source.hub.revision: refs/convert/parquet'), or local files "
                                     "('source.type: local'; see docs/tasks.md)") from None
        from moeguard.models.hub import hub_failure

        known = hub_failure(exc, src.hub_name)
        if offline:
            cause = "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and it is not cached"
        elif known is not None:
            cause = known.what
        else:   # not a hub failure moeguard knows: what was raised, not a guess that the hub is unreachable
            cause = "the datasets library failed"
        local = ("on a machine with network run datasets.load_dataset(...).save_to_disk(DIR) and use "
                 "'source: {type: disk, path: DIR}', or use local files ('source.type: local'; see docs/tasks.md)")
        raise MoeguardError(
            f"could not load {where} for task '{task.name}': {cause} "
            f"[{type(exc).__name__}: {first_line(exc)}]",
            hint=local if offline or known is None or known.unreachable else known.fix,
        ) from None
    return DatasetRows(ds), f"{where} split '{split}'"


def disk_rows(task: Task, split: str) -> tuple[Iterable[dict[str, Any]], str]:
    src = task.source
    if not src.path:
        raise MoeguardError(f"task '{task.name}' has a disk source without 'path'",
                            hint="set source.path to a folder written by datasets' save_to_disk")
    root = Path(src.path).expanduser()
    if not root.is_dir():
        raise MoeguardError(f"dataset folder '{root}' of task '{task.name}' does not exist",
                            hint="fix source.path (relative paths resolve against the YAML file's folder)")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except FileNotFoundError as exc:
        raise MoeguardError(f"'{root}' is not a folder written by save_to_disk: {first_line(exc)}",
                            hint="save it with dataset_dict.save_to_disk(path), or use local files") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise MoeguardError(f"'{root}' holds a single Dataset, not a DatasetDict with splits",
                            hint="save a DatasetDict({'train': ..., 'validation': ...}) instead")
    base, sliced = parse_split(split)
    if base not in loaded:
        raise MoeguardError(f"dataset folder '{root}' has no split '{base}' (task '{task.name}')",
                            hint=f"fix 'splits:'; splits present: {', '.join(loaded)}")
    ds = loaded[base]
    start, stop, _ = slice(*slice_bounds(sliced, len(ds))).indices(len(ds))
    return DatasetRows(ds.select(range(start, max(start, stop)))), f"{root} split '{split}'"


class DatasetRows:
    """A Dataset's rows, read lazily in column-wise batches (far faster than row iteration, and a
    limited read of a big split, CNN/DailyMail's train, never materializes all of it as Python
    objects), and by index (:meth:`take`: a sample never reads the rest)."""

    def __init__(self, ds: Any, batch: int = 1000):
        self.ds, self.batch = ds, batch

    def __len__(self) -> int:
        return len(self.ds)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for begin in range(0, len(self.ds), self.batch):
            yield from self._rows(self.ds[begin:begin + self.batch])

    def take(self, indices: list[int]) -> list[dict[str, Any]]:
        return list(self._rows(self.ds.select(indices)[:])) if indices else []

    @staticmethod
    def _rows(columns: dict[str, list]) -> Iterator[dict[str, Any]]:
        names = list(columns)
        for values in zip(*(columns[n] for n in names)):
            yield dict(zip(names, values))


def _offline() -> bool:
    true = ("1", "ON", "YES", "TRUE")
    return any(os.environ.get(v, "").upper() in true for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def parse_split(split: str) -> tuple[str, tuple[str | None, str | None] | None]:
    match = _SLICE.match(split)
    if not match:
        return split, None
    return match["split"], (match["start"], match["stop"])


def slice_bounds(sliced: tuple[str | None, str | None] | None, n: int) -> tuple[int | None, int | None]:
    def index(bound: str | None) -> int | None:
        if bound is None:
            return None
        if bound.endswith("%"):
            return round(n * int(bound[:-1]) / 100)
        return int(bound)

    return (None, None) if sliced is None else (index(sliced[0]), index(sliced[1]))
