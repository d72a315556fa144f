"""Early windows (``monitor profile --early 4,8``): a client's window scored as it grows, not only
when it is full.

A window of ``window`` requests (16) sees a client identity from its 16th request on. An attacker
who moves to a new identity every few requests is scored one request at a time, and an adaptive one
passes there (docs/routing-security.md). With early lengths, each block of a client's ``window``
consecutive requests is scored when it reaches each length (4, then 8, then 16), each *look*
against benign windows of its own length.

Several looks at one block are several tests. Each look's p-value is therefore adjusted by the
min-p method (Westfall & Young): the adjusted p is the share of benign blocks whose *smallest* p over
all their looks is at most this look's p. Those benign blocks are a second draw from the same benign
calibration requests as the blocks that calibrate each length (so the adjustment is as in-sample as
every window null: it describes traffic drawn like the profile's inputs). A benign block then alerts at ``alpha`` about ``alpha`` of the time, however
many looks it gets. The full window pays for the early looks with a somewhat larger p-value. The
looks are nested and strongly correlated, so this costs less than Bonferroni's factor. A profile of
a deployment's own log (``fromlog.py``) adjusts by Sidak's formula instead: its benign blocks are
overlapping runs of a few dozen users, too few to estimate the min-p distribution's tail.

A look at a block's first ``n`` requests uses the same statistics as a full window (``load``,
``atypical``, ``evidence``, ``drift``; ``profile.Profile.window_statistics``). A block alerts once,
at its first look at or below ``alpha``.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError

SHORTEST = 2       # drift compares a window's embeddings with each other: one request has no pair
BENIGN_BLOCKS = 2000   # benign blocks per calibration set when the profile has early looks (400 without)


def check_early(early: Any, window: int) -> tuple[int, ...]:
    """``early`` (lengths) checked against ``window``: distinct integers from 2 to window - 1, ascending."""
    if early is None:
        return ()
    if isinstance(early, (str, bytes)) or not isinstance(early, (list, tuple, np.ndarray)) \
            or any(isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) for n in early):
        raise MoeguardError(f"early window lengths are {early!r}, expected a list of integers",
                            hint="pass lengths such as 4,8")
    early = [int(n) for n in early]
    bad = [n for n in early if not SHORTEST <= n < window]
    if bad:
        raise MoeguardError(f"early window lengths {bad} are outside {SHORTEST}..{window - 1} (windows of {window})",
                            hint=f"pass lengths from {SHORTEST} to {window - 1}, or a larger --window")
    if list(early) != sorted(set(early)):
        raise MoeguardError(f"early window lengths {list(early)} repeat or are out of order",
                            hint=f"pass distinct lengths in ascending order, e.g. {','.join(map(str, sorted(set(early))))}")
    return tuple(early)


def default_early(window: int) -> tuple[int, ...]:
    """The early looks ``monitor profile`` takes unless told: a quarter and a half of the window (4 and 8
    of 16), those that are at least 2."""
    return tuple(sorted({n for n in (window // 4, window // 2) if SHORTEST <= n < window}))


def lengths(meta: dict[str, Any]) -> tuple[int, ...]:
    """Every look at a block, ascending: the early lengths, then the full window."""
    return tuple(meta.get("early", ())) + (int(meta["window"]),)


def level(n: int, window: int) -> str:
    """The null-distribution level a look of ``n`` requests is scored at: ``window`` or ``window@n``."""
    return "window" if n == window else f"window@{n}"


def adjust(null: dict[str, np.ndarray], raw: np.ndarray) -> np.ndarray:
    """Min-p adjusted p-values of looks whose own p-values are ``raw`` (module docstring)."""
    ref = null["window.ladder"]
    return (1 + np.searchsorted(ref, raw, side="right")) / (len(ref) + 1)


def first(blocks: list[np.ndarray], n: int, H: np.ndarray, X: np.ndarray, request_p: np.ndarray
          ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Each block's first ``n`` requests, as ``Profile.window_statistics`` takes them: mean histograms
    [len(blocks), L, E] (of ``H`` [N, L, E]), and each one's request p-values and embeddings."""
    return (np.stack([H[b[:n]].mean(0) for b in blocks]), [request_p[b[:n]] for b in blocks],
            [X[b[:n]] for b in blocks])


