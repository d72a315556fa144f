"""Who moved a period's load, and how (``monitor score --period``): the clients a period alert names,
and whether it is their *routing* that moved or the period's *mix* of traffic.

A period alerts when its mean residual in one (layer, expert) cell leaves what the baseline days
predict (``periods.py``). Two kinds of day do that:
- **routing**: some clients' requests are routed to the expert more than requests of the same content
  were on earlier days (a hijack campaign: each of its requests moved, whatever identity sent it);
- **mix**: no client's routing is unusual for its content, but the day holds more of one kind of
  content than the baseline days did (a launch, a batch job, or a distributed extraction campaign:
  many requests of one task). The neighbours' prediction is not exact in every region of content,
  so a heavy region moves the mean residual too.

**The test** (``Earlier.cause``). In each cell the period test found alerting (every one: a heavy
load of one task can take the top cell while a campaign moves another, and a decoy can move several),
each request's residual is compared with the mean residual of its ``K``
nearest requests (in the profile's embedding) among the baseline periods' requests in this run: the
same content, routed on days that passed. A verbatim repeat of the
request is not its own match (a campaign that repeats one prompt must not be matched by its earlier
copies). Per client of at least ``MIN_REQUESTS`` requests, a moderated one-sample t of those
differences (``moderated_z``). Benign clients' z's are wider than N(0, 1) (a client's requests share
neighbours, and users have habits), so the null is made of the baseline periods' own clients, each
period's matched against the others: ``NULL_CLIENTS`` of them, their median and scaled median
absolute deviation (an empirical null, as in Efron's large-scale testing). The period's own clients
are not the null's spread: a campaign of many identities would widen it. Its centre is the
baseline's median, or the period's own clients' median where that is higher: the cell was chosen
because the period's mean stood out there, which lifts every client's difference a little
(``Earlier.cause``). A client's p is its upper tail
against that null, Bonferroni-adjusted over the period's clients tested and the cells; the period's
cause is ``routing`` where the smallest is at most the period's level, else ``mix``.

Measured in ``benchmarks/routing_monitor_day_resample.py`` (docs/routing-security.md). The test
needs the baseline periods' requests: periods read from ``--history`` bring theirs only from the
``period_requests`` folder beside it (``periodrequests.py``), and with fewer
than 2 periods or ``MIN_MATCHED`` requests held, or fewer than ``MIN_NULL`` clients in them, the
cause is not given (``cause_why`` says why).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

K = 32               # earlier requests of the same content each request is compared with
MIN_REQUESTS = 4     # requests a client needs to be tested (a t needs a spread)
PRIOR_DF = 8         # the moderated t's prior degrees of freedom (``moderated_z``)
MIN_MATCHED = 256    # baseline requests in this run the test needs
NULL_CLIENTS = 128   # baseline clients (at most) whose z's are the null
MIN_NULL = 32        # and at least
NAMED = 5            # clients an alert names
UPPER = 0.9          # the clients' test's null scale is at least its upper tail's, from this quantile (``Earlier.cause``)
SCALE_FLOOR = 1.0    # the null's scale in a sparse cell is at least a z's own (N(0, 1)) (``Earlier.cause``)
SPARSE = 0.5         # a cell is sparse where at least this share of the baseline's residuals there are exactly 0
CHUNK_VALUES = 1 << 22   # distances ``nearest`` computes at a time (32 MiB as float64; at least 32 rows)
REQUESTS_FOLDER = "period_requests"   # beside periods.jsonl: each period's requests for later runs (periodrequests.py)


def _tally(clients: list) -> tuple[dict[str, int], dict[str, Any]]:
    """Each client's request count, and the value it was first given as (outputs name it so), by its
    ``str``: ``clients`` [n] who sent each request."""
    count: dict[str, int] = {}
    named: dict[str, Any] = {}
    for c in clients:
        count[str(c)] = count.get(str(c), 0) + 1
        named.setdefault(str(c), c)
    return count, named


def name_clients(r: np.ndarray, clients: list, expected: float, mean: float) -> list[dict[str, Any]]:
    """The ``NAMED`` clients whose requests carry most of a cell's excess over ``expected``: ``r`` [n]
    the period's residuals in the cell (``mean`` their mean, as the test computed it), ``clients`` [n]
    who sent each. Each with its request count and its share of the period's excess."""
    count, named = _tally(clients)
    excess: dict[str, float] = {}
    for c, v in zip(clients, r - expected):
        excess[str(c)] = excess.get(str(c), 0.0) + float(v)
    total = float((mean - expected) * len(r))
    top = [c for c in sorted(excess, key=lambda c: -excess[c]) if excess[c] > 0][:NAMED]
    return [{"client": named[c], "requests": count[c],
             "excess": round(excess[c] / total, 3) if total > 0 else None} for c in top]


