"""Task definitions: the data every task kind shares, parsed from YAML or built in Python.

A task says *what* to evaluate (records, prompt, labels, metric); loaders say *where* the
records come from; the task's kind (``task.kind_spec``, see ``moeguard.tasks.kinds``) says
*how* a record is read, scored and trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from moeguard.errors import MoeguardError, suggest
from moeguard.tasks.kinds.base import KINDS, TaskKindSpec


class _KindNames(type):
    """Enum-style access, kept from when kinds were an Enum: ``TaskKind.CLASSIFICATION`` is
    ``TaskKind("classification")`` (for any registered kind), and iterating ``TaskKind`` gives
    every registered kind."""

    def __getattr__(cls, attr: str) -> "TaskKind":
        if not attr.startswith("_") and attr.isupper() and attr.lower() in KINDS:
            return cls(attr.lower())
        raise AttributeError(f"type object 'TaskKind' has no attribute {attr!r}")

    def __iter__(cls):
        return iter([cls(name) for name in KINDS.names()])


class TaskKind(str, metaclass=_KindNames):
    """The name of a registered task kind, as ``Task.kind`` holds it.

    A ``str`` (it compares equal to ``"classification"``, and JSON and YAML write it as the
    name), with ``.value`` (the plain name, as the Enum had) and ``.spec`` (the kind object,
    :class:`~moeguard.tasks.kinds.TaskKindSpec`). There is one instance per name, so ``task.kind
    is TaskKind.CLASSIFICATION`` holds, also after pickling or copying a task. An unregistered
    name is refused with the registered ones.
    """

    __slots__ = ()
    _interned: dict[str, "TaskKind"] = {}

    def __new__(cls, name: "str | TaskKind") -> "TaskKind":
        if not isinstance(name, str):
            raise MoeguardError(f"task kind {name!r} is a {type(name).__name__}, not a name",
                                hint=f"use one of {', '.join(KINDS.names())}")
        KINDS.get(str(name))  # unknown kinds: the registry's error, with "did you mean"
        key = str(name)
        if key not in cls._interned:
            cls._interned[key] = super().__new__(cls, key)
        return cls._interned[key]

    @property
    def value(self) -> str:
        return str(self)

    @property
    def spec(self) -> TaskKindSpec:
        return KINDS.get(str(self))

    def __repr__(self) -> str:
        return f"TaskKind({str(self)!r})"

    def __reduce__(self):
        return (TaskKind, (str(self),))


SOURCE_TYPES = ("hub", "disk", "local", "package")
FILE_FORMATS = ("txt", "jsonl", "csv", "tsv")
# Formats whose files are tables: only these can take their column names from ``columns``.
TABLE_FORMATS = ("csv", "tsv")


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """Where records come from.

    type: ``hub`` (``datasets.load_dataset(hub_name, hub_config, revision=hub_revision)``), ``disk``
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
    # a branch, tag or commit of the dataset's repository: "refs/convert/parquet" is the hub's data-file
    # copy of a dataset defined by a loading script, which datasets 4+ no longer runs (XSum)
    hub_revision: str | None = None
    columns: tuple[str, ...] | None = None


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
ROLES = ("train", "eval")   # what a task's splits map: the attacker's data and the scoring data
# the keys a task file may use: a misspelled one ('split:', 'max_tokens:') was silently ignored, and its
# default applied (another split scored, summaries cut at 32 tokens)
_KEYS = {"": ("name", "kind", "source", "fields", "splits", "prompt", "labels", "metric", "max_length", "generation",
              "description", "provenance"),
         "source.": ("type", "path", "format", "files", "hub", "columns"), "source.hub.": ("name", "config", "revision"),
         "generation.": ("max_new_tokens",)}


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
    kind: TaskKind  # a registered kind's name; a plain str is converted
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
        # a task's name becomes file names in every output (scores/NAME.json, plots/NAME.png): one that
        # is not a plain file name ('../x', 'a/b') wrote outside the output folder
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise MoeguardError(f"task name {self.name!r} is not a plain name",
                                hint="use letters, digits, '.', '_' and '-' (starting with a letter or digit), "
                                     "at most 100 characters")
        object.__setattr__(self, "kind", TaskKind(self.kind))
        spec = self.kind_spec
        _check_settings(self)
        missing = [f for f in spec.required_fields if f not in self.fields]
        if missing:
            raise MoeguardError(
                f"task '{self.name}' ({self.kind}) has no field mapping for {missing}",
                hint=f"add them under 'fields:'; a {self.kind} task needs {list(spec.required_fields)}",
            )
        spec.validate(self)
        if self.source.type not in SOURCE_TYPES:
            raise MoeguardError(
                f"task '{self.name}' has source type '{self.source.type}'",
                hint=f"use one of {', '.join(SOURCE_TYPES)}",
            )
        if self.source.columns is not None:
            _check_columns(self.name, self.source)

    @property
    def kind_spec(self) -> TaskKindSpec:
        """The kind object: how records of this task are read, scored and trained on."""
        return self.kind.spec

    @property
    def primary_metric(self) -> str:
        return self.metric or self.kind_spec.primary_metric

    @property
    def higher_is_better(self) -> bool:
        """The primary metric's direction, as the kind declares it (a registered kind scoring an
        error rate was read as higher-is-better: retention and the risk levels inverted)."""
        return self.primary_metric not in self.kind_spec.lower_is_better

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "<dict>") -> "Task":
        """A task from its YAML mapping; every error names ``origin`` (the file, and the entry)."""
        try:
            return cls._from_dict(data, origin=origin)
        except MoeguardError as err:
            if origin in err.message:
                raise
            # the checks made when a Task is built name the task, not the file it came from
            raise MoeguardError(f"task definition {origin}: {err.message}", hint=err.hint) from None

    @classmethod
    def _from_dict(cls, data: dict[str, Any], *, origin: str) -> "Task":
        if not isinstance(data, dict):
            raise MoeguardError(f"task definition {origin} is a {type(data).__name__}, not a mapping of keys",
                                hint="see docs/tasks.md for the YAML schema")
        if "kind" not in data:
            raise MoeguardError(f"task definition {origin} has no 'kind'",
                                hint=f"set kind to one of {KINDS.names()}")
        try:
            kind = TaskKind(data["kind"])
        except MoeguardError as err:
            raise MoeguardError(f"task definition {origin} has kind '{data['kind']}'", hint=err.hint) from None
        if "name" not in data or "source" not in data or "fields" not in data:
            raise MoeguardError(f"task definition {origin} lacks one of name/source/fields",
                                hint="see docs/tasks.md for the YAML schema")
        src = _mapping(data, "source", origin, "source: {type: local, path: data, format: jsonl}")
        hub = _mapping(src, "hub", origin, "hub: {name: nyu-mll/glue, config: sst2}", where="source.")
        gen = _mapping(data, "generation", origin, "generation: {max_new_tokens: 64}")
        for where, mapping in (("", data), ("source.", src), ("source.hub.", hub), ("generation.", gen)):
            _known_keys(mapping, where, origin)
        splits = _mapping(data, "splits", origin, "splits: {train: train, eval: validation}")
        for role in splits:
            if role not in ROLES:   # 'training:' left no train role: attribution fell back to the eval split
                raise MoeguardError(f"task definition {origin} maps split role {str(role)[:40]!r}",
                                    hint=f"the roles are {', '.join(ROLES)}; {suggest(str(role), list(ROLES))}")
        src.pop("hub", None)
        for key, example in (("files", "files: {train: train.jsonl, test: test.jsonl}"),):
            _mapping(src, key, origin, example, where="source.")
        source = SourceSpec(
            type=src.get("type", "local"), path=src.get("path"), format=src.get("format"),
            files=dict(src.get("files") or {}), hub_name=hub.get("name"), hub_config=hub.get("config"),
            hub_revision=hub.get("revision"),
            # a YAML list becomes a tuple (the spec is frozen and hashable); anything else is
            # kept as given so the check in __post_init__ can say what it received
            columns=tuple(src["columns"]) if isinstance(src.get("columns"), list) else src.get("columns"),
        )
        return cls(
            name=data["name"], kind=kind, source=source,
            fields=_mapping(data, "fields", origin, "fields: {input: sentence, label: label}"),
            splits=splits or {"train": "train", "eval": "validation"},
            prompt=data.get("prompt"), labels=_mapping(data, "labels", origin, "labels: {0: ' no', 1: ' yes'}"),
            metric=data.get("metric"),
            max_length=data.get("max_length", 256), max_new_tokens=gen.get("max_new_tokens", 32),
            description=data.get("description", ""), provenance=data.get("provenance", ""),
        )


