"""Slices of all traffic (``monitor profile --slice N``): a view across client identities.

A client window sees an identity from its first early look (``ladder.py``). An attacker who moves to
a new identity every few requests is seen by no window; one universal crafted text still moves every
one of its requests' embeddings the same way. So every ``N`` consecutive requests of *all* traffic
(in time order, whoever sent them) form a slice, scored by ``drift`` against the best-fitting mix of
the benign topics: ``min over c on the simplex of MMD^2(slice, sum_t c_t R_t)``. The client windows
use the nearest-topic shares instead, because under a fitted mix one benign user's habits score high.
A slice of many users' traffic has no one user's habits, and the fitted mix removes the nearest-topic
shares' bias, which no slice length averages away (docs/routing-security.md, "A view across
identities").

**The null** is benign slices drawn from the profile's calibration half. Each has its own topic mix,
drawn from Dirichlet(0.5) over the topics, because traffic's composition moves over a day and a
statistic of all traffic must not alert on that. A topic drawn more often than it has calibration
requests repeats some (which raises a benign slice's ``drift``). The null describes traffic drawn like
the profile's inputs in Dirichlet mixes: held-out benign slices alerted on 2-3% at 0.01 in
``benchmarks/routing_monitor_slices.py``, which is why slices are off by default.

**An alert names the clients** whose requests carry the slice's excess: each request's witness, its
mean kernel to the slice's requests from *other* clients less its mean kernel to the fitted benign
mix, averaged per client. A campaign spread over identities is where the slice is denser than benign
use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeguard.errors import MoeguardError

CONCENTRATION = 0.5     # Dirichlet concentration of the benign slices' topic mixes
NAMED = 5               # clients an alert names
LONGEST = 4096          # requests a slice may hold: its kernel is n x n (128 MiB at 4096), fitted once per slice


def mix(K: np.ndarray, m: np.ndarray, start: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """``argmin c'Kc - 2 c'm`` on the probability simplex (``K`` a Gram matrix, ``m`` in its span),
    by the primal active-set method (Nocedal & Wright, 16.5) from the feasible ``start``. A projected
    gradient needed 50-1,000 steps where topics overlap; this takes a few small solves (0.1-0.4 ms
    for 10 topics) and matched a 20,000-step projected gradient to 1e-15 on 500 random problems,
    duplicate topics included.

    Free coordinates F solve ``K_FF c_F + nu = m_F``, ``sum c_F = 1``; the others are 0. A step that
    would make a free coordinate negative stops there and fixes it at 0; at a stationary point the
    fixed coordinate with the most negative multiplier ``(Kc - m)_i + nu`` is freed; none: optimal."""
    T = len(m)
    c = np.asarray(start, dtype=np.float64).copy()
    free = c > 0
    for _ in range(8 * T + 8):                 # each pass frees or fixes one coordinate
        F = np.flatnonzero(free)
        A = np.zeros((len(F) + 1, len(F) + 1))
        A[:-1, :-1], A[:-1, -1], A[-1, :-1] = K[np.ix_(F, F)], 1.0, 1.0
        sol = np.linalg.lstsq(A, np.append(m[F], 1.0), rcond=None)[0]   # lstsq: duplicate topics make A singular
        p = sol[:-1] - c[F]
        if np.abs(p).max() <= 1e-12:
            g = K @ c - m
            lam = g - g[F].mean()              # nu = -(Kc - m)_F, equal over F at a stationary point
            lam[F] = 0.0
            i = int(lam.argmin())
            if lam[i] >= -tol:
                break
            free[i] = True
            continue
        neg = p < 0
        steps = np.where(neg, c[F] / np.where(neg, -p, 1.0), np.inf)
        j = int(steps.argmin())
        alpha = min(1.0, float(steps[j]))
        c[F] += alpha * p
        if alpha < 1.0:
            c[F[j]], free[F[j]] = 0.0, False
    c = np.maximum(c, 0.0)
    return c / c.sum()


def fit(kernel, x: np.ndarray, clients: list | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """(squared MMD of ``x`` [n, dim] from the best-fitting topic mix, that mix [topics], each
    request's witness [n]). Never above the nearest-topic shares' value (both are tried).

    ``clients`` (one per row): pairs of one client's own requests are left out of the slice's
    within-term and of the witnesses, so a heavy benign user's self-similarity is not the slice's
    excess (an attacker on one identity is the windows' to see). Benign calibration slices are
    scored as if every request were another user's (``None``).

    ``kernel.K`` leaves self-pairs out of a topic's own mean kernel (an unbiased MMD), which can make
    it indefinite where topics overlap. The mix is solved with the topics' mean-embedding Gram matrix
    instead (self-pairs in: positive semi-definite, so the active-set solve is a convex problem's exact
    minimum), and the statistic is evaluated with ``kernel.K`` as ``drift`` is."""
    mu = kernel.means(x)                                                  # [n, topics]
    n = len(x)
    kx = kernel._k(x, x)
    np.fill_diagonal(kx, 0.0)
    if clients is not None:
        ids = np.unique(np.asarray([str(c) for c in clients]), return_inverse=True)[1]
        kx[ids[:, None] == ids[None, :]] = 0.0
        others = n - np.bincount(ids)[ids]                                # [n]: requests of other clients
    else:
        others = np.full(n, n - 1)
    within = kx.sum() / max(1, int(others.sum()))
    m = mu.mean(0)
    nearest = np.bincount(mu.argmax(1), minlength=len(kernel.refs)) / n
    K = kernel.K
    gram = K + np.diag((1.0 - np.diag(K)) / kernel._sizes)               # self-pairs back in: PSD
    c = min((mix(gram, m, nearest), nearest), key=lambda c: c @ K @ c - 2 * c @ m)
    witness = kx.sum(1) / np.maximum(others, 1) - mu @ c
    return float(within + c @ K @ c - 2 * c @ m), c, witness


def check_slice(n: Any) -> int:
    """``--slice`` checked: 0 (no slices) or 2 to ``LONGEST`` requests (a slice's kernel is n x n)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not (n == 0 or 2 <= n <= LONGEST):
        raise MoeguardError(f"slice is {n!r} requests", hint=f"pass 0 (no slices of all traffic) or 2 to {LONGEST} requests")
    return int(n)


def calibrate(kernel, *, n: int, XC: np.ndarray, cal_topic: list[str], topics: list[str], count: int,
              rng: np.random.Generator) -> np.ndarray:
    """Sorted ``drift`` of ``count`` benign slices of ``n`` requests (module docstring)."""
    pools = [np.flatnonzero(np.asarray(cal_topic) == t) for t in topics]
    pools = [p for p in pools if len(p)]
    out = np.empty(count)
    for i in range(count):
        sizes = rng.multinomial(n, rng.dirichlet(np.full(len(pools), CONCENTRATION)))
        pick = np.concatenate([rng.choice(p, size=s, replace=s > len(p)) for p, s in zip(pools, sizes) if s])
        out[i] = fit(kernel, XC[pick])[0]
    return np.sort(out)


def floor(prof) -> float:
    """The smallest p-value a slice can get from the profile's null (``ladder.floor``'s twin)."""
    return 1 / (len(prof.null["slice.drift"]) + 1)


def score(prof, x: np.ndarray, clients: list) -> dict[str, Any]:
    """One slice: its ``drift``, p-value, topic mix and the clients carrying its excess."""
    value, c, witness = fit(prof.kernel, x, clients)
    by_client: dict[str, list[float]] = {}
    named: dict[str, Any] = {}   # a client is its id's text, as fit pairs them (1 and "1" are one), named as first seen
    for cl, w in zip(clients, witness):
        by_client.setdefault(str(cl), []).append(float(w))
        named.setdefault(str(cl), cl)
    # by mean witness: a client sending many requests is not named for its volume
    top = sorted(by_client, key=lambda cl: -float(np.mean(by_client[cl])))[:NAMED]
    mixture = {t: round(float(v), 3) for t, v in zip(prof.kernel.names, c) if v > 0.005}
    from moeguard.monitor.profile import empirical_p

    return {"drift": round(value, 6), "p": float(empirical_p(prof.null["slice.drift"], value)), "clients": len(by_client),
            "mix": mixture, "top_clients": [{"client": named[cl], "requests": len(by_client[cl]),
                                             "witness": round(float(np.mean(by_client[cl])), 4)} for cl in top]}


def reason(row: dict[str, Any], n: int) -> dict[str, Any]:
    """An alert's reason, in the shape of the window and request alerts'."""
    named = ", ".join(f"{t['client']} ({t['requests']})" for t in row["top_clients"])
    return {"statistic": "slice_drift", "value": row["drift"], "p": row["p"], "p_combined": row["p"],
            "detail": (f"{n} requests of all traffic ({row['clients']} clients) are distributed unlike any mix of benign "
                       f"topics (MMD^2 {row['drift']:.4f} against the best-fitting mix); most of the excess is from: {named}")}


def check_profile(meta: dict[str, Any], null: dict[str, np.ndarray]) -> bool:
    """Whether a loaded profile's slices are whole: a valid length and its null of p-value-able values."""
    if "slice" not in meta:
        return True
    try:
        n = check_slice(meta["slice"])
    except MoeguardError:
        return False
    ref = null.get("slice.drift", np.empty(0))
    return n > 0 and len(ref) > 0 and len(ref) == meta.get("benign_windows")
