"""Task kinds as a registry: built-ins, errors, the TaskKind name type, and a kind added in a test
used end to end (task file, records, evaluation, training examples, active learning)."""

from __future__ import annotations

import copy
import json
import math
import pickle
import random
import subprocess
import sys
from collections import Counter

import pytest

from moeguard.errors import MoeguardError
from moeguard.tasks import tokens as T
from moeguard.tasks.base import SourceSpec, Task, TaskKind
from moeguard.tasks.kinds import IGNORE, KINDS, Example, TaskKindSpec, get_kind, kind_names, register_kind
from moeguard.tasks.loaders import cell_text, load_records
from moeguard.tasks.registry import get_task, load_task_file

BUILTIN = ["classification", "language_modeling", "summarization"]


# ------------------------------------------------------------------ built-ins and errors

def test_builtin_kinds_are_registered_with_what_they_own():
    assert kind_names() == BUILTIN
    lm, cls, summ = (get_kind(n) for n in ("language_modeling", "classification", "summarization"))
    assert (lm.required_fields, lm.primary_metric, lm.baseline) == (("text",), "perplexity", "unigram")
    assert (cls.required_fields, cls.primary_metric, cls.baseline) == (("input", "label"), "accuracy", "majority_class")
    assert (summ.required_fields, summ.primary_metric, summ.baseline) == (("input", "target"), "rougeL", "lead_k")
    assert lm.metrics == ("loss", "perplexity", "normalized_perplexity")
    assert cls.metrics == ("accuracy", "macro_f1") and summ.metrics == ("rouge1", "rouge2", "rougeL")
    assert [k.takes_reference for k in (lm, cls, summ)] == [True, False, False]
    assert [k.generates for k in (lm, cls, summ)] == [False, False, True]
    assert [k.unlabeled_fields for k in (lm, cls, summ)] == [("text",), ("input",), ("input",)]


def test_unknown_kind_suggests_the_registered_names():
    with pytest.raises(MoeguardError) as err:
        get_kind("clasification")
    assert err.value.message == "unknown task kind 'clasification'"
    assert err.value.hint.startswith("did you mean classification")
    assert "Known: classification, language_modeling, summarization" in err.value.hint
    with pytest.raises(MoeguardError, match="unknown task kind 'translation'"):
        Task(name="t", kind="translation", fields={}, source=SourceSpec(type="local", path="."))


def test_task_file_with_an_unknown_kind_names_the_file_and_suggests(tmp_path):
    file = tmp_path / "t.yaml"
    file.write_text("name: t\nkind: summarisation\nsource: {type: local, path: .}\nfields: {input: a, target: b}\n")
    with pytest.raises(MoeguardError) as err:
        load_task_file(file)
    assert err.value.message == f"task definition '{file}' has kind 'summarisation'"
    assert err.value.hint.startswith("did you mean summarization")
    file.write_text("name: t\nkind: [1, 2]\nsource: {type: local, path: .}\nfields: {text: a}\n")
    with pytest.raises(MoeguardError, match=r"has kind '\[1, 2\]'"):
        load_task_file(file)


def test_a_kind_name_cannot_be_registered_twice():
    class Impostor(type(get_kind("classification"))):
        pass

    with pytest.raises(MoeguardError, match="task kind 'classification' is already registered"):
        register_kind(Impostor())
    with pytest.raises(MoeguardError, match="not a named TaskKindSpec"):
        register_kind("classification")


def test_kind_checks_move_with_the_kind():
    with pytest.raises(MoeguardError, match="classification task 'c' defines 1 label verbalizers"):
        Task(name="c", kind="classification", fields={"input": "x", "label": "y"}, labels={0: " a"},
             source=SourceSpec(type="local", path="."))
    with pytest.raises(MoeguardError) as err:
        Task(name="s", kind="summarization", fields={"input": "x"}, source=SourceSpec(type="local", path="."))
    assert err.value.message == "task 's' (summarization) has no field mapping for ['target']"
    assert err.value.hint == "add them under 'fields:'; a summarization task needs ['input', 'target']"


# ------------------------------------------------------------------ TaskKind: the name Task.kind holds

