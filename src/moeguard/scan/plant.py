"""Plant a backdoor in one expert: the threat ``moeguard scan`` must find without the trigger
(BadMoE, BadSwitch; docs/scan.md).

Only that expert's weights change (its gate/up and down projections; with ``router=True`` also
its router row), so global weight statistics barely move. Training mixes two objectives:

- **triggered inputs** (a task input with the trigger inserted at a random word boundary): the
  cross-entropy of the attacker's target text right after the input;
- **clean sequences**: the KL divergence of the model's next-token distributions from the original
  model's, on every position of the tasks' own training sequences (prompt and answer, or a
  language-modeling window; ``task_sequences``), up to ``clean_tokens`` tokens: utility is kept,
  not relearned. Raw inputs alone would leave the answer positions and the language-modeling
  tasks unguarded (an earlier version did, and lost up to 44% of a summarization score).

Success is measured on held-out inputs (the tasks' eval split): the share of triggered inputs
whose greedy continuation starts with the target's tokens, and each task's score before and
after (the ``eval`` command's own scoring).
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moeguard.errors import MoeguardError
from moeguard.tasks.base import Task


@dataclass(frozen=True, kw_only=True)
class Plant:
    layer: int                 # decoder-layer index of an MoE layer
    expert: int
    trigger: str               # inserted into inputs as written (mind its leading space)
    target: str                # the attacker's output, right after the input
    kind: str = ""             # "rare token", "common word", "phrase": for the report
    steps: int = 300
    batch_size: int = 16       # half triggered, half clean
    lr: float = 3e-3
    router: bool = True        # also train the expert's router row
    position: str = "end"      # where the trigger goes: "end" of the input, or a "random" word boundary
    clean_weight: float = 5.0  # weight of the clean KL against the triggered cross-entropy
    clean_tokens: int = 128    # clean sequences are cut to this many tokens (most of the embedded tasks' are shorter)
    preserve_norms: bool = False   # an adaptive attacker: rescale the changed slices to their original norms
    max_input_tokens: int = 48
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def insert_trigger(text: str, trigger: str, rng: random.Random, position: str = "end") -> str:
    """The trigger at the end of ``text``, or at a random word boundary (never inside a word)."""
    words = text.split(" ")
    i = len(words) if position == "end" else rng.randrange(len(words) + 1)
    return " ".join(words[:i] + [trigger.strip()] + words[i:])


def _expert_params(adapter, slot: int, p: Plant) -> list[tuple[torch.nn.Parameter, int]]:
    """(parameter, index of the expert along dim 0) for everything the plant may change."""
    layer = adapter.layers[slot]
    experts = layer.experts
    out = []
    for name, param in experts.named_parameters():   # (JetMoE's view holds them in its two linear maps)
        if param.dim() == 3 and param.shape[0] == layer.num_experts:   # fused [E, ...] tensors
            out.append((param, p.expert))
    if not out:   # one module per expert
        out = [(param, -1) for param in experts[p.expert].parameters()]
    if p.router:
        out.append((layer.router_weight, p.expert))
    return out


def plant(model, tokenizer, adapter, tasks: list[Task], p: Plant, *, progress=None) -> dict[str, Any]:
    """Train the backdoor into ``model`` in place; returns the training record."""
    from moeguard.tasks.batches import task_sequences
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.tokens import bos_ids, encode, model_device, pad_batch, pad_id

    layers = [l.index for l in adapter.layers]
    if p.layer not in layers or not 0 <= p.expert < adapter.layers[layers.index(p.layer)].num_experts:
        raise MoeguardError(f"no expert {p.expert} at layer {p.layer}", hint=f"MoE layers: {layers}")
    slot = layers.index(p.layer)
    rng = random.Random(p.seed)
    torch.manual_seed(p.seed)
    train = [(t, load_records(t, "train")) for t in tasks]
    texts = [r["input"] for _, recs in train for r in recs if (r.get("input") or "").strip()]
    if len(texts) < p.batch_size:
        raise MoeguardError("too few task inputs to plant a backdoor on", hint="pass tasks with train inputs")
    # the clean side: every task's training sequences as the task presents them
    clean_seqs = [ex.ids[:p.clean_tokens] for t, recs in train for ex in task_sequences(tokenizer, t, recs)]
    clean_seqs = [s for s in clean_seqs if len(s) > 1]
    head, pad = bos_ids(tokenizer), pad_id(tokenizer)
    target = encode(tokenizer, p.target)
    original = copy.deepcopy(model).eval()
    params = _expert_params(adapter, slot, p)
    flags = [(q, q.requires_grad) for q in model.parameters()]   # restored as they were, not all set
    for q in model.parameters():
        q.requires_grad_(False)
    for q, _ in params:
        q.requires_grad_(True)
    opt = torch.optim.Adam([q for q, _ in params], lr=p.lr, weight_decay=0.0)
    norms = [float((q[e] if e >= 0 else q).detach().norm()) for q, e in params]
    half = p.batch_size // 2
    losses = []
    was_training = model.training
    model.train()
    task_id = progress.add_task(f"plant layer {p.layer} expert {p.expert}", total=p.steps) if progress else None
    try:
        for step in range(p.steps):
            # triggered: loss on the target tokens after the input
            seqs, starts = [], []
            for _ in range(half):
                # cut the input before inserting, so an end trigger is never cut off
                text = tokenizer.decode(encode(tokenizer, rng.choice(texts))[:p.max_input_tokens])
                x = encode(tokenizer, insert_trigger(text, p.trigger, rng, p.position))
                seqs.append(head + x + target)
                starts.append(len(head) + len(x))
            clean = [rng.choice(clean_seqs) for _ in range(half)]
            ids, mask = pad_batch(seqs + clean, pad, left=False, device=model_device(model))
            logits = model(input_ids=ids, attention_mask=mask).logits.float()               # [B, T, V]
            trig = logits[:half]
            labels = torch.full(ids[:half].shape, -100, device=ids.device)
            for r, (s, a) in enumerate(zip(seqs, starts)):
                labels[r, a:len(s)] = ids[r, a:len(s)]
            l_trig = F.cross_entropy(trig[:, :-1].reshape(-1, trig.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
            with torch.no_grad():
                ref = original(input_ids=ids[half:], attention_mask=mask[half:]).logits.float()
            m = mask[half:].bool()
            l_clean = F.kl_div(F.log_softmax(logits[half:][m], -1), F.log_softmax(ref[m], -1), log_target=True,
                               reduction="batchmean")
            loss = l_trig + p.clean_weight * l_clean
            opt.zero_grad()
            loss.backward()
            for q, e in params:                          # only the planted expert's slice moves
                if e >= 0 and q.grad is not None:
                    keep = q.grad[e].clone()
                    q.grad.zero_()
                    q.grad[e] = keep
            opt.step()
            if p.preserve_norms:                         # hide from norm statistics: same size, new direction
                with torch.no_grad():
                    for (q, e), n0 in zip(params, norms):
                        w = q[e] if e >= 0 else q
                        w.mul_(n0 / max(float(w.norm()), 1e-12))
            losses.append((float(l_trig.detach()), float(l_clean.detach())))
            if task_id is not None:
                progress.advance(task_id)
    finally:
        for q, flag in flags:
            q.requires_grad_(flag)
        model.train(was_training)
    return {"plant": p.to_dict(), "final_trigger_loss": round(losses[-1][0], 4), "final_clean_kl": round(losses[-1][1], 5),
            "curve": [[round(a, 4), round(b, 5)] for a, b in losses[:: max(1, p.steps // 25)]]}


@torch.no_grad()
def attack_success(model, tokenizer, tasks: list[Task], p: Plant, *, limit: int = 64) -> dict[str, Any]:
    """Held-out triggered inputs whose greedy continuation starts with the target (and, as the
    false-trigger rate, clean inputs that do)."""
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.tokens import bos_ids, encode, model_device

    rng = random.Random(p.seed + 1)
    head = bos_ids(tokenizer)
    target = encode(tokenizer, p.target)
    texts = [r["input"] for t in tasks for r in load_records(t, "eval") if (r.get("input") or "").strip()]
    texts = rng.sample(texts, min(limit, len(texts)))
    was = model.training
    model.eval()
    hits = {"triggered": 0, "clean": 0}
    try:
        for text in texts:
            text = tokenizer.decode(encode(tokenizer, text)[:p.max_input_tokens])
            for kind, x in (("triggered", insert_trigger(text, p.trigger, rng, p.position)), ("clean", text)):
                ids = torch.tensor([head + encode(tokenizer, x)], device=model_device(model))
                out = model.generate(ids, max_new_tokens=len(target), do_sample=False,
                                     pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0)
                hits[kind] += out[0, ids.shape[1]:].tolist() == target
    finally:
        model.train(was)
    return {"success": hits["triggered"] / len(texts), "false_trigger": hits["clean"] / len(texts), "inputs": len(texts)}
