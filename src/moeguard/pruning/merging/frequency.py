"""``frequency-weighted``, M-SMoE-like (Li et al. 2024, "Merge, then compress"): centres by
attribution score (M-SMoE's dominant experts are the most used: pass ``frequency`` scores for
that choice), the rest joined by output similarity, each member weighted by how many routing
slots it received on the calibration data. M-SMoE itself groups by router-logit similarity and
picks its dominant experts across all layers at once; here grouping is by outputs, K per layer."""

from moeguard.pruning.merging.base import MergeMethod, register_merge
from moeguard.pruning.merging.cluster import around_centres, normalized

register_merge(MergeMethod(
    name="frequency-weighted", group=around_centres,
    weigh=lambda profile, group, gate: normalized(profile.counts, group),
    description="centres by score, others joined by output similarity; weighted by routing frequency (M-SMoE-like)"))
