"""Task registry: built-in tasks (YAML shipped with moeguard) plus user task files.

Built-ins are read lazily on first use, because ``list_tasks`` and ``get_task`` are on the
CLI's hot path and most commands need only one task.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
import yaml

from moeguard.errors import MoeguardError, suggest
from moeguard.io import strict_yaml
from moeguard.tasks.base import Task

_HERE = Path(__file__).resolve().parent
# Both folders are globbed: presets/ holds hub-backed benchmarks, embedded/ holds tasks
# whose data ships inside the package (source type ``package``).
BUILTIN_DIRS: tuple[Path, ...] = (_HERE / "presets", _HERE / "embedded")

_registry: dict[str, Task] = {}
_origins: dict[str, str] = {}
_builtins_loaded = False

# Paths may also select one task out of a multi-task file: ``my_tasks.yaml#sst2-mine``.
_SELECT = "#"


def register_task(task: Task, *, overwrite: bool = False, origin: str = "<python>") -> Task:
    """Add ``task`` under ``task.name``; a clash is an error unless ``overwrite``."""
    _ensure_builtins()
    _add(task, origin, overwrite=overwrite)
    return task


def get_task(name_or_path: str | os.PathLike[str] | Task) -> Task:
    """A registered task by name, or the task defined in a YAML file.

    A path holding several tasks needs ``path#name`` to pick one.
    """
    if isinstance(name_or_path, Task):
        return name_or_path
    text = os.fspath(name_or_path)
    _ensure_builtins()
    if text in _registry:
        return _registry[text]
    if _looks_like_path(text):
        return _task_from_path(text)
    raise MoeguardError(
        f"unknown task '{text}' (not a registered name, and no such file)",
        hint=f"{suggest(text, list(_registry))}; or pass the path of a task YAML file",
    )


def adopt(task: Task, *, origin: str = "<file>") -> Task:
    """Make a task from a file reachable by its name in this process, for code that carries the
    name (the audit's stages and jobs key results by it). The same definition again is a no-op;
    another definition under a taken name is refused, since every later lookup would be ambiguous."""
    _ensure_builtins()
    known = _registry.get(task.name)
    if known is None:
        _add(task, origin, overwrite=False)
    elif known != task:
        raise MoeguardError(f"task '{task.name}' from {origin} differs from the task of that name in "
                            f"{_origins[task.name]}", hint="give the task in your file another name")
    return task


def origin_file(name: str) -> str | None:
    """The file a registered task was read from (a ``#name`` selector dropped); None for a task
    registered from Python."""
    _ensure_builtins()
    origin = _origins.get(name)
    if origin is None or origin.startswith("<"):
        return None
    return origin.split(_SELECT, 1)[0]


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a task shipped with moeguard (every process knows it by name)."""
    _ensure_builtins()
    origin = Path(_origins.get(name, "<none>"))
    return any(origin.parent == d for d in BUILTIN_DIRS)


def embedded_tasks() -> list[Task]:
    """The embedded suite: the tasks shipped inside the package."""
    return [t for t in list_tasks() if t.source.type == "package"]


def list_tasks() -> list[Task]:
    """Every registered task, sorted by name."""
    _ensure_builtins()
    return [_registry[name] for name in sorted(_registry)]


def task_origin(name: str) -> str:
    """The file (or ``<python>``) a registered task was defined in."""
    _ensure_builtins()
    return _origins.get(name, "<unknown>")


def load_task_file(path: str | os.PathLike[str]) -> list[Task]:
    """Parse a YAML file holding one task, or a list of them under ``tasks:``.

    Relative ``local``/``disk`` paths are resolved here, against the file's folder first
    and the current directory second, so the returned tasks do not depend on the cwd later.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        what = "a folder" if file.is_dir() else "no such file"
        raise MoeguardError(f"task file '{file}' is {what}",
                            hint="pass the path of a .yaml task definition (see docs/tasks.md)")
    try:
        # -sig: a byte-order mark is not YAML; a repeated key is refused (safe_load kept the last silently:
        # two 'splits:' lines, or labels {0: ' no', 0: ' yes'})
        data = strict_yaml(file.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise MoeguardError(f"task file '{file}' is not valid YAML{line}",
                            hint=str(getattr(exc, "problem", None) or exc).strip()) from None
    except UnicodeDecodeError:
        raise MoeguardError(f"task file '{file}' is not UTF-8 text",
                            hint="save it as UTF-8 YAML") from None
    except OSError as exc:
        raise MoeguardError(f"task file '{file}' cannot be read ({exc.strerror})",
                            hint="check the file's permissions") from None
    if isinstance(data, dict) and "tasks" in data:
        entries = data["tasks"]
        if not isinstance(entries, list) or not entries:
            raise MoeguardError(f"'tasks:' in '{file}' is {type(entries).__name__}, not a non-empty list",
                                hint="write 'tasks:' followed by '- name: ...' entries")
    elif isinstance(data, dict):
        entries = [data]
    else:
        raise MoeguardError(f"task file '{file}' holds a {type(data).__name__}, not a mapping",
                            hint="a task file is a mapping with name/kind/source/fields, or 'tasks:' and a list")
    tasks = []
    for i, entry in enumerate(entries):
        origin = f"'{file}'" if len(entries) == 1 else f"'{file}' (tasks[{i}])"
        if not isinstance(entry, dict):
            raise MoeguardError(f"task entry {origin} is a {type(entry).__name__}, not a mapping",
                                hint="each entry needs name/kind/source/fields keys")
        tasks.append(_resolve_paths(Task.from_dict(entry, origin=origin), file.parent))
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MoeguardError(f"task file '{file}' defines {dupes} more than once",
                            hint="give every task in a file a distinct name")
    return tasks


def _reset_for_tests() -> None:
    """Forget every registration, so tests do not leak tasks into each other."""
    global _builtins_loaded
    _registry.clear()
    _origins.clear()
    _builtins_loaded = False


def _add(task: Task, origin: str, *, overwrite: bool) -> None:
    if task.name in _registry and not overwrite:
        raise MoeguardError(
            f"task '{task.name}' from {origin} is already defined in {_origins[task.name]}",
            hint="rename one of them, or register with overwrite=True",
        )
    _registry[task.name] = task
    _origins[task.name] = origin


def _ensure_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    # All or nothing: a broken built-in file keeps raising on every lookup instead of
    # leaving a silently partial registry behind.
    found: dict[str, tuple[Task, str]] = {}
    for folder in BUILTIN_DIRS:
        for file in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
            for task in load_task_file(file):
                if task.name in found:
                    raise MoeguardError(
                        f"built-in task '{task.name}' is defined in both {found[task.name][1]} and {file}",
                        hint="rename one of them")
                found[task.name] = (task, str(file))
    for task, origin in found.values():
        _add(task, origin, overwrite=False)
    _builtins_loaded = True


def _looks_like_path(text: str) -> bool:
    # Only YAML names or existing files: "nyu-mll/glue" is a mistyped task, not a missing file.
    base = text.split(_SELECT, 1)[0]
    return base.endswith((".yaml", ".yml")) or Path(base).expanduser().is_file()


def _task_from_path(text: str) -> Task:
    path, _, wanted = text.partition(_SELECT)
    tasks = load_task_file(path)
    if wanted:
        for task in tasks:
            if task.name == wanted:
                return task
        raise MoeguardError(f"task file '{path}' has no task named '{wanted}'",
                            hint=suggest(wanted, [t.name for t in tasks]))
    if len(tasks) > 1:
        names = ", ".join(t.name for t in tasks)
        raise MoeguardError(f"task file '{path}' defines {len(tasks)} tasks ({names})",
                            hint=f"pick one with '{path}{_SELECT}<name>'")
    return tasks[0]


def _resolve_paths(task: Task, base: Path) -> Task:
    src = task.source
    if src.type not in ("local", "disk") or not src.path:
        return task
    given = Path(src.path).expanduser()
    if given.is_absolute():
        return task
    beside = (base / given).resolve()
    in_cwd = Path.cwd() / given
    # Neither exists: keep the YAML-relative form, which is what the docs promise, so the
    # loader's "not found" error names the path the user most likely meant.
    chosen = in_cwd.resolve() if (not beside.exists() and in_cwd.exists()) else beside
    return dataclasses.replace(task, source=dataclasses.replace(src, path=str(chosen)))
