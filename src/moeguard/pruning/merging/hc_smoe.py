"""``hc-smoe`` (Chen et al. 2025, "Retraining-free merging of sparse MoE via hierarchical
clustering"): average-linkage hierarchical clustering on the experts' mean outputs over the
calibration tokens, then a frequency-weighted average of each cluster. Attribution scores only
name the centre of each cluster (whose index the merged expert keeps)."""

from moeguard.pruning.merging.base import MergeMethod, register_merge
from moeguard.pruning.merging.cluster import hierarchical, normalized

register_merge(MergeMethod(
    name="hc-smoe", sets_centres=False, group=hierarchical, weigh=lambda profile, group, gate: normalized(profile.counts, group),
    description="hierarchical clustering (average linkage) on mean expert outputs; frequency-weighted average"))
