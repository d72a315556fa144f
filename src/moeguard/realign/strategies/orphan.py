"""``orphan`` (moeguard's routing-aware strategy): label the samples whose knowledge was pruned away.

The *original* (unpruned) model is run once over the pool with routing capture; a sample's
orphan share is the fraction of its routing slots, averaged over layers, that went to experts
the pruning plan removed. Those are the samples the pruned model now serves through experts
that never learned them, so re-aligning on them repairs the lost knowledge first. The share is
a property of the original model and the plan, not of the re-aligned model, so it is computed
once per run; ties (common when a task's routing is concentrated) are broken by a seeded shuffle.
"""

from moeguard.errors import MoeguardError
from moeguard.realign.strategies.base import Query, register_strategy


@register_strategy("orphan", needs_original=True,
                   description="routing-aware: samples the original model sent most to the pruned experts")
def select(q: Query) -> list[int]:
    if q.orphan_share is None:
        raise MoeguardError("strategy 'orphan' needs the original model and the pruning plan",
                            hint="prune with moeguard (the checkpoint records both) or pass --original")
    share = q.orphan_share()
    return q.top(share[q.candidates])


def orphan_shares(original, tokenizer, task, keep, num_experts: int):
    """A function pool -> [n] orphan share, for ``original`` pruned by ``keep`` ({layer: kept experts};
    keys may be ints or strings, as in a plan or a pruning record)."""
    import torch

    from moeguard.models.adapter import MoEAdapter
    from moeguard.realign.features import routing_shares, unlabeled

    from moeguard.tasks.evaluate import fit_to_model

    # the windows the original was trained on (wikitext's 512 on 256 positions: an IndexError with
    # absolute positions, shares of meaningless routing with rotary ones)
    task = fit_to_model(task, original)
    keep = {int(k): v for k, v in keep.items()}
    layers = MoEAdapter(original).layers
    dropped = torch.ones(len(layers), num_experts)
    for slot, layer in enumerate(layers):
        dropped[slot, keep.get(layer.index, list(range(num_experts)))] = 0.0
    return lambda pool: (routing_shares(original, tokenizer, task, unlabeled(task, pool)) * dropped).sum(-1).mean(-1)
