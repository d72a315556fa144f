"""Task metrics, kept free of torch so they can be checked by hand.

Scale: bounded metrics (accuracy, macro-F1, ROUGE) are **percentages in [0, 100]**, as in
the pruning study's tables; ``loss`` is mean NLL in nats per token; perplexity is
``exp(loss)``; ``normalized_perplexity`` is ``100 * ppl / reference_ppl``, so 100 means
"as good as the reference model" and larger is worse.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def mean_nll(nll_sum: float, n_tokens: int) -> float:
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    return nll_sum / n_tokens


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """``exp(summed NLL / tokens)``; ``inf`` instead of an overflow for hopeless models."""
    loss = mean_nll(nll_sum, n_tokens)
    if math.isnan(loss):   # a broken model, not a merely hopeless one (inf): said, not hidden as overflow
        import warnings

        warnings.warn("the model's token losses are NaN (broken weights or an overflowing dtype): perplexity is NaN",
                      stacklevel=2)
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf


def normalized_perplexity(ppl: float, reference_ppl: float) -> float:
    """The study's definition: ``100 * ppl / reference_ppl`` (100 = unchanged model)."""
    if not reference_ppl > 0:
        raise ValueError(f"reference perplexity must be positive, got {reference_ppl}")
    return 100.0 * ppl / reference_ppl


def unigram_nll(train_tokens: Iterable[int], eval_tokens: Sequence[int], vocab_size: int) -> float:
    """Summed NLL of ``eval_tokens`` under an add-one-smoothed unigram fit on ``train_tokens``.

    ``p(t) = (count(t) + 1) / (N + V)``: every id in ``range(vocab_size)`` gets mass, so
    tokens unseen in training stay finite.
    """
    counts = Counter(train_tokens)
    total = sum(counts.values()) + vocab_size
    unseen = [t for t in counts if not 0 <= t < vocab_size]
    if unseen:
        raise ValueError(f"token ids {unseen[:5]} are outside the vocabulary of size {vocab_size}")
    return -sum(math.log((counts.get(t, 0) + 1) / total) for t in eval_tokens)


def accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Percentage of exact matches."""
    _same_length(predictions, golds)
    return 100.0 * sum(p == g for p, g in zip(predictions, golds)) / len(golds)


def macro_f1(predictions: Sequence[str], golds: Sequence[str],
             labels: Sequence[str] | None = None) -> float:
    """Unweighted mean of per-class F1, as a percentage.

    Classes default to those seen in ``golds`` or ``predictions`` (sklearn's default); a
    class with no true, predicted or gold instance has F1 0 rather than being undefined.
    """
    _same_length(predictions, golds)
    # a None prediction (no finite score) is wrong for its gold class and is no class of its own
    classes = list(labels) if labels is not None else sorted(set(golds) | (set(predictions) - {None}))
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(predictions, golds))
        fp = sum(p == c and g != c for p, g in zip(predictions, golds))
        fn = sum(p != c and g == c for p, g in zip(predictions, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return 100.0 * sum(scores) / len(scores)


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=_unicode_words())


# Han, kana and Hangul: written without spaces, each character is a token (the usual practice for
# Chinese and Japanese ROUGE)
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")


def _split_words(text: str) -> list[str]:
    """Words of Unicode letters, digits and combining marks, in NFC: a mark is part of its word
    (Hindi's vowel signs and virama, an NFD 'résumé'), where splitting on ``[\\W_]+`` cut
    'हिन्दी' to 'ह न द' and NFD 'résumé' to 're sume'. On ASCII text, the same words."""
    import unicodedata

    text = unicodedata.normalize("NFC", text)
    return "".join(c if c.isalnum() or unicodedata.category(c)[0] == "M" else " " for c in text).split()


@lru_cache(maxsize=1)
def _unicode_words():
    """rouge-score's tokenizer (lower case, split on what is not a letter or digit, Porter stems of
    words over 3 characters) with Unicode letters and digits for its ASCII ones: its own keeps
    ``[a-z0-9]`` only, so Russian or Greek text had no tokens (ROUGE 0 for every model) and accented
    words were cut ('résumé' into 'r', 'sum'). On ASCII text the tokens are the same."""
    from rouge_score import tokenizers

    class UnicodeWords(tokenizers.DefaultTokenizer):
        def tokenize(self, text):
            import unicodedata

            # NFC first: an NFD kana's voicing mark (U+3099) is in the CJK range and was split off its kana
            words = _split_words(_CJK.sub(r" \1 ", unicodedata.normalize("NFC", text).lower()))
            stem = self._stemmer
            return [stem.stem(w) if stem is not None and len(w) > 3 else w for w in words]

    return UnicodeWords(use_stemmer=True)


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (percentages); with several references, the best per example.

    ``rougeL`` is sentence-level LCS (not ``rougeLsum``): generations are cut at the first
    newline, so they are single sentences.
    """
    _same_length(predictions, references)
    scorer = _scorer()
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError("every prediction needs at least one reference")
        scores = [scorer.score(ref, pred) for ref in refs]
        for kind in ROUGE_TYPES:
            totals[kind] += max(s[kind].fmeasure for s in scores)
    return {kind: 100.0 * total / len(predictions) for kind, total in totals.items()}


def lead_words(text: str, k: int) -> str:
    """The first ``k`` whitespace-separated words of ``text`` (the Lead-k baseline)."""
    return " ".join(text.split()[:k])


def median_words(texts: Iterable[str]) -> int:
    """Median length in words, rounded, at least 1 (the ``k`` of Lead-k)."""
    lengths = [len(t.split()) for t in texts]
    if not lengths:
        raise ValueError("no texts to measure")
    return max(1, round(statistics.median(lengths)))


def majority_label(labels: Iterable[str]) -> str:
    """Most frequent label; ties go to the label seen first, so the choice is deterministic."""
    counts = Counter(labels)
    if not counts:
        raise ValueError("no labels")
    return max(counts, key=counts.__getitem__)  # Counter keeps first-seen order for ties


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references")
    if not a:
        raise ValueError("no predictions to score")