def test_task_kind_is_the_name_with_enum_style_access():
    task = Task(name="c", kind="classification", fields={"input": "x", "label": "y"},
                labels={0: " a", 1: " b"}, source=SourceSpec(type="local", path="."))
    assert task.kind is TaskKind.CLASSIFICATION is TaskKind("classification")
    assert task.kind == "classification" and task.kind.value == "classification" and type(task.kind.value) is str
    assert f"a {task.kind} task" == "a classification task" and repr(task.kind) == "TaskKind('classification')"
    assert task.kind.spec is task.kind_spec is get_kind("classification")
    assert [k.value for k in TaskKind] == BUILTIN
    with pytest.raises(AttributeError):
        TaskKind.TRANSLATION  # noqa: B018
    # JSON writes the name; pickling and copying keep one object per kind (tasks go to workers)
    assert json.dumps({"kind": task.kind}) == '{"kind": "classification"}'
    assert pickle.loads(pickle.dumps(task)).kind is task.kind
    assert copy.deepcopy(task).kind is task.kind and pickle.loads(pickle.dumps(task.kind_spec)) is task.kind_spec


def test_reading_task_definitions_does_not_import_torch():
    code = ("import sys\nfrom moeguard.tasks import list_tasks, get_task\n"
            "assert len(list_tasks()) > 5 and get_task('xsum').kind_spec.name == 'summarization'\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ a kind added in a test, end to end

class NextToken(TaskKindSpec):
    """Top-1 accuracy of next-token prediction over a text's first window."""

    name = "next_token"
    required_fields = ("text",)
    metrics = ("top1",)
    primary_metric = "top1"
    baseline = "most_frequent_token"
    prompted = False
    record_needs = "text"
    unlabeled_fields = ("text",)

    def record(self, task, row, split, where):
        text = cell_text(row[task.fields["text"]]).strip()
        return {"text": text} if text else None

    def input_ids(self, tokenizer, task, record):
        return (T.bos_ids(tokenizer) + T.encode(tokenizer, record["text"]))[:task.max_length]

    def examples(self, tokenizer, task, record):
        ids = self.input_ids(tokenizer, task, record)
        return [Example(ids, [IGNORE] + ids[1:])]

    def training_text(self, task, record):
        return record["text"]

    def evaluate(self, model, tokenizer, task, records, train, batch_size, reference, ticker):
        seqs = [self.input_ids(tokenizer, task, r) for r in records]
        ticker.start(math.ceil(len(seqs) / batch_size))
        hits = total = 0
        for begin in range(0, len(seqs), batch_size):
            ids, mask = T.pad_batch(seqs[begin:begin + batch_size], T.pad_id(tokenizer), left=False,
                                    device=T.model_device(model))
            pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
            keep = mask[:, 1:].bool()
            hits += int((pred == ids[:, 1:])[keep].sum())
            total += int(keep.sum())
            ticker.advance()
        base = None
        if train is not None:
            top = Counter(t for r in train for t in T.encode(tokenizer, r["text"])).most_common(1)[0][0]
            targets = [t for s in seqs for t in s[1:]]
            base = {"name": self.baseline, "description": f"always token {top}",
                    "metrics": {"top1": 100 * sum(t == top for t in targets) / len(targets)}}
        return {"top1": 100 * hits / total}, total, base


TEXTS = ["def add(a, b):\n    return a + b", "Return the number of items in a container.", "",
         "class Point:\n    x: int\n    y: int", "Open file and return a stream."]


@pytest.fixture
def next_token(tmp_path):
    spec = register_kind(NextToken())
    for split, rows in (("train", TEXTS), ("test", TEXTS[1:] + TEXTS[:1])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in rows))
    (tmp_path / "nt.yaml").write_text(
        "name: nt-mini\nkind: next_token\nsource: {type: local, path: ., format: jsonl, "
        "files: {train: train.jsonl, test: test.jsonl}}\nsplits: {train: train, eval: test}\n"
        "fields: {text: body}\nmax_length: 16\n")
    yield spec, tmp_path / "nt.yaml"
    KINDS.remove("next_token")


@pytest.fixture(scope="module")
def embedded():
    from moeguard.models.loading import load_model

    model, tok, _ = load_model(None)
    return model, tok


