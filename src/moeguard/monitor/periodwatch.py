"""Periods of all traffic as a server sees them (``RoutingMonitor(period=...)``, ``serve --period``).

``periods.py`` is the test; this is its bookkeeping in service: ``PeriodWatch`` the counts and the
baseline, ``PeriodService`` their place in the online monitor (its ticker, saves and metrics).
Bounded: the current period's request count and each cell's sum and sum of squares of residuals, and
the baseline's periods; no text and no client names (an alert says to score that period's log to
name them).

- **When a period is tested**: at the first request counted after it, or, where the monitor has a
  ticker (``max_delay_s``), as soon as its end has passed (``close_over``): a quiet night's period is
  not left open until the morning. A request counts by the time it was served (its end, generation
  included: near a boundary, ``score`` may put it in the other period by its logged time). A request
  served before the current period (a wall clock stepped back, or a request that ended just before a
  period closed on time) joins the current period.
- **A restart keeps the current period.** ``state()`` is its counts as JSON (float64, exact);
  ``serve --period-log F`` writes them to ``F.open`` (``open_path``) at most every ``CHECKPOINT_S``
  and at shutdown, and reads them back at start (``read_open``), so a restart loses at most the last
  minute's requests before a crash, and none on a clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.monitor.embed import pack
from moeguard.monitor.neighbours import Neighbours
from moeguard.monitor.periodhistory import _unpack
from moeguard.monitor.periods import MIN_REQUESTS, TEST, Baseline, _row, _when, check_baseline, reason

_log = logging.getLogger("moeguard.monitor")

CHECKPOINT_S = 60.0   # the open period's counts are saved at most this often (and at shutdown)
SCHEMA = "moeguard.open-period/1"
MAX_REQUESTS = 10**12  # more than any period serves: a larger count is a damaged file
LAST = 253402300799.0  # 9999-12-31T23:59:59Z: the last time a period's row can name


def _count(value: Any, name: str) -> int:
    """A non-negative whole number as JSON writes one (not 100.7, "100" or true)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} is {value!r}, not a whole number of 0 or more")
    return value


def open_path(period_log: Path) -> Path:
    """Where ``serve`` keeps the open period's counts beside its period log."""
    return period_log.with_name(period_log.name + ".open")


