"""``random``: uniform sampling without replacement, the baseline every strategy must beat."""

from moeguard.realign.strategies.base import Query, register_strategy


@register_strategy("random", description="uniform random sampling from the unlabeled pool (the baseline)")
def select(q: Query) -> list[int]:
    return sorted(q.rng.sample(q.candidates, min(q.k, len(q.candidates))))
