"""What a merge method is: how it groups a layer's experts into K clusters (centre first), and
the weight each member gets when a cluster is averaged into one expert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from moeguard.registry import Registry

GATES = ("applied", "raw")


@dataclass(frozen=True, kw_only=True)
class MergeMethod:
    name: str
    description: str
    # (layer profile, the layer's attribution scores [E], K) -> K clusters, each [centre, members...]
    group: Callable[..., list[list[int]]]
    # (layer profile, one cluster, gate) -> one weight per member (normalized by the operation)
    weigh: Callable[..., list[float]]
    uses_gate: bool = False          # whether --gate (applied | raw router weights) changes the result
    weighs_by_data: bool = True      # whether weights need calibration statistics (uniform ones do not)
    sets_centres: bool = True        # centres come from the scores (False: the method clusters freely)


# importing ``moeguard.pruning.merging.registry`` imports every method file, which registers itself
MERGE_METHODS: Registry[MergeMethod] = Registry("merge method", loader="moeguard.pruning.merging.registry",
                                                hint="see `moeguard merge-methods`")


def register_merge(method: MergeMethod, *, overwrite: bool = False) -> MergeMethod:
    return MERGE_METHODS.add(method.name, method, overwrite=overwrite)


def get_merge_method(name: str) -> MergeMethod:
    return MERGE_METHODS.get(name)


def check_merge_methods(names) -> None:
    """The merge route's methods: at least one, each registered (a one-line error otherwise)."""
    from moeguard.errors import MoeguardError

    if not names:
        raise MoeguardError("the merge route has no merge method", hint="pass --merge-methods, e.g. router-weighted")
    for name in names:
        get_merge_method(name)