def _known_keys(mapping: dict[str, Any], where: str, origin: str) -> None:
    allowed = _KEYS[where]
    for key in mapping:
        if key not in allowed:
            raise MoeguardError(f"task definition {origin} has an unknown key '{where}{str(key)[:40]}'",
                                hint=f"{suggest(str(key), list(allowed))} (see docs/tasks.md)")


def _mapping(data: dict[str, Any], key: str, origin: str, example: str, *, where: str = "") -> dict[str, Any]:
    """``data[key]`` as a dict (absent or null: empty); anything else is a one-line error."""
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MoeguardError(f"task definition {origin} has {where}{key} {str(value)[:60]!r}, a "
                            f"{type(value).__name__}, not a mapping", hint=f"write it as a mapping, e.g. '{example}'")
    return dict(value)


def _check_settings(task: "Task") -> None:
    """What every kind needs of the settings, refused when the task is made (not after the model
    loads): a max_length of 0 looped forever chunking a txt file; a bad prompt or verbalizer
    failed on the first record."""
    import string

    name = task.name
    for key in ("description", "provenance"):
        value = getattr(task, key)
        if value is not None and not isinstance(value, str):
            # free text, but the whole value enters every resume key (asdict, json.dumps): a mapping of mixed
            # keys was a TypeError, and YAML aliases nested nine deep expanded to 387 million items there
            raise MoeguardError(f"task '{name}' has {key} of type {type(value).__name__}, expected text",
                                hint=f"write {key} as a quoted string")
    for key, value, least in (("max_length", task.max_length, 2), ("generation.max_new_tokens", task.max_new_tokens, 1)):
        if type(value) is not int or value < least:
            raise MoeguardError(f"task '{name}' has {key} {value!r}, expected a whole number of tokens, at least {least}",
                                hint=f"set {key} to a whole number (written without quotes or a decimal point)")
    if task.metric is not None and task.metric not in task.kind_spec.metrics:
        raise MoeguardError(f"task '{name}' asks for metric {task.metric!r}",
                            hint=f"a {task.kind} task reports {', '.join(task.kind_spec.metrics)}")
    if task.prompt is not None:
        if not isinstance(task.prompt, str):
            raise MoeguardError(f"task '{name}' has prompt {task.prompt!r}, not text",
                                hint="write the prompt as a quoted string with {column} placeholders")
        try:
            parts = list(string.Formatter().parse(task.prompt))
        except ValueError as exc:
            raise MoeguardError(f"task '{name}' has a prompt that is not a template ({exc}): {task.prompt[:60]!r}",
                                hint="double a literal brace ({{ or }}); {column} names a source column") from None
        for _, field_name, spec, conversion in parts:
            # a cell is text when the prompt is filled: {source[0]} took its first character, {a.b} failed
            if field_name is not None and (any(c in field_name for c in ".[") or "{" in (spec or "")):
                raise MoeguardError(f"task '{name}' has prompt placeholder {{{field_name}}}, which reaches into a column",
                                    hint="name whole columns only ({column}); a list column is joined into text")
            # a width ({text:>999999999}) built a string of that many characters per record (a task file from
            # someone else: gigabytes, or a MemoryError traceback); a conversion (!r) quoted the cell
            if field_name is not None and (spec or conversion):
                shown = field_name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                raise MoeguardError(f"task '{name}' has prompt placeholder {{{shown}}}, with a format",
                                    hint=f"write plain {{{field_name}}}: the cell's text goes in as it is")
    kinds = {type(k) for k in task.labels}
    if type(None) in kinds or len(kinds - {bool}) > 1:
        # {0: ' no', unsure: ' maybe'}: every resumable command's key (sorted JSON) failed with a TypeError
        raise MoeguardError(f"task '{name}' has label keys {list(task.labels)[:6]!r} of different kinds (numbers, text, "
                            "or null)", hint="write the keys one way; quote them all: labels: {'0': ' no', 'unsure': ' maybe'}")
    for key, verbalizer in task.labels.items():
        if isinstance(key, bool):   # YAML 1.1 reads unquoted yes/no/on/off as booleans
            raise MoeguardError(f"task '{name}' has label key {key!r}, which YAML read from an unquoted yes/no/true/on",
                                hint="quote the label keys: labels: {'yes': ' yes', 'no': ' no'}")
        if not isinstance(verbalizer, str) or not verbalizer:
            raise MoeguardError(f"task '{name}' has verbalizer {verbalizer!r} for label {key!r}, not non-empty text",
                                hint="give every label the text the model should continue with, e.g. ' positive'")
    for key, mapping in (("fields", task.fields), ("splits", task.splits), ("source.files", task.source.files)):
        bad = {k: v for k, v in mapping.items() if not isinstance(k, str) or not isinstance(v, str) or not v}
        if bad:
            raise MoeguardError(f"task '{name}' has {key} {bad!r}: each must name a column, split or file",
                                hint=f"write {key} as name -> name, one file per split, quoting names YAML would read "
                                     "as numbers")
    src = task.source
    # hub.config too: YAML reads an unquoted 1.10 as the number 1.1, which was then asked of the hub as '1.1'
    for key, value in (("source.path", src.path), ("source.format", src.format), ("source.hub.name", src.hub_name),
                       ("source.hub.config", src.hub_config), ("source.hub.revision", src.hub_revision)):
        if value is not None and (not isinstance(value, str) or not value):   # Path(2024) was a TypeError traceback
            raise MoeguardError(f"task '{name}' has {key} {value!r}, not a name", hint=f"write {key} as text (quoted)")


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
