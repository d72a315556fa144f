"""Score logged requests against a routing profile (``moeguard monitor score``).

A log is JSON Lines, one request per line: ``{"id": ..., "client": ..., "time": ..., "prompt": ...}``
(``id`` and ``client`` strings or integers, ``time`` a number or an ISO-8601 string, UTC where it names no zone; a client is its id's
text, so ``1`` and ``"1"`` are one client, as the online hook counts them), and, optionally,
``"reply"``: the text the model answered. With a profile that scores replies (``--reply-tokens``),
a record's reply is routed after its prompt; a record without one is given the model's greedy
reply (the profile's reply length), which is the served reply where the server decodes greedily. Each request
is replayed through the model; its routing histogram is scored (``profile.py``), and so is each
client's consecutive, non-overlapping window of ``window`` requests (in time order), and, with a
profile of early looks, each block as it reaches the early lengths (``ladder.py``: each look is a row
of the windows, and a block alerts once). An alert is written for every score with p <= ``alpha``
(a window's: its first look there), with its reason: the statistic, the layer and
experts it points at, the value and the calibrated p-value. Prompts are never written unless
``log_prompts`` is set: routing traces can reveal what users typed.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.kept import kept_arrays
from moeguard.models.families import text_config
from moeguard.monitor import ladder, periodclients, periods, periodsmall, slices
from moeguard.monitor.fit import observe
from moeguard.monitor.profile import NOT_MEASURED, NOT_MEASURED_FIX, WINDOW_STATISTICS, Profile, unmeasured

MAX_PROMPT_CHARS = 100_000


def read_log(path: Path) -> list[dict[str, Any]]:
    """The log's records, checked line by line (one-line errors naming the line)."""
    if not path.is_file():
        raise MoeguardError(f"request log {path} does not exist", hint="pass a JSON Lines file of {id, client, time, prompt}")
    out, seen, repeats = [], {}, []   # seen: each id's first line, as outputs write ids (7 and "7" alike)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MoeguardError(f"{where} is not UTF-8 (byte {e.start})", hint="write the log as UTF-8 JSON Lines") from None
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoeguardError(f"{where} is not valid JSON ({e.msg})", hint="one JSON object per line") from None
            except ValueError as e:   # an integer of more digits than Python converts
                raise MoeguardError(f"{where} is not usable JSON ({e})", hint="fix or drop that record") from None
            except RecursionError:   # [[[[... deeper than the parser recurses
                raise MoeguardError(f"{where} is not usable JSON (nested too deeply to read)",
                                    hint="fix or drop that record") from None
            if not isinstance(r, dict):
                raise MoeguardError(f"{where} holds a {type(r).__name__}, expected an object", hint="one JSON object per line")
            missing = [k for k in ("id", "client", "time", "prompt") if k not in r]
            if missing:
                raise MoeguardError(f"{where} lacks {missing}", hint="each record needs id, client, time and prompt")
            if not isinstance(r["prompt"], str) or not r["prompt"].strip() or len(r["prompt"]) > MAX_PROMPT_CHARS:
                raise MoeguardError(f"{where}: prompt must be a non-empty string of at most {MAX_PROMPT_CHARS} characters",
                                    hint="fix or drop that record")
            try:   # JSON can carry a lone surrogate (\ud800), which the tokenizer refused after the model loaded
                r["prompt"].encode("utf-8")
            except UnicodeEncodeError:
                raise MoeguardError(f"{where}: prompt is not valid Unicode (a lone surrogate)",
                                    hint="fix or drop that record") from None
            if "reply" in r and (not isinstance(r["reply"], str) or len(r["reply"]) > MAX_PROMPT_CHARS
                                 or not _unicode(r["reply"])):
                raise MoeguardError(f"{where}: reply must be a string of valid Unicode of at most {MAX_PROMPT_CHARS} "
                                    "characters (or left out)", hint="fix or drop that record's reply")
            for k in ("id", "client"):
                if isinstance(r[k], bool) or not isinstance(r[k], (str, int)):
                    raise MoeguardError(f"{where}: {k} is {type(r[k]).__name__}, expected a string or integer",
                                        hint="fix that record")
                if isinstance(r[k], str) and not _unicode(r[k]):   # the period tests hash client names, after the replay
                    raise MoeguardError(f"{where}: {k} is not valid Unicode (a lone surrogate)", hint="fix that record")
            out.append({**r, "_t": _time(r["time"], where)})
            if (first := seen.setdefault(str(r["id"]), n)) != n:
                repeats.append((str(r["id"]), first, n))
    if not out:
        raise MoeguardError(f"request log {path} holds no request", hint="pass a JSON Lines file of {id, client, time, prompt}")
    if repeats:   # scored all the same (a retry may repeat its id), but an alert's id names more than one request
        import warnings

        i, a, b = repeats[0]
        warnings.warn(f"{len(repeats)} record{'s' if len(repeats) > 1 else ''} of {path} repeat the id of an earlier one "
                      f"(the first: id {i[:40]!r} at lines {a} and {b}); outputs name requests by id, so those are "
                      "ambiguous: make ids unique to tell them apart", stacklevel=2)
    return out


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _time(t: Any, where: str) -> float:
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        try:
            value = float(t)
        except OverflowError:
            value = math.inf
        if math.isfinite(value):
            return value
        raise MoeguardError(f"{where}: time {str(t)[:20]} is not a finite number", hint="fix that record")
    if isinstance(t, str):
        try:
            when = datetime.fromisoformat(t.replace("Z", "+00:00"))
            # a time without a zone is UTC, not this machine's local time: periods (24h: UTC days) and
            # the order of a log must not depend on where it is scored
            return (when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)).timestamp()
        except (ValueError, OverflowError, OSError):   # OverflowError/OSError: a date the platform cannot place
            pass
    raise MoeguardError(f"{where}: time {t!r} is neither a number nor an ISO-8601 string", hint="fix that record")