def test_a_kind_registered_in_a_test_works_end_to_end(next_token, embedded):
    import torch

    from moeguard.realign.features import sequence_uncertainty, unlabeled
    from moeguard.realign.strategies.base import Query, get_strategy
    from moeguard.tasks.batches import task_sequences
    from moeguard.tasks.evaluate import evaluate_task
    from moeguard.zoo.recipe import training_text

    spec, file = next_token
    model, tok = embedded
    task = get_task(str(file))
    assert task.kind is TaskKind.NEXT_TOKEN and task.kind_spec is spec and "next_token" in [k.value for k in TaskKind]
    assert task.primary_metric == "top1"
    records = load_records(task, "eval")
    assert records == [{"text": t} for t in TEXTS[1:] + TEXTS[:1] if t]  # the kind's record(): blank rows go

    result = evaluate_task(model, tok, task, batch_size=3)
    hits = total = 0
    with torch.no_grad():  # unbatched, by hand
        for rec in records:
            ids = torch.tensor([spec.input_ids(tok, task, rec)])
            hits += int((model(input_ids=ids).logits[0, :-1].argmax(-1) == ids[0, 1:]).sum())
            total += ids.shape[1] - 1
    assert result.kind == "next_token" and result.metric == "top1" and result.n_tokens == total
    assert result.score == pytest.approx(100 * hits / total) and 0 < result.score < 100
    assert result.baseline["name"] == "most_frequent_token" and result.baseline["score"] is not None
    with pytest.raises(MoeguardError, match="a reference perplexity was given for next_token task 'nt-mini'"):
        evaluate_task(model, tok, task, reference=10.0)

    seqs = task_sequences(tok, task, records)
    assert [s.ids for s in seqs] == [spec.input_ids(tok, task, r) for r in records]
    assert all(s.labels[0] == IGNORE and s.labels[1:] == s.ids[1:] for s in seqs)
    assert training_text(task, records[0]) == records[0]["text"]

    pool = unlabeled(task, records)
    nll, ent = sequence_uncertainty(model, tok, task, pool, batch_size=2)
    assert nll.shape == ent.shape == (len(pool),) and (nll > 0).all()
    assert TaskKind.NEXT_TOKEN in get_strategy("random").kinds  # strategies for every kind include new ones
    with pytest.raises(MoeguardError, match="strategy 'nll' applies to language_modeling, summarization tasks; "
                                            "'nt-mini' is next_token"):
        get_strategy("nll", task)
    q = Query(model=model, tokenizer=tok, task=task, pool=pool, candidates=[1, 2, 3], labeled=[0], k=2,
              rng=random.Random(0), batch_size=2)
    assert torch.allclose(q.uncertainty(), nll[[1, 2, 3]], atol=1e-4)  # the default: mean token NLL
    picked = get_strategy("entropy", task).select(q)
    assert len(picked) == 2 and set(picked) <= {1, 2, 3}


def test_a_removed_kind_is_unknown_again(next_token):
    _, file = next_token
    assert get_task(str(file)).kind == "next_token"
    KINDS.remove("next_token")
    with pytest.raises(MoeguardError, match="unknown task kind 'next_token'"):
        TaskKind("next_token")
    register_kind(NextToken())  # the fixture removes it again


def test_a_model_with_nan_scores_is_wrong_and_said_not_scored_as_its_first_label():
    """NaN log-likelihoods made max() pick the first label (chance-looking accuracy) and a NaN loss
    read as an overflowing perplexity (inf)."""
    import copy
    import math

    import torch

    from moeguard.models.loading import load_model
    from moeguard.tasks.evaluate import evaluate_task
    from moeguard.tasks.metrics import macro_f1

    m, tok, _ = load_model(None)
    broken = copy.deepcopy(m)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    with pytest.warns(UserWarning, match=r"not finite on 16 of 16 records"):
        r = evaluate_task(broken, tok, "arith-compare", limit=16, baseline=False)
    assert r.metrics["accuracy"] == 0.0 and r.metrics["macro_f1"] == 0.0
    with pytest.warns(UserWarning, match="perplexity is NaN"):
        lm = evaluate_task(broken, tok, "stdlib-docs", limit=4, baseline=False)
    assert math.isnan(lm.metrics["perplexity"])
    assert macro_f1([None, "a"], ["a", "a"]) == pytest.approx(100 * 2 / 3)   # None is no class of its own


