"""The stdlib tasks' splits and records: each source file goes to one split for every stdlib
task, then each task dedups, balances and caps its records."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Any

from moeguard.errors import MoeguardError
from moeguard.zoo.suite.common import (EVAL_SIZE, EVAL_SPLITS, NAMING_PER_NAME, SPLITS, TOPICS, TRAIN_CAP, _order,
                                       _sample)
from moeguard.zoo.suite.stdlib_scan import FileItems

# a distribution's Python may ship the standard library without some packages (Debian and Ubuntu
# split tkinter and idlelib out), which leaves a topic or a task short
STRIPPED = ("read a complete CPython standard library: install the missing parts (e.g. python3-tk, idle) or pass "
            "--python-stdlib with a full one (the shipped data was built from one)")


# --------------------------------------------------------------------------- split by file


def quotas() -> dict[str, int]:
    q = {"stdlib-docs": EVAL_SIZE, "stdlib-code": EVAL_SIZE, "code-naming": EVAL_SIZE}
    for label in TOPICS:
        q["docstring-topic:" + label] = EVAL_SIZE // len(TOPICS)
    return q


def assign_files(items: list[FileItems], seed: int, margin: float = 1.35) -> dict[str, str]:
    """File -> split. Files are visited in seeded order; a file goes to an eval split while
    that split still needs records the file has and the file would not overshoot any quota
    by much (so big files such as ``tkinter/__init__.py`` stay in train)."""
    rng = random.Random(f"moeguard-embedded:{seed}:files")
    order = sorted(items, key=lambda it: it.rel)
    rng.shuffle(order)
    target = {k: int(round(v * margin)) for k, v in quotas().items()}
    need = {s: dict(target) for s in EVAL_SPLITS}
    slack = {k: max(3, v // 4) for k, v in target.items()}
    assignment: dict[str, str] = {}
    for it in order:
        demand = it.demand()
        chosen = "train"
        # the eval split with the larger relative unmet need goes first
        ranked = sorted(EVAL_SPLITS, key=lambda s: (-sum(need[s][k] / target[k] for k in target), s))
        for split in ranked:
            useful = any(demand[k] > 0 and need[split][k] > 0 for k in target)
            fits = all(demand[k] <= max(need[split][k], 0) + slack[k] for k in target)
            if useful and fits:
                chosen = split
                for k in target:
                    need[split][k] -= demand[k]
                break
        assignment[it.rel] = chosen
    return assignment


# --------------------------------------------------------------------------- selection


def _dedup_across_splits(by_split: dict[str, list[dict[str, Any]]], key: str,
                         label_key: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Keep each text once per task: in train if it occurs there, else in the first eval split.

    Texts that occur with two different labels/targets anywhere are dropped (ambiguous).
    """
    labels: dict[str, set[str]] = defaultdict(set)
    home: dict[str, str] = {}
    for split in SPLITS:  # train first, so a text seen in train stays there
        for r in by_split.get(split, []):
            if label_key is not None:
                labels[r[key]].add(str(r[label_key]))
            home.setdefault(r[key], split)
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    kept: set[str] = set()
    for split in SPLITS:
        for r in by_split.get(split, []):
            text = r[key]
            if home[text] != split or text in kept:
                continue
            if label_key is not None and len(labels[text]) > 1:
                continue
            kept.add(text)
            out[split].append(r)
    return out


def _cap_per_value(records: list[dict[str, Any]], key: str, cap: int) -> list[dict[str, Any]]:
    seen: Counter = Counter()
    out = []
    for r in records:
        if seen[r[key]] < cap:
            seen[r[key]] += 1
            out.append(r)
    return out


def select_stdlib_task(task: str, by_split: dict[str, list[dict[str, Any]]], seed: int) -> dict[str, list]:
    rng = random.Random(f"moeguard-embedded:{seed}:{task}")
    if task == "docstring-topic":
        by_split = _dedup_across_splits(by_split, "text", "label")
        labels = list(TOPICS)
        out = {}
        for split in SPLITS:
            groups = {lab: [r for r in by_split[split] if r["label"] == lab] for lab in labels}
            if split == "train":
                per = min(min(len(g) for g in groups.values()), TRAIN_CAP[task] // len(labels))
            else:
                per = EVAL_SIZE // len(labels)
            short = {lab: len(g) for lab, g in groups.items() if len(g) < max(per, 1)}
            if short:
                raise MoeguardError(f"{task}/{split}: this standard library gives too few docstrings for topics {short} "
                                    f"(need {max(per, 1)} each)", hint=STRIPPED)
            chosen = [r for lab in labels for r in _sample(rng, groups[lab], per)]
            out[split] = _order(rng, chosen, split, "label", labels)
        return out
    key = "code" if task == "code-naming" else "text"
    by_split = _dedup_across_splits(by_split, key, "target" if task == "code-naming" else None)
    out = {}
    for split in SPLITS:
        records = list(by_split[split])
        rng.shuffle(records)
        if task == "code-naming":
            records = _cap_per_value(records, "target", NAMING_PER_NAME)
        n = TRAIN_CAP[task] if split == "train" else EVAL_SIZE
        if split != "train" and len(records) < n:
            raise MoeguardError(f"{task}/{split}: this standard library gives only {len(records)} records (need {n})",
                                hint=STRIPPED)
        out[split] = records[:n]
    return out
