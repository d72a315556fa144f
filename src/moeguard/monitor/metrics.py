"""The online monitor's Prometheus series (``online.RoutingMonitor``), in one registry.

Metrics (``prometheus-client``, in the monitor's ``registry``):
- ``moeguard_requests_total``, ``moeguard_alerts_total{kind, statistic}``;
- ``moeguard_expert_assignments_total{layer, expert}``: routing load per expert;
- ``moeguard_request_anomaly`` (histogram of -log10 p), ``moeguard_client_anomaly{client}``
  (-log10 p of the client's last scored window: a full one, or an early look with ``--early``, for the
  ``max_clients`` clients tracked);
- ``moeguard_traffic_anomaly`` (-log10 p of the last slice of all traffic, with a profile of ``--slice``
  N: the last N requests' embeddings and client names are kept for it, in the order requests are
  scored, which is the order they complete);
- ``moeguard_period_anomaly`` (-log10 p of the last period of all traffic tested, with ``period``:
  the routing load moved beyond what the requests' content predicts, ``periodwatch.PeriodWatch``);
- what the windows do not see, as ``score``'s summary counts it: ``moeguard_clients_tracked``,
  ``moeguard_requests_awaiting_look`` (requests of tracked clients after their block's last look:
  identities that each stop short of a look pile up here), ``moeguard_clients_evicted_total`` and
  ``moeguard_unwindowed_requests_total`` (an evicted client's requests that no look covered);
- ``moeguard_scoring_failures_total`` (requests whose scoring raised: their result says why) and
  ``moeguard_callback_failures_total`` (``on_result`` and ``on_period_state`` calls that raised).

A scrape first scores the requests still waiting (``_Flusher``, registered before any series), so
every series it reads counts them.
"""

from __future__ import annotations

from typing import Any


class MonitorMetrics:
    """The series one monitor updates; the two read at scrape time call back into it
    (``monitor._tracked``, ``monitor._awaiting``, ``monitor._assigned`` under ``monitor._lock``)."""

    def __init__(self, monitor: Any, registry: Any):
        from prometheus_client import Counter, Gauge, Histogram

        r = registry
        r.register(_Flusher(monitor))      # first: a scrape scores the waiting requests before any metric is read
        self.requests = Counter("moeguard_requests", "requests scored", registry=r)
        self.alerts = Counter("moeguard_alerts", "alerts raised", ["kind", "statistic"], registry=r)
        # per-expert load is exported by a collector over one array: incrementing L x E labelled
        # counters per request was most of the monitor's own cost at batch 1
        r.register(_LoadCollector(monitor))
        self.request_anomaly = Histogram("moeguard_request_anomaly", "-log10 p of each request",
                                         buckets=(0.5, 1, 1.5, 2, 2.5, 3, 4, 5), registry=r)
        self.client = Gauge("moeguard_client_anomaly", "-log10 p of the client's last scored window", ["client"],
                            registry=r)
        self.traffic = Gauge("moeguard_traffic_anomaly", "-log10 p of the last slice of all traffic (profiles with --slice)",
                             registry=r)
        self.period = Gauge("moeguard_period_anomaly", "-log10 p of the last period of all traffic tested (--period)",
                            registry=r)
        # what the windows do not see (``score``'s "unwindowed"): a client evicted before a look covered
        # its latest requests loses them to the windows, and identities that each stop short of a
        # look (an attacker spread over many) leave requests awaiting one
        Gauge("moeguard_clients_tracked", "clients whose window is kept (at most max_clients)",
              registry=r).set_function(monitor._tracked)
        Gauge("moeguard_requests_awaiting_look", "requests of tracked clients that no window look has covered yet",
              registry=r).set_function(monitor._awaiting)
        self.evicted = Counter("moeguard_clients_evicted", "clients evicted beyond max_clients", registry=r)
        self.unwindowed = Counter("moeguard_unwindowed_requests",
                                  "requests of evicted clients that no window look covered", registry=r)
        self.failed = Counter("moeguard_scoring_failures", "requests whose scoring failed", registry=r)
        self.callback_failed = Counter("moeguard_callback_failures", "on_result and on_period_state calls that raised", registry=r)


class _Flusher:
    """Registered first in the monitor's registry: a scrape scores the requests still waiting, so
    every metric it reads counts them. It exports nothing."""

    def __init__(self, monitor: Any):
        self.monitor = monitor

    def describe(self):
        return []

    def collect(self):
        try:
            self.monitor.flush()
        except Exception:  # noqa: BLE001 -- logged and counted in _score; the scrape reads every metric
            pass
        return []


class _LoadCollector:
    """``moeguard_expert_assignments_total{layer, expert}`` from the monitor's running array."""

    def __init__(self, monitor: Any):
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
