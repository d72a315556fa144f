"""Text helpers of the embedded suite: docstring paragraphs and chunks, prose scores, name words,
and the ROUGE-L / Lead-k baselines the tests hold the summarization tasks against."""

from __future__ import annotations

import re

from moeguard.zoo.suite.common import DOC_MAX_CHARS, DOC_MIN_CHARS

_WS = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def normalize_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


def docstring_paragraphs(doc: str) -> list[str]:
    """Blank-line-separated paragraphs of a (cleaned) docstring, doctest examples removed.

    A doctest example runs from a ``>>>`` line to the next blank line (its ``...``
    continuation and expected output included), as :mod:`doctest` parses it.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    in_example = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_example = True
        if not stripped:
            in_example = False
            if current:
                paragraphs.append(normalize_ws(" ".join(current)))
                current = []
            continue
        if not in_example:
            current.append(stripped)
    if current:
        paragraphs.append(normalize_ws(" ".join(current)))
    return [p for p in paragraphs if p]


def _pack(units: list[tuple[str, bool]], limit: int) -> list[str]:
    """Join units greedily with spaces into pieces of at most ``limit`` characters; a unit marked
    alone ends the current piece and stands as a piece of its own."""
    pieces, current = [], ""
    for text, alone in units:
        if alone:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(text)
        elif current and len(current) + 1 + len(text) > limit:
            pieces.append(current)
            current = text
        else:
            current = f"{current} {text}".strip()
    if current:
        pieces.append(current)
    return pieces


def _split_long(text: str, limit: int) -> list[str]:
    """Split text longer than ``limit`` at sentence ends, else at spaces."""
    if len(text) <= limit:
        return [text]
    units: list[tuple[str, bool]] = []
    for sentence in _SENTENCE_END.split(text):
        while len(sentence) > limit:  # one huge "sentence": cut at the last space before limit
            cut = sentence.rfind(" ", 0, limit)
            cut = cut if cut > 0 else limit
            units.append((sentence[:cut].strip(), True))
            sentence = sentence[cut:].strip()
        units.append((sentence, False))
    return [p for p in _pack(units, limit) if p]


def doc_chunks(paragraphs: list[str]) -> list[str]:
    """Pack paragraphs into chunks of DOC_MIN_CHARS..DOC_MAX_CHARS characters (single line)."""
    units = [(u, False) for p in paragraphs for u in _split_long(p, DOC_MAX_CHARS)]
    chunks = _pack(units, DOC_MAX_CHARS)
    # a short tail joins the chunk before it when that stays within 1.3x the limit
    if len(chunks) >= 2 and len(chunks[-1]) < DOC_MIN_CHARS and \
            len(chunks[-2]) + 1 + len(chunks[-1]) <= DOC_MAX_CHARS * 1.3:
        chunks[-2:] = [f"{chunks[-2]} {chunks[-1]}"]
    return [c for c in chunks if len(c) >= DOC_MIN_CHARS]


_PLAIN_WORD = re.compile(r"^[(\"'`]*[a-z][a-z'-]*[)\"'`.,;:!?]*$")


def prose_score(text: str) -> float:
    """Share of whitespace-separated words that are plain lower-case words."""
    words = text.split()
    return sum(bool(_PLAIN_WORD.match(w)) for w in words) / len(words) if words else 0.0


def truncate_words(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit].rstrip(" ,;:")


def name_words(name: str) -> list[str]:
    """``get_close_matches`` -> [get, close, matches]; ``getHTTPResponse`` -> [get, http, response]."""
    return [w.lower() for part in name.split("_") if part for w in _CAMEL.findall(part)]


def rouge_tokens(text: str) -> list[str]:
    """Tokens as rouge-score's default tokenizer makes them (lower-cased alphanumeric runs)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (no stemming) of two strings; used by tests and the manifest's baselines."""
    a, b = rouge_tokens(candidate), rouge_tokens(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def lead_k(text: str, k: int) -> str:
    return " ".join(text.split()[:k])
