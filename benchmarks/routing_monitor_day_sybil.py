"""A campaign split over many identities (Sybil): the period tests on resampled days, and what the
small clients' test (``periodsmall.py``) adds.

    .venv/bin/python benchmarks/routing_monitor_day_load.py --identities 24 --out /tmp/x.json --dump /tmp/days.npz
    .venv/bin/python benchmarks/routing_monitor_day_sybil.py --dump /tmp/days.npz [--draws 200] [--clients-draws 20] [--out JSON]
    .venv/bin/python benchmarks/routing_monitor_day_sybil.py --dump /tmp/days.npz --padded [--out JSON]
    .venv/bin/python benchmarks/routing_monitor_day_sybil.py --dump /tmp/days.npz --mixed [--out JSON]

The clients' test (``score --period-clients``) tests each client alone, so its power falls with the
client's size, and under ``periodclients.MIN_REQUESTS`` requests a client is not tested at all. An
attacker with many identities splits its campaign over them. Here, on days resampled as in
``routing_monitor_day_resample.py`` (14 baseline days and a test day of the benchmark's benign users):

- **One-off users**: a share (``--one-off``) of each day's users, chosen at random, are one-off
  identities: their requests are split into identities of 1-3 requests (the same content, so a
  pool of small clients has a benign baseline). Each share is its own set of draws.
- **Kinds of test day**: ``benign``; ``campaign_s``: the first 2 identities of one campaign (96
  hijacked requests, 3% of the day; ``routing_monitor_day_load.py --identities 24``'s screened
  prefixes, cycling over the campaigns) split into identities of ``s`` requests (``1-3``: sizes
  drawn from 1, 2 and 3; ``48``: as sent); ``control_s``: the same identities' inputs without the
  prefix, split the same way (a day heavy in one task, sent by many small identities: a launch
  among one-off users).
- **Tests**, each at 0.001, 0.01 and 0.05, the share of draws whose p is at most the level:
  ``load`` (``periods.Baseline.judge``, all traffic, against all 14 baseline days), ``small``
  (``periodsmall.SmallClients``: the baseline days tested and kept in sequence, a day its own test
  alerts on held out; unlike ``score_periods``, a baseline day the load test would alert on is kept
  in the pools), each pool's own p
  (``small_under_U``, unadjusted), ``load_or_small`` (either), and on the first ``--clients-draws`` draws of the first share
  the clients' test (``periodclients.clients_test``, slow) and ``any_at_level`` (any of the three).
- ``--padded`` (the first ``--one-off`` share only): an attacker who pads its identities with benign
  requests, to lift each into a larger pool of the small clients' test or out of them all (64 or
  more requests), and to dilute it for the clients' test. ``padded_H_of_S``: the campaign split into
  identities of ``H`` hijacked requests, each topped up to ``S`` requests with benign requests (of
  users in none of the draw's days: the same content as benign traffic); ``S / H`` requests sent for
  each hijacked one. ``control_padded_H_of_S``: the same without the prefix. Written as
  ``results/routing_monitor_day_sybil_padded.json``.
- ``--mixed`` (the first ``--one-off`` share only): an attacker who mixes identity sizes, each
  identity's size drawn from ``MIXED``'s sets (``campaign_S1-S2-...``), to spread its campaign over
  the small clients' test's pools; the control as the first set. Written as
  ``results/routing_monitor_day_sybil_mixed.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import write_result
from routing_monitor_day_resample import LEVELS, day_stats, read_dump

SPLITS = ((1, 2, 3), (4,), (8,), (16,), (24,), (48,))
CONTROL_SPLITS = ((1, 2, 3), (16,))
PADS = ((2, 16), (4, 32), (8, 32), (2, 64), (4, 64), (8, 64), (16, 64))   # --padded: (hijacked, identity size)
CONTROL_PADS = ((4, 64),)
MIXED = ((1, 2, 4, 8, 16), (2, 4, 8, 16, 24), (4, 8, 16, 24, 48), (8, 16, 24, 48))   # --mixed: identity sizes drawn from


def split(reqs: np.ndarray, rng: np.random.Generator, sizes: tuple) -> list[np.ndarray]:
    """``reqs`` cut into identities of sizes drawn from ``sizes``, in order."""
    out, a = [], 0
    while a < len(reqs):
        s = int(rng.choice(sizes))
        out.append(reqs[a:a + s])
        a += s
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", required=True, help="routing_monitor_day_load.py --dump's file")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--clients-draws", type=int, default=20, help="draws (of the first --one-off share) that also run "
                                                                  "the clients' test: about 15 s a draw")
    ap.add_argument("--one-off", default="0.1,0.02,0.25", help="shares of each day's users that are one-off identities")
    ap.add_argument("--baseline", type=int, default=14)
    ap.add_argument("--padded", action="store_true", help="the padded identities instead of the plain splits (module docstring)")
    ap.add_argument("--mixed", action="store_true", help="identities of mixed sizes instead of the plain splits (module docstring)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    from moeguard.monitor import periodclients, periods, periodsmall

    t0 = time.perf_counter()
    z, R, _, pool, per_day, camp, ctrl = read_dump(args.dump)                        # R: [texts, L, E]
    X = z["x"].astype(np.float64)
    layers = list(range(R.shape[1]))
    every = [[a, b] for a in layers for b in range(R.shape[2])]
    if args.padded and args.mixed:
        raise SystemExit("--padded or --mixed, not both")
    shares = [float(s) for s in args.one_off.split(",")][:1 if args.padded or args.mixed else None]

    def day(chosen: np.ndarray, rng: np.random.Generator, tag: str, share: float) -> tuple[np.ndarray, list[str]]:
        """A day's requests and who sent each: each user a one-off identity set with probability ``share``."""
        idx, who = [], []
        for j in chosen:
            if rng.random() < share:
                for q, part in enumerate(split(pool[j], rng, (1, 2, 3))):
                    idx += list(part)
                    who += [f"{tag}:once-{j}-{q}"] * len(part)
            else:
                idx += list(pool[j])
                who += [f"{tag}:user-{j}"] * len(pool[j])
        return np.array(idx), who

    result: dict = {}
    for si, share in enumerate(shares):
        got: dict[str, list] = {}
        rng = np.random.default_rng([args.seed, si])
        for draw in range(args.draws):
            perm = rng.permutation(len(pool))
            drng = np.random.default_rng([args.seed, si, draw])
            days = [day(perm[per_day * i:per_day * (i + 1)], drng, f"d{i}", share) for i in range(args.baseline)]
            tidx, twho = day(perm[per_day * args.baseline:per_day * (args.baseline + 1)], drng, "test", share)
            load = periods.Baseline(baseline=args.baseline, alpha=0.5, layers=layers)
            load.kept = [day_stats(R, i) for i, _ in days]
            small = periodsmall.SmallClients(baseline=args.baseline, alpha=0.01, layers=layers)
            for i, w in days:   # in sequence, as score_periods keeps them (a day its test alerts on is held out)
                row: dict = {}
                small.keep(row, small.test(row, R[i], w))
            c = draw % len(camp)
            kinds = {"benign": (tidx, twho)}
            if args.padded:   # benign requests of the users in none of the draw's days, to pad with
                spare = drng.permutation(np.concatenate([pool[j] for j in perm[per_day * (args.baseline + 1):]]))
            for what, src, splits in (("campaign", camp, MIXED if args.mixed else SPLITS),
                                      ("control", ctrl, MIXED[:1] if args.mixed else CONTROL_SPLITS)):
                reqs = np.concatenate(src[c][:2])
                if args.padded:
                    for h, size in PADS if what == "campaign" else CONTROL_PADS:
                        ids = split(reqs, drng, (h,))
                        if len(ids) * (size - h) > len(spare):
                            raise SystemExit(f"{len(spare)} spare requests, {len(ids) * (size - h)} needed to pad")
                        ids = [np.concatenate([i, spare[q * (size - h):(q + 1) * (size - h)]]) for q, i in enumerate(ids)]
                        kinds[f"{'control_' if what == 'control' else ''}padded_{h}_of_{size}"] = (
                            np.concatenate([tidx, *ids]), twho + [f"sybil-{q}" for q, part in enumerate(ids) for _ in part])
                    continue
                for sz in splits:
                    ids = split(reqs, drng, sz)
                    kinds[f"{what}_{'-'.join(map(str, sz))}"] = (np.concatenate([tidx, *ids]),
                                                                  twho + [f"sybil-{q}" for q, part in enumerate(ids) for _ in part])
            clients = si == 0 and draw < args.clients_draws
            if clients:
                before = periodclients.Earlier([X[i] for i, _ in days], [w for _, w in days])
                at = np.concatenate([i for i, _ in days])
            for k, (idx, who) in kinds.items():
                row = {}
                load.judge(row, *day_stats(R, idx), hold=True)
                ps = {"load": row["p"]}
                row = {}
                small.test(row, R[idx], who)
                ps["small"] = 1.0 if row["small_p"] is None else row["small_p"]
                for pl in row["small_pools"]:
                    ps[f"small_under_{pl['under']}"] = pl["p"]
                ps["load_or_small"] = min(ps["load"], ps["small"])   # either alerting at the level
                got.setdefault(f"{k}|small_pools_tested", []).append(len(row["small_pools"]))
                if clients:
                    row = {}
                    periodclients.clients_test(row, before, before.match(X[idx]), r=R[idx].reshape(len(idx), -1),
                                               clients=who, pool_r=R[at].reshape(len(at), -1), alpha=0.01, cells=every)
                    ps["clients"] = 1.0 if row["clients_p"] is None else row["clients_p"]
                    ps["any_at_level"] = min(ps["load"], ps["small"], ps["clients"])
                for name, p in ps.items():
                    got.setdefault(f"{k}|{name}", []).append(p)
            if (draw + 1) % 50 == 0:
                print(f"one-off {share}: {draw + 1} draws ({time.perf_counter() - t0:.0f} s)", flush=True)
        rates: dict = {}
        for key, v in got.items():
            k, name = key.split("|")
            rates.setdefault(k, {})[name] = (round(float(np.mean(v)), 2) if name == "small_pools_tested" else
                                             {"draws": len(v), **{str(a): round(float(np.mean(np.array(v) <= a)), 4) for a in LEVELS}})
        result[str(share)] = rates
        for k, r in rates.items():
            print(f"one-off {share} {k:16s} " + "  ".join(f"{n} {r[n]['0.01']:.3f}" for n in ("load", "small", "load_or_small", "clients", "any_at_level")
                                                       if n in r), flush=True)
    path = write_result("routing_monitor_day_sybil" + ("_padded" if args.padded else "_mixed" if args.mixed else ""), {
        "setting": {"draws": args.draws, "clients_draws": args.clients_draws, "baseline": args.baseline, "one_off": shares,
                    "users_per_day": per_day, "campaigns": len(camp), "identities_split": 2, "sizes": list(periodsmall.SIZES),
                    "half": periodsmall.HALF, "seed": args.seed, **({"pads": PADS, "control_pads": CONTROL_PADS} if args.padded else {}),
                    **({"mixed": MIXED} if args.mixed else {})},
        "rates": result, "seconds": round(time.perf_counter() - t0, 1)}, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
