"""The online routing monitor: a hook on a loaded Hugging Face MoE model (in a serving process)
that scores every request and every client's window against a profile (``profile.py``) and
exports Prometheus metrics.

    monitor = RoutingMonitor(model, Profile.from_dict(json.load(open("P.json")), where="P.json"))
    with monitor:                                  # hooks on every router; removed on exit
        with monitor.request(client="alice") as r: # one request: its prompt's forward pass(es)
            model.generate(...)
        r.result                                   # {"p": ..., "alert": {...} | None, "window": {...} | None}

Only the request's **prefill** is counted (the profile is of prompts; generated tokens would
shift it). Per client the monitor keeps one running sum of routing histograms ([L, E] floats),
a running sum of -log p and a count: bounded memory whatever the traffic, and no prompt is stored. Clients beyond
``max_clients`` evict the least recently seen (its window restarts when it returns).

Metrics (``prometheus-client``, in ``registry``):
- ``moeguard_requests_total``, ``moeguard_alerts_total{kind, statistic}``;
- ``moeguard_expert_assignments_total{layer, expert}``: routing load per expert;
- ``moeguard_request_anomaly`` (histogram of -log10 p), ``moeguard_client_anomaly{client}``
  (-log10 p of the client's last complete window, for the ``max_clients`` clients tracked).

Requests must not run concurrently through the same model (a serving process serializes them,
as ``serve.py`` does): the hook attributes every router call to the current request.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from moeguard.monitor.profile import Profile


@dataclass
class RequestResult:
    client: str
    result: dict[str, Any] = field(default_factory=dict)


class RoutingMonitor:
    def __init__(self, model, profile: Profile, *, alpha: float = 0.01, max_clients: int = 1000, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from moeguard.models.adapter import MoEAdapter

        self.model, self.profile, self.alpha = model, profile, alpha
        self.adapter = MoEAdapter(model)
        self.window = int(profile.meta["window"])
        self.max_clients = max_clients
        L, E = len(self.adapter.layers), self.adapter.num_experts
        if (L, E) != profile.mean.shape:
            from moeguard.errors import MoeguardError

            raise MoeguardError(f"the profile has {profile.mean.shape[0]} MoE layers x {profile.mean.shape[1]} experts, "
                                f"the model {L} x {E}", hint="use the profile made for this model")
        self._counts = torch.zeros(L, E, dtype=torch.int64)
        self._active = False          # inside a request, before its prefill has been counted
        self._prefill_seen: set[int] = set()
        self._clients: OrderedDict[str, list] = OrderedDict()   # client -> [sum [L, E], n]
        self._lock = threading.Lock()
        self._handles: list = []
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.m_requests = Counter("moeguard_requests", "requests scored", registry=r)
        self.m_alerts = Counter("moeguard_alerts", "alerts raised", ["kind", "statistic"], registry=r)
        self.m_load = Counter("moeguard_expert_assignments", "routing assignments per expert (prefill tokens x top-k)",
                              ["layer", "expert"], registry=r)
        self.m_request_anomaly = Histogram("moeguard_request_anomaly", "-log10 p of each request",
                                           buckets=(0.5, 1, 1.5, 2, 2.5, 3, 4, 5), registry=r)
        self.m_client = Gauge("moeguard_client_anomaly", "-log10 p of the client's last complete window", ["client"],
                              registry=r)
        # the per-expert counters, looked up once: a label lookup per expert per request is most of
        # the monitor's own cost at batch 1 (benchmarks/monitor_overhead.py)
        self._load = [[self.m_load.labels(str(l.index), str(e)) for e in range(E)] for l in self.adapter.layers]

    # --- hooks -------------------------------------------------------------------------------
    def _hook(self, slot: int):
        def hook(module, args, output):
            if not self._active or slot in self._prefill_seen:
                return
            idx = output[2]
            self._counts[slot] += torch.bincount(idx.reshape(-1), minlength=self._counts.shape[1]).to(self._counts.device)
            self._prefill_seen.add(slot)
        return hook

    def __enter__(self) -> "RoutingMonitor":
        try:
            for slot, layer in enumerate(self.adapter.layers):
                self._handles.append(layer.router.register_forward_hook(self._hook(slot)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # --- one request ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def request(self, client: str) -> Iterator[RequestResult]:
        out = RequestResult(client=str(client))
        self._counts.zero_()
        self._prefill_seen.clear()
        self._active = True
        try:
            yield out
        finally:
            self._active = False
        counts = self._counts.numpy().astype(np.float64)
        if counts.sum() == 0:
            return                      # nothing ran through the model (a failed request)
        out.result = self._score(out.client, counts)

    def _score(self, client: str, counts: np.ndarray) -> dict[str, Any]:
        h = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        stats = self.profile.statistics(h[None])
        ps = self.profile.p_values(stats, "request")
        p = float(ps["combined"][0])
        res: dict[str, Any] = {"p": p, "alert": None, "window": None}
        with self._lock:
            self.m_requests.inc()
            self.m_request_anomaly.observe(-math.log10(p))
            for l, e in zip(*np.nonzero(counts)):
                self._load[l][e].inc(float(counts[l, e]))
            if p <= self.alpha:
                res["alert"] = {"kind": "request", **self.profile.reason(stats, ps, 0, h)}
                self.m_alerts.labels("request", res["alert"]["statistic"]).inc()
            state = self._clients.pop(client, None) or [np.zeros_like(h), 0, 0.0]   # sum of h, n, sum of -log p
            state[0] += h
            state[1] += 1
            state[2] += -math.log(p)
            if state[1] == self.window:          # a complete window: score it, start the next
                w = state[0] / state[1]
                ws = self.profile.statistics(w[None])
                ws["evidence"] = np.array([state[2] / state[1]])
                wp = self.profile.p_values(ws, "window")
                pw = float(wp["combined"][0])
                res["window"] = {"p": pw}
                self.m_client.labels(client).set(-math.log10(pw))
                if pw <= self.alpha:
                    res["window"]["alert"] = {"kind": "window", **self.profile.reason(ws, wp, 0, w)}
                    self.m_alerts.labels("window", res["window"]["alert"]["statistic"]).inc()
                state = [np.zeros_like(h), 0, 0.0]
            self._clients[client] = state
            while len(self._clients) > self.max_clients:
                old, _ = self._clients.popitem(last=False)
                with contextlib.suppress(KeyError):
                    self.m_client.remove(old)
        return res
