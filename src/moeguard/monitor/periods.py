"""Periods of all traffic (``monitor score --period 24h``): the load a campaign moves, summed over a day.

An attacker who holds the weights can keep every request and every client window benign-looking
(docs/routing-security.md, "Against an attacker who screens its windows too"), and spread its
requests over identities and over the day, so that no slice sees it either. Its goal is still to
move routing to its expert, and every hijacked request moves it the same way. Summed over a day,
many small pushes become one large one, where benign traffic's pushes cancel.

- **What a request's content predicts**: the mean routing histogram of its ``NEIGHBOURS`` nearest
  benign requests in the profile's embedding space (``Neighbours``: up to ``REFERENCES`` of the
  profile's fit half, kept in the profile). A request's **residual** [L, E] is its histogram less
  that. It is finer than a mix of topics: a log profile's topics are a few clusters, and a day
  heavy in one task (a batch job, a popular feature) moved a topic-mix residual nearly as far as a
  campaign did (``benchmarks/routing_monitor_day_load.py``'s control).
- **A period** is the requests whose time falls in one ``period``-long interval (aligned to the
  epoch: ``24h`` gives UTC days). Its statistic, per (layer, expert), is the mean residual.
- **The baseline** is the ``baseline`` most recent earlier periods that did not alert (a period that
  alerted is kept out, so a campaign that goes on does not become the norm). Each cell's day-to-day
  mean and spread come from it: benign days differ from each other by more than their requests'
  sampling noise (their users differ), so one day's requests cannot calibrate the next. The spread
  is floored at the baseline's own sampling noise, and a smaller period's extra noise is added.
- **The test**: per cell ``z = (m - mean) / sd``, its one-sided p-value from Student's t with
  ``baseline - 1`` degrees of freedom (load moved *to* an expert is the attack's goal), and the
  period's p-value is the smallest cell's, Sidak-adjusted over the cells. Cells move together, so
  this is conservative.
- **An alert names** the (layer, expert) and the clients whose requests carry most of its excess
  (each client's summed residual there, above the baseline's mean, as a share of the period's).

The null is the deployment's own earlier periods; nothing here is calibrated on the profile's
traffic. A campaign already running through the whole baseline is part of the norm, and a new kind
of traffic (a new app, a new prompt template) moves the residual as a campaign does: the alert's
clients tell them apart. Measured in ``benchmarks/routing_monitor_day_load.py``.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.monitor.embed import pack, unpack

NEIGHBOURS = 16       # benign requests whose mean routing predicts a request's
REFERENCES = 4096     # benign requests kept for that (the profile's fit half, subsampled)
VALUES = 1 << 22      # at most this many stored histogram values (16 MiB as float32): a model of 58 MoE
                      # layers x 256 experts keeps 282 references, not a 240 MB profile
MIN_BASELINE = 3      # earlier periods a period needs before it is tested
BASELINE = 14         # earlier periods a period is compared with (``--baseline``): two weeks of days
MIN_REQUESTS = 16     # requests a period needs to be tested or to join a baseline
NAMED = 5             # clients an alert names
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Neighbours:
    """Benign requests' embeddings [R, dim] and routing histograms [R, L, E]: what a request's
    content predicts its routing to be."""

    def __init__(self, *, x: np.ndarray, h: np.ndarray):
        self.x = np.asarray(x, dtype=np.float64)
        self.h = np.asarray(h, dtype=np.float64)
        self.k = min(NEIGHBOURS, len(self.x))

    @classmethod
    def fit(cls, x: np.ndarray, h: np.ndarray, *, seed: int) -> "Neighbours":
        """At most ``REFERENCES`` of the benign requests (fewer where their histograms would pass
        ``VALUES``), drawn with their own generator (the profile's other draws are unchanged by it)."""
        cap = min(REFERENCES, max(2 * NEIGHBOURS, VALUES // max(1, int(np.prod(np.shape(h)[1:])))))
        keep = np.sort(np.random.default_rng([seed, 0x6E]).permutation(len(x))[:cap])
        return cls(x=np.asarray(x)[keep], h=np.asarray(h)[keep])

    def residual(self, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        """[N, L, E]: each request's histogram less the mean of its nearest references' (cosine:
        the embeddings are unit length). In blocks of rows: a log of 100k requests never builds
        [N, R] at once."""
        out = np.empty(np.shape(h), dtype=np.float64)
        step = max(1, min(2048, VALUES // max(1, self.k * int(np.prod(self.h.shape[1:])))))   # [step, k, L, E] at most VALUES
        for a in range(0, len(x), step):
            sim = np.asarray(x[a:a + step]) @ self.x.T                           # [n, R]
            nn = np.argpartition(-sim, self.k - 1, axis=1)[:, :self.k]
            out[a:a + step] = np.asarray(h[a:a + step]) - self.h[nn].mean(1)
        return out

    @property
    def digest(self) -> str:
        """What a period's residuals depend on, so that a history made with other references is refused."""
        import hashlib

        return hashlib.sha256(pack(self.x).encode() + pack(self.h).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"count": len(self.x), "embeddings_f32_b64": pack(self.x), "histograms_f32_b64": pack(self.h)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, dim: int, shape: tuple[int, int]) -> "Neighbours":
        n = int(d["count"])
        out = cls(x=unpack(d["embeddings_f32_b64"], (n, dim)), h=unpack(d["histograms_f32_b64"], (n, *shape)))
        if n < 2 or not (np.isfinite(out.x).all() and np.isfinite(out.h).all()):
            raise ValueError("neighbour references are damaged")
        return out


def parse_period(value: Any) -> float:
    """``--period``: a length such as ``24h``, ``30m``, ``7d``, ``1w`` or seconds (``3600``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value))
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"] if m else 0.0
    if not (m and math.isfinite(seconds) and seconds > 0):
        raise MoeguardError(f"--period is {value!r}", hint="pass a length such as 24h, 30m, 7d or seconds (3600)")
    return seconds


def check_period(period: Any, baseline: int | None, **needs_period: Any) -> tuple[float | None, int]:
    """``--period`` and ``--baseline`` as ``score`` and ``serve`` take them (one-line errors before any
    work): the period in seconds (None: off) and the baseline. ``needs_period``: the command's other
    options that mean nothing without a period (name: value, None where not given)."""
    seconds = parse_period(period) if period is not None else None
    given = ([f"--baseline {baseline}"] if baseline is not None else []) \
        + [f"--{k.replace('_', '-')} {v}" for k, v in needs_period.items() if v is not None]
    if seconds is None and given:
        raise MoeguardError(f"{given[0]} without --period", hint="pass --period (e.g. 24h) to test periods of all traffic, or drop it")
    return seconds, check_baseline(BASELINE if baseline is None else baseline)


def neighbours_of(profile, command: str) -> Neighbours:
    """The profile's neighbour references, or a one-line error: a profile made before them cannot test periods."""
    if profile.neighbours is None:
        raise MoeguardError("the profile has no neighbour references, which --period needs (it was made before them)",
                            hint=f"re-make it with `moeguard monitor profile`, or {command} without --period")
    return profile.neighbours


def check_baseline(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < MIN_BASELINE:
        raise MoeguardError(f"--baseline is {n!r} periods", hint=f"pass {MIN_BASELINE} or more earlier periods to compare with")
    return int(n)


def _when(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return str(t)


def _unpack(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """A period's stored state: float64, exactly (a period scored with a history gets the numbers it
    gets in one run), and finite."""
    a = unpack(text, shape, "<f8")
    if not np.isfinite(a).all():
        raise ValueError("a stored value is not finite")
    return a


def read_history(path: Path, *, period: float, digest: str, shape: tuple[int, int], baseline: int,
                 alpha: float) -> list[dict[str, Any]]:
    """``--history``: an earlier run's ``periods.jsonl``, checked line by line (one-line errors
    naming the line): the same period length, neighbour references, baseline and alpha (which
    decided which of its periods alerted and so joins a baseline), periods in time order."""
    from moeguard.io import strict_loads

    unedited = "pass the periods.jsonl an earlier run wrote, unedited"
    if not path.is_file():
        raise MoeguardError(f"period history {path} " + ("is a folder" if path.is_dir() else "does not exist"),
                            hint="pass the periods.jsonl of an earlier `monitor score --period` run")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise MoeguardError(f"period history {path} cannot be read ({e.strerror})", hint="check its permissions") from None
    rows, last = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = strict_loads(line)
            index, seconds, state = int(row["index"]), float(row["seconds"]), row.get("state")
            settings = (int(row["settings"]["baseline"]), float(row["settings"]["alpha"]))
            str(row["start"])
            if state is not None:
                row["_state"] = (_unpack(state["mean"], shape), _unpack(state["noise"], shape))
        except (ValueError, KeyError, TypeError, OverflowError) as e:   # OverflowError: an index of 1e999
            raise MoeguardError(f"{where} is not a period of `monitor score --period` ({type(e).__name__}: {e})",
                                hint=unedited) from None
        if seconds != period:
            raise MoeguardError(f"{where} is a period of {seconds:g} s, this run's are {period:g} s",
                                hint="pass the same --period as the run that wrote the history")
        if row.get("neighbours") != digest:
            raise MoeguardError(f"{where} was scored with another profile's neighbour references",
                                hint="score with the profile that wrote the history, or start without --history")
        if settings != (baseline, alpha):
            raise MoeguardError(f"{where} was scored with --baseline {settings[0]} --alpha {settings[1]:g}, this run "
                                f"with --baseline {baseline} --alpha {alpha:g}",
                                hint="pass the history's settings: they decided which of its periods join a baseline")
        if last is not None and index <= last:
            raise MoeguardError(f"{where} is period {index}, not after the line before it ({last})", hint=unedited)
        rows.append(row)
        last = index
    return rows


def check_after(t, *, period: float, history: list[dict[str, Any]] | None) -> None:
    """A one-line error unless every request ``t`` (seconds) falls after the history's last period
    (before the model loads: a daily run is given the new day's log)."""
    if history and len(t) and math.floor(min(t) / period) <= int(history[-1]["index"]):
        raise MoeguardError(f"the log has requests from {_when(math.floor(min(t) / period) * period)}, in or before the "
                            f"history's last period ({history[-1]['start']})",
                            hint="score only the requests after the history's last period, or drop --history")


class Baseline:
    """The last ``baseline`` periods that did not alert (their mean residual and sampling noise), and
    the test of a period against them (module docstring). ``score_periods`` and ``PeriodWatch`` share it."""

    def __init__(self, *, baseline: int, alpha: float, layers: list[int], history: list[dict[str, Any]] | None = None):
        self.baseline, self.alpha, self.layers = baseline, alpha, layers
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []
        for old in history or []:   # the history's periods join as they did in their own run
            if "_state" in old and not old.get("alert"):
                self._keep(old["_state"])

    def _keep(self, state: tuple[np.ndarray, np.ndarray]) -> None:
        self.kept = (self.kept + [state])[-self.baseline:]

    def judge(self, row: dict[str, Any], m: np.ndarray, se2: np.ndarray) -> tuple[np.ndarray, int, int] | None:
        """Test a period of mean residual ``m`` [L, E] and sampling variance ``se2``: fills ``row``
        (its state, baseline size, z, cell, shift, p, alert) and keeps the period for later baselines
        unless it alerts. The baseline's mean and the cell, for naming clients; None where not tested."""
        from scipy.stats import t as student

        if not (np.isfinite(m).all() and np.isfinite(se2).all()):   # a model that routed NaN: in no baseline
            row["why"] = "non-finite routing: not tested, and in no baseline"
            return None
        row["state"] = {"mean": pack(m, "<f8"), "noise": pack(se2, "<f8")}      # what a later run's baseline reads (--history)
        ref = self.kept
        row["baseline"] = len(ref)
        if len(ref) < MIN_BASELINE:
            row["why"] = f"{len(ref)} earlier periods, {MIN_BASELINE} needed: not tested"
            self._keep((m, se2))
            return None
        M = np.stack([a for a, _ in ref])
        noise = np.stack([b for _, b in ref]).mean(0)
        mu = M.mean(0)
        var = np.maximum(M.var(0, ddof=1), noise) * (1 + 1 / len(ref)) + np.maximum(0.0, se2 - noise)
        z = (m - mu) / np.sqrt(np.maximum(var, 1e-18))
        l, e = np.unravel_index(int(z.argmax()), z.shape)
        p_cell = float(student.sf(z[l, e], df=len(ref) - 1))
        p = float(-np.expm1(m.size * np.log1p(-min(p_cell, 1 - 1e-16))))        # Sidak: 1 - (1 - p)^cells
        row.update(z=round(float(z[l, e]), 3), layer=self.layers[l], expert=int(e),
                   shift=round(float(m[l, e] - mu[l, e]), 6), p=p)
        if p <= self.alpha:
            row["alert"] = True
        else:
            self._keep((m, se2))
        return mu, int(l), int(e)


def _row(k: float, period: float, n: int, clients: int | None, *, digest: str, baseline: int, alpha: float) -> dict[str, Any]:
    return {"start": _when(k * period), "end": _when((k + 1) * period), "requests": n, "clients": clients,
            "baseline": 0, "p": None, "index": int(k), "seconds": period, "neighbours": digest,
            "settings": {"baseline": baseline, "alpha": alpha}}


def score_periods(t: np.ndarray, resid: np.ndarray, clients: list, *, period: float, baseline: int, alpha: float,
                  layers: list[int], digest: str = "", history: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per period, in time order: the ``history``'s (``read_history``: earlier periods, which
    join the baseline as they did then) and then one per period of these requests (module docstring).
    ``t`` [N] the requests' times (seconds), ``resid`` [N, L, E] their residuals, ``clients`` [N] as
    outputs name them, ``digest``: the neighbour references' (written with each row)."""
    keys, which = np.unique(np.floor(np.asarray(t, dtype=np.float64) / period), return_inverse=True)
    members = np.split(np.argsort(which, kind="stable"), np.cumsum(np.bincount(which, minlength=len(keys)))[:-1])
    rows = [{k: v for k, v in old.items() if k != "_state"} for old in history or []]
    base = Baseline(baseline=baseline, alpha=alpha, layers=layers, history=history)
    check_after(t, period=period, history=history)
    for k, idx in zip(keys, members):
        r = resid[idx]
        row = _row(k, period, len(idx), len({str(clients[i]) for i in idx}), digest=digest, baseline=baseline, alpha=alpha)
        rows.append(row)
        if len(idx) < MIN_REQUESTS:
            row["why"] = f"fewer than {MIN_REQUESTS} requests: not tested, and in no baseline"
            continue
        m = r.mean(0)
        tested = base.judge(row, m, r.var(0, ddof=1) / len(idx))
        if tested is None:
            continue
        mu, l, e = tested
        excess: dict[str, float] = {}
        named: dict[str, Any] = {}
        for i, v in zip(idx, r[:, l, e] - mu[l, e]):
            excess[str(clients[i])] = excess.get(str(clients[i]), 0.0) + float(v)
            named.setdefault(str(clients[i]), clients[i])
        total = float((m[l, e] - mu[l, e]) * len(idx))
        top = [c for c in sorted(excess, key=lambda c: -excess[c]) if excess[c] > 0][:NAMED]
        count = {c: 0 for c in top}
        for i in idx:
            if str(clients[i]) in count:
                count[str(clients[i])] += 1
        row["top_clients"] = [{"client": named[c], "requests": count[c],
                               "excess": round(excess[c] / total, 3) if total > 0 else None} for c in top]
    return rows


class PeriodWatch:
    """Periods of all traffic as a server sees them (``RoutingMonitor(period=...)``, ``serve
    --period``). Bounded: the current period's request count and each cell's sum and sum of squares
    of residuals, and the baseline's periods; no text and no client names (an alert says to score
    that period's log to name them). A period is tested when the first request after it is counted
    (a quiet weekend's Friday is tested on Monday), by the time the request was served (its end,
    generation included: near a boundary, ``score`` may put it in the other period by its logged
    time); a request served before the current period (a wall clock stepped back) joins the current
    period. A restart loses the current period's counts: ``history`` (the rows written so far)
    restores the baseline."""

    def __init__(self, neighbours: Neighbours, *, period: float, baseline: int, alpha: float, layers: list[int],
                 history: list[dict[str, Any]] | None = None):
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

    def add(self, t: float, r: np.ndarray) -> dict[str, Any] | None:
        """Count one request (served at ``t`` seconds; its residual [L, E], ``Neighbours.residual``,
        computed per batch by the caller); the row of the period it closes, if any."""
        k = math.floor(t / self.period)
        if self._floor is not None:
            k = max(k, self._floor)
        row = None
        if self._k is None or k > self._k:
            row = self.close()
            self._k, self._n, self._sum, self._sq = k, 0, 0.0, 0.0
        self._n += 1
        self._sum = self._sum + r
        self._sq = self._sq + r * r
        return row

    def close(self) -> dict[str, Any] | None:
        """The current period's row (tested where it can be), or None where it has no request."""
        if self._k is None or not self._n:
            return None
        n, row = self._n, _row(self._k, self.period, self._n, None, digest=self.digest, baseline=self.baseline,
                               alpha=self.alpha)
        self._n = 0
        if n < MIN_REQUESTS:
            row["why"] = f"fewer than {MIN_REQUESTS} requests: not tested, and in no baseline"
            return row
        m = self._sum / n
        self._base.judge(row, m, np.maximum(self._sq - n * m * m, 0.0) / (n - 1) / n)
        return row


def reason(row: dict[str, Any]) -> dict[str, Any]:
    """A period alert's reason, in the shape of the other alerts'."""
    named = ", ".join(f"{c['client']} ({c['requests']})" for c in row["top_clients"]) if "top_clients" in row \
        else "not named online (score the period's log with `moeguard monitor score --period` to name them)"
    return {"statistic": "period_load", "layer": row["layer"], "experts": [row["expert"]], "value": row["z"],
            "p": row["p"], "p_combined": row["p"],
            "detail": (f"over {row['requests']} requests" + (f" ({row['clients']} clients)" if row["clients"] is not None else "")
                       + f", expert {row['expert']} at layer "
                       f"{row['layer']} took {100 * row['shift']:.2f} points more routing than the requests' content "
                       f"predicts (z {row['z']:.1f} against the {row['baseline']} periods before); most of the excess "
                       f"is from: {named or 'no one client'}")}
