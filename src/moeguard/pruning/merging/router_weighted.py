"""``router-weighted`` (REAM-like, 2604.04356): centres by attribution score, the rest joined by
output similarity, each member weighted by the gate mass the router gave it on the calibration
data, so an expert that is chosen often but with small weights counts for little.

``gate``: ``applied`` uses the weights the block multiplies outputs by (top-k renormalized where
the family renormalizes), ``raw`` the router's score before renormalization, as REAP's default
Mixtral pipeline scores (docs/merging.md)."""

from moeguard.pruning.merging.base import MergeMethod, register_merge
from moeguard.pruning.merging.cluster import around_centres, normalized

register_merge(MergeMethod(
    name="router-weighted", group=around_centres, uses_gate=True,
    weigh=lambda profile, group, gate: normalized(profile.gate(gate), group),
    description="centres by score, others joined by output similarity; weighted by router gate mass (REAM-like)"))