class PeriodWatch:
    """The current period's counts and the baseline (module docstring). Not thread-safe: the monitor
    calls it under its flush lock."""

    def __init__(self, neighbours: Neighbours, *, period: float, baseline: int, alpha: float, layers: list[int],
                 history: list[dict[str, Any]] | None = None, open_period: dict[str, Any] | None = None):
        import importlib

        importlib.import_module("scipy.stats")   # now, not inside the first period's flush (a request's exit)

        if not (isinstance(period, (int, float)) and math.isfinite(period) and period > 0):
            raise MoeguardError(f"period is {period!r} seconds", hint="pass a positive number of seconds, e.g. 86400")
        self.neighbours, self.period, self.alpha = neighbours, float(period), alpha
        self.baseline = check_baseline(baseline)
        self.digest, self.layers = neighbours.digest, layers
        self._base = Baseline(baseline=self.baseline, alpha=alpha, layers=layers, history=history)
        self._floor = int(history[-1]["index"]) + 1 if history else None   # no period of the history again
        self._k: int | None = None
        self._n, self._sum, self._sq = 0, 0.0, 0.0
        # who counted the open period's requests (provenance.maker): a server restarted under another
        # moeguard (an upgrade) continues the period it saved, and its row says both made it. This
        # process's is read now: not under the flush lock, and as the code that started (a pull or an
        # upgrade while it runs does not change what counts)
        from moeguard.provenance import maker

        self._me = maker()
        self._makers: list[Any] = []
        if open_period is not None:        # read_open's: checked against this run's settings and history
            self._k, self._n = open_period["index"], open_period["requests"]
            self._sum, self._sq = open_period["_sum"], open_period["_sq"]
            self._makers = list(open_period.get("made_by", []))

    def add(self, t: float, r: np.ndarray) -> dict[str, Any] | None:
        """Count one request (served at ``t`` seconds; its residual [L, E], ``Neighbours.residual``,
        computed per batch by the caller); the row of the period it closes, if any."""
        k = math.floor(t / self.period)
        if self._floor is not None:
            k = max(k, self._floor)
        row = None
        if self._k is None or k > self._k:
            row = self.close()
            self._start(k)
        self._n += 1
        self._sum = self._sum + r
        self._sq = self._sq + r * r
        return row

    def ended(self, t: float) -> bool:
        """Whether the current period has requests and had ended by ``t`` seconds (a cheap look; the
        caller then closes it under its lock with ``close_over``)."""
        return self._k is not None and self._n > 0 and math.floor(t / self.period) > self._k

    def close_over(self, t: float) -> dict[str, Any] | None:
        """At ``t`` seconds: the current period's row if it has ended (the next period starts empty),
        else None."""
        k = math.floor(t / self.period)
        if self._k is None or k <= self._k:
            return None
        row = self.close()
        self._start(k)
        return row

    def _start(self, k: int) -> None:
        self._k, self._n, self._sum, self._sq, self._makers = k, 0, 0.0, 0.0, []

    def _lineage(self) -> list[Any]:
        """Every version that counted the open period, in the order they first did."""
        from moeguard.provenance import joined

        return joined(self._makers, self._me)

    def close(self) -> dict[str, Any] | None:
        """The current period's row (tested where it can be), or None where it has no request."""
        if self._k is None or not self._n:
            return None
        n, row = self._n, _row(self._k, self.period, self._n, None, digest=self.digest, baseline=self.baseline,
                               alpha=self.alpha)
        if len(self._lineage()) > 1:   # counted partly before a restart under another version: said, as kept work is
            row["made_by"] = self._lineage()
        self._n = 0
        if n < MIN_REQUESTS:
            row["why"] = f"fewer than {MIN_REQUESTS} requests: not tested, and in no baseline"
            return row
        m = self._sum / n
        self._base.judge(row, m, np.maximum(self._sq - n * m * m, 0.0) / (n - 1) / n, n)
        return row

    def state(self) -> dict[str, Any] | None:
        """The open period's counts as JSON (``read_open`` reads them back), or None where it has none."""
        if self._k is None or not self._n:
            return None
        return {"schema": SCHEMA, "index": int(self._k), "start": _when(self._k * self.period),
                "seconds": self.period, "requests": int(self._n), "neighbours": self.digest,
                "settings": {"baseline": self.baseline, "alpha": self.alpha, "test": TEST},
                "sum": pack(self._sum, "<f8"), "sumsq": pack(self._sq, "<f8"), "made_by": self._lineage()}


