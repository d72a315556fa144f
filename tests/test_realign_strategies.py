"""Active-learning strategies (shared matrix over strategies x task kinds) and the loop's contract."""

import random

import pytest
import torch

from moeguard.errors import MoeguardError
from moeguard.models.loading import load_model
from moeguard.realign.features import routing_shares, unlabeled
from moeguard.realign.strategies.base import Query, get_strategy, list_strategies
from moeguard.realign.strategies.coreset import k_center
from moeguard.realign.strategies.hybrid import kmeans
from moeguard.realign.strategies.orphan import orphan_shares
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task

KIND_TASK = {"classification": "arith-compare", "language_modeling": "stdlib-docs", "summarization": "record-summary"}


@pytest.fixture(scope="module")
def embedded():
    model, tok, _ = load_model(None)
    return model, tok


def query(embedded, task_name, *, n=20, k=4, labeled=(0, 1), seed=0, orphan=None):
    model, tok = embedded
    task = get_task(task_name)
    pool = unlabeled(task, load_records(task, "train", limit=n))
    return Query(model=model, tokenizer=tok, task=task, pool=pool, candidates=[i for i in range(n) if i not in labeled],
                 labeled=list(labeled), k=k, rng=random.Random(seed), batch_size=8, orphan_share=orphan)


def test_strategy_matrix_covers_every_registered_strategy():
    from moeguard.tasks.kinds.base import kind_names

    assert set(KIND_TASK) == set(kind_names()), "a new task kind needs a task in KIND_TASK"   # else its strategies go untested
    names = {s.name for s in list_strategies()}
    assert {"random", "least-confidence", "margin", "entropy", "nll", "coreset", "cluster-uncertainty", "orphan"} <= names


@pytest.mark.parametrize("kind", sorted(KIND_TASK))
@pytest.mark.parametrize("name", [s.name for s in list_strategies()])
def test_every_strategy_picks_k_distinct_unlabeled_samples_deterministically(embedded, name, kind):
    task = get_task(KIND_TASK[kind])
    strategy = get_strategy(name)
    if task.kind not in strategy.kinds:
        with pytest.raises(MoeguardError, match=f"applies to .*'{task.name}' is {kind}"):
            get_strategy(name, task)
        return
    orphan = (lambda: torch.linspace(0, 1, 20)) if strategy.needs_original else None
    a = strategy.select(query(embedded, task.name, orphan=orphan))
    b = strategy.select(query(embedded, task.name, orphan=orphan))
    assert a == b, "same seed, same picks"
    assert len(a) == 4 and len(set(a)) == 4 and not set(a) & {0, 1} and all(0 <= i < 20 for i in a)


def test_strategies_never_see_labels():
    task = get_task("arith-compare")
    seen = unlabeled(task, load_records(task, "train", limit=3))
    assert all(set(r) == {"input"} for r in seen)
    summ = get_task("record-summary")
    assert all(set(r) == {"input"} for r in unlabeled(summ, load_records(summ, "train", limit=3)))


def test_uncertainty_strategies_rank_by_their_definitions(embedded):
    q = query(embedded, "arith-compare", k=3)
    p = q.class_probs
    top = lambda v: sorted(q.candidates[i] for i in torch.as_tensor(v).argsort(descending=True)[:3].tolist())  # noqa: E731
    assert sorted(get_strategy("least-confidence").select(q)) == top(1 - p.max(-1).values)
    two = p.topk(2, -1).values
    assert sorted(get_strategy("margin").select(q)) == top(-(two[:, 0] - two[:, 1]))
    assert sorted(get_strategy("entropy").select(q)) == top(-(p * p.log()).sum(-1))
    lm = query(embedded, "stdlib-docs", k=3)
    nll, _ = lm.sequence_uncertainty
    assert sorted(get_strategy("nll").select(lm)) == sorted(lm.candidates[i] for i in nll.argsort(descending=True)[:3].tolist())


def test_summary_uncertainty_reads_the_models_own_generation(embedded):
    q = query(embedded, "record-summary", n=6, labeled=())
    nll, ent = q.sequence_uncertainty
    assert nll.shape == (6,) and (nll > 0).all() and nll.std() > 0
    # greedy tokens are each step's most likely: -log max p <= H(p), so the mean NLL of the model's own
    # generation is at most its mean entropy (a reference text read instead would not be bounded so)
    assert (nll <= ent + 1e-5).all(), (nll, ent)


