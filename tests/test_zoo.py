"""The embedded model's recipe: packing, mixing, tokenizer, specialization, determinism."""

import hashlib

import pytest
import torch

from moeguard.models.specialization import task_expert_mutual_information
from moeguard.zoo.recipe import Recipe, mixture_order, pack_blocks, train_tokenizer


def test_pack_blocks_starts_every_block_at_an_example():
    examples = [[1] * 5, [2] * 4, [3] * 7, [4] * 20]
    blocks = pack_blocks(examples, context=10, eos_id=0)
    # each example carries its EOS; one that does not fit opens a new block; one longer than a
    # block gives all its tokens, in windows that overlap by one token
    assert blocks == [[1] * 5 + [0], [2] * 4 + [0], [3] * 7 + [0], [4] * 10, [4] * 10, [4] * 2 + [0]]
    assert pack_blocks([[1] * 3, [2] * 3], context=10, eos_id=0) == [[1, 1, 1, 0, 2, 2, 2, 0]]


def test_mixture_weights_tasks_equally_and_is_seeded():
    order = mixture_order({"a": 3, "b": 50}, steps=10, batch_size=4, seed=0)
    names = [n for n, _ in order]
    assert names.count("a") == names.count("b") == 20
    assert all(0 <= i < 3 for n, i in order if n == "a")
    assert order == mixture_order({"a": 3, "b": 50}, steps=10, batch_size=4, seed=0)
    assert order != mixture_order({"a": 3, "b": 50}, steps=10, batch_size=4, seed=1)


def test_tokenizer_training_is_deterministic_and_round_trips():
    texts = [f"def f{i}(x):\n    return x + {i}  # café" for i in range(200)]
    a, b = train_tokenizer(texts, vocab_size=400), train_tokenizer(texts, vocab_size=400)
    assert a.get_vocab() == b.get_vocab()
    assert a.decode(a("def g(y): return 'é'")["input_ids"]) == "def g(y): return 'é'"


def test_specialization_statistic_bounds():
    same = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    assert task_expert_mutual_information({"a": same, "b": same}) == [0.0]
    disjoint = {"a": torch.tensor([[0.5, 0.5, 0.0, 0.0]]), "b": torch.tensor([[0.0, 0.0, 0.5, 0.5]])}
    assert task_expert_mutual_information(disjoint) == [pytest.approx(1.0)]


def test_recipe_is_deterministic_end_to_end(tmp_path, monkeypatch):
    """Two trainings with one seed give byte-identical weights (a tiny, short recipe)."""
    from moeguard.zoo.train import train_embedded

    small = Recipe(steps=3, hidden_size=32, intermediate_size=32, num_layers=2, batch_size=4, context=64,
                   vocab_size=600)
    digests = []
    import os

    torch.set_num_threads(1)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    for name in ("a", "b"):
        card = train_embedded(tmp_path / name, recipe=small)
        # the process's settings put back (a benchmark that trained first measured with the recipe's)
        assert torch.get_num_threads() == 1 and os.environ["TOKENIZERS_PARALLELISM"] == "true"
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
        assert (tmp_path / name / "tokenizer.json").exists() and (tmp_path / name / "README.md").exists()
        assert len(card["specialization"]["per_layer"]) == 2
    assert digests[0] == digests[1]


def test_zoo_recipe_trains_on_named_tasks(tmp_path):
    """`zoo train --tasks`: the same recipe on other tasks (here a local-file task), with its own card."""
    import json

    from moeguard.zoo.train import train_embedded

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"review {i}: {'good' if i % 2 else 'bad'} film", "label": i % 2} for i in range(60)]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "toy.yaml").write_text(
        f"name: toy-sentiment\nkind: classification\nsource: {{type: local, path: {data}, format: jsonl, "
        "files: {train: train.jsonl, test: test.jsonl}}\nsplits: {train: train, eval: test}\n"
        "fields: {input: text, label: label}\nprompt: \"{text}\\nSentiment:\"\nlabels: {0: ' bad', 1: ' good'}\n")
    small = Recipe(steps=2, hidden_size=32, intermediate_size=32, num_layers=2, batch_size=4, context=64, vocab_size=400)
    card = train_embedded(tmp_path / "m", recipe=small, tasks=[str(tmp_path / "toy.yaml")])
    assert card["name"] == "moeguard-zoo-mixtral" and list(card["tasks"]) == ["toy-sentiment"]
    assert "toy-sentiment" in (tmp_path / "m" / "README.md").read_text()


def test_an_interrupted_training_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """The state is saved every ``save_every`` steps; a run stopped after its second save continues
    from step 4 and ends byte-identical (weights, loss curve) to one that never stopped."""
    import json

    from moeguard import trainstate
    from moeguard.zoo import train as T

    small = Recipe(steps=6, hidden_size=32, intermediate_size=32, num_layers=2, batch_size=4, context=64,
                   vocab_size=600)
    whole = T.train_embedded(tmp_path / "whole", recipe=small)
    state, real, saved = tmp_path / ".cut.zoo-state", trainstate.save, []

    def save_then_stop(path, **kw):
        real(path, **kw)
        saved.append(kw["step"])
        if kw["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainstate, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        T.train_embedded(tmp_path / "cut", recipe=small, checkpoint=state, save_every=2)
    assert saved == [2, 4] and not (tmp_path / "cut").exists()
    saved.clear()
    cut = T.train_embedded(tmp_path / "cut", recipe=small, checkpoint=state, save_every=2)
    assert cut["resumed_from"] == 4 and saved == []          # steps 5 and 6 only; no save at the end
    assert cut["loss_curve"] == whole["loss_curve"] and "resumed_from" not in whole

    def weights(name):
        return hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest()

    assert weights("cut") == weights("whole")
    card = json.loads((tmp_path / "cut" / "moeguard_card.json").read_text())
    assert card["settings"]["tasks"] == [t.name for t in T.embedded_tasks()] and card["settings"]["training_texts"]
    # a state of another run (another seed) is not resumed from
    other = T.train_embedded(tmp_path / "other", recipe=Recipe(**{**small.to_dict(), "seed": 1}), checkpoint=state)
    assert "resumed_from" not in other
