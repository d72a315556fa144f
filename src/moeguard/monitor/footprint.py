"""What ``monitor score`` holds in memory, estimated before the model loads, and a one-line refusal
where it cannot fit: a replay of a large log on a large model takes hours, and the arrays it fills are
held to the end, so a run that would run out of memory is stopped before it starts.

The run holds float64 values for every request of the log (``score.py``):

- its routing histogram [L, E], with ``--period`` written over by its residual (one array, not two);
- with a profile of replies, the reply's histogram [L, E] and surprise too;
- the sum of its final hidden states [hidden], its embedding [DIM], its token count and surprise;

the mean histogram [L, E] of every client's block at each look (the window and its early lengths:
at most requests / n blocks reach a look of n), and with ``--period`` and a ``--history`` whose run
kept its periods' requests, those requests' embeddings and residuals [DIM + L x E] and this log's, joined into one array of each
(``periods.score_periods``), and a copy of one period's residuals as it is tested. The estimate is
those arrays: a lower bound (Python's per-request rows, the model and its activations come on top).
On DeepSeek-V3's 58 x 256 cells a request's histogram alone is 119 KB: 100,000 requests hold 11 GiB.
"""

from __future__ import annotations

import os
from pathlib import Path

from moeguard.errors import MoeguardError

# a container's memory limit (cgroup v2, then v1), as a container sees its own cgroup at the mount's root; where it
# is larger than the machine, or absent, the machine's. Not read: a cgroup of this process below the root
# (/proc/self/cgroup), a parent's limit, RLIMIT_AS: the check can pass where those stop the run later
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def estimate(*, requests: int, cells: int, hidden: int, dim: int, replies: bool = False, held: int = 0,
             largest_period: int = 0, looks: tuple[int, ...] = ()) -> int:
    """Bytes of the arrays a ``score`` run holds at its peak (module docstring): ``requests`` in the log,
    ``cells`` = L x E, ``hidden`` the model's hidden size, ``dim`` the profile's embedding size,
    ``replies`` a profile of replies, ``held`` the requests a --history brings with --period (joined
    with the log's: pass 0 without --period), ``largest_period`` the log's largest period's requests
    (copied as it is tested; 0 without --period), ``looks`` the lengths clients' blocks are looked at
    (``ladder.lengths``: the early ones and the window)."""
    per_request = cells * (2 if replies else 1) + hidden + dim + (3 if replies else 2)
    joined = (held + requests) * (dim + cells) if held else 0
    blocks = sum(requests // n for n in looks)   # each look's mean histograms, held to the end (score.py)
    return 8 * (requests * per_request + joined + largest_period * cells + blocks * cells)


def memory_limit() -> tuple[int, str] | None:
    """The memory this process can have, in bytes, and where that figure comes from; None if unknown."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # no sysconf (Windows) or no such name
        physical = None
    for f in CGROUP_LIMITS:
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (physical is None or int(text) < physical):
            return int(text), f"the container's memory limit ({f})"
    return (physical, "this machine's memory") if physical else None


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check(*, requests: int, shape: tuple[int, int], hidden: int, dim: int, replies: bool, held: int,
          largest_period: int, period: bool, held_periods: int = 0, looks: tuple[int, ...] = ()) -> int:
    """A one-line error, before the model loads, where ``estimate`` is over ``memory_limit``; else the
    estimate. ``shape``: the profile's (L, E); ``period``: --period is on; ``held_periods``: the
    periods the ``held`` requests are of."""
    need = estimate(requests=requests, cells=shape[0] * shape[1], hidden=hidden, dim=dim, replies=replies,
                    held=held, largest_period=largest_period, looks=looks)
    limit = memory_limit()
    if limit is None or need <= limit[0]:
        return need
    each = 8 * shape[0] * shape[1] * (2 if replies else 1)
    what = (f"scoring {requests:,} requests on a model of {shape[0]} MoE layers x {shape[1]} experts holds at least "
            f"{_size(need)} of arrays ({each / 1024:,.1f} KiB a request for its routing as float64"
            + (f"; and the {held:,} requests of the --history's {held_periods} baseline periods" if held else "")
            + f"), more than {limit[1]} allows: {_size(limit[0])}")
    fix = "score the log a part at a time" + (
        " (with --period: a period's log a run, each given the run before's periods.jsonl as --history, which then "
        "holds that period and the baseline periods' kept requests)" if period else "")
    if held:
        fix += "; a smaller --baseline brings fewer requests"
    raise MoeguardError(what, hint=fix)


def check_score(prof, records: list[dict], *, period: float | None, history: Path | None, want: list[dict]) -> int:
    """``check`` for a ``monitor score`` run: ``prof`` its Profile, ``records`` its log (``read_log``'s),
    ``period`` in seconds (None: off), ``want`` the --history's rows whose requests it takes
    (``periodrequests.wanted``; counted from the rows, before any file is read)."""
    from moeguard.monitor.periodrequests import held_requests
    from moeguard.monitor.periods import members

    on = period is not None
    largest = max(map(len, members([r["_t"] for r in records], period)[1]), default=0) if on and records else 0
    held = held_requests(history, want) if on and want and history is not None else (0, 0)
    from moeguard.monitor.ladder import lengths

    return check(requests=len(records), shape=prof.mean.shape, hidden=prof.space.hidden, dim=prof.space.dim,
                 replies=prof.replies is not None, held=held[0], held_periods=held[1], largest_period=largest, period=on,
                 looks=lengths(prof.meta))
