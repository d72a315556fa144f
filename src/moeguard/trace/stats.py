"""The p-value: does the suspect share its experts with the owner, or could it be independent?

**Per layer (relabeling test).** View A (the gate Gram) chooses which owner expert each suspect
expert corresponds to (a linear assignment, ``sigma``); view B (the up-down operator, other
tensors) scores that choice: ``T = sum_j sB[sigma(j), j]``. The null relabels the owner's
experts: ``T_tau = sum_j sB[tau(sigma(j)), j]`` over every injection ``tau o sigma`` of the
suspect's experts into the owner's (enumerated exactly up to ``EXACT_MAX`` of them, else
``MC_DRAWS`` random ones), and ``p = #{T_tau >= T} / #tau`` (ties and the observed choice count
against the owner). Expert labels are exchangeable in how an MoE is initialized and trained,
so under independence the choice made by view A carries no information about view B's score
(assumption A1 of ``docs/trace.md``, the expert-level form of Zhu et al.'s phi_MATCH; its
calibration on independently trained models is in ``benchmarks/provenance.py``).

**Over layers.** The layers' p-values are independent under the null (each layer relabels on
its own) and each is super-uniform on its grid ``k/N``. Their product is compared with the
exact distribution of a product of independent uniforms on those grids (counted, not
approximated), which keeps the power of layers whose smallest p is 1/56; when counting would
take too long the continuous bound (Fisher's method, always larger) is used instead.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

EXACT_MAX = 50_000
MC_DRAWS = 9_999
COUNT_BUDGET = 200_000


def assignment(s: np.ndarray) -> np.ndarray:
    """sigma[j] = the owner expert (row of ``s``) matched to suspect expert j (column)."""
    from scipy.optimize import linear_sum_assignment

    E, E_s = s.shape
    if E_s > E:  # more suspect experts than owner ones (an expert duplicated or split): best row each
        return s.argmax(axis=0)
    rows, cols = linear_sum_assignment(-s)
    sigma = np.empty(E_s, dtype=int)
    sigma[cols] = rows
    return sigma


def _injections(E: int, k: int) -> int:
    return math.perm(E, k)


def layer_test(s_a: np.ndarray, s_b: np.ndarray, *, rng: np.random.Generator) -> dict:
    """The relabeling test of one layer; returns p, its grid size N, the statistic and sigma."""
    E, E_s = s_b.shape
    sigma = assignment(s_a)
    cols = np.arange(E_s)
    t = float(s_b[sigma, cols].sum())
    injective = len(set(sigma.tolist())) == E_s
    if injective and _injections(E, E_s) <= EXACT_MAX:
        # every injection of the suspect's experts into the owner's, the observed one included
        perms = np.array(list(itertools.permutations(range(E), E_s)), dtype=int)
        null = s_b[perms, cols[None, :]].sum(axis=1)
        n = len(perms)
        exact = True
    else:
        draws = np.stack([rng.permutation(E) for _ in range(MC_DRAWS)])    # tau
        null = s_b[draws[:, sigma], cols[None, :]].sum(axis=1)
        null = np.concatenate([[t], null])
        n = len(null)
        exact = False
    k = int((null >= t - 1e-12).sum())
    return {"p": k / n, "N": n, "statistic": t, "null_mean": float(null.mean()), "null_sd": float(null.std()),
            "sigma": sigma.tolist(), "exact": exact}


def _fisher_terms(ps: list[float]) -> tuple[float, list[float]]:
    """log of each term of x * sum_{k<L} (-ln x)^k / k!, and the largest (to sum them stably)."""
    log_x = sum(math.log(max(p, 1e-300)) for p in ps)
    terms = [log_x + k * math.log(-log_x) - math.lgamma(k + 1) if log_x < 0 else (0.0 if k == 0 else -math.inf)
             for k in range(len(ps))]
    return max(terms), terms


def fisher(ps: list[float]) -> float:
    """P(prod of L independent continuous uniforms <= prod ps) = x * sum_{k<L} (-ln x)^k / k!."""
    top, terms = _fisher_terms(ps)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in terms))


def product_tail(ps: list[float], grids: list[int], *, log10: bool = False) -> tuple[float, str]:
    """P(prod U_l <= prod p_l) for independent U_l uniform on {1/N_l, ..., 1}; each p_l is
    super-uniform on that grid, so this is a valid combined p-value. Counted exactly within a
    budget; Fisher's continuous bound (larger) otherwise. Returns (p, method)."""
    target = sum(math.log(p) for p in ps) + 1e-9
    order = sorted(range(len(ps)), key=lambda i: grids[i])  # small grids first: fewer branches
    Ns = [grids[i] for i in order]
    visits = [0]

    def count(level: int, budget: float) -> int:
        """Tuples of levels level.. whose sum of log(r/N) <= budget."""
        visits[0] += 1
        if visits[0] > COUNT_BUDGET:
            raise OverflowError
        if budget >= 0:
            return math.prod(Ns[level:])
        if level == len(Ns) - 1:
            return min(Ns[level], int(math.floor(math.exp(budget) * Ns[level] + 1e-9)))
        N = Ns[level]
        # the later levels shrink the product by at most prod 1/N_j: r/N above exp(budget) * that is hopeless
        after = sum(math.log(n) for n in Ns[level + 1:])
        top = min(N, int(math.floor(math.exp(budget + after) * N + 1e-9)))
        total = 0
        for r in range(1, top + 1):
            total += count(level + 1, budget - math.log(r / N))
        return total

    try:
        hits = count(0, target)
    except OverflowError:
        return (_fisher_log10(ps) if log10 else fisher(ps)), "fisher"
    if log10:   # big integers: exact where hits / prod(Ns) underflows to 0.0
        return min(0.0, math.log10(hits) - sum(math.log10(n) for n in Ns)), "exact"
    return min(1.0, hits / math.prod(Ns)), "exact"


def log10_product_tail(ps: list[float], grids: list[int]) -> float:
    """log10 of :func:`product_tail`'s p-value, finite where the p-value underflows (many layers
    at the grid's floor: 94 layers at 1e-4 gave p_value 0.0)."""
    return product_tail(ps, grids, log10=True)[0]


def _fisher_log10(ps: list[float]) -> float:
    top, terms = _fisher_terms(ps)
    return min(0.0, (top + math.log(sum(math.exp(x - top) for x in terms))) / math.log(10))