def test_coreset_covers_far_regions_first():
    pts = torch.tensor([[0.0, 0], [0.1, 0], [10, 0], [10.1, 0], [0, 10], [0.2, 0.1]])
    # labeled: point 0; the two far clusters come before the near duplicates
    assert k_center(pts, [1, 2, 3, 4, 5], [0], 2, random.Random(0)) == [3, 4]  # farthest, then the other far one


def test_cluster_uncertainty_takes_the_most_uncertain_of_each_cluster(embedded):
    q = query(embedded, "arith-compare", n=9, labeled=(), k=3)
    centers = torch.tensor([[0.0, 0], [20, 0], [0, 20]])
    emb = torch.cat([c + 0.1 * torch.randn(3, 2, generator=torch.Generator().manual_seed(i)) for i, c in enumerate(centers)])
    unc = torch.tensor([0.1, 0.9, 0.2, 0.5, 0.3, 0.4, 0.05, 0.07, 0.8])
    q.__dict__["pool_embeddings"] = emb
    q.uncertainty = lambda: unc
    assert get_strategy("cluster-uncertainty").select(q) == [1, 3, 8]
    assert kmeans(emb.double(), 3, torch.ones(9, dtype=torch.float64), random.Random(0)).unique().numel() == 3


def test_orphan_prefers_samples_routed_to_pruned_experts(embedded):
    model, tok = embedded
    task = get_task("stdlib-docs")
    pool = load_records(task, "train", limit=12)
    keep = {l: [0, 1, 2, 3] for l in range(4)}
    rest = {l: [4, 5, 6, 7] for l in range(4)}
    a = orphan_shares(model, tok, task, keep, 8)(pool)
    b = orphan_shares(model, tok, task, rest, 8)(pool)
    # every routing slot goes to a kept or a dropped expert: the two shares are complements
    assert torch.allclose(a + b, torch.ones_like(a), atol=1e-6)
    assert torch.all(orphan_shares(model, tok, task, {l: list(range(8)) for l in range(4)}, 8)(pool) == 0)
    shares = routing_shares(model, tok, task, unlabeled(task, pool))
    assert shares.shape == (12, 4, 8) and torch.allclose(shares.sum(-1), torch.ones(12, 4, dtype=shares.dtype))
    q = query(embedded, "stdlib-docs", n=12, labeled=(), k=3, orphan=lambda: a)
    assert sorted(get_strategy("orphan").select(q)) == sorted(a.argsort(descending=True)[:3].tolist())


def test_unknown_strategy_suggests_names():
    with pytest.raises(MoeguardError) as err:
        get_strategy("corset")
    assert err.value.message == "unknown active-learning strategy 'corset'"
    assert err.value.hint.startswith("did you mean coreset")


def test_strategy_kind_mismatch_names_the_kinds_and_the_strategies_that_fit():
    with pytest.raises(MoeguardError) as err:
        get_strategy("margin", get_task("stdlib-docs"))
    assert err.value.message == "strategy 'margin' applies to classification tasks; 'stdlib-docs' is language_modeling"
    assert err.value.hint == "use one of cluster-uncertainty, coreset, entropy, nll, orphan, random"
    assert get_strategy("margin", get_task("arith-compare")).name == "margin"


def test_strategies_live_in_a_registry_and_declare_kinds_by_name():
    from moeguard.realign.strategies.base import STRATEGIES, register_strategy
    from moeguard.tasks.base import TaskKind

    assert "random" in STRATEGIES and [s.name for s in list_strategies()] == STRATEGIES.names()
    assert get_strategy("least-confidence").kinds == {TaskKind.CLASSIFICATION}
    assert get_strategy("nll").kinds == {"language_modeling", "summarization"}
    assert get_strategy("random").kinds == set(TaskKind) and get_strategy("random").only is None
    with pytest.raises(MoeguardError, match="unknown task kind 'clasification'"):
        register_strategy("typo", kinds=["clasification"], description="never registered")
    assert "typo" not in STRATEGIES
    with pytest.raises(MoeguardError, match="active-learning strategy 'random' is already registered"):
        register_strategy("random", description="a second random")(lambda q: [])
