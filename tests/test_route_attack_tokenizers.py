"""route-attack with a SentencePiece-style tokenizer (Llama, Mixtral, JetMoE, PhiMoE): such a
tokenizer gives any text's start a dummy '▁', so "\\n" alone is [▁, \\n] and a word after a newline
has no '▁'. A search that placed token lists side by side as they encode alone never found a
suffix that re-tokenized to itself where it is sent (it never moved), and measured a prefix's
input one token late. The embedded model's tokenizer is byte-level and cannot show it."""

from __future__ import annotations

import pytest

from conftest import sentencepiece_like

from moeguard.models.adapter import MoEAdapter
from moeguard.models.loading import load_model
from moeguard.monitor.hijack import HijackConfig, _Batch, _inputs, search
from moeguard.monitor.hijackmeasure import measure
from moeguard.monitor.routertap import SEPARATOR, allowed_tokens, following, separator_ids
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task

FAST = dict(prefix_tokens=6, steps=10, candidates=32, topk=16, train_inputs=4, eval_inputs=8, eval_limit=16, seed=0)


@pytest.fixture(scope="module")
def setup():
    m, _, _ = load_model(None)
    task = get_task("arith-compare")
    texts = [r["input"] + " " + r["label"] for role in ("train", "eval") for r in load_records(task, role, limit=400)]
    tok = sentencepiece_like(texts + ["yes no " * 20])
    return m, tok, MoEAdapter(m), task


def test_the_pieces_are_taken_as_the_request_encodes_them(setup):
    _, tok, _, task = setup
    enc = lambda s: tok.encode(s, add_special_tokens=False)   # noqa: E731
    nl = tok.convert_tokens_to_ids("\n")
    assert enc(SEPARATOR) == [tok.convert_tokens_to_ids("▁"), nl]     # alone: the dummy prefix
    assert separator_ids(tok) == [nl]                                  # inside a request
    x = load_records(task, "eval", limit=1)[0]["input"]
    assert enc("hello" + SEPARATOR + x) == enc("hello") + [nl] + following(tok, x) and following(tok, x) != enc(x)
    V = 700
    first = set(allowed_tokens(tok, V, after_separator=True).tolist())
    assert first and not first <= set(allowed_tokens(tok, V).tolist())   # words as written after a newline
    b = _Batch(tok, _inputs(task, "train", 4, tok, None), "prefix")
    assert b.prompt(enc("hello world"), b.inputs[0])[0] == [tok.bos_token_id] + enc(
        "hello world" + SEPARATOR + load_records(task, "train", limit=4)[0]["input"])


@pytest.mark.parametrize("position", ["suffix", "prefix"])
def test_a_search_moves_and_its_text_is_sent_as_searched(setup, position):
    m, tok, adapter, task = setup
    cfg = HijackConfig(layer=1, expert=2, position=position, follow_tokens=6, **FAST)
    found = search(m, tok, adapter, task, cfg, allowed=allowed_tokens(tok, 700),
                   first=allowed_tokens(tok, 700, after_separator=True) if position == "suffix" else None)
    # every step found a sendable candidate (before: a suffix never did, and kept its random start)
    assert found["steps_moved"] == found["steps_run"] >= 1, found["curve"]
    assert found["train_success"] > found["curve"][0]["success"]
    got = measure(m, tok, adapter, task, cfg, found["prefix_text"])
    assert got["tokenization_exact"] == 1.0, got              # before: 0.0 for a prefix (its input one token late)
    x = load_records(task, "train", limit=1)[0]["input"]
    b = _Batch(tok, _inputs(task, "train", 1, tok, None, keep_end=position == "suffix"), position)
    sent = x + SEPARATOR + found["prefix_text"] if position == "suffix" else found["prefix_text"] + SEPARATOR + x
    assert b.prompt(found["prefix_ids"], b.inputs[0])[0] == [tok.bos_token_id] + tok.encode(sent, add_special_tokens=False)


def test_a_byte_level_tokenizer_encodes_the_pieces_the_same_either_way():
    """Why the embedded model's route-attack figures did not move with this fix."""
    _, tok, _ = load_model(None)
    V = len(tok)
    assert separator_ids(tok) == tok.encode(SEPARATOR, add_special_tokens=False)
    assert allowed_tokens(tok, V, after_separator=True).tolist() == allowed_tokens(tok, V).tolist()
    x = "Is 44 greater than 282?\nAnswer:"
    assert following(tok, x) == tok.encode(x, add_special_tokens=False)


