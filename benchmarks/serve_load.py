"""Load test of ``moeguard serve`` on localhost: 8 concurrent clients, 1,000 requests, a mix of valid
and malformed ones. Goals: no 5xx and no dropped connection, 4xx for every malformed request, and no
lost metric update (``moeguard_requests_total`` equals the number of answered completions).

    .venv/bin/python benchmarks/serve_load.py [--requests 1000] [--clients 8]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import threading
import time
from collections import Counter

from _common import write_result

BAD = [b"{not json", json.dumps({"prompt": 5}).encode(), json.dumps({"prompt": "x", "max_tokens": "many"}).encode(),
       json.dumps({"prompt": "x", "max_tokens": 10_000}).encode(), json.dumps({"prompt": "x" * 9000}).encode(),
       b"[]", b"{" + b" " * 70_000 + b"}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()
    import uvicorn

    from moeguard.models.loading import load_model
    from moeguard.monitor.online import RoutingMonitor
    from moeguard.monitor.fit import build
    from moeguard.monitor.serve import create_app, uvicorn_config
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import get_task

    m, tok, _ = load_model(None)
    recs = {t: [r["input"] for r in load_records(get_task(t), "eval", limit=200)] for t in ("arith-compare", "docstring-topic")}
    prof = build(m, tok, {t: v[:100] for t, v in recs.items()}, window=16, seed=0, name="embedded")
    prompts = [p for v in recs.values() for p in v[100:]]
    mon = RoutingMonitor(m, prof)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the 8 clients share one loopback address: keyed on their 'user' field, as before --client-id existed
    server = uvicorn.Server(uvicorn_config(create_app(m, tok, mon, client_id="user"), host="127.0.0.1", port=port,
                                           log_level="error"))   # as `moeguard serve` runs it
    statuses: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    per = args.requests // args.clients

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(per):
            bad = i % 3 == 2
            body = BAD[(k + i) % len(BAD)] if bad else json.dumps(
                {"prompt": prompts[(k * per + i) % len(prompts)], "max_tokens": 2, "user": f"client-{k}"}).encode()
            try:
                conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                code = r.status
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            with lock:
                statuses[("bad" if bad else "good", code)] += 1
        conn.close()

    with mon:
        t = threading.Thread(target=server.run, daemon=True)
        t.start()
        while not server.started:
            time.sleep(0.05)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        seconds = time.perf_counter() - t0
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/metrics")
        metrics = c.getresponse().read().decode()
        server.should_exit = True
        t.join(timeout=10)
    counted = float(re.search(r"^moeguard_requests_total (\S+)$", metrics, re.M).group(1))
    answered = sum(n for (kind, code), n in statuses.items() if kind == "good" and code == 200)
    sent = sum(statuses.values()) + len(errors)
    goals = {"no_5xx_no_dropped": not errors and not any(code >= 500 for (_, code) in statuses),
             "malformed_all_4xx": all(400 <= code < 500 for (kind, code) in statuses if kind == "bad"),
             "valid_all_200": all(code == 200 for (kind, code) in statuses if kind == "good"),
             "no_lost_metric_update": counted == answered, "at_least_1000_requests": sent >= 1000}
    path = write_result("serve_load", {"requests": sent, "clients": args.clients, "seconds": round(seconds, 1),
                                       "requests_per_second": round(sent / seconds, 1),
                                       "statuses": {f"{k}:{c}": n for (k, c), n in sorted(statuses.items())},
                                       "errors": errors[:10], "metric_requests_total": counted, "answered": answered,
                                       "goals": goals}, args.out)
    print(json.dumps({f"{k}:{c}": n for (k, c), n in sorted(statuses.items())}), goals, f"{seconds:.1f} s; {path}")


if __name__ == "__main__":
    main()
