"""Resolve once, at the edge: what the user named (a model, tasks) becomes objects here, is
checked here before any weights are read, and is passed down as objects.

- :func:`resolve_model` gives a :class:`~moeguard.models.handle.ModelHandle` (config, family,
  MoE shape, the one keep rule);
- :func:`resolve_grid` gives a study's tasks x methods x keep levels, checked;
- :func:`resolve_tasks` gives :class:`~moeguard.tasks.base.Task` objects, each readable (its
  first eval record is loaded here, so unreadable data fails before model work). A task from a
  YAML file is adopted under its name, so jobs (which carry names, being JSON) find it, and the
  runtime carries it to worker processes.
"""

from __future__ import annotations

from typing import Iterable

from moeguard.errors import MoeguardError
from moeguard.models.handle import ModelHandle, resolve_model


def resolve_tasks(values: Iterable | None, *, what: str = "tasks", default=None, check: bool = True,
                  train: bool = True, scored: bool = True) -> list:
    """Tasks from names, YAML paths or Task objects (``default``: a callable giving the tasks
    when ``values`` is None); each is adopted and, with ``check``, its eval data read once, and
    its train data too unless the command reads none (``train=False``: monitor profile).
    ``scored=False``: the command reads the tasks' data only (attribution, merge calibration), so a
    metric no command can compute is not refused."""
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import adopt, get_task

    if values is None:
        tasks = list(default()) if default is not None else []
    else:
        tasks = [adopt(get_task(v), origin=str(v)) for v in values]
        if not tasks:
            raise MoeguardError(f"{what} name no task", hint="see `moeguard tasks` for names")
    folded: dict[str, str] = {}
    for t in tasks:   # names are file names (task-NAME.json, scores/NAME/): on macOS's APFS Docs and docs are one file
        other = folded.setdefault(t.name.casefold(), t.name)
        if other != t.name:
            raise MoeguardError(f"{what} name tasks '{other}' and '{t.name}', which differ only in case",
                                hint="rename one (their outputs would share files on a case-insensitive file system)")
    for t in tasks if scored else ():   # before any model loads: no command passes the reference it divides by
        if t.primary_metric == "normalized_perplexity":
            raise MoeguardError(f"task '{t.name}' reports normalized_perplexity, which needs a reference perplexity "
                                f"that no moeguard command takes",
                                hint="set `metric: perplexity` (studies compare with the full model themselves); "
                                     "library callers pass reference= to evaluate_task")
    if check:
        for t in tasks:
            load_records(t, "eval", limit=1)
            # the train split too where reading one record is cheap (a hub split would be downloaded
            # whole): a typo in its file name failed at the baseline, after the model loaded
            if train and "train" in t.splits and t.source.type != "hub":
                load_records(t, "train", limit=1)
    import warnings

    from moeguard.tasks.loaders import shared_data

    for t in tasks:
        if (why := shared_data(t)) is not None:
            warnings.warn(f"task '{t.name}' trains and evaluates on the same records ({why}): attack labels, calibration "
                          f"and baselines drawn from train would have seen the eval records, inflating recovery; "
                          f"point 'splits: train:' at other data", stacklevel=2)
    return tasks


def embedded_or(values: Iterable | None, *, what: str = "tasks", check: bool = True, train: bool = True) -> list:
    """:func:`resolve_tasks` with the embedded suite as the default."""
    from moeguard.zoo.train import embedded_tasks

    return resolve_tasks(values, what=what, default=embedded_tasks, check=check, train=train)


def resolve_grid(model: ModelHandle, *, tasks: Iterable | None = None, methods: Iterable[str] | None = None,
                 keeps: Iterable[int] | None = None) -> tuple[list, list[str], list[int]]:
    """A study grid of tasks x attribution methods x keep levels, each checked (tasks readable,
    methods registered, keeps within the model's one keep rule). Defaults: the embedded suite,
    every registered method, the model's :meth:`~ModelHandle.default_keeps`."""
    from moeguard.attribution.base import check_method_runs, get_method, list_methods, runs_on

    counts = sorted(set(model.experts_per_layer))
    if len(counts) > 1:   # as attribution refuses it, before the baseline's evaluations (not after)
        raise MoeguardError(f"the model's MoE layers have different expert counts {counts} (a budget-pruned "
                            "checkpoint); attribution and the sweep score one count per layer",
                            hint="sweep the unpruned model")
    task_list = embedded_or(tasks)
    model.check_fits(task_list)
    # by default every method the model's family can run (an encoder-decoder: the routing-statistics ones)
    names = list(methods) if methods else [m.name for m in list_methods() if runs_on(m, model.family)]
    for m in names:
        check_method_runs(get_method(m), model.family)
    levels = [model.check_keep(k) for k in keeps] if keeps else model.default_keeps()
    if not levels:   # top-k = E (a checkpoint pruned to its top-k): the sweep measured nothing, and said nothing
        raise MoeguardError(f"{model.name} routes every token to all of its {model.num_experts} experts (top-k "
                            f"{model.top_k}): no keep level below that reaches top-k",
                            hint="audit the model it was cut from (pruning it further cannot keep fewer experts "
                                 "than each token uses)")
    return task_list, names, levels


def task_inputs(tasks: Iterable) -> list[str]:
    """The local paths the tasks read, for ``check_output(inputs=...)``: each task's YAML file and,
    for a local or disk task, its data folder and the files (a disk dataset: the folders) of its
    splits. An ``--out`` that is or holds one would replace it under --overwrite; the folder alone let
    an output inside it through (outputs may go beside the data), so ``--out data/validation.jsonl``
    replaced the eval records with the results."""
    from moeguard.tasks.registry import origin_file

    tasks = list(tasks)
    paths = [f for t in tasks if (f := origin_file(t.name)) is not None]
    for t in tasks:
        if t.source.type not in ("local", "disk") or not t.source.path:
            continue
        paths.append(t.source.path)
        for split in dict.fromkeys(t.splits.values()):
            paths += _split_paths(t, split)
    return paths


def _split_paths(task, split: str) -> list[str]:
    from pathlib import Path

    from moeguard.tasks.hubrows import parse_split
    from moeguard.tasks.loaders import _data_file

    if task.source.type == "disk":   # save_to_disk's files at its root, and the split's folder
        root = Path(task.source.path).expanduser()
        folder = root / parse_split(split)[0]
        return ([str(p) for p in sorted(root.iterdir()) if p.is_file()] if root.is_dir() else []) + [str(folder)]
    try:
        return [str(_data_file(task, split)[0])]
    except MoeguardError:   # a missing file is the edge's own error to give, with its fix
        return []


def file_tasks(tasks: Iterable) -> tuple:
    """The tasks a worker process cannot know by name (they came from the user's files)."""
    from moeguard.tasks.registry import is_builtin

    return tuple(t for t in tasks if not is_builtin(t.name))


def data_stamps(tasks: Iterable) -> tuple:
    """(name, each role's data stamp) of the built-in tasks whose data can change under the same name
    (a hub dataset's cached commit, a save_to_disk folder's files), for a study's or an audit's keys:
    they held only the user's task files, and a hub dataset that moved to a new commit resumed jobs
    scored on the old records beside new ones. The embedded suite changes only with moeguard."""
    from moeguard.tasks.loaders import task_identity
    from moeguard.tasks.registry import is_builtin

    return tuple((t.name, task_identity(t)["files"]) for t in tasks
                 if is_builtin(t.name) and t.source.type in ("hub", "disk"))


__all__ = ["ModelHandle", "resolve_model", "resolve_tasks", "embedded_or", "resolve_grid", "file_tasks", "task_inputs",
           "data_stamps"]
