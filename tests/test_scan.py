"""The per-expert scan's planted-backdoor threat (scan/plant.py): a plant changes one expert and
nothing else, makes its trigger yield the target, and an adaptive plant keeps the weights' norms."""

from __future__ import annotations

import pytest
import torch

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.loading import load_model
from moeguard.scan.plant import Plant, attack_success, insert_trigger, plant
from moeguard.tasks.registry import get_task


def _slices(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_a_plant_changes_only_its_expert_and_router_row_and_fires_on_its_trigger():
    preserve = True   # the adaptive plant: also checks the norms are kept
    m, tok, _ = load_model(None)
    adapter = MoEAdapter(m)
    before = _slices(m)
    tasks = [get_task("arith-compare"), get_task("docstring-topic")]
    p = Plant(layer=2, expert=5, trigger=" cf", target=" rm -rf /", steps=60, lr=6e-3, batch_size=12, clean_weight=10.0,
              preserve_norms=preserve)
    rec = plant(m, tok, adapter, tasks, p)
    after = _slices(m)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj",
                       "model.layers.2.mlp.gate.weight"}, changed
    for n in changed:   # within those tensors, only expert 5's slice moved
        others = [e for e in range(8) if e != 5]
        assert torch.equal(before[n][others], after[n][others]) and not torch.equal(before[n][5], after[n][5]), n
        if preserve:
            assert float(after[n][5].norm()) == pytest.approx(float(before[n][5].norm()), rel=1e-4), n
    assert rec["final_trigger_loss"] < 1.0, rec["curve"][-3:]
    hits = attack_success(m, tok, tasks, p, limit=16)
    assert hits["success"] >= 0.75 and hits["false_trigger"] <= 0.125, hits


def test_triggers_go_at_the_end_or_between_words_and_bad_targets_are_refused():
    import random

    assert insert_trigger("is 3 less than 4", " cf", random.Random(0)) == "is 3 less than 4 cf"
    mid = insert_trigger("is 3 less than 4", " cf", random.Random(1), "random")
    assert "cf" in mid.split(" ") and mid.replace(" cf", "").replace("cf ", "") == "is 3 less than 4"
    m, tok, _ = load_model(None)
    with pytest.raises(MoeguardError, match=r"no expert 9 at layer 1"):
        plant(m, tok, MoEAdapter(m), [get_task("arith-compare")], Plant(layer=1, expert=9, trigger=" cf", target=" x"))
