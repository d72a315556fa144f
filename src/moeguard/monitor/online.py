"""The online routing monitor: a hook on a loaded Hugging Face MoE model (in a serving process)
that scores every request and every client's window against a profile (``profile.py``) and
exports Prometheus metrics.

    monitor = RoutingMonitor(model, Profile.from_dict(json.load(open("P.json")), where="P.json"))
    with monitor:                                  # hooks attached; removed on exit
        with monitor.request(client="alice") as r: # one request: its prompt's forward pass(es)
            model.generate(...)
        r.result                                   # {"p", "alert", "window", "slice", "period", "statistics"}

**Scored in batches.** A request's exit only keeps its prefill's routed ids, token ids and pooled
hidden state (small arrays, no text; ``batch.py`` reads a batch of them). The statistics, windows
and metrics run for ``flush_every`` requests at once (default 16), when a result is read
(``r.result`` scores what is waiting), on every metrics scrape, and when the monitor is exited;
``on_result(client, result)`` is called as each is scored. Straight after a forward, every numpy
call costs ~10x what it does in a loop (the forward has evicted its code and data), so scoring one
request at a time cost 0.6 ms on the embedded model, 1.08x its batch-1 forward; in batches, the
requests share those first calls.
``flush_every=1`` scores each request at its exit. A result is late by at most 1.25 x ``max_delay_s``
(default 1 s: while the monitor is entered, a daemon thread looks four times per interval and
scores what waited that long), and less when traffic fills a batch or a scrape comes. The waiting requests' token ids stay in memory
until their batch is scored (at most ``flush_every`` prompts' worth), and are never written anywhere.

Only the request's **prefill** is counted in the prompt's statistics (the profile is of prompts;
generated tokens would shift it). With a profile that scores replies (``replies.py``), the decode
steps' routing is kept too (at most the profile's reply length) and scored as the reply: the
prefill's last position and each decode step, the first ``r.reply_tokens`` of them when the caller
sets it (the reply's length without its end of text, as ``serve.py`` does; unset, every decode
step, which counts the forward that made the end of text as well). Per client the monitor keeps one running sum of routing histograms ([L, E] floats),
and the current window's p-values and prompt embeddings (``window`` x min(64, hidden) floats, ``embed.py``):
bounded memory whatever the traffic, and no prompt is stored. Clients beyond
``max_clients`` evict the least recently seen (its window restarts when it returns, and its next
block may alert again: ``score`` continues the block instead). With ``period`` (``periods.py``,
``periodwatch.py``), the current period's count and per-cell sums of residuals, tested when the next
period's first request is counted (``r.result["period"]``: the closed period's row) or, with a
ticker, once its end has passed (``on_result(None, {"period": row})``: no request closed it).
``period_open`` restores a saved open period, and ``on_period_state(state)`` is given the open
period's counts at most every ``periodwatch.CHECKPOINT_S`` seconds (with a ticker) and on exit.

Metrics (``prometheus-client``, in ``registry``): ``metrics.py``.

Requests must not run concurrently through the same model (a serving process serializes them,
as ``serve.py`` does): the hook attributes every router call to the current request.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.models.families import text_config
from moeguard.models.hooks import Hooks
from moeguard.monitor import ladder, periods, periodwatch, slices
from moeguard.monitor.batch import BatchReader, Captured
from moeguard.monitor.embed import PooledHidden
from moeguard.monitor.metrics import MonitorMetrics
from moeguard.monitor.profile import NOT_MEASURED, WINDOW_STATISTICS, Profile, unmeasured
from moeguard.monitor.replies import ReplyIds
from moeguard.monitor.tokens import RoutedIds

_log = logging.getLogger("moeguard.monitor")


@dataclass
class RequestResult:
    """One request's monitor result. Reading ``result`` scores the requests still waiting
    (``RoutingMonitor.flush``) if this one is among them."""
    client: str
    # the reply's length in tokens, without its end of text (set by a caller that generated, before
    # the request ends): with a profile that scores replies, its positions are those (replies.py)
    reply_tokens: int | None = None
    _monitor: Any = field(default=None, repr=False)
    _result: dict[str, Any] = field(default_factory=dict, repr=False)
    _scored: bool = False

    @property
    def result(self) -> dict[str, Any]:
        if not self._scored and self._monitor is not None:
            self._monitor.flush()
        return self._result

    @result.setter
    def result(self, value: dict[str, Any]) -> None:
        self._result = value


class RoutingMonitor:
    def __init__(self, model, profile: Profile, *, alpha: float = 0.01, max_clients: int = 1000, registry=None,
                 flush_every: int = 16, max_delay_s: float | None = 1.0, on_result=None,
                 raise_errors: bool = True, period: float | None = None, baseline: int = periods.BASELINE,
                 period_history: list[dict] | None = None, period_open: dict | None = None,
                 on_period_state=None, period_alpha: float | None = None, clock=time.time):
        from prometheus_client import CollectorRegistry

        from moeguard.models.adapter import MoEAdapter

        self.model, self.profile, self.alpha = model, profile, alpha
        self.adapter = MoEAdapter(model)
        self.window = int(profile.meta["window"])
        self.looks = frozenset(ladder.lengths(profile.meta))   # when a client's block is scored (ladder.py)
        self.slice = int(profile.meta.get("slice", 0))        # requests per slice of all traffic (slices.py)
        self._slice: list[tuple[str, np.ndarray]] = []        # the current slice: (client, embedding), no text
        # periods of all traffic (periods.py): a request counts by when it was served (``clock``)
        watch = None if period is None else periodwatch.PeriodWatch(
            periods.neighbours_of(profile, "serve"), period=period, baseline=baseline,
            alpha=periods.period_alpha(alpha, period_alpha), layers=profile.meta["layers"],
            history=period_history, open_period=period_open)
        self.clock = clock
        self.max_clients = max_clients
        if int(flush_every) < 1:
            raise MoeguardError(f"flush_every is {flush_every}", hint="score every request (1) or batches of more")
        self.flush_every = int(flush_every)
        if max_delay_s is not None and not (isinstance(max_delay_s, (int, float)) and 0 < max_delay_s < math.inf):
            raise MoeguardError(f"max_delay_s is {max_delay_s}", hint="pass a positive number of seconds, or None")
        self.max_delay_s = max_delay_s               # a waiting request is scored at most this late (None: no bound)
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self.on_result = on_result                   # (client, result) per scored request: alerts to a log, a SIEM
        # False (a server): a scoring or on_result error is logged and counted, not raised into the
        # request whose exit scored the batch (its answer was already computed)
        self.raise_errors = raise_errors
        self._pending: list[Captured] = []          # requests not scored yet (at most flush_every)
        # one flush at a time: windows see requests in order. on_result runs under it, so a flush
        # called from a callback (a scrape) returns at once instead of waiting for itself
        self._flush_lock = threading.Lock()
        self._flushing: int | None = None             # the thread inside flush, if any
        L, E = len(self.adapter.layers), self.adapter.num_experts
        profile.check_routing(self.adapter)
        profile.check_hidden(getattr(text_config(getattr(model, "config", None)), "hidden_size", None))
        self._read = BatchReader(profile, layers=L, experts=E)
        self._pooled = PooledHidden(self.adapter)                 # the prompt's final hidden states
        self._pooled.limit, self._pooled.enabled = 1, False
        self._routed = RoutedIds(self.adapter, first_only=True)   # the prompt's top-k ids per layer
        self._routed.enabled = False
        # a profile that scores replies: the decode steps' routing too (none kept otherwise)
        self._reply = ReplyIds(self.adapter, steps=profile.replies.max_tokens - 1) if profile.replies else None
        self._ids = None                                          # the prompt's token ids (prefill)
        self._mask = None                                         # its attention mask; False: none given
        self._active = False          # inside a request, before its prefill has been counted
        # client -> [sum [L, E], [p], [embedding], whether its block alerted yet]
        self._clients: OrderedDict[str, list] = OrderedDict()
        self._lock = threading.Lock()
        self._hooks = contextlib.ExitStack()
        self._assigned = np.zeros((L, E))            # routing assignments per expert, read at scrape time
        self.registry = registry or CollectorRegistry()
        self.metrics = MonitorMetrics(self, self.registry)
        # on_period_state: (the open period's counts, or None) -> saved where a restart reads them
        self._periods = None if watch is None else periodwatch.PeriodService(
            watch, metrics=self.metrics, clock=clock, serialized=self._serialized, on_state=on_period_state)

    # --- hooks -------------------------------------------------------------------------------
    def _ids_hook(self, module, args):
        if self._active and self._ids is None and args:
            self._ids = args[0].detach().clone()    # read when the batch is scored: the caller may reuse it

    def _mask_hook(self, module, args, kwargs):
        # the prefill's attention mask: padded rows are counted, pooled and scored without padding
        if self._active and self._mask is None:
            m = kwargs.get("attention_mask")
            self._mask = m.detach().clone() if m is not None and m.dim() == 2 else False
            if self._mask is not False:
                self._pooled.mask = self._mask

    def __enter__(self) -> "RoutingMonitor":
        # every hook in one stack: an error while attaching removes those already attached
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._routed)
            stack.enter_context(self._pooled)
            if self._reply is not None:
                stack.enter_context(self._reply)
            own = stack.enter_context(Hooks())
            own.on_input(self.model.get_input_embeddings(), self._ids_hook)
            own.on_input(self.model, self._mask_hook, with_kwargs=True)
            self._hooks = stack.pop_all()
        if self.max_delay_s is not None:
            # quiet traffic fills no batch and a server may go unscraped: a daemon thread scores what
            # waited max_delay_s. It runs a flush (~1-2 ms) at most once per interval; a forward it
            # overlaps shares the GIL that long, and back-to-back traffic fills batches before it fires
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, name="moeguard-monitor-flush", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.close()
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None
        try:
            self.flush()
        finally:   # an on_result that raises in the last flush (a full disk) must not lose the open period's counts
            if self._periods is not None:
                self._periods.stop()

    def _tick(self) -> None:
        while not self._stop.wait(self.max_delay_s / 4):
            with self._lock:
                due = bool(self._pending) and time.monotonic() - self._pending[0].at >= self.max_delay_s
            if due:
                try:
                    self.flush()
                except Exception:  # noqa: BLE001 -- a thread has no caller; logged and counted in _score
                    pass
            if self._periods is not None:
                try:
                    self._periods.tick(flush=self.flush, on_result=self.on_result)
                except Exception as e:  # noqa: BLE001 -- a thread has no caller: logged and counted
                    self.metrics.callback_failed.inc()
                    _log.warning("the routing monitor's period bookkeeping failed: %s: %s", type(e).__name__, e)

    @contextlib.contextmanager
    def _serialized(self) -> Iterator[None]:
        """The flush lock, marked as this thread's: a callback run under it (an ``on_result`` that
        scrapes the registry) that flushes returns at once instead of waiting for itself."""
        with self._flush_lock:
            self._flushing = threading.get_ident()
            try:
                yield
            finally:
                self._flushing = None

    # --- one request ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def request(self, client: str) -> Iterator[RequestResult]:
        """One request's forward pass(es). Its prefill is kept (routed ids, token ids, pooled hidden
        state: small arrays, no text) and scored with the batch it belongs to (``flush``)."""
        out = RequestResult(client=str(client), _monitor=self)
        self._routed.reset()
        self._ids, self._mask = None, None
        self._pooled.sums, self._pooled.mask = [], None
        self._active = self._pooled.enabled = self._routed.enabled = True
        if self._reply is not None:
            self._reply.reset()
            self._reply.enabled = True
        try:
            yield out
        finally:
            self._active = self._pooled.enabled = self._routed.enabled = False
            if self._reply is not None:
                self._reply.enabled = False
        n = out.reply_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise MoeguardError(f"reply_tokens is {n!r}", hint="set it to the reply's length in tokens (0 or more), "
                                                              "or leave it unset")
        routed, pooled = self._routed.ids, self._pooled.sums
        ids, mask = self._ids, self._mask
        reply = (self._reply.ids, self._reply.tokens) if self._reply is not None else None
        self._routed.reset()
        self._ids, self._mask, self._pooled.sums = None, None, []
        if any(x is None for x in routed) or not pooled:
            out._scored = True          # nothing (or not every layer) ran: a failed request, result {}
            return
        with self._lock:
            self._pending.append(Captured(out, routed, ids, mask, pooled[0], time.monotonic(), reply, self.clock()))
            full = len(self._pending) >= self.flush_every
        if full:
            self.flush()

    def flush(self) -> None:
        """Score every request not scored yet, in arrival order: request statistics, client windows,
        metrics and ``on_result``. Called when ``flush_every`` requests are waiting, when a result is
        read, on each metrics scrape and when the monitor is exited. A call from inside a flush (an
        ``on_result`` that scrapes the registry) returns at once: the running flush loops until
        nothing waits, so callbacks stay in arrival order (a request such a callback reads before
        its batch is scored reads ``{}``)."""
        if self._flushing == threading.get_ident():
            return
        error = None
        with self._serialized():
            while True:
                with self._lock:
                    batch, self._pending = self._pending, []
                if not batch:
                    break
                failed = self._score(batch)
                error = error or failed
        if error is not None and self.raise_errors:
            raise error

    def _score(self, batch: list[Captured]) -> Exception | None:
        """Score one batch and run ``on_result`` for each of its requests; the first error, if any
        (logged and counted here, raised by ``flush`` unless ``raise_errors`` is off)."""
        results, error = [c.out for c in batch], None
        try:
            counts, x, surprise = self._read.prefills(batch)
            h = counts / np.maximum(counts.sum(2, keepdims=True), 1)
            r, rs = self._read.replies(batch) if self._reply is not None else (None, None)
            stats = self.profile.statistics(h, x, surprise, r, rs)
            bad = unmeasured(stats, self.profile.request_statistics)
            ps = self.profile.p_values(stats, "request")
            # periods: the batch's residuals in one call (per request, it cost 1.05x a batch-8 forward)
            resid = self.profile.neighbours.residual(x, h) if self._periods is not None else None
            for i, out in enumerate(results):
                if bad[i]:   # no p-value (it would be the smallest), and nothing into its client's window
                    out.result, out._scored = {"error": f"scoring failed: {NOT_MEASURED}"}, True
                    self.metrics.failed.inc()
                    _log.warning("the routing monitor could not score a request: %s", NOT_MEASURED)
                    continue
                out.result = self._record(out.client, counts[i], h[i], x[i], stats, ps, i,
                                          None if r is None else r[i], served=batch[i].served,
                                          resid=None if resid is None else resid[i])
                out._scored = True
        except Exception as e:  # noqa: BLE001 -- returned: the callbacks still run, every request is answered
            # the batch left the queue: its requests say why they have no score (reading them
            # would otherwise flush an empty queue and return {} as if nothing had run)
            failed = [out for out in results if not out._scored]
            for out in failed:
                out.result, out._scored = {"error": f"scoring failed: {type(e).__name__}: {e}"}, True
            self.metrics.failed.inc(len(failed))
            _log.warning("the routing monitor failed to score %d requests: %s: %s", len(failed), type(e).__name__, e)
            error = e
        # every result is recorded before any callback runs, and every callback runs (those of the
        # requests that failed too): one that raises (a full disk under an alert log) loses no other
        for out in results if self.on_result is not None else ():
            try:
                self.on_result(out.client, out.result)
            except Exception as e:  # noqa: BLE001 -- counted and logged; flush raises the first error
                self.metrics.callback_failed.inc()
                _log.warning("the routing monitor's on_result failed: %s: %s", type(e).__name__, e)
                error = error or e
        return error

    def _record(self, client: str, counts: np.ndarray, h: np.ndarray, x: np.ndarray, stats: dict, ps: dict,
                i: int, reply: np.ndarray | None = None, served: float = 0.0,
                resid: np.ndarray | None = None) -> dict[str, Any]:
        """Row ``i`` of a scored batch: its result, its client's window, the metrics."""
        p = float(ps["combined"][i])
        res: dict[str, Any] = {"p": p, "alert": None, "window": None, "slice": None, "period": None,
                               "statistics": {k: float(stats[k][i]) for k in self.profile.request_statistics}}
        with self._lock:
            self.metrics.requests.inc()
            self.metrics.request_anomaly.observe(-math.log10(p))
            self._assigned += counts
            if p <= self.alpha:
                res["alert"] = {"kind": "request", **self.profile.reason(stats, ps, i, h, reply)}
                self.metrics.alerts.labels("request", res["alert"]["statistic"]).inc()
            # the window so far: sum of h, and its requests' p-values and embeddings (at most
            # `window` of each: bounded, and no prompt)
            # ([L, E] sum, p-values, embeddings, whether the block alerted yet)
            state = self._clients.pop(client, None) or [np.zeros_like(h), [], [], False]
            try:   # the client goes back (most recent) even if a look raises: else its gauge label outlived eviction
                state[0] += h
                state[1].append(p)
                state[2].append(x.copy())   # a view would keep its whole batch's array alive per client
                n = len(state[1])
                if n in self.looks:         # a look at the block (the full window, or an early one): as `score` does
                    w = state[0] / n
                    ws, wp = ladder.look(self.profile, n, w[None], [np.array(state[1])], [np.stack(state[2])])
                    pw = float(wp["combined"][0])
                    res["window"] = {"p": pw, "length": n, **({"p_look": float(wp["look"][0])} if "look" in wp else {}),
                                     "statistics": {k: float(ws[k][0]) for k in WINDOW_STATISTICS}}
                    self.metrics.client.labels(client).set(-math.log10(pw))
                    if pw <= self.alpha and not state[3]:   # a block alerts once, at its first look there
                        state[3] = True
                        res["window"]["alert"] = {"kind": "window", "length": n, **self.profile.reason(ws, wp, 0, w)}
                        self.metrics.alerts.labels("window", res["window"]["alert"]["statistic"]).inc()
            finally:   # a complete block starts the next, even where its look raised (else no look came again)
                self._clients[client] = state if len(state[1]) < self.window else [np.zeros_like(h), [], [], False]
            ready = None
            if self.slice:   # slices of all traffic (slices.py): this request joins the current one
                self._slice.append((client, x.copy()))
                if len(self._slice) == self.slice:
                    ready, self._slice = self._slice, []
            while len(self._clients) > self.max_clients:
                old, gone = self._clients.popitem(last=False)
                self.metrics.evicted.inc()
                self.metrics.unwindowed.inc(ladder.unseen(self.profile.meta, len(gone[1])))
                with contextlib.suppress(KeyError):
                    self.metrics.client.remove(old)
        if ready is not None:   # outside the lock (a slice's fit is n x n; request exits wait on the lock),
            names, xs = zip(*ready)   # in order: flushes are serialized
            row = slices.score(self.profile, np.stack(xs), list(names))
            res["slice"] = row
            self.metrics.traffic.set(-math.log10(row["p"]))
            if row["p"] <= self.alpha:
                row["alert"] = {"kind": "slice", "clients": row["top_clients"], **slices.reason(row, self.slice)}
                self.metrics.alerts.labels("slice", "slice_drift").inc()
        if self._periods is not None:   # in order (flushes are serialized); a period closes at its next request or on time
            res["period"] = self._periods.count(served, resid)
        return res

    def _tracked(self) -> int:
        with self._lock:   # _record pops and re-inserts a client: unlocked, a scrape could read one short
            return len(self._clients)

    def _awaiting(self) -> int:
        """Requests of the tracked clients after their block's last look (read at scrape time)."""
        with self._lock:
            return sum(ladder.unseen(self.profile.meta, len(state[1])) for state in self._clients.values())
