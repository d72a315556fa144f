"""The online routing monitor: a hook on a loaded Hugging Face MoE model (in a serving process)
that scores every request and every client's window against a profile (``profile.py``) and
exports Prometheus metrics.

    monitor = RoutingMonitor(model, Profile.from_dict(json.load(open("P.json")), where="P.json"))
    with monitor:                                  # hooks attached; removed on exit
        with monitor.request(client="alice") as r: # one request: its prompt's forward pass(es)
            model.generate(...)
        r.result                                   # {"p", "alert": {...} | None, "window": {...} | None, "statistics"}

Only the request's **prefill** is counted (the profile is of prompts; generated tokens would
shift it). Per client the monitor keeps one running sum of routing histograms ([L, E] floats),
and the current window's p-values and prompt embeddings (``window`` x min(64, hidden) floats, ``embed.py``):
bounded memory whatever the traffic, and no prompt is stored. Clients beyond
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
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from moeguard.monitor.embed import PooledHidden
from moeguard.monitor.profile import STATISTICS, WINDOW_STATISTICS, Profile
from moeguard.monitor.tokens import RoutedIds


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
        profile.check_hidden(getattr(getattr(model, "config", None), "hidden_size", None))
        self._E = E
        self._cell_offsets = (np.arange(L) * E)[:, None, None]    # [L, 1, 1]: layer l's experts at l * E
        self._pooled = PooledHidden(self.adapter)                 # the prompt's final hidden states
        self._pooled.limit, self._pooled.enabled = 1, False
        self._routed = RoutedIds(self.adapter, first_only=True)   # the prompt's top-k ids per layer
        self._routed.enabled = False
        self._ids = None                                          # the prompt's token ids (prefill)
        self._mask = None                                         # its attention mask; False: none given
        self._warned_ids = False
        self._active = False          # inside a request, before its prefill has been counted
        self._clients: OrderedDict[str, list] = OrderedDict()   # client -> [sum [L, E], [p], [embedding]]
        self._lock = threading.Lock()
        self._hooks = contextlib.ExitStack()
        self._assigned = np.zeros((L, E))            # routing assignments per expert, read at scrape time
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.m_requests = Counter("moeguard_requests", "requests scored", registry=r)
        self.m_alerts = Counter("moeguard_alerts", "alerts raised", ["kind", "statistic"], registry=r)
        # per-expert load is exported by a collector over one array: incrementing L x E labelled
        # counters per request was most of the monitor's own cost at batch 1
        r.register(_LoadCollector(self))
        self.m_request_anomaly = Histogram("moeguard_request_anomaly", "-log10 p of each request",
                                           buckets=(0.5, 1, 1.5, 2, 2.5, 3, 4, 5), registry=r)
        self.m_client = Gauge("moeguard_client_anomaly", "-log10 p of the client's last complete window", ["client"],
                              registry=r)

    # --- hooks -------------------------------------------------------------------------------
    def _ids_hook(self, module, args):
        if self._active and self._ids is None and args:
            self._ids = args[0]

    def _mask_hook(self, module, args, kwargs):
        # the prefill's attention mask: padded rows are counted, pooled and scored without padding
        if self._active and self._mask is None:
            m = kwargs.get("attention_mask")
            self._mask = m if m is not None and m.dim() == 2 else False
            if self._mask is not False:
                self._pooled.mask = self._mask

    def __enter__(self) -> "RoutingMonitor":
        # every hook in one stack: an error while attaching removes those already attached
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._routed)
            stack.enter_context(self._pooled)
            stack.callback(self.model.get_input_embeddings().register_forward_pre_hook(self._ids_hook).remove)
            stack.callback(self.model.register_forward_pre_hook(self._mask_hook, with_kwargs=True).remove)
            self._hooks = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.close()

    # --- one request ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def request(self, client: str) -> Iterator[RequestResult]:
        out = RequestResult(client=str(client))
        self._routed.reset()
        self._ids, self._mask = None, None
        self._pooled.sums, self._pooled.mask = [], None
        self._active = self._pooled.enabled = self._routed.enabled = True
        try:
            yield out
        finally:
            self._active = self._pooled.enabled = self._routed.enabled = False
        if any(x is None for x in self._routed.ids) or not self._pooled.sums:
            return                      # nothing (or not every layer) ran: a failed request
        E = self._E
        # numpy from here: per call it costs a fraction of torch's dispatch on these tiny arrays
        routed = torch.stack(self._routed.ids).cpu().numpy()              # [L, rows * T, k]
        self._routed.reset()
        ids = self._ids.detach().cpu().numpy() if self._ids is not None else None
        mask = self._mask.detach().cpu().numpy().astype(bool) if self._mask is not False and self._mask is not None else None
        self._ids, self._mask = None, None
        if mask is not None and mask.size == routed.shape[1] and not mask.all():
            valid = mask.reshape(-1)                      # padded positions are not the prompt's
        else:
            valid, mask = None, None
        kept = routed if valid is None else routed[:, valid]
        tokens = float(kept.shape[1])                     # the prompt's tokens (all rows)
        L = len(kept)                                     # one bincount over (layer, expert) cells
        counts = np.bincount((kept + self._cell_offsets).ravel(), minlength=L * E).reshape(L, E).astype(np.float64)
        # surprise per row of the prompt's ids (a request is one prompt; several rows: the largest)
        if ids is None or ids.size != routed.shape[1]:
            surprise = 0.0              # called with embeddings, not ids: this statistic has nothing to read
            if not self._warned_ids:
                self._warned_ids = True
                warnings.warn("the model was called without input ids: the monitor scores 'surprise' as 0 "
                              "(no token ids to look up); the other statistics are unaffected")
        else:
            ids = ids.reshape(-1, ids.shape[-1])
            T = ids.shape[1]
            rows = [(ids[b], routed[:, b * T:(b + 1) * T]) if mask is None else
                    (ids[b][mask[b]], routed[:, b * T:(b + 1) * T][:, mask[b]]) for b in range(len(ids))]
            surprise = max(self.profile.tokens.surprise(i, r) for i, r in rows)
        prefill = self._pooled.sums[0].numpy().sum(0, keepdims=True, dtype=np.float64)   # [1, hidden]: the prompt's
        self._pooled.sums = []
        x = self.profile.space(prefill, np.array([tokens]))[0]
        out.result = self._score(out.client, counts, x, surprise)

    def _score(self, client: str, counts: np.ndarray, x: np.ndarray, surprise: float) -> dict[str, Any]:
        h = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        stats = self.profile.statistics(h[None], x[None], np.array([surprise]))
        ps = self.profile.p_values(stats, "request")
        p = float(ps["combined"][0])
        res: dict[str, Any] = {"p": p, "alert": None, "window": None,
                               "statistics": {k: float(stats[k][0]) for k in STATISTICS}}
        with self._lock:
            self.m_requests.inc()
            self.m_request_anomaly.observe(-math.log10(p))
            self._assigned += counts
            if p <= self.alpha:
                res["alert"] = {"kind": "request", **self.profile.reason(stats, ps, 0, h)}
                self.m_alerts.labels("request", res["alert"]["statistic"]).inc()
            # the window so far: sum of h, and its requests' p-values and embeddings (at most
            # `window` of each: bounded, and no prompt)
            state = self._clients.pop(client, None) or [np.zeros_like(h), [], []]
            state[0] += h
            state[1].append(p)
            state[2].append(x)
            if len(state[1]) == self.window:     # a complete window: score it as `score` does, start the next
                w = state[0] / self.window
                ws = self.profile.window_statistics(w[None], [np.array(state[1])], [np.stack(state[2])])
                wp = self.profile.p_values(ws, "window")
                pw = float(wp["combined"][0])
                res["window"] = {"p": pw, "statistics": {k: float(ws[k][0]) for k in WINDOW_STATISTICS}}
                self.m_client.labels(client).set(-math.log10(pw))
                if pw <= self.alpha:
                    res["window"]["alert"] = {"kind": "window", **self.profile.reason(ws, wp, 0, w)}
                    self.m_alerts.labels("window", res["window"]["alert"]["statistic"]).inc()
                state = [np.zeros_like(h), [], []]
            self._clients[client] = state
            while len(self._clients) > self.max_clients:
                old, _ = self._clients.popitem(last=False)
                with contextlib.suppress(KeyError):
                    self.m_client.remove(old)
        return res


class _LoadCollector:
    """``moeguard_expert_assignments_total{layer, expert}`` from the monitor's running array."""

    def __init__(self, monitor: RoutingMonitor):
        self.monitor = monitor

    def describe(self):
        # declared up front, so a second monitor registering the same series in one registry is refused
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("moeguard_expert_assignments", "routing assignments per expert (prefill tokens x top-k)",
                                  labels=["layer", "expert"])

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        m = self.monitor
        fam = CounterMetricFamily("moeguard_expert_assignments", "routing assignments per expert (prefill tokens x top-k)",
                                  labels=["layer", "expert"])
        with m._lock:
            a = m._assigned.copy()
        for slot, layer in enumerate(m.adapter.layers):
            for e in range(a.shape[1]):
                fam.add_metric([str(layer.index), str(e)], float(a[slot, e]))
        yield fam
