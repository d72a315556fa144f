"""The period test's arithmetic (``periods.Baseline``): the baseline periods' spread and main directions,
and the test of a *sparse* cell.

A cell is **sparse** where at least ``SPARSE`` of the baseline periods' mean residuals there are exactly 0:
no request of those periods, nor any of its nearest benign references, was routed to that expert. On
models of many experts such cells are common (a tiny random-weight Mixtral of 8 x 512 cells:
``benchmarks/score_memory.py``), above all in the small clients' test's pools of a few dozen requests.
There the baseline's day-to-day spread and sampling noise are 0, and the first test divided by them:
a benign day with one request routed there stood 1e9 spreads out, and the small clients' test alerted
7 of 11 benign days at p 1e-36 to 1e-62; each day that alerted stayed out of the baseline, so the
zeros stayed the norm. In a sparse cell now:

- **The noise is pooled** (``pooled``): the per-request variance of the baseline's requests and the
  period's together, as a two-proportion test pools under its null; the period's own part weighs
  its share of the requests. The out-of-sample spread is at least that noise (nothing varied to
  learn a narrower one from).
- **Its z is at most the exact test's** (``events_z``): a period's *events* are as many requests of one
  size as give its mean and variance; were the period's and the baseline's events spread over their
  requests at random, how likely is the period's share? With a few events the t's tails are far too
  thin: one event in a period after 14 empty ones is z 3.9 (p about 1e-3) by the pooled noise,
  1 in 15 exactly.

Measured in ``benchmarks/period_sparse_cells.py`` (one cell of 8 routed to by a small share of
requests, periods of 200). Where that share is 0.05-0.2%, benign periods alert at 0.7-1.0% at 0.01,
against 7-15% before (at p down to 1e-175), and 5 hijacked requests are seen on 96-100% of periods.
Where it is 0.4-0.6% (about one request a period: sparse on some days), benign periods alert at
1.0-2.0% (before: 3.7-4.7%) and 5 hijacked requests are seen on 80-95% (before: all). What it gives
up is magnitude: events are counted as if of one size, so 2 hijacked requests that route 10 times
what benign ones do, to an expert the baseline hardly saw, are seen on 0-2% of periods (before: all,
among the false alarms). Under exchangeable requests alone no test could do better: 2 events falling
in one period of 15 periods' requests is p (1/15)^2, whatever their size; more needs a model of
benign magnitudes. Where the share is 1% (the cell never sparse), every number is as before.
"""

from __future__ import annotations

import math

import numpy as np

FACTORS = 3           # at most this many directions of the baseline's day-to-day variation are removed
SPARSE = 0.5          # a cell is sparse where at least this share of the baseline periods' means there are exactly 0
TINY = 1e-18         # a floor on variances: a cell no baseline period routes to (0 / 0) is not NaN


def factors(M: np.ndarray, noise: np.ndarray, k: int | None = None,
            sparse: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Periods' mean [cells], spread [cells] (``spread``) and the ``k`` directions [cells, k] along
    which their standardized values vary most (the day's mix of users). ``k`` None: as many as stand
    above noise, from the same decomposition: those whose variance passes the largest that independent
    cells would show (the Marchenko-Pastur edge, (1 + sqrt(cells / (n - 1)))^2 in units of a cell's
    variance), at most ``FACTORS`` and the periods' number less 3. A direction fitted to noise would
    take part of a shift's cell with it (a synthetic day mix of one direction was seen at 54% with 3
    removed, 73% with 1). The ``sparse`` cells [cells] (bool) take no part in the directions and none
    is removed from them: their few events are no mix of users, and their spread is pooled with
    the period's, which must not move the other cells' test."""
    n, cells = M.shape
    mu, sd = M.mean(0), spread(M, noise)
    use = np.ones(cells, dtype=bool) if sparse is None else ~sparse
    top = max(0, min(FACTORS, n - 3)) if k is None else k
    if top <= 0 or not use.any():
        return mu, sd, np.zeros((cells, 0))
    X = (M - mu) / sd
    _, sv, vt = np.linalg.svd(X if use.all() else X[:, use], full_matrices=False)
    if k is None:
        k = int(min(top, np.sum(sv**2 / (n - 1) > (1 + math.sqrt(int(use.sum()) / (n - 1))) ** 2)))
    if use.all():   # no sparse cell: the directions as they always were (the same bits)
        return mu, sd, vt[:k].T
    V = np.zeros((cells, k))
    V[use] = vt[:k].T
    return mu, sd, V


def pooled(ref: list[tuple[np.ndarray, np.ndarray, int]], own: np.ndarray, n: int, noise: np.ndarray,
           per_request: np.ndarray, sparse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In the ``sparse`` cells, the baseline's sampling noise [cells] and per-request variance [cells] at
    least the per-request variance of the baseline's requests and the period's together (``own`` [cells],
    of its ``n`` requests): under the null they are one population, as a two-proportion test pools.
    Within-period variances only: the periods' means differ by a few events' worth at most here."""
    counts = np.array([c for _, _, c in ref], dtype=np.float64)
    total = sum(b.ravel()[sparse] * c * c for _, b, c in ref) + own[sparse] * n
    both = total / (counts.sum() + n)                                   # [sparse cells]: per request
    noise, per_request = noise.copy(), per_request.copy()
    noise[sparse] = np.maximum(noise[sparse], both * np.mean(1.0 / counts))
    per_request[sparse] = np.maximum(per_request[sparse], both)
    return noise, per_request


def events(m: np.ndarray, se2: np.ndarray, n: int) -> np.ndarray:
    """A period's routing events per cell [cells]: as many of its ``n`` requests, routed there alike
    and the rest not, as give its mean ``m`` > 0 and sampling variance ``se2``. For k such requests
    m^2 / se2 is r = k (n - 1) / (n - k), so k = r n / (n - 1 + r); every request where none varies
    (se2 0); none where the mean is not above 0 (load moved away is no event)."""
    r = np.square(m) / np.maximum(se2, TINY)
    return np.where(m > 0, np.where(se2 > 0, r * n / (n - 1 + r), n), 0.0)


def events_z(ref: list[tuple[np.ndarray, np.ndarray, int]], m: np.ndarray, se2: np.ndarray, n: int,
             df: int) -> np.ndarray:
    """Each cell's z [cells] (Student t of ``df``) of the exact test of a period's routing events against
    the baseline periods': were the events of the period and the baseline together spread over their
    requests at random, the chance that the period's ``n`` held as many (binomial: P(X >= k) is
    I_q(k, others + 1), q the period's share of the requests). +inf where the period moved no load."""
    from scipy.special import betainc
    from scipy.stats import t as student

    k, others = events(m, se2, n), sum(events(a.ravel(), b.ravel(), c) for a, b, c in ref)
    q = n / (n + sum(c for _, _, c in ref))
    # scipy's t.isf gives -inf or a negative z below about 1e-250 at some df (3: 1e-250): 1e-200 is its floor
    p = np.clip(betainc(np.maximum(k, 1e-12), others + 1.0, q), 1e-200, 1 - 1e-16)
    return np.where(k > 0, student.isf(p, df), np.inf)


def spread(M: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Periods' spread per cell, floored at their sampling noise and at TINY (an expert nothing routes to)."""
    return np.sqrt(np.maximum(np.maximum(M.var(0, ddof=1), noise), TINY))


def deviation(m: np.ndarray, mu: np.ndarray, sd: np.ndarray, V: np.ndarray) -> np.ndarray:
    """A period's standardized deviation [cells] with its part along the factors removed."""
    d = (m - mu) / sd
    return d - V @ (V.T @ d)