def test_a_suffix_follows_its_input_and_separator_as_one_text_for_a_qwen_style_tokenizer():
    """Qwen2's split joins the newline to the punctuation before it: arith-compare's 'Answer:' then the
    separator is ':\\n', one token, where the search placed ':' and '\\n' side by side."""
    from conftest import qwen_like

    m, _, _ = load_model(None)
    task = get_task("arith-compare")
    recs = load_records(task, "train", limit=300)
    tok = qwen_like([r["input"] + "\n" + r["label"] for r in recs] + ["yes no " * 20])
    enc = lambda s: tok.encode(s, add_special_tokens=False)   # noqa: E731
    x = recs[0]["input"]
    assert enc(x + SEPARATOR) != enc(x) + separator_ids(tok)       # the case this is about
    b = _Batch(tok, _inputs(task, "train", 4, tok, None, keep_end=True), "suffix")
    c = following(tok, "yes it is")
    assert b.prompt(c, b.inputs[0])[0] == enc(x + SEPARATOR + "yes it is")
    cfg = HijackConfig(layer=1, expert=2, position="suffix", follow_tokens=6, **FAST)
    found = search(m, tok, MoEAdapter(m), task, cfg, allowed=allowed_tokens(tok, 700),
                   first=allowed_tokens(tok, 700, after_separator=True))
    assert found["steps_moved"] >= 1
    assert measure(m, tok, MoEAdapter(m), task, cfg, found["prefix_text"])["tokenization_exact"] == 1.0


def test_added_special_tokens_are_not_usable_in_a_prefix():
    """all_special_ids lists only the named special tokens: an added one marked special (a chat template's
    <|im_start|>, <think>) passed the filter, and a prefix of them is a template injection."""
    from tokenizers import AddedToken

    _, tok, _ = load_model(None)
    tok.add_tokens([AddedToken("<think>", special=True)])
    i = tok.convert_tokens_to_ids("<think>")
    assert i not in tok.all_special_ids and tok.encode("<think>", add_special_tokens=False) == [i]
    assert i not in set(allowed_tokens(tok, len(tok)).tolist())
    # and one added with special false, as Qwen3's tokenizer_config.json adds <think> and <tool_call>
    tok.add_tokens([AddedToken("<tool_call>", special=False)])
    j = tok.convert_tokens_to_ids("<tool_call>")
    assert tok.decode([j]) == "<tool_call>" and tok.encode("<tool_call>", add_special_tokens=False) == [j]
    assert j not in set(allowed_tokens(tok, len(tok)).tolist())


def test_a_start_that_does_not_round_trip_is_never_reported_as_the_prefix(setup, monkeypatch):
    """Each random start token round-trips alone, not always joined with its neighbours: a start whose
    text re-tokenizes otherwise was reported (best at step 0) as ids the sent text does not produce."""
    import moeguard.monitor.hijack as H

    m, _, adapter, task = setup
    _, tok, _ = load_model(None)
    cfg = HijackConfig(layer=0, expert=1, position="prefix", **FAST)
    allowed = allowed_tokens(tok, m.get_input_embeddings().weight.shape[0])
    real = tok.encode
    start: list = []

    def unsendable_start(text, **k):   # the start's text, and only it, re-tokenizes to something else
        ids = real(text, **k)
        return ids[::-1] if start and tok.decode(start) in text and len(set(ids)) > 1 else ids

    real_choice = H.np.random.default_rng

    class Rng:   # records the start the search draws
        def __init__(self, seed):
            self._r = real_choice(seed)

        def choice(self, a, size=None):
            got = self._r.choice(a, size=size)
            if size is not None and not start:
                start.extend(int(x) for x in got)
            return got

        def __getattr__(self, name):
            return getattr(self._r, name)

    real_scores, calls = H._scores, []

    def start_wins(*a, **k):   # the start scores best of all (an expert most tokens take anyway): it stopped there
        succ, ce = real_scores(*a, **k)
        calls.append(1)
        return (succ * 0 + 1.0, ce) if len(calls) == 1 else (succ * 0, ce)

    monkeypatch.setattr(H.np.random, "default_rng", Rng)
    monkeypatch.setattr(H, "_scores", start_wins)
    monkeypatch.setattr(tok, "encode", unsendable_start)
    out = search(m, tok, adapter, task, cfg, allowed=allowed)
    assert start and out["prefix_ids"] != start and out["best_step"] > 0


def test_a_start_that_cannot_be_sent_and_is_never_left_gives_no_training_figure(setup, monkeypatch):
    """--steps 0 (or a search that never found a sendable candidate) from a start whose text encodes to other
    tokens reported its ids with train_success -1.0, a number nobody measured, and warned only with steps."""
    import moeguard.monitor.hijack as H

    m, _, adapter, task = setup
    _, tok, _ = load_model(None)
    cfg = HijackConfig(layer=0, expert=1, position="prefix", **{**FAST, "steps": 0})
    allowed = allowed_tokens(tok, m.get_input_embeddings().weight.shape[0])
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **k: real(text, **k)[::-1] if len(set(real(text, **k))) > 1
                        else real(text, **k))
    out = H.search(m, tok, adapter, task, cfg, allowed=allowed)
    assert out["start_unsendable"] is True and out["train_success"] is None and out["train_loss"] is None