def routing_clients(ps: dict[str, float | None], clients: list, alpha: float) -> list[dict[str, Any]]:
    """The ``NAMED`` clients whose routing went beyond their content's (``Earlier.cause``'s adjusted p at
    most ``alpha``), the smallest p first: ``ps`` by client name, ``clients`` [n] who sent each request."""
    count, named = _tally(clients)
    small = sorted((p, c) for c, p in ps.items() if p is not None and p <= alpha)[:NAMED]
    return [{"client": named[c], "requests": count[c], "p_routing": p} for p, c in small]


def _repeats(d2: np.ndarray, qn: np.ndarray, pn: np.ndarray) -> np.ndarray:
    """Which distances ``d2`` (|q - p|^2 less |q|^2, ``nearest``'s) are a verbatim repeat of the query:
    |q - p|^2 within a relative 1e-9 of the two norms. ``qn`` and ``pn`` broadcast against ``d2``."""
    return d2 + qn <= 1e-9 * (qn + pn)


def nearest(x: np.ndarray, pool: np.ndarray, k: int, *, skip: tuple[int, int] | None = None) -> np.ndarray:
    """[len(x), k] indices into ``pool`` of each row's ``k`` nearest rows (Euclidean), in chunks (a
    period against two weeks of requests is a large matrix). A row equal to the query (to a relative
    1e-9: a verbatim repeat) is not its match, nor are the pool's rows ``skip`` = (start, stop) (a
    period matched against the others: the pool is not copied without it); where fewer than ``k``
    others are left, the missing matches are -1 (``matched_mean`` skips them). Each row is sorted (its
    -1s first, then its matches in increasing pool index), so the mean over them is summed in one
    order whatever selected them. Where exact copies of one pool row tie at the k-th distance, which
    copies are taken is the selection's choice (copies of one prompt are routed alike).

    The selection is ``torch.topk`` on numpy's distances (shared, not copied): it runs on every thread,
    where numpy's ``argpartition`` ran on one (``benchmarks/results/period_clients_cost_topk.json``)."""
    import torch

    k = min(k, len(pool))
    out = np.full((len(x), k), -1, dtype=np.int64)
    if k < 1:
        return out
    # each row's squared norm, a block of rows at a time: the same sums as (pool**2).sum(1), without a
    # temporary the pool's size
    pn = np.concatenate([(pool[a:a + 4096] ** 2).sum(1) for a in range(0, len(pool), 4096)])
    # rows a chunk: its [rows, pool] distances (and their temporaries) about 32 MiB, not 512 rows whatever
    # the pool (two weeks of 16,000 requests a day made 0.9 GB a chunk and a 3.7 GB peak); at least 32
    # rows, so the pool is not read once per row (past a pool of 131,072 a chunk is larger: 115 MiB at 448,000)
    rows = max(32, min(512, CHUNK_VALUES // max(1, len(pool))))
    for s in range(0, len(x), rows):
        q = x[s:s + rows]
        qn = (q**2).sum(1)[:, None]
        d2 = (q * -2) @ pool.T                                              # [chunk, pool]: |q - p|^2 less |q|^2
        d2 += pn                                                            # (scaling q by -2 is exact: the same values)
        if skip is not None:
            d2[:, skip[0]:skip[1]] = np.inf
        idx = torch.topk(torch.from_numpy(d2), k, dim=1, largest=False, sorted=False).indices.numpy()
        # a verbatim repeat is not its own match. Where a row's k hold none, they are its k nearest others
        # as they are; the rows whose k hold one are selected again without their repeats (masking every
        # row's distances first, as until 2026-12-06, cost as much as the selection)
        redo = np.nonzero(_repeats(np.take_along_axis(d2, idx, 1), qn, pn[idx]).any(1))[0]
        for g in range(0, len(redo), 8):   # 8 rows a topk, not one (a log of templated prompts repeats many
            r = redo[g:g + 8]              # of them), and not all (their temporaries would be the chunk's, 4 times)
            sub = d2[r]
            sub[_repeats(sub, qn[r], pn)] = np.inf
            d2[r] = sub
            idx[r] = torch.topk(torch.from_numpy(sub), k, dim=1, largest=False, sorted=False).indices.numpy()
        idx[np.isinf(np.take_along_axis(d2, idx, 1))] = -1
        idx.sort(axis=1)                   # -1s first, then the matches in pool order
        out[s:s + rows] = idx
    return out


def matched_mean(v: np.ndarray, nn: np.ndarray) -> np.ndarray:
    """[len(nn)]: the mean of ``v`` [pool] over each row's matches (``nearest``), NaN where it has none."""
    ok = nn >= 0
    total = np.where(ok, v[np.maximum(nn, 0)], 0.0).sum(1)
    count = ok.sum(1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def moderated_z(d: np.ndarray, owner: np.ndarray, s0: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per client (``owner`` [n] indexes them): its differences ``d`` [n] as the z of a moderated
    one-sample t, NaN for clients of fewer than ``MIN_REQUESTS``; their variances and the tested mask.

    Moderated as in Smyth's limma: a client's variance is shrunk toward ``s0`` (default: the tested
    clients' mean variance; ``Earlier.cause`` gives the null clients') with ``PRIOR_DF`` degrees of
    freedom, so a client of 4 requests that happen to agree is not read as certain. On resampled days, with each client's own variance alone,
    benign clients of 4 requests reached the t's of a campaign's; with the pooled variance alone,
    days heavy in one task were put down to routing on 10% of draws (0% moderated)."""
    from scipy.stats import norm
    from scipy.stats import t as student

    G = int(owner.max()) + 1
    ok = np.isfinite(d)                    # a request with no match counts for nothing
    owner, d = owner[ok], d[ok]
    n = np.bincount(owner, minlength=G).astype(float)
    tested = n >= MIN_REQUESTS
    mean = np.bincount(owner, weights=d, minlength=G) / np.maximum(n, 1)
    var = np.maximum(np.bincount(owner, weights=d * d, minlength=G) - n * mean**2, 0.0) / np.maximum(n - 1, 1)
    s0 = float(var[tested].mean()) if s0 is None else s0
    shrunk = (PRIOR_DF * s0 + (n - 1) * var) / (PRIOR_DF + n - 1)
    t = mean / np.sqrt(np.maximum(shrunk, 1e-30) / np.maximum(n, 1))
    z = np.full(G, np.nan)
    z[tested] = norm.isf(student.sf(t[tested], df=PRIOR_DF + n[tested] - 1))        # the t as a z, by its df
    return z, var, tested


def _owners(clients: list) -> tuple[np.ndarray, np.ndarray]:
    """Client names (sorted) and each request's index into them."""
    return np.unique(np.array([str(c) for c in clients]), return_inverse=True)


class Earlier:
    """The baseline periods' requests in this run, as matches for a period's: each period's embeddings
    [m_j, dim] and clients [m_j]. The null's matches (``NULL_CLIENTS`` clients of the periods, as many
    from each, each period's matched against the others) are found once, whatever the cell tested."""

    def __init__(self, x: list[np.ndarray], clients: list[list]):
        sizes = [len(a) for a in x]
        self.pool = np.concatenate(x) if x else np.zeros((0, 0))
        self.why = None
        self.sampled: list[tuple[int, str]] = []   # the null's clients: (period, name)
        if len(x) < 2 or len(self.pool) < MIN_MATCHED:
            self.why = (f"{len(x)} baseline periods ({len(self.pool)} requests) held with their requests; 2 and "
                        f"{MIN_MATCHED} needed (a --history's periods bring theirs from the {REQUESTS_FOLDER} folder "
                        "beside it, which `monitor score --period` writes; serve's period log has none)")
            return
        starts = np.cumsum([0] + sizes[:-1])
        rows, owners, nn = [], [], []
        for j, (xj, cj) in enumerate(zip(x, clients)):
            if len(self.pool) - sizes[j] <= K:   # too few to be its nearest: this period gives the null no client
                continue
            names, owner = _owners(cj)
            n = np.bincount(owner, minlength=len(names))
            quota = NULL_CLIENTS // len(x) + (j < NULL_CLIENTS % len(x))
            # chosen by a hash of the period and the name: not by how names sort, and not the same
            # clients every period where names recur (API keys)
            ok = sorted((g for g in range(len(names)) if n[g] >= MIN_REQUESTS),
                        key=lambda g: hashlib.sha256(f"{j}\0{names[g]}".encode()).digest())[:quota]
            keep = np.flatnonzero(np.isin(owner, ok))
            if not len(keep):
                continue
            nn.append(nearest(xj[keep], self.pool, K, skip=(starts[j], starts[j] + sizes[j])))   # among the others
            rows.append(starts[j] + keep)
            owners.append(len(self.sampled) + np.unique(owner[keep], return_inverse=True)[1])
            self.sampled += [(j, str(names[g])) for g in sorted(ok)]
        self._rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)     # null requests, into the pool
        self._nn = np.concatenate(nn) if nn else np.zeros((0, K), dtype=np.int64)
        self._owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
        if len(self.sampled) < MIN_NULL:
            self.why = (f"{len(self.sampled)} clients of {MIN_REQUESTS} or more requests in the baseline periods, "
                        f"{MIN_NULL} needed")

    def match(self, x: np.ndarray) -> np.ndarray:
        """[len(x), K] indices into the pool of each request's nearest earlier requests (``nearest``)."""
        return nearest(x, self.pool, K)

    def cause(self, row: dict[str, Any], *, r: np.ndarray, clients: list, pool_r: np.ndarray, alpha: float,
              nn: np.ndarray, cells: list[list[int]] | None = None, centre: str = "period",
              tail: bool = False, pool_at: np.ndarray | None = None,
              pool_cols: list[int] | None = None) -> dict[str, float | None]:
        """Fill an alerted period's ``cause`` (``routing`` or ``mix``), ``p_routing`` and ``cause_cell``, or
        ``cause_why``: its requests' residuals ``r`` [n, c] in the ``c`` cells tested (``cells``: their
        [layer, expert], the test's alerting cells, most deviant first; [n]: one), ``clients`` [n] and
        matches ``nn`` (``match``); ``pool_r`` [m, c] the earlier requests' residuals there (or, with
        ``pool_at`` [m], rows of ``pool_r`` that are: one cell's column is gathered at a time, so the
        baseline's residuals are not copied whole; a fortnight of Mixtral's 256 cells at 32,000 requests
        a day was a 0.9 GB copy), and with ``pool_cols`` [c] the columns of ``pool_r`` that are the
        ``c`` cells (the load test's alerting cells among all of them: no copy either). Each of the
        period's clients' adjusted p (its smallest over the cells; None: too few requests), by name.

        Bonferroni over the clients and the cells. Every alerting cell is tested, not only the most
        deviant: a day can hold a mix that moves one cell and a campaign that moves another (or an
        attacker who adds a heavy load of one task to have its alert read as the mix).

        ``centre``: where the null is centred. ``period`` (the test): the baseline clients' median, or
        the period's own tested clients' median where that is higher. A cell is tested because the
        period's mean stood out there, and its clients' differences sum to about that excess: choosing
        the cell lifts every client's difference a little, and a null from other periods does not
        have that lift (on 200 resampled benign days, ``p_routing`` at most 0.01 on 2.0% and at most
        0.05 on 8.5% with the baseline's centre; 1.5% and 6.0% centred so). The median moves little
        with a few clients far out (a campaign); identities that are half the period's tested
        clients would move it to their own. ``baseline``: the baseline clients' median alone (the
        test before 2026-12-06, kept for the benchmark's comparison).

        ``tail`` (the clients' test, ``clients_test``): the null's scale is at least its upper tail's,
        ``(quantile UPPER - median) / z_UPPER``. In a cell the model seldom routes to, a client of a few
        requests has a difference near 0 or, when one request is routed there, a large one: the null's
        z's are skewed to the right, and its MAD, from the bulk, is narrower than its upper tail. On
        the embedded model's test days (clients of 4 requests), benign clients were flagged in such a
        cell on 6 of 7 benign days with the MAD alone (one cell, layer 1 expert 4: the null's 95th
        percentile 3.8-4.3 MADs above its median), and on none with the tail. On a symmetric null it costs
        a little power: the larger of two estimates of one scale.

        In a *sparse* cell (at least ``SPARSE`` of the baseline's residuals there exactly 0: an expert
        that no token of most requests, nor of their references, is routed to), the scale is at least
        ``SCALE_FLOOR``, a z's own, in both tests. There most null clients' differences are 0 or nearly,
        so the median, the MAD and the upper tail are too, and a benign client with one request routed
        there stood that many "scales" out: on a tiny random-weight Mixtral of 8 x 512 cells
        (``benchmarks/score_memory.py``'s), every benign day from the third alerted the clients' test
        at p 0.0. A floor on every cell cost the embedded model's clients' test power (its nulls are
        narrower than N(0, 1) in some cells: a 4-draw smoke lost a quarter to a half of its campaign
        detections); limited to sparse cells, it changes none of that smoke's numbers."""
        from scipy.stats import norm

        if centre not in ("period", "baseline"):
            raise ValueError(f"centre is {centre!r}, not 'period' or 'baseline'")

        row["cause"], row["p_routing"] = None, None
        if self.why is not None:
            row["cause_why"] = self.why
            return {}
        r, pool_r = np.asarray(r).reshape(len(r), -1), np.asarray(pool_r).reshape(len(pool_r), -1)
        rows = slice(None) if pool_at is None else np.asarray(pool_at)     # the pool's requests among pool_r's rows
        cols = list(range(pool_r.shape[1])) if pool_cols is None else list(pool_cols)   # cell j is pool_r's column cols[j]
        if len(cols) != r.shape[1] or (cells is not None and len(cells) != r.shape[1]):
            raise ValueError(f"residuals in {r.shape[1]} cells, the pool's in {len(cols)}, "
                             f"{'no' if cells is None else len(cells)} cells named")
        names, owner = _owners(clients)
        best = np.full(len(names), np.inf)                 # each client's smallest adjusted p over the cells
        tested = np.zeros(len(names), dtype=bool)
        why, where = None, None
        for j in range(r.shape[1]):
            col = pool_r[rows, cols[j]]                                      # [m]: the baseline's residuals in cell j
            zn, varn, tn = moderated_z(col[self._rows] - matched_mean(col, self._nn), self._owner)
            null = zn[tn]
            z, _, tj = moderated_z(r[:, j] - matched_mean(col, nn), owner,
                                   s0=float(varn[tn].mean()) if tn.any() else None)
            med = float(np.median(null)) if len(null) else 0.0
            mad = 1.4826 * float(np.median(np.abs(null - med))) if len(null) else 0.0
            if tail and len(null):
                mad = max(mad, (float(np.quantile(null, UPPER)) - med) / float(norm.isf(1 - UPPER)))
            if len(null) and np.mean(col == 0) >= SPARSE:   # a sparse cell: no spread to learn (docstring)
                mad = max(mad, SCALE_FLOOR)
            if centre == "period" and tj.any():   # the period's own clients' median, where it is higher (docstring)
                med = max(med, float(np.median(z[tj])))
            if not tj.any() or not mad > 0:
                why = why or (f"no client of {MIN_REQUESTS} or more requests in the period" if not tj.any() else
                              "the baseline clients' differences do not vary in this cell: no null to test against")
                continue
            adjusted = np.where(tj, np.minimum(1.0, norm.sf((z - med) / mad) * int(tj.sum()) * r.shape[1]), np.inf)
            if where is None or np.nanmin(adjusted) < np.nanmin(best):
                where = j
            best, tested = np.fmin(best, adjusted), tested | tj
        if where is None:
            row["cause_why"] = why
            return {}
        row["p_routing"] = float(np.nanmin(best))
        row["cause"] = "routing" if row["p_routing"] <= alpha else "mix"
        if cells is not None:
            row["cause_cell"] = list(cells[where])
        return {str(names[g]): (float(best[g]) if tested[g] else None) for g in range(len(names))}


def clients_test(row: dict[str, Any], before: Earlier, nn: np.ndarray | None, *, r: np.ndarray, clients: list,
                 pool_r: np.ndarray, alpha: float, cells: list[list[int]], pool_at: np.ndarray | None = None) -> None:
    """The clients' test (``monitor score --period-clients``): every period's clients, in every cell of
    the model, against the same content on the baseline periods (``Earlier.cause``, Bonferroni over the
    clients and the cells), whether the period's load test alerts or not. ``r`` [n, cells] the period's
    residuals, ``pool_r`` [m, cells] the baseline requests' (``pool_at``: ``Earlier.cause``'s), ``cells`` their
    [layer, expert].

    Why a test of its own: the load test sums a period's residual over all its clients, so a few
    identities are diluted by everyone else's; here each client is a test. On 100 resampled days of the
    day-load benchmark (``benchmarks/routing_monitor_day_resample.py``, ``clients_test``), 2 identities
    (3% of the day's requests) were seen on 99% of days at 0.01 (the load test: 25%), benign days and
    days heavy in one task on none (3% and 2-3% at 0.05). It runs with the null's upper-tail scale
    (``Earlier.cause``'s ``tail``): in every cell, seldom-routed ones included.
    Fills ``clients_p`` (None: not tested, ``clients_why`` says why), ``clients_cell`` and, at most
    ``alpha``, ``clients_alert`` and ``clients_routing`` (the clients, smallest p first)."""
    got: dict[str, Any] = {}
    ps = before.cause(got, r=r, clients=clients, pool_r=pool_r, pool_at=pool_at, alpha=alpha, nn=nn, cells=cells,
                      tail=True)
    row["clients_p"] = got["p_routing"]
    if got["p_routing"] is None:
        row["clients_why"] = got["cause_why"]
        return
    row["clients_cell"] = got["cause_cell"]
    if got["p_routing"] <= alpha:
        row["clients_alert"] = True
        row["clients_routing"] = routing_clients(ps, clients, alpha)


def clients_reason(row: dict[str, Any]) -> dict[str, Any]:
    """A clients' test alert's reason (``clients_test``), in the shape of the other alerts'."""
    layer, expert = row["clients_cell"]
    moved = ", ".join(f"{c['client']} ({c['requests']} requests, p {c['p_routing']:.2g})" for c in row["clients_routing"])
    load = ("the period's load alerted too" if row.get("alert") else
            "the period's load did not alert" + (f" (p {row['p']:.2g})" if row.get("p") is not None else " (not tested)"))
    return {"statistic": "period_clients", "layer": layer, "experts": [expert], "value": None,
            "p": row["clients_p"], "p_combined": row["clients_p"], "cause": "routing",
            "routing_clients": row["clients_routing"],
            "detail": (f"over {row['requests']} requests ({row['clients']} clients), some clients' requests were routed "
                       f"beyond what requests of the same content got in the baseline periods (a hijack, or content the "
                       f"baseline periods never held: a launch's users read the same), most of all to expert {expert} at "
                       f"layer {layer} (p {row['clients_p']:.2g} over every client and cell): {moved}; {load}"
                       + ("" if row.get("accepted") else "; if their content is new and benign, accept the period "
                          f"(--accept {row.get('start', 'START')}) so that later periods are tested against it"))}
