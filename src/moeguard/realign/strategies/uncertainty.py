"""Uncertainty sampling: label what the current model is least sure about (Lewis & Gale 1994).

Classification reads the model's distribution over the label verbalizers: ``least-confidence``
(1 - max p), ``margin`` (smallest gap between the two most likely labels, Scheffer et al. 2001)
and ``entropy``. Language modeling and summarization use ``nll``: the mean token negative
log-likelihood of the sample's text, or of the model's own greedy summary (Shen et al. 2017's
maximum normalized log-probability); ``entropy`` there is the mean next-token entropy.
"""

from moeguard.realign.strategies.base import Query, register_strategy

CLS = ("classification",)
GEN = ("language_modeling", "summarization")


@register_strategy("least-confidence", kinds=CLS, description="lowest probability of the predicted label")
def least_confidence(q: Query) -> list[int]:
    return q.top(1 - q.class_probs.max(-1).values)


@register_strategy("margin", kinds=CLS, description="smallest margin between the two most likely labels")
def margin(q: Query) -> list[int]:
    top2 = q.class_probs.topk(2, dim=-1).values
    return q.top(-(top2[:, 0] - top2[:, 1]))


@register_strategy("entropy", description="highest predictive entropy (labels; or mean next-token entropy)")
def entropy(q: Query) -> list[int]:
    return q.top(q.entropy())


@register_strategy("nll", kinds=GEN, description="highest mean token NLL of the text, or of the model's own summary")
def nll(q: Query) -> list[int]:
    return q.top(q.sequence_uncertainty[0])
