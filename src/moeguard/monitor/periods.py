"""Periods of all traffic (``monitor score --period 24h``): the load a campaign moves, summed over a day.

An attacker who holds the weights can keep every request and every client window benign-looking
(docs/routing-security.md, "Against an attacker who screens its windows too"), and spread its
requests over identities and over the day, so that no slice sees it either. Its goal is still to
move routing to its expert, and every hijacked request moves it the same way. Summed over a day,
many small pushes become one large one, where benign traffic's pushes cancel.

- **What a request's content predicts**: the mean routing histogram of its nearest benign requests in
  the profile's embedding space (``neighbours.py``). A request's **residual** [L, E] is its histogram
  less that. It is finer than a mix of topics: a day heavy in one task moved a topic-mix residual
  nearly as far as a campaign did.
- **A period** is the requests whose time falls in one ``period``-long interval (aligned to the
  epoch: ``24h`` gives UTC days). Its statistic, per (layer, expert), is the mean residual.
- **The baseline** is the ``baseline`` most recent earlier periods that did not alert (a period that
  alerted is kept out, so a campaign that goes on does not become the norm), or that the owner
  reviewed and accepted (``accept``: a launch would alert every day otherwise). Each cell's day-to-day
  mean and spread come from it: benign days differ from each other by more than their requests'
  sampling noise (their users differ), so one day's requests cannot calibrate the next.
- **The test.** Days differ mostly by their mix of users, which moves many cells together: over 20
  benign days of the day-load benchmark, three directions carry 83% of the cells' standardized
  variance. So a period's standardized deviation ``(m - mean) / sd`` is tested after removing its
  part along the baseline's main directions, per cell against that remainder's out-of-sample spread:
  each baseline period's remainder when mean, spread and as many directions are fitted without it
  (floored at ``FLOOR`` of the sampling noise, against a baseline that agrees by chance). The
  directions removed are those that stand above noise (``periodstats.factors``, at most
  ``periodstats.FACTORS``); their number and the noise floor are the whole baseline's. In a *sparse*
  cell (most baseline periods' means exactly 0: an expert almost nothing is routed to) the noise
  is pooled with the period's and the z is at most an exact count test's (``periodstats``). A
  period of fewer requests than the baseline's adds its extra sampling noise (from the count: a
  campaign's own spread must not widen its test). One-sided Student t with ``baseline - 1 - directions`` degrees of freedom (load moved
  *to* an expert is the attack's goal; with ``baseline - 1``, 8 synthetic baseline days whose cells
  move along one direction gave 10.5% of benign days p <= 0.05); the period's p-value is the most
  deviant cell's, Sidak-adjusted over the cells. The first version (the raw deviation, its spread
  floored at the sampling noise) gave benign days p >= 0.33 where this is nominal (``TEST`` names the version; a history of another is refused).
- **An alert names** the (layer, expert) and the clients whose requests carry most of its excess
  (each client's summed residual there, above what the baseline predicts, as a share of the period's),
  and, where the baseline periods' requests are in the run, its cause: the clients' routing beyond
  their content's, or the period's mix of content (``periodclients.py``).

The null is the deployment's own earlier periods; nothing here is calibrated on the profile's
traffic. A campaign already running through the whole baseline is part of the norm, and a new kind
of traffic (a new app, a new prompt template) moves the residual as a campaign does, and its users'
routing reads as moved to the cause and the clients' test too: the content has no match on earlier
days (``benchmarks/routing_monitor_day_novel.py``). The alert's clients and their content are what an
owner reviews before accepting the period. Measured in ``benchmarks/routing_monitor_day_load.py``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from datetime import datetime, timezone
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.monitor import periodclients
from moeguard.monitor.embed import pack
from moeguard.monitor.neighbours import Neighbours
from moeguard.monitor.periodstats import SPARSE, TINY, deviation, events_z, factors, pooled

MIN_BASELINE = 3      # earlier periods a period needs before it is tested
BASELINE = 14         # earlier periods a period is compared with (``--baseline``): two weeks of days
MIN_REQUESTS = 16     # requests a period needs to be tested or to join a baseline
FLOOR = 0.25          # a cell's out-of-sample spread is at least this share of its sampling noise
# an alert's cause is sought in every cell that alerts on its own (periodclients); an int caps them, the most
# deviant first. A cap of 4 (2026-12-05 to 06) let a decoy that moved 4 cells further hide a campaign's cell
CAUSE_CELLS: int | None = None
TEST = "factors"      # the period test's version, in each row's settings: a history of another is refused
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


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
        + [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in needs_period.items() if v is not None]
    if seconds is None and given:
        raise MoeguardError(f"{given[0]} without --period", hint="pass --period (e.g. 24h) to test periods of all traffic, or drop it")
    return seconds, check_baseline(BASELINE if baseline is None else baseline)


def period_alpha(alpha: float, period_alpha: float | None) -> float:
    """``--period-alpha`` resolved: the level of the period test, ``alpha`` where not given (a period
    is one test a day, where a request is thousands: an owner may want it stricter or looser)."""
    if period_alpha is None:
        return alpha
    if isinstance(period_alpha, bool) or not isinstance(period_alpha, (int, float)) or not 0 < period_alpha < 1:
        raise MoeguardError(f"--period-alpha is {period_alpha!r}", hint="pass a level between 0 and 1, e.g. 0.001")
    return float(period_alpha)


def neighbours_of(profile, command: str) -> Neighbours:
    """The profile's neighbour references, or a one-line error: a profile made before them cannot test periods."""
    if profile.neighbours is None:
        raise MoeguardError("the profile has no neighbour references, which --period needs (it was made before them)",
                            hint=f"re-make it with `moeguard monitor profile`, or {command} without --period")
    return profile.neighbours


