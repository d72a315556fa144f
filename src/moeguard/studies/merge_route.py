"""The merge route of the knowledge-loss sweep (``moeguard sweep --route prune,merge``): for every
task, attribution method, keep level and merge method, the task's experts are merged down to K
per layer (centres by the method's scores) and the merged model is scored on the task and, for
collateral damage, on the others. Random centres merged the same way give the route's own random
band. Then, per task and keep level, the stronger route: the best retention either reaches.

Calibration (routing statistics and every expert's outputs on the task's tokens) runs once per
task and serves every method, keep and merge method (:func:`profile_model`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeguard.analysis import retention
from moeguard.errors import MoeguardError
from moeguard.kept import document
from moeguard.models.adapter import MoEAdapter
from moeguard.models.loading import release_memory
from moeguard.models.prune import spread
from moeguard.pruning.merging.merge import merge_model, prepare, profile_model
from moeguard.tasks.batches import calibration_batches
from moeguard.tasks.evaluate import evaluate_task, fit_to_model


def scores_identity(s) -> str:
    """What a merge's centres are chosen from: a Scores' method, values and subsets."""
    import hashlib
    import json

    h = hashlib.sha256(s.method.encode() + b"\0" + s.scores.double().cpu().numpy().tobytes())
    h.update(json.dumps(s.subsets, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class _Calibration:
    """The task's calibration profiles, computed on first use: a rerun whose merges are all kept
    (``keep``) does not calibrate at all; their cost is kept beside them for the result."""

    def __init__(self, model, batches, *, adapter, tokens: int, seed: int, keep, key):
        from moeguard.kept import KeptJSON

        self.args = dict(tokens=tokens, seed=seed, adapter=adapter)
        self.model, self.batches, self._found = model, batches, None
        self.doc = KeptJSON(keep / "merge-calibration.json", key) if keep is not None else None

    def profiles(self):
        if self._found is None:
            self._found = profile_model(self.model, self.batches, **self.args)
            if self.doc is not None:
                self.doc.write(self._found[1], exact=True)
        return self._found

    def cost(self) -> dict[str, Any]:
        kept = self.doc.read() if self.doc is not None and self._found is None else None
        return kept if kept is not None else self.profiles()[1]


def merge_points(model, tokenizer, cfg, task, tasks: list, full: dict[str, dict[str, Any]], scores: dict,
                 random_scores, *, progress=None, keep=None) -> dict[str, Any]:
    """``scores``: {method: Scores} of ``task``; ``random_scores(seed)``: a random Scores of the
    same shape. Returns {"points", "random", "calibration"} for ``task``. ``keep``: a folder keyed
    by the job (a sweep job's scratch), where each merged model's point is kept as it finishes and
    read back on a resumed run (the merge and its evaluations, and the calibration once all are)."""
    adapter = MoEAdapter(model)
    batches = calibration_batches(tokenizer, fit_to_model(task, model), samples=cfg.samples, batch_size=8, seed=cfg.seed)
    calibration = _Calibration(model, batches, adapter=adapter, tokens=cfg.merge_tokens, seed=cfg.seed, keep=keep,
                               key=[task.name, cfg.merge_tokens, cfg.seed, cfg.samples])

    def measure(s, mm: str, k: int, with_collateral: bool) -> dict[str, Any]:
        from moeguard.studies.sweep import score_point

        kept = document(keep, "merge", [task.name, scores_identity(s), mm, k, with_collateral, full, cfg.batch_size])
        found = kept.read() if kept is not None else None
        if found is not None:
            return found
        merged, record = merge_model(model, prepare(adapter, method=mm, scores=s, keep=k),
                                     profiles=calibration.profiles(), task=task.name, scores_method=s.method,
                                     share_unchanged=True)   # only evaluated
        point = {"merge_method": mm, **score_point(
            cfg, full, task, tasks if with_collateral else None, k,
            lambda t, limit: evaluate_task(merged, tokenizer, t, limit=limit, batch_size=cfg.batch_size))}
        if with_collateral:
            point["merges"] = {li: [g["from"] for g in gs] for li, gs in record["merges"].items()}
        if kept is not None:   # as JSON gives it back: the job's result goes through JSON too
            kept.write(point, exact=True)
        return point

    jobs = [(m, mm, k) for m in cfg.methods for mm in cfg.merge_methods for k in cfg.keeps]
    randoms = [(seed, mm, k) for seed in range(cfg.random_seeds) for mm in cfg.merge_methods for k in cfg.keeps]
    tid = progress.add_task(f"merge route {task.name}", total=len(jobs) + len(randoms)) if progress else None
    points, random_points = [], []
    for m, mm, k in jobs:
        points.append({"task": task.name, "route": "merge", "method": m, **measure(scores[m], mm, k, True)})
        progress and progress.advance(tid)
    for seed, mm, k in randoms:
        random_points.append({"task": task.name, "route": "merge", "seed": seed,
                              **measure(random_scores(cfg.seed * 1000 + seed), mm, k, False)})
        progress and progress.advance(tid)
    progress and progress.remove_task(tid)
    return {"points": points, "random": random_points, "calibration": {task.name: calibration.cost()}}


def stronger_route(cfg, tasks: list, prune_points: list[dict], prune_random: list[dict],
                   merge: dict[str, Any]) -> dict[str, Any]:
    """Per task and keep level: the best retention by pruning and by merging (over attribution
    methods, and merge methods), each route's random mean, and which route keeps more. The
    attacker takes the stronger one, so the envelope is their maximum."""
    out: dict[str, Any] = {}
    for t in tasks:
        by_keep = {}
        for k in cfg.keeps:
            row: dict[str, Any] = {}
            for route, pts, rnd in (("prune", prune_points, prune_random),
                                    ("merge", merge["points"], merge["random"])):
                mine = [p for p in pts if p["task"] == t.name and p["keep"] == k and p["retention"] is not None]
                rand = [p["retention"] for p in rnd if p["task"] == t.name and p["keep"] == k
                        and p["retention"] is not None]
                best = max(mine, key=lambda p: p["retention"], default=None)
                row[route] = None if best is None else {
                    "retention": best["retention"], "above_baseline": best["retention_above_baseline"],
                    "method": best["method"],
                    "merge_method": best.get("merge_method"), "random_mean": float(np.mean(rand)) if rand else None}
            p_, m_ = row["prune"], row["merge"]
            if p_ and m_:
                d = m_["retention"] - p_["retention"]
                row["winner"] = "merge" if d > 0 else "prune" if d < 0 else "tie"
                row["envelope"] = max(p_["retention"], m_["retention"])
                row["margin"] = d
            by_keep[str(k)] = row
        out[t.name] = by_keep
    return out


# --------------------------------------------------------------------------- the attack harness's merge route

def attack_candidates(model, tokenizer, task, scores: dict, *, keep: int, merge_methods, samples: int, eval_limit: int,
                      seed: int, full_score: float, kept=None) -> list[tuple[dict[str, Any], Any]]:
    """The attack harness's merge candidates: every attribution method's scores x merge method,
    merged to ``keep`` per layer and scored on the task; (candidate, TaskResult) pairs. The
    candidate carries its merge plan (clusters and weights), so a cell rebuilds the same model
    without calibrating again. ``kept``: a folder keyed by the job (the pick job's scratch) where
    each candidate is kept as it finishes and read back on a resumed run (calibrated only if one is
    missing)."""
    import dataclasses

    from moeguard.tasks.evaluate import TaskResult

    adapter = MoEAdapter(model)
    batches = calibration_batches(tokenizer, fit_to_model(task, model), samples=samples, batch_size=8, seed=seed)
    calibration = _Calibration(model, batches, adapter=adapter, tokens=256, seed=seed, keep=None, key=None)
    out = []
    for name, s in scores.items():
        for mm in merge_methods:
            doc = document(kept, "merge", [task.name, scores_identity(s), name, mm, keep, eval_limit, full_score])
            found = doc.read() if doc is not None else None
            if found is not None:
                try:
                    out.append((found["candidate"], TaskResult(**found["result"])))
                    continue
                except TypeError:   # a result of another moeguard's fields: merged and evaluated again
                    pass
            merged, rec = merge_model(model, prepare(adapter, method=mm, scores=s, keep=keep),
                                      profiles=calibration.profiles(), task=task.name, scores_method=name,
                                      share_unchanged=True)   # only evaluated
            r = evaluate_task(merged, tokenizer, task, limit=eval_limit, batch_size=32, baseline=False)
            out.append(({"route": "merge", "method": name, "merge_method": mm, "plan": "uniform", "keep": rec["keep"],
                         "merge": {"clusters": rec["plan"]["clusters"], "weights": rec["plan"]["weights"]},
                         "score": r.score, "retention": retention(r.score, full_score,
                                                                  higher_is_better=task.higher_is_better)}, r))
            if doc is not None:   # JSON's view of both, which the job's result holds too
                doc.write({"candidate": out[-1][0], "result": dataclasses.asdict(r)}, exact=True)
            multi = spread(merged)
            del merged
            if multi:   # over several GPUs the hooks keep a merged copy there until a collection
                release_memory()
    return out


def merged_from(model, merge: dict[str, Any]):
    """The merged model a candidate's plan describes (exactly the one it was scored on)."""
    from moeguard.pruning.merging.operation import merge_experts

    return merge_experts(model, {int(l): g for l, g in merge["clusters"].items()},
                         {int(l): w for l, w in merge["weights"].items()})[0]


def refuse_capped_merge(max_memory: str, *, flag: str, route_flag: str) -> None:
    """The merge route under a memory cap, refused before any work: the sweep's merge points and the
    merged model's recovery merge a copy of the model in memory (a traceback after the baseline,
    attribution and prune points, at every resume)."""
    raise MoeguardError(f"{flag} {max_memory} is set with the merge route, which merges a copy of the model in memory",
                        hint=f"use {route_flag} prune under a cap; `moeguard merge --max-memory` merges a checkpoint "
                             "larger than memory on its own")