class PeriodService:
    """A ``PeriodWatch`` in the online monitor (``online.py``): each scored request counted into its
    period, a period closed once its end has passed (the monitor's ticker calls ``tick``), and the open
    period's counts handed to ``on_state`` at most every ``CHECKPOINT_S`` and at ``stop``. A closed
    period's row gets its metric, and an alert its reason. ``serialized`` is the monitor's flush lock
    (a context): it orders the watch with scoring. ``on_state`` runs outside it (a callback that
    scrapes the metrics flushes, and must not wait for itself)."""

    def __init__(self, watch: PeriodWatch, *, metrics, clock, serialized, on_state=None):
        self.watch, self.metrics, self.clock, self.on_state = watch, metrics, clock, on_state
        self.serialized = serialized
        self._saved_at = time.monotonic()

    def count(self, served: float, resid: np.ndarray) -> dict[str, Any] | None:
        """One scored request (inside the flush, in order); the row of the period it closed, if any."""
        row = self.watch.add(served, resid)
        return None if row is None else self.row(row)

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A closed period's row, with its metric set and its alert counted and given its reason."""
        if row["p"] is not None:   # a p that underflowed to 0 (a long baseline, a strong campaign) is 1e-300
            self.metrics.period.set(-math.log10(max(row["p"], 1e-300)))
        if row.get("alert"):
            row["alert"] = {"kind": "period", "period": [row["start"], row["end"]], "requests": row["requests"],
                            **reason(row)}
            self.metrics.alerts.labels("period", "period_load").inc()
        return row

    def tick(self, *, flush, on_result) -> None:
        """The ticker's look: once the current period's end has passed, count what waits (``flush``),
        close the period and give its row to ``on_result(None, ...)``; and save the open period when
        ``CHECKPOINT_S`` has passed since the last save."""
        if self.watch.ended(self.clock()):
            with contextlib.suppress(Exception):   # counted and logged where it was scored
                flush()
            with self.serialized():
                row = self.watch.close_over(self.clock())
                if row is not None:
                    res = {"period": self.row(row)}
                    if on_result is not None:
                        on_result(None, res)
        if self.on_state is not None and time.monotonic() - self._saved_at >= CHECKPOINT_S:
            try:
                self.save()
            finally:          # a failing save is retried at the next interval, not at every look
                self._saved_at = time.monotonic()

    def save(self) -> None:
        """``on_state`` with the open period's counts (read under the flush lock, saved outside it)."""
        with self.serialized():
            state = self.watch.state()
        self.on_state(state)

    def stop(self) -> None:
        """The last save, at the monitor's exit: a failure is logged and counted, never raised."""
        if self.on_state is None:
            return
        try:
            self.save()
        except Exception as e:  # noqa: BLE001 -- a failed save must not turn a clean stop into a traceback
            self.metrics.callback_failed.inc()
            _log.warning("the routing monitor could not save the open period: %s: %s", type(e).__name__, e)

def read_open(path: Path, *, period: float, digest: str, shape: tuple[int, int], baseline: int, alpha: float,
              history: list[dict[str, Any]] | None, now: float) -> dict[str, Any] | None:
    """``serve``'s saved open period (``PeriodWatch.state``), checked before the model loads: None where
    there is none, or where the period log already holds it (closed after it was saved). One-line
    errors for a file that is not one, or one of other settings."""
    from moeguard.io import strict_loads

    if not path.exists():
        return None
    fix = f"delete {path} to start the current period from zero"
    try:
        doc = strict_loads(path.read_text(encoding="utf-8"))
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"schema {doc.get('schema')!r}")
        k, n, seconds = _count(doc["index"], "index"), _count(doc["requests"], "requests"), float(doc["seconds"])
        settings = dict(doc["settings"])
        made = doc.get("made_by", [None])   # absent in periods saved before 2026-12-08: an unrecorded version
        if not isinstance(made, list) or not all(m is None or isinstance(m, dict) for m in made):
            raise ValueError(f"made_by {made!r}")
        state = {"index": k, "requests": n, "_sum": _unpack(doc["sum"], shape), "_sq": _unpack(doc["sumsq"], shape),
                 "made_by": made}
    except OSError as e:
        raise MoeguardError(f"{path} cannot be read ({e.strerror})", hint=fix) from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
        raise MoeguardError(f"{path} is not an open period saved by `moeguard serve` ({type(e).__name__}: {e})",
                            hint=fix) from None
    if seconds != period or doc.get("neighbours") != digest or settings != {"baseline": baseline, "alpha": alpha, "test": TEST}:
        raise MoeguardError(f"{path} was saved with another --period, profile, --baseline or --period-alpha "
                            f"({seconds:g} s, baseline {settings.get('baseline')}, period alpha {settings.get('alpha')})",
                            hint=f"serve with the settings that saved it, or {fix}")
    if n < 1 or n > MAX_REQUESTS or (state["_sq"] < 0).any():
        raise MoeguardError(f"{path} holds {n} requests", hint=fix)
    if k > math.floor(now / period) or k * period > LAST:
        raise MoeguardError(f"{path}'s period ({doc.get('start')}) has not started yet",
                            hint=f"check this machine's clock, or {fix}")
    if history and k <= int(history[-1]["index"]):
        return None        # closed and logged after it was saved: the log has it
    from moeguard.provenance import reusing

    for m in state["made_by"]:   # continued: the start's record lists another version's counts
        reusing(str(path), m, fix=fix)
    return state
