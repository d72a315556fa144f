"""Each hardening term moves the quantity it claims to move, on a tiny model (issue 5's acceptance)."""

import math

import pytest
import torch

from moeguard.defense.objectives import (Adaptation, collapse, forward_loss, record_routers, simulate_adaptation,
                                         task_balance, task_shares)
from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks import mask_experts
from moeguard.tasks.batches import Batch
from moeguard.testing import causal_families, tiny_model


FAMILIES = causal_families()  # every family harden accepts: every registered one whose tasks run


def lm_batch(seed: int, rows: int = 4, width: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern (each row counts up from a random start), so fine-tuning lowers the loss
    start = torch.randint(0, 60, (rows, 1), generator=g)
    ids = (start + torch.arange(width)) % 96
    mask = torch.ones_like(ids)
    return Batch(ids, mask, ids.clone())


def balance_of(model, batch) -> float:
    a = MoEAdapter(model)
    with torch.no_grad(), record_routers(model, adapter=a) as tape:
        forward_loss(model, batch)
    valid = batch.attention_mask.reshape(-1).bool()
    return float(task_balance(tape, valid, torch.zeros_like(valid, dtype=torch.long), score=a.family.routing.score))


def test_task_balance_is_zero_for_even_routing_and_e_minus_1_for_one_expert():
    from moeguard.defense.objectives import RouterTape

    E, N = 8, 10
    valid = torch.ones(N, dtype=torch.bool)
    tasks = torch.zeros(N, dtype=torch.long)
    even = RouterTape(logits=[torch.zeros(N, E)], index=[torch.zeros(N, 2, dtype=torch.long)])
    assert float(task_balance(even, valid, tasks)) == pytest.approx(0.0, abs=1e-6)
    peaked = torch.full((N, E), -1e4)
    peaked[:, 3] = 0
    one = RouterTape(logits=[peaked], index=[torch.zeros(N, 2, dtype=torch.long)])
    assert float(task_balance(one, valid, tasks)) == pytest.approx(E - 1, abs=1e-4)
    # two tasks, each on its own expert: per batch that is balanced-ish, per task it is not
    logits = torch.full((N, E), -1e4)
    logits[:5, 0] = 0
    logits[5:, 1] = 0
    two = RouterTape(logits=[logits], index=[torch.zeros(N, 2, dtype=torch.long)])
    per_task = float(task_balance(two, valid, torch.tensor([0] * 5 + [1] * 5)))
    assert per_task == pytest.approx(E - 1, abs=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_minimizing_task_balance_spreads_each_task_over_more_experts(family):
    torch.manual_seed(0)
    model = tiny_model(family).train()
    a = MoEAdapter(model)
    # concentrate routing first so there is something to spread
    with torch.no_grad():
        for l in a.layers:
            l.router_weight.mul_(6.0)
    batch = lm_batch(0)
    before = balance_of(model, batch)
    routers = [p for l in a.layers for p in l.router.parameters()]
    opt = torch.optim.Adam(routers, lr=0.05)
    valid = batch.attention_mask.reshape(-1).bool()
    for _ in range(25):
        with record_routers(model, adapter=a) as tape:
            forward_loss(model, batch)
        loss = task_balance(tape, valid, torch.zeros_like(valid, dtype=torch.long), score=a.family.routing.score)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = balance_of(model, batch)
    assert before > 0.01   # concentrated enough to spread (the sigmoid families start at 0.02-0.06)
    assert after < 0.5 * before


def test_task_shares_are_the_top_k_slot_frequencies():
    from moeguard.defense.objectives import RouterTape

    idx = torch.tensor([[0, 1], [0, 2], [0, 1]])
    shares = task_shares(RouterTape(logits=[torch.zeros(3, 4)], index=[idx]), torch.tensor([True, True, False]), 4)
    assert shares.tolist() == [[0.5, 0.25, 0.25, 0.0]]


def test_collapse_pushes_the_pruned_models_loss_up_to_the_target_and_stops():
    torch.manual_seed(0)
    model = tiny_model("mixtral").train()
    batch = lm_batch(1)
    keep = {l.index: [0, 1, 2, 3] for l in MoEAdapter(model).layers}

    def pruned_loss():
        with torch.no_grad(), mask_experts(model, keep):
            return float(forward_loss(model, batch))

    before = pruned_loss()
    target = before + 1.0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        with mask_experts(model, keep):
            loss = collapse(forward_loss(model, batch), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert pruned_loss() > before + 0.5
    # bounded: once the pruned loss is past the target, the term is 0 and gives no gradient
    high = torch.tensor(target + 1.0, requires_grad=True)
    out = collapse(high, target)
    out.backward()
    assert float(out.detach()) == 0.0 and float(high.grad) == 0.0


def test_simulate_adaptation_restores_the_model_and_returns_gradients_of_the_adapted_parameters_only():
    torch.manual_seed(0)
    model = tiny_model("olmoe").train()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names = [n for n, _ in model.named_parameters() if "self_attn" in n]
    keep = {l.index: [0, 2, 4, 6] for l in MoEAdapter(model).layers}
    it = iter([lm_batch(s) for s in range(10)])
    grads, before, after = simulate_adaptation(model, Adaptation(params=names, keep=keep, steps=4, lr=1e-2),
                                               lambda: next(it), lambda l: l)
    assert set(grads) == set(names)
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n
        assert p.requires_grad == flags[n] and p.grad is None
    assert math.isfinite(before) and math.isfinite(after)


def attack_loss(model, keep, seed=0) -> float:
    """A fixed simulated attack (same data, same lr): its post-attack loss."""
    names = [n for n, _ in model.named_parameters()]
    it = iter([lm_batch(100 + seed + s) for s in range(8)])
    _, _, after = simulate_adaptation(model, Adaptation(params=names, keep=keep, steps=5, lr=3e-3),
                                      lambda: next(it), lambda l: l * 0)
    return after


def test_the_adversarial_meta_gradient_raises_the_loss_after_a_simulated_attack():
    torch.manual_seed(0)
    model = tiny_model("mixtral").train()
    keep = {l.index: [0, 1, 2, 3] for l in MoEAdapter(model).layers}
    names = [n for n, _ in model.named_parameters()]
    before = attack_loss(model, keep)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(25):
        it = iter([lm_batch(100 + s) for s in range(8)])
        grads, _, _ = simulate_adaptation(model, Adaptation(params=names, keep=keep, steps=5, lr=3e-3),
                                          lambda: next(it), lambda l: collapse(l, 10.0))
        opt.zero_grad()
        for n, p in model.named_parameters():
            p.grad = grads[n]
        opt.step()
    assert attack_loss(model, keep) > before + 0.5


def test_the_authorized_term_lowers_the_loss_after_authorized_adaptation():
    torch.manual_seed(0)
    model = tiny_model("mixtral").train()
    names = [n for n, _ in model.named_parameters() if "self_attn" in n]

    def adapted() -> float:
        it = iter([lm_batch(200 + s) for s in range(6)])
        return simulate_adaptation(model, Adaptation(params=names, keep=None, steps=3, lr=1e-3),
                                   lambda: next(it), lambda l: l * 0)[2]

    before = adapted()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        it = iter([lm_batch(200 + s) for s in range(6)])
        grads, _, _ = simulate_adaptation(model, Adaptation(params=names, keep=None, steps=3, lr=1e-3),
                                          lambda: next(it), lambda l: l)
        opt.zero_grad()
        for n, p in model.named_parameters():
            p.grad = grads.get(n)
        opt.step()
    assert adapted() < before - 0.2