def look(prof, n: int, h: np.ndarray, request_p: list[np.ndarray], xs: list[np.ndarray]
         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Statistics and p-values of looks at ``n`` requests: ``h`` [W, L, E] their mean histograms,
    ``request_p`` and ``xs`` each look's requests' p-values and embeddings. With early lengths,
    ``combined`` is the adjusted p-value and ``look`` the look's own."""
    ws = prof.window_statistics(h, request_p, xs)
    wp = prof.p_values(ws, level(n, int(prof.meta["window"])))
    if prof.meta.get("early"):
        wp["look"] = wp["combined"]
        wp["combined"] = adjust(prof.null, wp["combined"])
    return ws, wp


def looks(prof, blocks: list[np.ndarray], H: np.ndarray, X: np.ndarray, request_p: np.ndarray
          ) -> list[tuple[int, list[int], dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]]:
    """Every look at ``blocks`` (each an index array into ``H`` [N, L, E] histograms, ``X`` [N, dim]
    embeddings and ``request_p`` [N], in time order, at most a window long): per length, ``(n, the
    blocks that reach it, statistics, p-values, mean histograms)``."""
    out = []
    for n in lengths(prof.meta):
        which = [j for j, b in enumerate(blocks) if len(b) >= n]
        if not which:
            continue
        W, ps, xs = first([blocks[j] for j in which], n, H, X, request_p)
        ws, wp = look(prof, n, W, ps, xs)
        out.append((n, which, ws, wp, W))
    return out


def unseen(meta: dict[str, Any], block: int) -> int:
    """Requests of a block of ``block`` requests that no look covers (those after its last look)."""
    reached = [n for n in lengths(meta) if n <= block]
    return block - (reached[-1] if reached else 0)


def calibrate(prof, *, window: int, early: tuple[int, ...], fit_blocks: list[np.ndarray],
              ladder_blocks: list[np.ndarray] | None, C: np.ndarray, XC: np.ndarray, request_p: np.ndarray) -> None:
    """Fill ``prof.null`` for early looks: each length's statistics on the first ``n`` requests of
    ``fit_blocks`` (benign blocks, whose full windows calibrated ``window``), and ``window.ladder``:
    the smallest look p-value of each of ``ladder_blocks`` (other benign blocks). ``ladder_blocks``
    None: the quantiles of the smallest of independent uniform p-values, one per look, at as many
    points as ``fit_blocks``: Sidak's adjustment, conservative for looks that are positively
    correlated, where benign blocks are too few users to estimate their min-p (``fromlog.py``)."""
    from moeguard.monitor.profile import WINDOW_STATISTICS

    for n in early:
        ws = prof.window_statistics(*first(fit_blocks, n, C, XC, request_p))
        for k in WINDOW_STATISTICS:
            prof.null[f"{level(n, window)}.{k}"] = np.sort(ws[k])
    if ladder_blocks is None:   # exact quantiles of the smallest of m uniforms: no draw, no Monte Carlo noise
        u = np.arange(1, len(fit_blocks) + 1) / (len(fit_blocks) + 1)
        prof.null["window.ladder"] = 1 - (1 - u) ** (1 / (len(early) + 1))
        return
    smallest = np.ones(len(ladder_blocks))
    for n in early + (window,):
        ws = prof.window_statistics(*first(ladder_blocks, n, C, XC, request_p))
        smallest = np.minimum(smallest, prof.p_values(ws, level(n, window))["combined"])
    prof.null["window.ladder"] = np.sort(smallest)


def floor(prof) -> float:
    """The smallest window p-value the profile can give (adjusted, with early looks)."""
    raw = prof.p_floor("window")
    return float(adjust(prof.null, np.array([raw]))[0]) if prof.meta.get("early") else raw


def check_profile(meta: dict[str, Any], null: dict[str, np.ndarray]) -> bool:
    """Whether a loaded profile's early looks are whole: valid lengths, and a null for each."""
    from moeguard.monitor.profile import WINDOW_STATISTICS

    if "early" not in meta:
        return True
    try:
        early = check_early(meta["early"], int(meta["window"]))
    except (MoeguardError, TypeError, ValueError):
        return False
    # every look's null as long as the full window's (floor() assumes it), and minima that are p-values
    names = [f"{level(n, meta['window'])}.{k}" for n in early for k in WINDOW_STATISTICS]
    ref = null.get("window.ladder")
    return bool(early) and ref is not None and bool(((ref > 0) & (ref <= 1)).all()) \
        and all(len(null.get(k, ())) == len(null["window.load"]) for k in names)
