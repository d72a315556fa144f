"""The small clients' test (``monitor score --period-clients``): a period's clients of few requests,
pooled, against the same pools of the baseline periods.

The clients' test (``periodclients.clients_test``) tests each client alone, and a client of a few
requests cannot be tested alone: under ``periodclients.MIN_REQUESTS`` it is not tested at all, and
its power falls fast with size (on resampled days of the day-load benchmark, a campaign of 3% of the
day was seen on 19 of 20 days as 2 identities of 48 requests, 13 as identities of 24, 5 as
identities of 16 and 0-1 as identities of 4 or 8: ``benchmarks/routing_monitor_day_sybil.py``). An
attacker who holds many identities (accounts, API keys) splits its campaign over them, and the load
test sees the campaign diluted by the whole day.

So the clients under each size are pooled: for each ``under`` in ``SIZES``, the requests of the
period's clients of fewer than ``under`` requests. A campaign split into identities of size ``s``
is in every pool above ``s``, where it is a larger share than of the whole period (benign traffic
in a pool is only the clients as small). Each pool is tested as a period is (``periods.Baseline``:
its mean residual against the same pool of the baseline periods, their day-to-day spread, the mix's
directions removed), and the test's p is the smallest p over the pools tested, Bonferroni-adjusted
for their number. A pool is tested when it holds at least ``periods.MIN_REQUESTS`` requests, at most
``HALF`` of the period's (a larger pool is nearly the whole period: the load test) and other
clients than the pool below it (the same requests would be the same test twice).

Measured (``benchmarks/routing_monitor_day_sybil.py``, docs/routing-security.md): with a tenth of
the day's users one-off identities of 1-3 requests, a campaign of 3% of the day split into
identities of 1-8 requests is seen on 80.5-82.5% of days at 0.01 (the load test: 23.5%), of 16 or
24 on 60%; benign days on 1%. What it cannot tell apart: new users of new
content (a launch by one-off users) move a pool as a campaign does; the alert says so, and
``--accept`` takes the period into later baselines as it does for the other tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeguard.monitor import periods
from moeguard.monitor.embed import pack

SIZES = (4, 8, 16, 32, 64)   # a pool: the clients of fewer requests than this, in the period
HALF = 0.5                    # a pool of more than this share of the period's requests is not tested


def pools(clients: list) -> list[tuple[int, np.ndarray]]:
    """``(under, requests)`` for each size in ``SIZES``: the indices into ``clients`` [n] (who sent each
    request) of the requests of clients with fewer than ``under`` of them."""
    _, owner, count = np.unique(np.array([str(c) for c in clients]), return_inverse=True, return_counts=True)
    size = count[owner]                                                    # [n]: its client's request count
    return [(u, np.flatnonzero(size < u)) for u in SIZES]


class SmallClients:
    """The baseline periods' pools (one ``periods.Baseline`` per size) and the test of a period's.
    A period joins them, as it joins the load test's baseline, only when no test alerted on it or
    the owner accepted it (``keep``, after every test of the period)."""

    def __init__(self, *, baseline: int, alpha: float, layers: list[int], history: list[dict[str, Any]] | None = None):
        self.alpha = alpha
        self.by_size = {u: periods.Baseline(baseline=baseline, alpha=alpha, layers=layers) for u in SIZES}
        for old in history or []:
            if "_small_state" in old and periods.joins(old):
                for u, state in old["_small_state"].items():
                    self.by_size[u].keep(state)

    def test(self, row: dict[str, Any], r: np.ndarray, clients: list) -> list[tuple[int, tuple]]:
        """Fill ``row``'s ``small_p`` (None: no pool tested, ``small_why`` says why), ``small_pools``
        (each tested pool's size bound, requests, clients and p), for the pool of smallest p
        ``small_under``, ``small_requests``, ``small_clients``, ``small_layer``, ``small_expert``,
        ``small_z``, ``small_shift``, ``small_baseline`` and ``small_top_clients``,
        ``small_alert`` at most ``alpha``, and ``small_state`` (what a later run's baseline reads).
        ``r`` [n, L, E] the period's residuals, ``clients`` [n] who sent each. Returns the states to
        ``keep`` once the period's tests are all done."""
        # why no pool was tested: the first pool's reason that had requests enough, else the largest's
        states, tested, why, few, last = [], [], None, None, None
        row["small_p"], row["small_state"] = None, {}
        for u, idx in pools(clients):
            if len(idx) < periods.MIN_REQUESTS:
                few = f"fewer than {periods.MIN_REQUESTS} requests from clients of fewer than {u} requests"
                continue
            m, se2 = r[idx].mean(0), r[idx].var(0, ddof=1) / len(idx)
            if not (np.isfinite(m).all() and np.isfinite(se2).all()):
                continue
            # every pool's state, tested or not: a later period's pool of this size is tested against it
            states.append((u, (m, se2, len(idx))))
            row["small_state"][str(u)] = {"mean": pack(m, "<f8"), "noise": pack(se2, "<f8"), "requests": len(idx)}
            if len(idx) > HALF * len(r):
                why = why or f"clients of fewer than {u} requests are more than half the period (the load test's)"
                continue
            if len(idx) == last:     # pools are nested: the same count is the same clients, the same test
                continue
            got: dict[str, Any] = {}
            judged = self.by_size[u].judge(got, m, se2, len(idx), hold=True)   # kept or not in ``keep``
            if judged is None:   # a larger pool of the same clients may have its baseline already: tested there
                why = why or f"clients of fewer than {u} requests: {got.get('why', 'not tested')}"
                continue
            last = len(idx)
            expected, l, e, _ = judged
            tested.append((got["p"], u, idx, got, expected, l, e))
        row["small_pools"] = [{"under": u, "requests": len(idx), "clients": len({str(clients[i]) for i in idx}),
                               "p": got["p"]} for _, u, idx, got, *_ in tested]
        if not tested:
            row["small_why"] = why or few or "no pool of small clients"
            return states
        p, u, idx, got, expected, l, e = min(tested, key=lambda a: (a[0], a[1]))
        from moeguard.monitor.periodclients import name_clients

        who = [clients[i] for i in idx]
        row.update(small_p=min(1.0, p * len(tested)), small_under=u, small_requests=len(idx),
                   small_clients=len(set(map(str, who))), small_layer=got["layer"], small_expert=got["expert"],
                   small_z=got["z"], small_shift=got["shift"], small_baseline=got["baseline"],
                   small_top_clients=name_clients(r[idx][:, l, e], who, expected[l, e], float(r[idx][:, l, e].mean())))
        if row["small_p"] <= self.alpha:
            row["small_alert"] = True
        return states

    def keep(self, row: dict[str, Any], states: list[tuple[int, tuple]]) -> None:
        """After every test of the period: its pools join the baselines where the period joins the load
        test's (no alert, or accepted)."""
        if periods.joins(row):
            for u, state in states:
                self.by_size[u].keep(state)


def small_reason(row: dict[str, Any]) -> dict[str, Any]:
    """A small clients' test alert's reason, in the shape of the other alerts'."""
    named = ", ".join(f"{c['client']} ({c['requests']})" for c in row["small_top_clients"]) or "no one client"
    return {"statistic": "period_small_clients", "layer": row["small_layer"], "experts": [row["small_expert"]],
            "value": row["small_z"], "p": row["small_p"], "p_combined": row["small_p"],
            "detail": (f"the {row['small_requests']} requests of the period's {row['small_clients']} clients of fewer than "
                       f"{row['small_under']} requests each: expert {row['small_expert']} at layer {row['small_layer']} took "
                       f"{100 * row['small_shift']:.2f} points more routing than their content predicts (z "
                       f"{row['small_z']:.1f} against the pools of clients as small in the {row['small_baseline']} periods before; "
                       f"p {row['small_p']:.2g} over {len(row['small_pools'])} pools). A campaign split over many "
                       f"identities reads so, and so do new users of content the baseline periods never held (a "
                       f"launch); most of the excess is from: {named}"
                       + ("" if row.get("accepted") else "; if it is benign, accept the period "
                          f"(--accept {row.get('start', 'START')}) so that later periods are tested against it"))}