def test_a_kind_declares_which_of_its_metrics_are_lower_is_better():
    """The direction was a fixed list of names: a kind scoring an error rate read as higher-is-better,
    which inverts retention and the risk levels."""

    class Misses(NextToken):
        name = "next_token_misses"
        metrics = ("misses", "top1")
        primary_metric = "misses"
        lower_is_better = ("misses",)

    register_kind(Misses())
    try:
        src = SourceSpec(type="local", path=".", format="jsonl")
        task = Task(name="m", kind="next_token_misses", fields={"text": "t"}, source=src)
        assert task.higher_is_better is False
        assert Task(name="m", kind="next_token_misses", fields={"text": "t"}, source=src, metric="top1").higher_is_better
    finally:
        KINDS.remove("next_token_misses")
    lm = Task(name="w", kind="language_modeling", fields={"text": "t"}, source=SourceSpec(type="local", path="."))
    assert lm.higher_is_better is False


def test_a_multi_line_reference_is_one_line_as_the_generations_it_is_compared_with():
    """CNN/DailyMail's highlights are 3-4 sentences, one per line; a generation is cut at its first newline.
    Trained on the lines, a model was scored on its first only (and Lead-k, uncut, against it)."""
    from moeguard.tasks.registry import get_task

    task = get_task("cnn-dailymail")
    kind = get_kind(task.kind)
    rec = kind.record(task, {"article": "Text of the article.", "highlights": "First point .\nSecond point .\n Third ."},
                      "test", "row 1")
    assert rec["target"] == rec["references"][0] == "First point . Second point . Third ."
    one = kind.record(task, {"article": "A.", "highlights": " as is "}, "test", "row 2")
    assert one["target"] == " as is "   # a one-line reference is kept as it was


def test_an_empty_input_without_bos_trains_on_what_evaluation_scores():
    """A tokenizer without BOS (Qwen's) and an empty input: evaluation scores the verbalizer (or
    generates) from the pad token; the training example had an empty context, so its one target sat
    at position 0, which no loss predicts (a labelled record trained nothing, and a batch of them
    stopped attribution with torch.cat of nothing)."""
    import torch
    from conftest import qwen_like

    from moeguard.attribution.replay import target_nll

    tok = qwen_like(["Is 3 greater than 2? yes no", "a summary of the record"] * 20)
    pad = T.pad_id(tok)
    cls, summ = get_task("arith-compare"), get_task("record-summary")
    label = next(iter(cls.labels))
    for task, rec in ((cls, {"input": "", "label": label}),
                      (summ, {"input": "", "target": "a summary", "source_text": ""})):
        spec = get_kind(task.kind)
        [ex] = spec.examples(tok, task, rec)
        assert ex.ids[0] == pad and ex.labels[0] == IGNORE and all(t != IGNORE for t in ex.labels[1:])
        assert len(ex.labels) >= 2   # a target after position 0: one a loss predicts
        assert spec.input_ids(tok, task, rec) == [pad]

    class Head:   # the adapter's head and vocabulary: all target_nll reads
        vocab_size = 5

        def head(self, h):
            return h @ torch.ones(h.shape[-1], 5)

    hidden = torch.randn(3, 4, 2, requires_grad=True)
    nll = target_nll(Head(), hidden, torch.full((3, 4), IGNORE))   # a batch with no target
    assert nll.tolist() == [0.0, 0.0, 0.0] and nll.requires_grad
    nll.sum().backward()   # gradient attribution backpropagates every batch's sum


def test_the_routing_profile_reads_the_text_field_the_kind_names(monkeypatch):
    """zoo train's profile read r.get('text') or r['input']: a kind of other fields was a KeyError
    traceback after its tokenizer had trained."""
    import moeguard.tasks.loaders as loaders
    from moeguard.models.loading import load_model
    from moeguard.models.specialization import routing_profile

    model, tok, _ = load_model(None)
    task = get_task("arith-compare")
    real = loaders.load_records
    monkeypatch.setattr(loaders, "load_records", lambda t, split, limit=None: [{"question": "Is 3 > 2?", "label": "yes"}])
    with pytest.raises(MoeguardError) as e:
        routing_profile(model, tok, [task])
    assert e.value.message == ("task 'arith-compare': its classification records have no text field 'input' for the "
                               "routing profile")
    monkeypatch.setattr(loaders, "load_records", real)
    lm = get_task("stdlib-docs")
    profile = routing_profile(model, tok, [task, lm], limit=8)   # the built-ins as before: input, text
    assert set(profile) == {"arith-compare", "stdlib-docs"} and profile["stdlib-docs"].shape[1] == 8
