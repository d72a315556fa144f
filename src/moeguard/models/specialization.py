"""Per-task routing distributions and how specialized the experts are.

Specialization statistic: per MoE layer, the mutual information I(task; expert) between which
task a token comes from (tasks weighted equally) and which expert a routing slot goes to,
divided by its upper bound log(min(#tasks, #experts)). 0 = every task uses the experts
identically; 1 = tasks use disjoint experts.
"""

from __future__ import annotations

import math

import torch


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def task_expert_mutual_information(freq: dict[str, torch.Tensor]) -> list[float]:
    """``freq[task]`` is [L, E] slot shares (rows sum to 1); returns normalized MI per layer."""
    names = sorted(freq)
    stacked = torch.stack([freq[n].double() for n in names])  # [T, L, E]
    T, L, E = stacked.shape
    bound = math.log(min(T, E)) if min(T, E) > 1 else 1.0
    out = []
    for layer in range(L):
        cond = stacked[:, layer]                  # p(e | t)
        marginal = cond.mean(0)                   # p(e) with uniform p(t)
        mi = _entropy(marginal) - sum(_entropy(cond[t]) for t in range(T)) / T
        out.append(max(0.0, mi) / bound)
    return out


def routing_profile(model, tokenizer, tasks, *, limit: int = 64, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Slot shares [L, E] per task on its eval split (the text the task shows the model)."""
    from moeguard.models.hooks import RoutingCapture
    from moeguard.tasks.loaders import load_records

    out = {}
    for task in tasks:
        records = load_records(task, "eval", limit=limit)
        # the text the model reads, as the kind names it (a kind of other fields was a KeyError traceback
        # in zoo train, after its tokenizer had trained)
        field = task.kind_spec.unlabeled_fields[0]
        if any(not isinstance(r.get(field), str) for r in records):
            from moeguard.errors import MoeguardError

            raise MoeguardError(f"task '{task.name}': its {task.kind} records have no text field '{field}' for the "
                                "routing profile", hint="set the kind's unlabeled_fields to the record field holding "
                                                        "the text the model reads")
        texts = [r[field] for r in records]
        with RoutingCapture(model) as cap, torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                                max_length=task.max_length)
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        out[task.name] = cap.stats.frequency()
    return out


def specialization_summary(profile: dict[str, torch.Tensor]) -> dict:
    mi = task_expert_mutual_information(profile)
    return {
        "statistic": "normalized mutual information I(task; expert) per MoE layer (0 = shared, 1 = disjoint)",
        "per_layer": [round(x, 4) for x in mi],
        "mean": round(sum(mi) / len(mi), 4),
        "routing": {name: [[round(float(x), 4) for x in row] for row in f] for name, f in sorted(profile.items())},
        "top_experts": {name: [int(row.argmax()) for row in f] for name, f in sorted(profile.items())},
    }
