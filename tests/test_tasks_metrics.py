"""Metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from moeguard.tasks import metrics as M


def test_perplexity_of_a_uniform_distribution_is_the_vocab_size():
    vocab, n = 50, 37
    assert M.perplexity(n * math.log(vocab), n) == pytest.approx(vocab)
    assert M.mean_nll(n * math.log(vocab), n) == pytest.approx(math.log(vocab))


def test_perplexity_overflow_and_empty():
    assert M.perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="at least one predicted token"):
        M.perplexity(1.0, 0)


def test_normalized_perplexity_is_percent_of_reference():
    assert M.normalized_perplexity(15.0, 10.0) == pytest.approx(150.0)
    assert M.normalized_perplexity(10.0, 10.0) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="must be positive, got 0.0"):
        M.normalized_perplexity(10.0, 0.0)


def test_unigram_add_one_by_hand():
    # counts {0: 2, 1: 1}, N=3, V=3: p(0)=3/6, p(1)=2/6, p(2)=1/6
    nll = M.unigram_nll([0, 0, 1], [0, 1, 2], vocab_size=3)
    assert nll == pytest.approx(-(math.log(3 / 6) + math.log(2 / 6) + math.log(1 / 6)))
    # With no training data the unigram is uniform: perplexity = V
    assert M.perplexity(M.unigram_nll([], [4, 4, 1], vocab_size=7), 3) == pytest.approx(7)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        M.unigram_nll([9], [0], vocab_size=3)


def test_accuracy_and_macro_f1_on_a_small_confusion():
    golds = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    # a: tp2 fp0 fn1 -> 4/5; b: tp1 fp1 fn1 -> 1/2; c: tp1 fp1 fn0 -> 2/3
    assert M.accuracy(preds, golds) == pytest.approx(100 * 4 / 6)
    assert M.macro_f1(preds, golds) == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_counts_a_never_predicted_class_as_zero():
    assert M.macro_f1(["a"] * 4, ["a", "a", "b", "b"]) == pytest.approx(100 * (2 / 3 + 0) / 2)
    # An explicit label list adds classes absent from both sides, at F1 0.
    assert M.macro_f1(["a", "b"], ["a", "b"], labels=["a", "b", "c"]) == pytest.approx(200 / 3)


def test_metric_inputs_must_line_up():
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        M.accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no predictions to score"):
        M.macro_f1([], [])


def test_rouge_on_a_known_pair():
    # ref "the cat sat on the mat" (6 tokens), pred "the cat sat" (3 tokens):
    # R1: 3 overlaps, P=1, R=1/2 -> F=2/3. R2: bigrams 2/2 and 2/5 -> F=4/7. LCS=3 -> 2/3.
    scores = M.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(100 * 2 / 3)
    assert scores["rouge2"] == pytest.approx(100 * 4 / 7)
    assert scores["rougeL"] == pytest.approx(100 * 2 / 3)


def test_rouge_takes_the_best_reference_and_averages_examples():
    scores = M.rouge(["dogs bark", "zebra"], [["cats meow", "dogs bark"], "horse"])
    assert scores == {"rouge1": pytest.approx(50.0), "rouge2": pytest.approx(50.0), "rougeL": pytest.approx(50.0)}


def test_rouge_uses_stemming():
    assert M.rouge(["running dogs"], ["run dog"])["rouge1"] == pytest.approx(100.0)


def test_lead_k_pieces():
    assert M.lead_words("  one two\nthree four ", 3) == "one two three"
    assert M.median_words(["a b", "a b c d", "a"]) == 2
    assert M.median_words([""]) == 1
    assert M.majority_label(["1", "0", "0", "1"]) == "1"  # tie: first seen
    assert M.majority_label(["1", "0", "0"]) == "0"
