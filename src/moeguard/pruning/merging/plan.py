"""A merge plan: per MoE layer, K clusters (centre first) and each member's weight, with the
method and the data they came from. Plain JSON (``moeguard.merge-plan/1``), so a plan can be
written by hand, reviewed and applied again; given as ``--plan``, a pruning plan's kept experts
are the centres instead and the method joins the rest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeguard.config import is_decimal
from moeguard.errors import MoeguardError
from moeguard.io import read_json
from moeguard.pruning.merging.operation import check_clusters

SCHEMA = "moeguard.merge-plan/1"


@dataclass(kw_only=True)
class MergePlan:
    clusters: dict[int, list[list[int]]]              # layer -> clusters, centre first
    weights: dict[int, list[list[float]]] | None      # layer -> per cluster, per member; None: the method's
    num_experts: int
    method: str | None = None
    gate: str | None = None
    task: str | None = None
    scores_method: str | None = None
    why: str = ""

    @property
    def keep(self) -> dict[int, list[int]]:
        return {l: sorted(g[0] for g in gs) for l, gs in self.clusters.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "method": self.method, "gate": self.gate, "task": self.task,
                "scores_method": self.scores_method, "num_experts": self.num_experts, "why": self.why,
                "clusters": {str(l): g for l, g in sorted(self.clusters.items())},
                # unrounded: the plan applied again gives the same bytes
                "weights": None if self.weights is None else
                {str(l): [[float(x) for x in w] for w in ws] for l, ws in sorted(self.weights.items())}}


def read_plan(path: str | Path) -> dict[str, Any]:
    """A merge plan's or a pruning plan's JSON (which one is told by its keys)."""
    data = read_json(Path(path), what="plan file",
                     hint='write {"clusters": {"<layer>": [[centre, member, ...], ...]}} or a pruning plan {"keep": ...}')
    if isinstance(data, dict) and isinstance(data.get("plan"), dict) and isinstance(data["plan"].get("clusters"), dict):
        # a merge record (moeguard_merging.json): its plan, replayed; its top-level "keep" (the centres) read it
        # as a pruning plan, and the merge was derived again from whatever calibration was given now
        data = data["plan"]
    if not isinstance(data, dict) or not (isinstance(data.get("clusters"), dict) or isinstance(data.get("keep"), dict)) \
            or ("clusters" in data and not isinstance(data["clusters"], dict)):
        raise MoeguardError(f"{path} has neither a 'clusters' nor a 'keep' map",
                            hint='write {"clusters": {"0": [[0, 1], [2, 3]]}}, or a pruning plan {"keep": {"0": [0, 2]}}')
    return data


def explicit_clusters(data: dict[str, Any], *, origin: str, layers: dict[int, int]) -> tuple[dict, dict | None]:
    """(clusters, weights or None) from a merge plan's JSON, checked against ``layers``
    (MoE layer index -> expert count)."""
    clusters: dict[int, list[list[int]]] = {}
    for layer, groups in data["clusters"].items():
        # whole numbers only: 0.9 was expert 0, and a string's characters were experts
        if not is_decimal(str(layer)) or not isinstance(groups, list) or not all(
                isinstance(g, list) and all(type(e) is int for e in g) for g in groups):
            raise MoeguardError(f"{origin}: layer {str(layer)[:20]!r} -> {str(groups)[:60]} is not a list of expert clusters",
                                hint='write {"clusters": {"0": [[0, 1], [2, 3]]}} (whole numbers), centre first')
        if int(layer) in clusters:   # "0" and "00": the last one silently won
            raise MoeguardError(f"{origin}: layer {int(layer)} is named twice", hint="name each layer once")
        clusters[int(layer)] = groups
    _check_layers(clusters, layers, origin)
    for li, groups in clusters.items():
        check_clusters(li, layers[li], groups)
    weights = None
    if data.get("weights") is not None:
        try:
            weights = {int(l): [[float(x) for x in w] for w in ws] for l, ws in data["weights"].items()}
        except (TypeError, ValueError, AttributeError):
            raise MoeguardError(f"{origin}: 'weights' is not a map of per-cluster weight lists",
                                hint="give one list of weights per cluster, or leave 'weights' out") from None
        from moeguard.pruning.merging.operation import cluster_weights

        for li, groups in clusters.items():
            ws = weights.get(li)
            if ws is None or [len(w) for w in ws] != [len(g) for g in groups]:
                raise MoeguardError(f"{origin}: layer {li}'s weights {ws} do not match its clusters {groups}",
                                    hint="one weight per member of every cluster, or leave 'weights' out")
            cluster_weights(li, groups, ws)   # negative, NaN or all-zero weights: refused before any weights load
    return clusters, weights


def _check_layers(named: dict[int, Any], layers: dict[int, int], origin: str) -> None:
    missing, unknown = sorted(set(layers) - set(named)), sorted(set(named) - set(layers))
    if missing or unknown:
        raise MoeguardError(f"{origin} names layers {sorted(named)}; the model's MoE layers are {sorted(layers)}",
                            hint="name every MoE layer once (a layer kept whole: one cluster per expert)")


def centres_from_keep(data: dict[str, Any], *, origin: str, layers: dict[int, int]) -> dict[int, list[int]]:
    """A pruning plan's kept experts, as the centres to merge around."""
    from moeguard.pruning.plan import PrunePlan

    plan = PrunePlan.from_dict(data, origin=origin)
    plan.check_model(max(layers.values()), origin=origin)
    keep = plan.keep
    _check_layers(keep, layers, origin)
    for li, experts in keep.items():
        if len(set(experts)) != len(experts) or not all(0 <= e < layers[li] for e in experts):
            raise MoeguardError(f"{origin}: layer {li} keeps {experts}, not distinct experts of its {layers[li]}",
                                hint=f"name experts 0..{layers[li] - 1} once each")
    return keep