EARLIEST, LATEST = -62135596800.0, 253402300799.0   # 0001-01-01 and 9999-12-31T23:59:59, UTC


def check_times(records: list[dict[str, Any]]) -> None:
    """``--period``: every request's time (``_t``, seconds) within the years 1-9999, which a period's start
    can name; a one-line error naming the first that is not, before the model loads. Beyond, a period's
    index overflowed after the whole replay; a log in milliseconds lands there, in the year 50,000
    (without --period a time only orders requests, and any finite one does)."""
    bad = next((r for r in records if not EARLIEST <= r["_t"] <= LATEST), None)
    if bad is not None:
        raise MoeguardError(f"request {str(bad['id'])[:40]!r} has time {str(bad['time'])[:24]}, outside the years 1-9999 "
                            "as seconds since 1970: --period cannot place it",
                            hint="write times as seconds since the epoch (not milliseconds) or as ISO-8601 strings")


def check_baseline(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < MIN_BASELINE:
        raise MoeguardError(f"--baseline is {n!r} periods", hint=f"pass {MIN_BASELINE} or more earlier periods to compare with")
    return int(n)


def _when(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return str(t)


class Baseline:
    """The last ``baseline`` periods that did not alert (their mean residual, sampling noise and
    request count), and the test of a period against them (module docstring). ``score_periods`` and
    ``PeriodWatch`` share it. ``requests``, beside ``kept``: what the caller gave ``judge`` of each
    kept period (``score_periods``: its requests' indices, for an alert's cause; None: not held)."""

    def __init__(self, *, baseline: int, alpha: float, layers: list[int], history: list[dict[str, Any]] | None = None,
                 requests: dict[int, Any] | None = None):
        self.baseline, self.alpha, self.layers = baseline, alpha, layers
        self.kept: list[tuple[np.ndarray, np.ndarray, int]] = []
        self.requests: list[Any] = []
        for old in history or []:   # the history's periods join as they did in their own run (or the owner accepted them)
            if "_state" in old and joins(old):   # with their requests where the caller holds them (by index)
                self.keep(old["_state"] + (int(old["requests"]),), (requests or {}).get(int(old["index"])))

    def keep(self, state: tuple[np.ndarray, np.ndarray, int], requests: Any = None) -> None:
        """A period (its mean residual, sampling noise and request count) joins the baseline, the oldest leaving."""
        self.kept = (self.kept + [state])[-self.baseline:]
        self.requests = (self.requests + [requests])[-self.baseline:]

    def judge(self, row: dict[str, Any], m: np.ndarray, se2: np.ndarray, n: int, requests: Any = None,
              hold: bool = False, accept: bool = False) -> tuple[np.ndarray, int, int, list[tuple[int, int, float]]] | None:
        """Test a period of ``n`` requests, mean residual ``m`` [L, E] and sampling variance ``se2``:
        fills ``row`` (its state, baseline size, z, cell, shift, p, alert) and keeps the period (and
        ``requests``, in ``self.requests``) for later baselines unless it alerts or ``hold`` (another
        test alerted on it: ``score_periods``'s clients' test), or whatever the tests say where ``accept``
        (the owner reviewed it and judged it benign: ``score --accept``). What the baseline
        predicts for the period [L, E], the cell (for naming clients) and, for its cause, the cells
        [(layer slot, expert, p)] that alert on their own, the most deviant first (the most deviant
        always; at most ``CAUSE_CELLS`` where that is set); None where not tested."""
        from scipy.stats import t as student

        if not (np.isfinite(m).all() and np.isfinite(se2).all()):   # a model that routed NaN: in no baseline
            row["why"] = "non-finite routing: not tested, and in no baseline"
            return None
        row["state"] = {"mean": pack(m, "<f8"), "noise": pack(se2, "<f8")}      # what a later run's baseline reads (--history)
        ref = self.kept
        row["baseline"] = len(ref)
        if len(ref) < MIN_BASELINE:
            row["why"] = f"{len(ref)} earlier periods, {MIN_BASELINE} needed: not tested"
            if accept or not hold:
                self.keep((m, se2, n), requests)
            return None
        M = np.stack([a.ravel() for a, _, _ in ref])                     # [periods, cells]
        noise = np.stack([b.ravel() for _, b, _ in ref]).mean(0)
        per_request = np.mean([b.ravel() * c for _, b, c in ref], axis=0)
        sparse = np.mean(M == 0, axis=0) >= SPARSE                         # [cells] (periodstats' docstring)
        if sparse.any():
            noise, per_request = pooled(ref, se2.ravel() * n, n, noise, per_request, sparse)
        mu, sd, V = factors(M, noise, sparse=sparse)
        k = V.shape[1]
        # each baseline period's error when predicted by the others (mean, spread and as many directions,
        # fitted without it): a new period's spread, out of sample
        loo = [deviation(M[i], *factors(np.delete(M, i, 0), noise, k, sparse)) for i in range(len(ref))]
        floor = np.where(sparse, 1.0, FLOOR)                               # a sparse cell's loo is 0: nothing varied
        scale = np.maximum(np.mean(np.square(loo), axis=0), np.maximum(floor * noise / sd**2, TINY))
        extra = np.maximum(0.0, per_request / n - noise) / sd**2          # fewer requests than the baseline's: more noise
        d = (m.ravel() - mu) / sd
        along = V @ (V.T @ d)                                              # the part the day's mix explains
        z = (d - along) / np.sqrt(scale + extra)
        df = len(ref) - 1 - k                                              # each direction removed costs one
        if sparse.any():
            z = np.where(sparse, np.minimum(z, events_z(ref, m.ravel(), se2.ravel(), n, df)), z)
        c = int(z.argmax())
        l, e = np.unravel_index(c, m.shape)

        def sidak(i: int) -> float:
            """Cell ``i``'s one-sided p, Sidak-adjusted over the cells: 1 - (1 - p)^cells."""
            p_cell = float(student.sf(z[i], df=df))
            return float(-np.expm1(m.size * np.log1p(-min(p_cell, 1 - 1e-16))))

        p = sidak(c)
        expected = (mu + sd * along).reshape(m.shape)                      # the baseline's mean, moved along the factors
        row.update(z=round(float(z[c]), 3), layer=self.layers[l], expert=int(e),
                   shift=round(float(m[l, e] - expected[l, e]), 6), p=p, factors=k)
        if p <= self.alpha:
            row["alert"] = True
        if accept or not (hold or row.get("alert")):
            self.keep((m, se2, n), requests)
        # the cells that alert on their own (Sidak), most deviant first, with their p's: where an alert's
        # cause is sought (the most deviant alone where none does)
        cells = [(int(l), int(e), p)]
        for i in np.argsort(-z, kind="stable"):
            if CAUSE_CELLS is not None and len(cells) >= CAUSE_CELLS:
                break
            if i == c:
                continue
            pi = sidak(int(i))
            if pi > self.alpha:   # most deviant first: no later cell alerts either
                break
            cells.append((*(int(v) for v in np.unravel_index(i, m.shape)), pi))
        return expected, int(l), int(e), cells


def joins(row: dict[str, Any]) -> bool:
    """Whether a period joins later baselines: the owner accepted it, or none of its tests alerted (the
    load test, the clients' test, the small clients' test: ``periodclients.py``, ``periodsmall.py``)."""
    return bool(row.get("accepted")) or not (row.get("alert") or row.get("clients_alert") or row.get("small_alert"))


def _row(k: float, period: float, n: int, clients: int | None, *, digest: str, baseline: int, alpha: float,
         clients_test: bool = False) -> dict[str, Any]:
    return {"start": _when(k * period), "end": _when((k + 1) * period), "requests": n, "clients": clients,
            "baseline": 0, "p": None, "index": int(k), "seconds": period, "neighbours": digest,
            "settings": {"baseline": baseline, "alpha": alpha, "test": TEST, **({"clients_test": True} if clients_test else {})}}


def members(t: np.ndarray, period: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """The periods the times ``t`` (seconds) fall in (their indices, ascending) and each one's requests
    (indices into ``t``, in the order given)."""
    keys, which = np.unique(np.floor(np.asarray(t, dtype=np.float64) / period), return_inverse=True)
    return keys, np.split(np.argsort(which, kind="stable"), np.cumsum(np.bincount(which, minlength=len(keys)))[:-1])


def score_periods(t: np.ndarray, resid: np.ndarray, clients: list, *, period: float, baseline: int, alpha: float,
                  layers: list[int], digest: str = "", history: list[dict[str, Any]] | None = None,
                  x: np.ndarray | None = None, clients_test: bool = False, accept: Collection[str] = (),
                  held: dict[int, tuple[np.ndarray, np.ndarray, list]] | None = None,
                  progress=None) -> list[dict[str, Any]]:
    """One row per period, in time order: the ``history``'s (``periodhistory.read_history``: earlier periods, which
    join the baseline as they did then) and then one per period of these requests (module docstring).
    ``t`` [N] the requests' times (seconds), ``resid`` [N, L, E] their residuals, ``clients`` [N] as
    outputs name them, ``digest``: the neighbour references' (written with each row). With ``x`` [N,
    dim], the requests' embeddings, an alert's cause: its clients' routing or the period's mix
    (``periodclients.py``); with ``clients_test`` too, every period's clients tested in every cell
    (``periodclients.clients_test``: an alarm of its own, ``clients_alert``, which also keeps the
    period out of later baselines) and its clients of few requests pooled by size (``periodsmall.py``:
    ``small_alert``, the same). ``accept``: the starts (as rows give them) of periods the owner has
    reviewed and judged benign, the history's or these requests': each joins later baselines whatever
    its tests say, and its row says ``accepted`` (so a run reading it as history keeps it). Without
    it, a launch of new content goes on alerting: each alerting day is held out, so no baseline ever
    holds the new content (``benchmarks/routing_monitor_day_novel.py``). ``held``: history periods' requests
    (``periodrequests.read``; emptied as they are taken), by index: their embeddings [n, dim], residuals [n, L, E] and clients, so
    that the clients' test and an alert's cause have them as matches in a daily run, as in one run over
    all the days (the same rows: ``tests/test_periodrequests.py``)."""
    from moeguard.monitor import periodsmall   # here: it builds on this module's Baseline
    from moeguard.monitor.periodhistory import check_after, mark_accepted   # here: periodhistory reads this module's TEST

    accept = set(accept)
    history = mark_accepted(history, accept)
    keys, parts = members(t, period)
    rows = [{k: v for k, v in old.items() if not k.startswith("_")} for old in history]   # _state, _small_state: read back
    of, offset = {}, 0
    if held:   # the history's requests go before this run's, in the history's order
        if x is None:
            raise ValueError("a history's requests need this run's embeddings (x)")
        order = [int(old["index"]) for old in history if int(old["index"]) in held]
        total = sum(len(held[i][0]) for i in order) + len(x)
        # the joined arrays made whole first, then each period copied in and dropped from the caller's
        # dict: a period's arrays are never held twice (np.concatenate's values, in its order)
        all_x = np.empty((total, *x.shape[1:]), dtype=np.result_type(x, *(held[i][0] for i in order)))
        all_r = np.empty((total, *resid.shape[1:]), dtype=np.result_type(resid, *(held[i][1] for i in order)))
        all_c: list = []
        for i in order:
            hx, hr, hc = held.pop(i)
            of[i] = np.arange(offset, offset + len(hx))
            all_x[offset:offset + len(hx)], all_r[offset:offset + len(hx)] = hx, hr
            all_c += hc
            offset += len(hx)
            del hx, hr, hc
        all_x[offset:], all_r[offset:] = x, resid
        x, resid, clients = all_x, all_r, all_c + list(clients)
        parts = [idx + offset for idx in parts]
    base = Baseline(baseline=baseline, alpha=alpha, layers=layers, history=history, requests=of)
    small = periodsmall.SmallClients(baseline=baseline, alpha=alpha, layers=layers, history=history) if clients_test else None
    before, before_key = None, None                            # the last alert's baseline requests (periodclients)
    check_after(t, period=period, history=history)
    if clients_test and x is None:
        raise ValueError("the clients' test needs the requests' embeddings (x)")
    flat = resid.reshape(len(resid), -1)                                 # [N, L * E]: the clients' test's cells
    every_cell = [[a, b] for a in layers for b in range(resid.shape[2])]   # their [layer, expert], in that order
    from moeguard.attribution.context import track

    # a bar per period: with the clients' test a period of 16,000-32,000 requests takes 40-130 s
    for k, idx in track(progress, zip(keys, parts), "testing periods", keep=True):
        r = resid[idx]                  # a copy: [n, L, E], viewed as [n, L * E] by the clients' test (not copied again)
        row = _row(k, period, len(idx), len({str(clients[i]) for i in idx}), digest=digest, baseline=baseline, alpha=alpha,
                   clients_test=clients_test)
        if row["start"] in accept:
            row["accepted"] = True
        rows.append(row)
        if len(idx) < MIN_REQUESTS:
            row["why"] = f"fewer than {MIN_REQUESTS} requests: not tested, and in no baseline"
            continue
        m = r.mean(0)
        earlier = [i for i in base.requests if i is not None]   # the baseline's periods held in this run
        at = np.concatenate(earlier) if earlier else np.zeros(0, dtype=np.int64)
        who, nn = [clients[i] for i in idx], None

        def matched() -> tuple[periodclients.Earlier, np.ndarray | None]:
            """The baseline's requests as matches, built once per baseline, and this period's matches."""
            nonlocal before, before_key, nn
            key = tuple((int(j[0]), len(j)) for j in earlier)   # consecutive alerts share their baseline
            if before is None or before_key != key:
                before, before_key = periodclients.Earlier([x[j] for j in earlier], [[clients[i] for i in j] for j in earlier]), key
            if nn is None and before.why is None:
                nn = before.match(x[idx])
            return before, nn

        if clients_test:   # before the load test: an alarm here keeps the period out of later baselines too
            periodclients.clients_test(row, *matched(), r=r.reshape(len(r), -1), clients=who, pool_r=flat, pool_at=at, alpha=alpha,
                                       cells=every_cell)
            small_states = small.test(row, r, who)
        tested = base.judge(row, m, r.var(0, ddof=1) / len(idx), len(idx), requests=idx,
                            hold=bool(row.get("clients_alert") or row.get("small_alert")), accept=bool(row.get("accepted")))
        if small is not None:   # after the load test: a period that alerted there joins no pool's baseline either
            small.keep(row, small_states)
        if tested is None:
            continue
        expected, l, e, cells = tested
        row["top_clients"] = periodclients.name_clients(r[:, l, e], who, expected[l, e], m[l, e])
        if row.get("alert") and x is not None:   # the routing of its clients, or the mix of the period?
            ls, es = [a for a, _, _ in cells], [b for _, b, _ in cells]
            earlier_x, nn_x = matched()
            # the baseline's residuals read a cell at a time where they lie (flat), as the clients' test reads them
            ps = earlier_x.cause(row, r=r[:, ls, es], clients=who, pool_r=flat, pool_at=at,
                                 pool_cols=[a * resid.shape[2] + b for a, b in zip(ls, es)], alpha=alpha,
                                 nn=nn_x, cells=[[layers[a], b] for a, b, _ in cells])
            for c in row["top_clients"]:
                c["p_routing"] = ps.get(str(c["client"]))
            if row.get("cause") == "routing":   # whose routing moved: not always those the excess names
                row["routing_clients"] = periodclients.routing_clients(ps, who, alpha)
    return rows


def reason(row: dict[str, Any]) -> dict[str, Any]:
    """A period alert's reason, in the shape of the other alerts'."""
    named = ", ".join(f"{c['client']} ({c['requests']})" for c in row["top_clients"]) if "top_clients" in row \
        else ("not named online (score the period's log with `moeguard monitor score --period` to name them; with "
              "the baseline periods' logs too, it says whether their routing or the mix of traffic moved)")
    how = ""
    if row.get("cause") == "routing":
        cell = row.get("cause_cell")
        there = ("the expert" if cell in (None, [row["layer"], row["expert"]])
                 else f"expert {cell[1]} at layer {cell[0]} (which alerts too)")
        moved = ", ".join(f"{c['client']} ({c['requests']}, p {c['p_routing']:.2g})" for c in row.get("routing_clients", []))
        how = (f"; routing beyond content (p {row['p_routing']:.2g}): clients' requests went to {there} more than "
               "requests of the same content did in the baseline periods (a hijack, or content the baseline periods "
               "never held: a launch's users read the same)" + (f"; whose: {moved}" if moved else ""))
    elif row.get("cause") == "mix":
        how = (f"; no client's routing goes beyond its content's (p {row['p_routing']:.2g}): the period's mix moved "
               "(more of one kind of content: a launch, a batch job, or a distributed extraction)")
    elif row.get("cause_why"):
        how = f"; no cause given ({row['cause_why']})"
    return {"statistic": "period_load", "layer": row["layer"], "experts": [row["expert"]], "value": row["z"],
            "p": row["p"], "p_combined": row["p"], **({"cause": row["cause"]} if row.get("cause") else {}),
            # where the cause was found, and whose routing moved (with a decoy, not the clients the excess names)
            **{k: row[k] for k in ("cause_cell", "routing_clients") if row.get(k)},
            "detail": (f"over {row['requests']} requests" + (f" ({row['clients']} clients)" if row["clients"] is not None else "")
                       + f", expert {row['expert']} at layer "
                       f"{row['layer']} took {100 * row['shift']:.2f} points more routing than the requests' content "
                       f"predicts (z {row['z']:.1f} against the {row['baseline']} periods before); most of the excess "
                       f"is from: {named or 'no one client'}" + how
                       + ("" if row.get("accepted") else f"; if it is benign (a launch, a batch job), accept the period "
                          f"(--accept {row.get('start', 'START')}) so that later periods are tested against it"))}
