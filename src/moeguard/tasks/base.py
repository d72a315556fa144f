"""Task definitions: the data every task kind shares, parsed from YAML or built in Python.

A task says *what* to evaluate (records, prompt, labels, metric); loaders say *where* the
records come from; ``evaluate.py`` says *how* a model is scored on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from moeguard.errors import MoeguardError


class TaskKind(str, Enum):
    LANGUAGE_MODELING = "language_modeling"
    CLASSIFICATION = "classification"
    SUMMARIZATION = "summarization"


# Which record fields each kind needs (names in the *normalized* record, see loaders).
REQUIRED_FIELDS: dict[TaskKind, tuple[str, ...]] = {
    TaskKind.LANGUAGE_MODELING: ("text",),
    TaskKind.CLASSIFICATION: ("input", "label"),
    TaskKind.SUMMARIZATION: ("input", "target"),
}

PRIMARY_METRIC: dict[TaskKind, str] = {
    TaskKind.LANGUAGE_MODELING: "perplexity",
    TaskKind.CLASSIFICATION: "accuracy",
    TaskKind.SUMMARIZATION: "rougeL",
}

SOURCE_TYPES = ("hub", "disk", "local", "package")
FILE_FORMATS = ("txt", "jsonl", "csv", "tsv")
# Formats whose files are tables: only these can take their column names from ``columns``.
TABLE_FORMATS = ("csv", "tsv")


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """Where records come from.

    type: ``hub`` (``datasets.load_dataset(hub_name, hub_config)``), ``disk``
    (``datasets.load_from_disk(path)``), ``local`` (files under ``path``) or ``package``
    (files shipped inside moeguard, ``path`` relative to ``moeguard/tasks/embedded/data``).
    files: split name -> file name, for ``local``/``package``.
    columns: names for the columns of a csv/tsv file that has no header row (AG News, many
    Kaggle exports); with them the first row is data. ``None``: the first row is the header.
    """

    type: str
    path: str | None = None
    format: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    hub_name: str | None = None
    hub_config: str | None = None
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Task:
    """One evaluation/training task.

    fields maps normalized names (``text``; ``input``/``label``; ``input``/``target``) to the
    source's column names. prompt is a ``str.format`` template over the *source* columns
    (e.g. ``"Review: {sentence}\\nSentiment:"``); labels maps a label value to its verbalizer,
    the continuation whose log-likelihood is scored (``{0: " negative", 1: " positive"}``).
    splits maps roles (``train``, ``eval``) to the source's split names.
    """

    name: str
    kind: TaskKind
    source: SourceSpec
    fields: dict[str, str]
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "eval": "validation"})
    prompt: str | None = None
    labels: dict[Any, str] = field(default_factory=dict)
    metric: str | None = None
    max_length: int = 256
    max_new_tokens: int = 32
    description: str = ""
    provenance: str = ""

    def __post_init__(self) -> None:
        missing = [f for f in REQUIRED_FIELDS[self.kind] if f not in self.fields]
        if missing:
            raise MoeguardError(
                f"task '{self.name}' ({self.kind.value}) has no field mapping for {missing}",
                hint=f"add them under 'fields:'; a {self.kind.value} task needs {list(REQUIRED_FIELDS[self.kind])}",
            )
        if self.kind is TaskKind.CLASSIFICATION and len(self.labels) < 2:
            raise MoeguardError(
                f"classification task '{self.name}' defines {len(self.labels)} label verbalizers",
                hint="add at least two entries under 'labels:' (label value -> verbalizer text)",
            )
        if self.source.type not in SOURCE_TYPES:
            raise MoeguardError(
                f"task '{self.name}' has source type '{self.source.type}'",
                hint=f"use one of {', '.join(SOURCE_TYPES)}",
            )
        if self.source.columns is not None:
            _check_columns(self.name, self.source)

    @property
    def primary_metric(self) -> str:
        return self.metric or PRIMARY_METRIC[self.kind]

    @property
    def higher_is_better(self) -> bool:
        return self.primary_metric not in ("perplexity", "loss", "normalized_perplexity")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "<dict>") -> "Task":
        try:
            kind = TaskKind(data["kind"])
        except KeyError:
            raise MoeguardError(f"task definition {origin} has no 'kind'",
                                hint=f"set kind to one of {[k.value for k in TaskKind]}") from None
        except ValueError:
            raise MoeguardError(f"task definition {origin} has kind '{data['kind']}'",
                                hint=f"use one of {[k.value for k in TaskKind]}") from None
        src = dict(data.get("source") or {})
        hub = src.pop("hub", None) or {}
        if "name" not in data or "source" not in data or "fields" not in data:
            raise MoeguardError(f"task definition {origin} lacks one of name/source/fields",
                                hint="see docs/tasks.md for the YAML schema")
        source = SourceSpec(
            type=src.get("type", "local"), path=src.get("path"), format=src.get("format"),
            files=dict(src.get("files") or {}), hub_name=hub.get("name"), hub_config=hub.get("config"),
            # a YAML list becomes a tuple (the spec is frozen and hashable); anything else is
            # kept as given so the check in __post_init__ can say what it received
            columns=tuple(src["columns"]) if isinstance(src.get("columns"), list) else src.get("columns"),
        )
        gen = data.get("generation") or {}
        return cls(
            name=data["name"], kind=kind, source=source, fields=dict(data["fields"]),
            splits=dict(data.get("splits") or {"train": "train", "eval": "validation"}),
            prompt=data.get("prompt"), labels=dict(data.get("labels") or {}), metric=data.get("metric"),
            max_length=int(data.get("max_length", 256)), max_new_tokens=int(gen.get("max_new_tokens", 32)),
            description=data.get("description", ""), provenance=data.get("provenance", ""),
        )


def _check_columns(task: str, source: SourceSpec) -> None:
    """``source.columns`` must be unique, non-empty names, on a source whose files are tables."""
    columns = source.columns
    example = "columns: [label, title, description]"
    if not isinstance(columns, (list, tuple)) or not columns:
        raise MoeguardError(f"task '{task}' has source.columns {columns!r}, not a non-empty list of names",
                            hint=f"write one name per column of the file, in file order, e.g. '{example}'")
    bad = [c for c in columns if not isinstance(c, str) or not c.strip()]
    if bad:
        what = f"{bad[0]!r} is not a name" if len(bad) == 1 else f"{bad!r} are not names"
        raise MoeguardError(f"task '{task}' has source.columns {list(columns)!r}: {what}",
                            hint="give every column a non-empty text name (quote names YAML would read as "
                                 "numbers or null)")
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise MoeguardError(f"task '{task}' has source.columns {list(columns)!r}, which names {dupes} more than once",
                            hint="give every column a distinct name (rename unused ones, e.g. 'unused1', 'unused2')")
    if source.type not in ("local", "package"):
        raise MoeguardError(f"task '{task}' sets source.columns on a '{source.type}' source",
                            hint="columns name the cells of header-less csv/tsv files; "
                                 "use them with source type local, or drop them")
    if source.format is not None and source.format not in TABLE_FORMATS:
        raise MoeguardError(f"task '{task}' sets source.columns for format '{source.format}'",
                            hint=f"columns only apply to header-less {'/'.join(TABLE_FORMATS)} files; drop them "
                                 "(jsonl rows name their own keys, txt has the single column 'text')")
