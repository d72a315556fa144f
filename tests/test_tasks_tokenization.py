"""A label or target is scored and trained on the tokens it has after its prompt. A SentencePiece
tokenizer (Llama, Mixtral, JetMoE, PhiMoE) gives any text's start a dummy '▁': " yes" encoded alone
is [▁, ▁yes] (or ▁▁yes), which never follows "Answer:" in real text. Verbalizers and summary targets
were encoded alone; the embedded model's byte-level tokenizer encodes them the same either way."""

from __future__ import annotations

import pytest
import torch

from conftest import sentencepiece_like

from moeguard.models.loading import load_model
from moeguard.tasks import tokens as T
from moeguard.tasks.evaluate import loglikelihoods
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task


@pytest.fixture(scope="module")
def sp():
    texts = []
    for name in ("arith-compare", "record-summary"):
        task = get_task(name)
        for r in load_records(task, "train", limit=300):
            texts.append(r["input"] + " " + str(r.get("label", r.get("target", ""))))
    return sentencepiece_like(texts + ["yes no " * 20])


def test_a_continuation_takes_the_tokens_it_has_after_its_context(sp):
    enc = lambda s: sp.encode(s, add_special_tokens=False)   # noqa: E731
    ctx = "Is 5 greater than 3?\nAnswer:"
    assert enc(" yes")[0] == sp.convert_tokens_to_ids("▁")       # alone: the dummy prefix, then the word
    assert T.continuation(sp, ctx, " yes") == enc(ctx + " yes")[len(enc(ctx)):] != enc(" yes")
    _, byte_level, _ = load_model(None)
    for c, t in ((ctx, " yes"), ("Name:", " parse_header"), ("x", "y")):   # the same either way
        assert T.continuation(byte_level, c, t) == byte_level.encode(t, add_special_tokens=False)


def test_classification_and_summarization_train_on_what_follows_the_prompt(sp):
    enc = lambda s: sp.encode(s, add_special_tokens=False)   # noqa: E731
    cls = get_task("arith-compare")
    rec = load_records(cls, "train", limit=1)[0]
    (ex,) = cls.kind_spec.examples(sp, cls, rec)
    verbalizer = {str(k): v for k, v in cls.labels.items()}[str(rec["label"])]
    assert ex.ids == [sp.bos_token_id] + enc(rec["input"].rstrip() + verbalizer)     # one string, as sent
    assert [t for t in ex.labels if t != -100] == T.continuation(sp, rec["input"].rstrip(), verbalizer)
    summ = get_task("record-summary")
    rec = load_records(summ, "train", limit=1)[0]
    (ex,) = summ.kind_spec.examples(sp, summ, rec)
    target = [t for t in ex.labels if t != -100][:-1]      # before EOS
    assert target == enc(rec["input"] + " " + rec["target"])[len(enc(rec["input"])):][:len(target)]


def test_a_label_is_scored_on_the_tokens_the_model_sees_after_the_prompt(sp):
    m, _, _ = load_model(None)     # the embedded weights read the toy tokenizer's ids: any model scores them
    ctx, cont = "Is 5 greater than 3?\nAnswer:", " yes"
    (got,) = loglikelihoods(m, sp, [(ctx, cont)], max_length=256)
    ids = [sp.bos_token_id] + sp.encode(ctx + cont, add_special_tokens=False)
    n = len(ids) - 1 - len(sp.encode(ctx, add_special_tokens=False))   # the tail after the prompt, as sent
    with torch.no_grad():
        logp = torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    want = sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids)))
    assert got == pytest.approx(want, abs=1e-4)


def test_a_logged_reply_is_replayed_as_the_tokens_it_had_after_its_prompt(sp, monkeypatch):
    """monitor score and log profiles re-encoded a logged reply alone: a SentencePiece tokenizer gave it
    a lone '▁' (a reply starting with a newline) the model never generated, unlike the online monitor."""
    from moeguard.monitor import replies

    seen = {}
    monkeypatch.setattr(replies, "generate", lambda model, tokenizer, prompts, n: [[] for _ in prompts])
    monkeypatch.setattr(replies, "observe", lambda model, tokenizer, prompts, toks, **kw: seen.setdefault("toks", toks))
    prompt = "Is 5 greater than 3?\nAnswer:"
    generated = sp.encode(prompt + "\nyes it is", add_special_tokens=False)[len(sp.encode(prompt, add_special_tokens=False)):]
    logged = sp.decode(generated)                                   # what serve returns and a log keeps
    assert logged == "\nyes it is" and sp.encode(logged, add_special_tokens=False) != generated
    replies.routing(None, sp, [prompt], [logged], adapter=None, table=None, max_tokens=16)
    assert seen["toks"] == [generated]
