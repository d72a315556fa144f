"""The shipped embedded model: loads offline, beats every task's trivial baseline, and specializes."""

import json

import pytest

from moeguard.models.loading import EMBEDDED_MODEL_DIR, load_model
from moeguard.tasks.evaluate import evaluate_task
from moeguard.zoo.train import embedded_tasks

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "model.safetensors").exists(),
                                reason="embedded model not built")


@pytest.fixture(scope="module")
def embedded():
    model, tokenizer, _ = load_model(None)
    return model, tokenizer


def test_embedded_model_is_a_small_mixtral():
    cfg = json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    assert cfg["num_hidden_layers"] >= 4 and cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    size = sum(f.stat().st_size for f in EMBEDDED_MODEL_DIR.iterdir())
    assert size <= 25 * 2**20


@pytest.mark.parametrize("task", embedded_tasks(), ids=lambda t: t.name)
def test_embedded_model_beats_the_trivial_baseline(embedded, task):
    model, tokenizer = embedded
    r = evaluate_task(model, tokenizer, task, limit=40)
    base = r.baseline["score"]
    if r.higher_is_better:
        assert r.score > base, (task.name, r.score, base)
    else:
        assert r.score < base, (task.name, r.score, base)


def test_card_reports_task_specialization():
    card = json.loads((EMBEDDED_MODEL_DIR / "moeguard_card.json").read_text())
    spec = card["specialization"]
    assert set(spec["routing"]) == {t.name for t in embedded_tasks()}
    # routing depends on the task in every layer, and tasks prefer different experts somewhere
    assert len(spec["per_layer"]) == 4 and all(x > 0.02 for x in spec["per_layer"]) and spec["mean"] > 0.05
    tops = list(spec["top_experts"].values())
    assert any(len({t[layer] for t in tops}) > 1 for layer in range(len(tops[0])))


def test_the_cards_specialization_is_what_the_shipped_weights_give(embedded):
    """The claim above was read from the card alone: weights replaced without the card still passed."""
    from moeguard.models.specialization import routing_profile, specialization_summary

    model, tokenizer = embedded
    card = json.loads((EMBEDDED_MODEL_DIR / "moeguard_card.json").read_text())["specialization"]
    now = specialization_summary(routing_profile(model, tokenizer, embedded_tasks()))
    assert now["top_experts"] == card["top_experts"]
    assert all(abs(a - b) <= 0.002 for a, b in zip(now["per_layer"], card["per_layer"])), (now["per_layer"], card)