def check_settings(prof: Profile, *, window: int | None, alpha: float, period: float | None = None,
                   baseline: int = periods.BASELINE) -> int:
    """The window to score with, checked against the profile (before any model is loaded), and the
    periods' settings (``period``: seconds, None: off); warns when the profile's resolution cannot
    reach ``alpha``."""
    import warnings

    if period is not None:
        periods.check_baseline(baseline)
        periods.neighbours_of(prof, "score")

    if window is None:
        window = int(prof.meta["window"])
    if window != prof.meta["window"]:
        raise MoeguardError(f"the profile's windows were calibrated at {prof.meta['window']} requests, not {window}",
                            hint=f"pass --window {prof.meta['window']}, or rebuild the profile with --window {window}")
    if not 0 < alpha < 1:
        raise MoeguardError(f"alpha is {alpha}", hint="pass a level between 0 and 1, e.g. 0.01")
    for level in ("request", "window") + (("slice",) if prof.meta.get("slice") else ()):
        floor = prof.p_floor(level) if level == "request" else ladder.floor(prof) if level == "window" \
            else slices.floor(prof)
        if floor > alpha:
            warnings.warn(f"the profile's smallest {level} p-value is {floor:.3g}, above alpha {alpha}: no {level} can "
                          f"alert; profile more benign inputs (--limit, or a longer --log) or raise --alpha")
    return window


CHUNK = 512   # requests replayed per step: a multiple of observe's batch of 16, so the batches are the same


