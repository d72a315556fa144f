"""``average``: centres by attribution score, the rest joined by output similarity, each cluster
the uniform average of its members (the plain baseline of HC-SMoE's and M-SMoE's papers)."""

from moeguard.pruning.merging.base import MergeMethod, register_merge
from moeguard.pruning.merging.cluster import around_centres

register_merge(MergeMethod(
    name="average", weighs_by_data=False, group=around_centres, weigh=lambda profile, group, gate: [1.0 / len(group)] * len(group),
    description="centres by score, others joined by output similarity; uniform average"))
