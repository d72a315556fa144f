"""The terms of the hardening objectives, each a differentiable function of one forward pass.

``docs/defenses.md`` gives the math. Every term is tested on a tiny model to move the quantity
it names (``tests/test_defense_objectives.py``):

- :func:`task_balance` : per-task routing balance, ``E * sum_e pbar_{t,e}^2 - 1`` per layer
  (0 when task t spreads its router probability evenly over all E experts, E - 1 when one
  expert takes it all); the load-balancing loss of Switch/Mixtral is per *batch*, which a
  model satisfies while still sending each task to its own few experts.
- :func:`collapse` : the hinge ``relu(target - loss)`` that pushes a (pruned, or pruned and
  attacked) model's task loss *up* to ``target`` and then stops, so the outer objective is
  bounded (an unbounded "maximize the loss" term is what makes tamper-resistance training
  diverge).
- :func:`simulate_adaptation` : the inner loop: a few AdamW steps of an attacker (or of an
  authorized user) on a copy of the chosen parameters, under an expert mask, returning the
  first-order gradient of a post-adaptation loss at the adapted weights (FO-MAML, as TAR and
  SOPHON approximate their meta-gradients).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from moeguard.models.adapter import MoEAdapter
from moeguard.models.hooks import Hooks, mask_experts
from moeguard.realign.engine import task_loss
from moeguard.tasks.batches import Batch


@dataclass
class RouterTape:
    """Router outputs of one forward pass, with gradients: per MoE layer, logits [N, E] and the
    chosen experts [N, k] for the N = B*T token positions."""

    logits: list[torch.Tensor] = field(default_factory=list)
    index: list[torch.Tensor] = field(default_factory=list)


@contextlib.contextmanager
def record_routers(model: nn.Module, *, adapter: MoEAdapter | None = None) -> Iterator[RouterTape]:
    adapter = adapter or MoEAdapter(model)
    tape = RouterTape()

    def hook_for(layer):
        def hook(module, args, output):
            logits, _, index = layer.unpack(output)
            tape.logits.append(logits)
            tape.index.append(index.detach())
        return hook

    with Hooks() as hooks:
        for layer in adapter.layers:
            hooks.on_output(layer.router, hook_for(layer))
        yield tape


def routing_probs(logits: torch.Tensor, score: str) -> torch.Tensor:
    lv = logits.float()
    if score == "sigmoid":  # DeepSeek-V3: independent scores; their shares are what top-k compares
        s = lv.sigmoid()
        return s / s.sum(-1, keepdim=True).clamp_min(1e-9)
    return torch.softmax(lv, dim=-1)


def task_balance(tape: RouterTape, valid: torch.Tensor, task_ids: torch.Tensor, *, score: str = "softmax") -> torch.Tensor:
    """Mean over layers and tasks of ``E * sum_e pbar^2 - 1`` (0: every task uses every expert).

    ``valid`` [N] marks real tokens, ``task_ids`` [N] the task of each token's sequence."""
    terms = []
    for logits in tape.logits:
        probs = routing_probs(logits, score)                   # [N, E], on its layer's device
        # the masks where each layer's routers ran: over several GPUs a layer on the second one was indexed
        # with the first one's masks
        v, ids = valid.to(probs.device), task_ids.to(probs.device)
        E = probs.shape[-1]
        for t in ids[v].unique():
            sel = v & (ids == t)
            pbar = probs[sel].mean(0)                            # [E]
            terms.append((E * (pbar * pbar).sum() - 1).to(valid.device))
    return torch.stack(terms).mean()


def task_shares(tape: RouterTape, valid: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[layers, E] share of the top-k routing slots each expert took (the attacker's
    ``frequency`` attribution, computed for free from the forward pass)."""
    rows = []
    for idx in tape.index:
        counts = torch.bincount(idx[valid.to(idx.device)].reshape(-1), minlength=num_experts).float()
        rows.append((counts / counts.sum().clamp_min(1)).to(valid.device))   # one device for the stack
    return torch.stack(rows)


def collapse(loss: torch.Tensor, target: float) -> torch.Tensor:
    return torch.relu(target - loss)


def forward_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return task_loss(out.logits, batch.labels)


@dataclass(frozen=True, kw_only=True)
class Adaptation:
    """One simulated adaptation: who adapts what, how hard, and under which expert mask."""

    params: Sequence[str]                 # names of the parameters the adapter may change
    keep: Mapping[int, list[int]] | None  # expert mask (the attacker's pruning); None: the full model
    steps: int
    lr: float


def simulate_adaptation(model: nn.Module, adaptation: Adaptation, batches: Callable[[], Batch],
                        post_loss: Callable[[torch.Tensor], torch.Tensor]) -> tuple[dict[str, torch.Tensor], float, float]:
    """Run ``adaptation`` on ``model`` in place, take ``post_loss(task loss)`` on a fresh batch at
    the adapted weights, put every parameter back, and return (first-order gradient of the
    post-adaptation term per adapted parameter, task loss before, task loss after).

    ``batches()`` gives the next batch (the inner steps' data, then the held-out one)."""
    named = dict(model.named_parameters())
    params = [named[n] for n in adaptation.params]
    saved = [p.detach().clone() for p in params]
    flags = {n: p.requires_grad for n, p in named.items()}
    chosen = set(adaptation.params)
    for n, p in named.items():
        p.requires_grad_(n in chosen)
    opt = torch.optim.AdamW(params, lr=adaptation.lr, betas=(0.9, 0.95), weight_decay=0.0)
    mask = mask_experts(model, adaptation.keep) if adaptation.keep else contextlib.nullcontext()
    try:
        with mask:
            before = None
            for _ in range(adaptation.steps):
                loss = forward_loss(model, batches())
                before = float(loss.detach()) if before is None else before
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            opt.zero_grad(set_to_none=True)
            after = forward_loss(model, batches())
            post_loss(after).backward()
        grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                 for n, p in zip(adaptation.params, params)}
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
                p.grad = None
        for n, p in named.items():
            p.requires_grad_(flags[n])
    return grads, (before if before is not None else float(after.detach())), float(after.detach())
