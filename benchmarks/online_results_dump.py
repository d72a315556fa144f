"""Every result the online hook (``RoutingMonitor``) gives on fixed traffic, for refactor equality.

    python benchmarks/online_results_dump.py --out /tmp/before.json    # before a change to online.py
    python benchmarks/online_results_dump.py --out /tmp/after.json     # after it
    python benchmarks/compare_numbers.py --pair online /tmp/before.json /tmp/after.json

The embedded model, a profile of three tasks with early looks at 4, slices of 16 and replies of 4
tokens; 8 days of 48 benign requests (users of 4) and a campaign day (tests/test_periods.py's
traffic), scored with periods of a day, baseline 4, batches of 8, 20 tracked clients (evictions
happen) and 3-token greedy replies. Written: every ``on_result`` call (requests, windows, slices,
periods), each open-period save, and every Prometheus sample. About 20 s on 2 cores.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where the JSON goes")
    ap.add_argument("--seed", type=int, default=0, help="the traffic's seed")
    args = ap.parse_args()

    import torch

    from moeguard.models.loading import load_model
    from moeguard.monitor.fit import build
    from moeguard.monitor.online import RoutingMonitor
    from moeguard.monitor.score import _time
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import get_task
    from test_periods import DAY, TASKS, _day

    torch.manual_seed(args.seed)
    m, tok, _ = load_model(None)
    prompts = {t: [r["input"] for r in load_records(get_task(t), "eval", limit=120)] for t in TASKS}
    prof = build(m, tok, prompts, window=8, seed=args.seed, name="embedded", early=(4,), slice_len=16, reply_tokens=4)
    rng = random.Random(args.seed)
    rows = [r for d in range(6) for r in _day(d, rng)] + _day(6, rng, campaign=24) + _day(7, rng)
    rows.sort(key=lambda r: r["time"])
    out, states, now = [], [], [0.0]
    mon = RoutingMonitor(m, prof, flush_every=8, max_delay_s=None, period=DAY, baseline=4, clock=lambda: now[0],
                         on_result=lambda c, r: out.append([c, r]), on_period_state=states.append, max_clients=20)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    with mon:
        for r in rows:
            now[0] = _time(r["time"], "")
            ids = torch.tensor([bos + tok(r["prompt"], add_special_tokens=False)["input_ids"]])
            with mon.request(r["client"]) as q:
                g = m.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
                q.reply_tokens = int(g.shape[1] - ids.shape[1])
    samples = sorted([s.name, sorted(s.labels.items()), s.value] for f in mon.registry.collect() for s in f.samples
                     if not s.name.endswith("_created"))
    path = write_result("online_results_dump", {"results": out, "states": states, "metrics": samples}, args.out)
    print(f"{len(out)} results, {sum(1 for _, r in out if r.get('period'))} periods closed, {len(states)} saves: {path}")


if __name__ == "__main__":
    main()