def replay(model, tokenizer, prof: Profile, prompts: list[str], *, adapter, cache: Path | None = None,
           progress=None, replies: list[str | None] | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """``observe`` over ``prompts`` in steps of ``CHUNK``. With ``cache`` (a resumable output folder),
    each step's arrays are kept there as it finishes (``.replay-N.npz``, no prompt text), and a
    step already there is read instead of replayed: an interrupted replay of a large log resumes.
    Last, with a profile that scores replies, the replies' histograms [N, L, E] and token surprise
    [N] (``replies``: each request's logged reply text, or None for the model's greedy reply);
    otherwise None.
    The same numbers as one ``observe`` call when no prompt is longer than the model's positions
    (a longer one is routed as several rows, which shifts the batches by a row)."""
    from moeguard.monitor.replies import routing as reply_routing   # `replies` here: the logged texts

    task = progress.add_task("replaying requests", total=len(prompts)) if progress is not None else None
    replies = replies if replies is not None else [None] * len(prompts)

    def step(a: int) -> dict[str, np.ndarray]:
        z = dict(zip(("h", "sums", "tokens", "surprise"),
                     observe(model, tokenizer, prompts[a:a + CHUNK], tokens=prof.tokens, adapter=adapter)))
        if prof.replies is not None:
            z["reply"], z["reply_surprise"] = reply_routing(model, tokenizer, prompts[a:a + CHUNK], replies[a:a + CHUNK],
                                                            adapter=adapter, table=prof.tokens,
                                                            max_tokens=prof.replies.max_tokens)
        return z

    out: list[np.ndarray] = []
    for n, a in enumerate(range(0, len(prompts), CHUNK)):
        # a step kept by a prompt-only replay has no replies: the name tells them apart
        z = kept_arrays(cache, f"replay-{n}" + ("-replies" if prof.replies is not None else ""), lambda: step(a))
        part = [z[k] for k in ("h", "sums", "tokens", "surprise")] + \
            ([z["reply"], z["reply_surprise"]] if prof.replies is not None else [])
        # each step's rows go into arrays of the whole log, made at the first step: the log's [N, L, E]
        # histograms are held once, not twice as steps then joined (the same values)
        if not out:
            out = [np.empty((len(prompts), *p.shape[1:]), dtype=p.dtype) for p in part]
        for o, p in zip(out, part):
            o[a:a + len(p)] = p
        del z, part
        if task is not None:
            progress.advance(task, min(CHUNK, len(prompts) - a))
    if not out:
        raise ValueError("no prompts to replay")
    return (*out[:4], None if prof.replies is None else (out[4], out[5]))  # type: ignore[return-value]


def clear_outputs(cache: Path) -> None:
    """Before a run writes its outputs into its resumable folder ``cache``: remove what an earlier,
    interrupted attempt's writing left there (another attempt's flags may not write the same files,
    and a ``period_requests`` file half-written would be renamed into --out with the rest). Only the
    kept replay steps (``.NAME.npz``, whole: ``kept.kept_arrays`` renames them into place), the
    folder's settings stamp and its makers' list (``provenance.mark``) carry over."""
    import shutil

    from moeguard.io import MADE_BY, STAMP

    for f in cache.iterdir():
        if f.name in (STAMP, MADE_BY) or (f.name.startswith(".") and f.name.endswith(".npz") and not f.name.endswith(".tmp.npz")):
            continue
        shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()


def drop_replay(cache: Path) -> None:
    """Delete ``replay``'s kept steps from ``cache`` once the outputs are complete (scratch: the
    resumable folder becomes the output as it is)."""
    for f in cache.glob(".replay-*.npz"):
        f.unlink()


def score(model, tokenizer, prof: Profile, records: list[dict[str, Any]], *, window: int | None = None,
          alpha: float = 0.01, log_prompts: bool = False, cache: Path | None = None, period: float | None = None,
          baseline: int = periods.BASELINE, history: list[dict] | None = None, period_alpha: float | None = None,
          period_clients: bool = False, accept: list[str] | None = None, held: dict | None = None,
          progress=None) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """(per-request scores, per-window scores, alerts, summary). ``cache``/``progress``: ``replay``'s;
    ``period`` (seconds) and ``baseline``: periods of all traffic (``periods.py``; None: off), after
    the earlier periods in ``history`` (``periodhistory.read_history``), tested at ``period_alpha`` (None:
    ``alpha``); ``period_clients``: each period's clients too (``periodclients.clients_test``);
    ``accept``: the starts of periods the owner judged benign, which join later baselines whatever
    their tests say (``periodhistory.check_accept``); ``held``: the history's periods' requests
    (``periodrequests.read``)."""
    window = check_settings(prof, window=window, alpha=alpha, period=period, baseline=baseline)
    period_alpha = periods.period_alpha(alpha, period_alpha)
    from moeguard.models.adapter import MoEAdapter

    adapter = MoEAdapter(model)
    prof.check_routing(adapter)                   # before replaying the log
    prof.check_hidden(getattr(text_config(getattr(model, "config", None)), "hidden_size", None))
    H, sums, tokens, surprise, R = replay(model, tokenizer, prof, [r["prompt"] for r in records], adapter=adapter,
                                          cache=cache, progress=progress, replies=[r.get("reply") for r in records])
    prof.check_hidden(sums.shape[1])
    X = prof.space(sums, tokens)
    stats = prof.statistics(H, X, surprise, *(R or (None, None)))
    bad = np.flatnonzero(unmeasured(stats, prof.request_statistics))
    if len(bad):   # not a p-value: NaN sorted past every benign value, the profile's smallest
        more = f" (and {len(bad) - 1} other requests)" if len(bad) > 1 else ""
        raise MoeguardError(f"request {records[bad[0]]['id']!r}{more} cannot be scored: {NOT_MEASURED}",
                            hint=NOT_MEASURED_FIX)
    ps = prof.p_values(stats, "request")
    # a client is its id's text (1 and "1" are one, as the online hook counts them), its requests in
    # time order, named in every output as its first request names it
    by_client: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_client.setdefault(str(r["client"]), []).append(i)
    by_client = {c: sorted(idx, key=lambda i: records[i]["_t"]) for c, idx in by_client.items()}
    named = {c: records[idx[0]]["client"] for c, idx in by_client.items()}
    client_of = [named[str(r["client"])] for r in records]   # each request's client, as outputs name it
    scores, alerts = [], []
    for i, r in enumerate(records):
        row = {"id": r["id"], "client": client_of[i], "time": r["time"], "p": float(ps["combined"][i]),
               **{k: round(float(stats[k][i]), 4) for k in prof.request_statistics}}
        if log_prompts:
            row["prompt"] = r["prompt"]
        scores.append(row)
        if ps["combined"][i] <= alpha:
            alerts.append({"kind": "request", "id": r["id"], "client": client_of[i], "time": r["time"],
                           **prof.reason(stats, ps, i, H[i], None if R is None else R[0][i]),
                           **({"prompt": r["prompt"]} if log_prompts else {})})
    blocks = []                                  # (client, its next `window` requests in time order)
    for c, idx in by_client.items():
        blocks += [(named[c], idx[a:a + window]) for a in range(0, len(idx), window)]
    # every look at each block (one, the full window, unless the profile has early lengths: ladder.py)
    found = ladder.looks(prof, [np.asarray(b) for _, b in blocks], H, X, ps["combined"])
    rows = sorted(((j, n, at, ws, wp, W) for n, which, ws, wp, W in found for at, j in enumerate(which)),
                  key=lambda r: r[:2])   # by block, then look: the order they happen in
    windows, alerted = [], set()
    for j, n, at, ws, wp, W in rows:
        c, idx = blocks[j][0], blocks[j][1][:n]
        windows.append({"client": c, "requests": [records[i]["id"] for i in idx], "length": n,
                        "p": float(wp["combined"][at]), **({"p_look": float(wp["look"][at])} if "look" in wp else {}),
                        **{k: round(float(ws[k][at]), 4) for k in WINDOW_STATISTICS}})
        if wp["combined"][at] <= alpha and j not in alerted:   # a block alerts once, at its first look there
            alerted.add(j)
            alerts.append({"kind": "window", "client": c, "requests": [records[i]["id"] for i in idx], "length": n,
                           "time": records[idx[-1]]["time"], **prof.reason(ws, wp, at, W[at])})
    # slices of all traffic (slices.py): every `slice` consecutive requests in time order, whoever sent them
    n = int(prof.meta.get("slice", 0))
    order = sorted(range(len(records)), key=lambda i: records[i]["_t"]) if n else []
    cuts = [order[a:a + n] for a in range(0, len(order) - n + 1, n)] if n else []
    traffic = []
    for idx in cuts:
        row = {"requests": [records[i]["id"] for i in (idx[0], idx[-1])],
               "time": [records[i]["time"] for i in (idx[0], idx[-1])],
               **slices.score(prof, X[idx], [client_of[i] for i in idx])}
        traffic.append(row)
        if row["p"] <= alpha:
            alerts.append({"kind": "slice", "requests": row["requests"], "time": records[idx[-1]]["time"],
                           "clients": row["top_clients"], **slices.reason(row, n)})
    # periods of all traffic (periods.py): the load moved over each day (or ``period``), against the days before
    t = np.array([r["_t"] for r in records])
    # written over H, which nothing reads after this: no second [N, L, E] array for the residuals
    resid = None if period is None else prof.neighbours.residual(X, H, out=H if H.dtype == np.float64 else None)
    del H
    spans = [] if period is None else periods.score_periods(
        t, resid, client_of, period=period, baseline=baseline, alpha=period_alpha, layers=prof.meta["layers"],
        digest=prof.neighbours.digest, history=history, x=X, clients_test=period_clients, accept=accept or (), held=held,
        progress=progress)
    new = spans[len(history or ()):]   # the history's rows (and alerts) are its own run's
    for row in new:
        # a period the owner accepted still alerts where it is out of line; the alert says it joins later baselines
        ok = {"accepted": True} if row.get("accepted") else {}
        if row.get("alert"):
            alerts.append({"kind": "period", "time": [row["start"], row["end"]], "requests": row["requests"],
                           "clients": row["top_clients"], **periods.reason(row), **ok})
        if row.get("clients_alert"):
            alerts.append({"kind": "period_clients", "time": [row["start"], row["end"]], "requests": row["requests"],
                           "clients": row["clients_routing"], **periodclients.clients_reason(row), **ok})
        if row.get("small_alert"):
            alerts.append({"kind": "period_small_clients", "time": [row["start"], row["end"]], "requests": row["requests"],
                           "clients": row["small_top_clients"], **periodsmall.small_reason(row), **ok})
    # what the windows did not see: a client's trailing requests after the last look, and clients that
    # never reached one (an attacker spread over identities stays there)
    first = ladder.lengths(prof.meta)[0]
    summary = {"requests": len(records), "clients": len(by_client), "windows": len(windows),   # looks, with early ones
               "blocks": len({j for j, *_ in rows}), "window": window,
               **({"early": prof.meta["early"]} if prof.meta.get("early") else {}),
               "unwindowed": {"requests": sum(ladder.unseen(prof.meta, len(b)) for _, b in blocks),
                              "clients": sum(len(idx) < first for idx in by_client.values())},
               **({"slice": n, "slices": len(traffic), "unsliced": len(records) - n * len(traffic)} if n else {}),
               "alpha": alpha, "alerts": {"request": sum(a["kind"] == "request" for a in alerts),
                                          "window": sum(a["kind"] == "window" for a in alerts),
                                          **({"slice": sum(a["kind"] == "slice" for a in alerts)} if n else {}),
                                          **({"period": sum(a["kind"] == "period" for a in alerts)} if period else {}),
                                          **({k: sum(a["kind"] == k for a in alerts) for k in ("period_clients", "period_small_clients")}
                                             if period and period_clients else {})},
               **({"period": period, "baseline": baseline, "period_alpha": period_alpha,
                   "history": len(history or ()),
                   # periods the owner accepted (--accept), the history's included: in later baselines whatever their tests said
                   "periods_accepted": [r["start"] for r in spans if r.get("accepted")],
                   "periods": len(new), "periods_tested": sum(r["p"] is not None for r in new),
                   # an alert's cause (periodclients.py): its clients' routing, the mix, or not given (no baseline requests)
                   "period_causes": {c: sum(bool(r.get("alert")) and r.get("cause") == k for r in new)
                                     for c, k in (("routing", "routing"), ("mix", "mix"), ("none", None))},
                   # the clients' test: periods it tested (the rest say why in clients_why)
                   **({"periods_clients_tested": sum(r.get("clients_p") is not None for r in new),
                       # the small clients' test (periodsmall.py): periods with a pool tested (the rest say why in small_why)
                       "periods_small_tested": sum(r.get("small_p") is not None for r in new)} if period_clients else {})}
                 if period else {}),
               "prompts_logged": log_prompts,
               # with a profile of replies: how long a reply is scored, and how many requests had none
               "replies": None if R is None else {"max_tokens": prof.replies.max_tokens,
                                                  "logged": sum("reply" in r for r in records),
                                                  "without_reply": int((R[0].sum((1, 2)) == 0).sum())},
               # the smallest p-value each level can give: below alpha, or nothing can alert there
               "p_floor": {"request": prof.p_floor("request"), "window": ladder.floor(prof),
                           **({"slice": slices.floor(prof)} if n else {})}}
    summary["traffic_slices"] = traffic   # popped by the CLI into slices.jsonl
    summary["traffic_periods"] = spans    # and periods.jsonl
    # and each period's requests, which the CLI keeps for later runs' baselines (periodrequests.save)
    summary["period_arrays"] = None if period is None else {
        "x": X, "resid": resid, "clients": client_of, "parts": {int(k): idx for k, idx in zip(*periods.members(t, period))}}
    return scores, windows, alerts, summary
