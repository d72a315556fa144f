"""`moeguard monitor profile|score` and `moeguard serve`: the routing monitor offline and in service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli.app import DeviceMapOpt, ModelOpt, OverwriteOpt, SeedOpt, _kept_on_interrupt, _progress, app


monitor_app = typer.Typer(no_args_is_help=True, help="Routing monitor: a benign profile, then score logged traffic.")
app.add_typer(monitor_app, name="monitor")


@monitor_app.command("profile")
def monitor_profile(
        out: Annotated[Path, typer.Option("--out", help="profile file to write (JSON)")],
        tasks: Annotated[Optional[str], typer.Option("--tasks", help="benign traffic: comma-separated tasks; default: the embedded suite")] = None,
        log: Annotated[Optional[Path], typer.Option("--log", help="benign traffic: the deployment's own request log (JSON Lines as `monitor score` reads, optionally with a topic per record) instead of tasks; its clients split in two, half to fit, half to calibrate")] = None,
        topics: Annotated[str, typer.Option("--topics", help="with --log and no topic in its records: topics are this many clusters of the requests ('auto': about one per 100, at most 8)")] = "auto",
        limit: Annotated[Optional[int], typer.Option("--limit", help="inputs per task (eval split), half to fit, half to calibrate; default 200 (--tasks only)")] = None,
        window: Annotated[int, typer.Option("--window", help="requests per client window the profile calibrates")] = 16,
        reply_tokens: Annotated[int, typer.Option("--reply-tokens", help="also profile each benign input's greedy reply of at most this many tokens (with --log: a record's logged reply where it has one), and score requests' replies (0: prompts only)")] = 0,
        slice_len: Annotated[int, typer.Option("--slice", help="also score every N consecutive requests of all traffic, whoever sent them (a campaign spread over client identities); 0: off")] = 0,
        early: Annotated[str, typer.Option("--early", help="also score each client's window as it grows, at these lengths: 'auto' (a quarter and a half of --window: 4,8 of 16), a list such as 4,8, or 'none' (only full windows)")] = "auto",
        model: ModelOpt = None, device_map: DeviceMapOpt = None, overwrite: OverwriteOpt = False, seed: SeedOpt = 0) -> None:
    """The reference routing profile of benign traffic, with calibrated null distributions."""
    from moeguard.cli.app import _ints
    from moeguard.monitor import commands
    from moeguard.monitor.ladder import check_early, default_early

    limit = commands.check_profile_options(log=log, tasks=tasks, limit=limit, topics=topics, window=window,
                                           reply_tokens=reply_tokens, slice_len=slice_len)
    looks = default_early(window) if early == "auto" else () if early == "none" else check_early(_ints(early, "--early"), window)
    early_at = _early_at(looks, slice_len)
    replies = f", replies of at most {reply_tokens} tokens" if reply_tokens else ""
    if log is not None:
        with _kept_on_interrupt("requests profiled"):
            prof, handle = commands.profile_log(out=out, log=log, topics=topics, window=window, early=looks,
                                                slice_len=slice_len, reply_tokens=reply_tokens, model=model,
                                                device_map=device_map, overwrite=overwrite, seed=seed,
                                                progress=_progress)
        r, src = prof.meta["requests"], prof.meta["source"]
        typer.echo(f"profile of {handle.name} from {log}: {len(prof.topics)} topics ({src['topics']}), split by {src['split']}: "
                   f"{r['fit']} requests from {src['clients']['fit']} clients fitted, {r['calibration']} from "
                   f"{src['clients']['calibration']} calibrating; windows of {window} from "
                   + (f"{src['clients']['calibrating_windows']} clients' own blocks" if src["windows"] == "clients"
                      else "drawn requests (no calibration client sent a full window)")
                   + f"{early_at}{replies}; written to {out}")
        return
    with _kept_on_interrupt("tasks profiled"):
        prof, handle, prompts = commands.profile_tasks(out=out, tasks=_task_list(tasks), limit=limit, window=window,
                                                       early=looks, slice_len=slice_len, reply_tokens=reply_tokens,
                                                       model=model, device_map=device_map, overwrite=overwrite,
                                                       seed=seed, progress=_progress)
    r = prof.meta["requests"]
    typer.echo(f"profile of {handle.name}: {len(prompts)} tasks, {r['fit']} requests fitted, {r['calibration']} "
               f"calibrating, windows of {window}{early_at}{replies}; written to {out}")
    if seed == 0:   # the profile is a key (docs/routing-security.md): tasks and the default seed rebuild it exactly
        typer.echo("note: seed 0 (the default): anyone with this model and these tasks can rebuild this profile and "
                   "screen attacks against it; for a deployed profile pass a secret --seed and keep the file secret")


def _early_at(looks: tuple[int, ...], slice_len: int) -> str:
    at = f" (looked at early after {', '.join(map(str, looks))} requests)" if looks else ""
    return at + (f", slices of {slice_len} requests of all traffic" if slice_len else "")


@monitor_app.command("score")
def monitor_score(
        profile: Annotated[Path, typer.Option("--profile", help="profile from `moeguard monitor profile`")],
        log: Annotated[Path, typer.Option("--log", help="requests, JSON Lines: {id, client, time, prompt[, reply]}")],
        out: Annotated[Path, typer.Option("--out", help="folder for scores.jsonl, windows.jsonl, alerts.jsonl, summary.json (and slices.jsonl with a profile of --slice, periods.jsonl and period_requests/ with --period)")],
        window: Annotated[Optional[int], typer.Option("--window", help="requests per client window: must be the profile's (its null is calibrated at it); default: the profile's")] = None,
        alpha: Annotated[float, typer.Option("--alpha", help="alert when a calibrated p-value is at most this")] = 0.01,
        log_prompts: Annotated[bool, typer.Option("--log-prompts", help="write prompts into the outputs (off: routing can reveal what users typed)")] = False,
        period: Annotated[Optional[str], typer.Option("--period", help="also test each period of all traffic (24h, 30m, 7d, seconds) for load moved to one expert beyond what its requests' content predicts, against the --baseline periods before it; writes periods.jsonl")] = None,
        baseline: Annotated[Optional[int], typer.Option("--baseline", help="earlier periods (that did not alert) each period is compared with; with --period (default 14)")] = None,
        history: Annotated[Optional[Path], typer.Option("--history", help="an earlier run's periods.jsonl: its periods are the baseline's first, so a daily run replays only the new day's log (their requests, for the clients' test and an alert's cause, are read from the period_requests folder beside it); with --period")] = None,
        period_alpha: Annotated[Optional[float], typer.Option("--period-alpha", help="alert on a period when its p-value is at most this; with --period (default: --alpha)")] = None,
        period_clients: Annotated[bool, typer.Option("--period-clients", help="also test every period's clients in every (layer, expert): routing beyond what the same content got in the baseline periods (an alarm of its own, kind period_clients; a few seconds a period of 3,000 requests against 14 such, growing with both: about 40 s at 16,000 on 2 cores); and its clients of few requests, pooled by size, against the same pools of the baseline periods (kind period_small_clients: a campaign split over many identities). The clients' test needs the baseline periods' requests: this log's, or a --history's from the period_requests folder its run wrote beside it; the small clients' test does not; with --period")] = False,
        accept: Annotated[Optional[str], typer.Option("--accept", help="periods you reviewed and judged benign (a launch, a batch job), comma-separated, each by its start as periods.jsonl writes it: each joins later baselines even though it alerted, so new content stops alerting once accepted (the history's periods or the log's); with --period")] = None,
        no_period_requests: Annotated[bool, typer.Option("--no-period-requests", help="do not keep each period's requests in period_requests/ (embeddings and residuals, no text: (64 + layers x experts) x 8 bytes a request): saves the disk, but a later run given this run's periods.jsonl as --history then has no clients' test and no cause; with --period")] = False,
        model: ModelOpt = None, device_map: DeviceMapOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Replay logged requests through the model; alert on requests and client windows unlike the profile
    (and, with --period, on days whose routing load moved)."""
    from moeguard.monitor.commands import score_log

    with _kept_on_interrupt("requests replayed"):
        summary, _ = score_log(profile=profile, log=log, out=out, window=window, alpha=alpha, log_prompts=log_prompts,
                               period=period, baseline=baseline, history=history, period_alpha=period_alpha,
                               period_clients=period_clients, accept=accept, no_period_requests=no_period_requests,
                               model=model, device_map=device_map, overwrite=overwrite, progress=_progress,
                               note=lambda line: typer.echo(line, err=True))
    from moeguard.cli.app import _console
    from moeguard.report.tables import monitor_score_table

    _console().print(monitor_score_table(summary))
    typer.echo(f"{summary['requests']} requests from {summary['clients']} clients, {summary['windows']} windows: "
               f"{summary['alerts']['request']} request alerts, {summary['alerts']['window']} window alerts"
               + (f", {summary['alerts']['slice']} slice alerts ({summary['slices']} slices of all traffic)"
                  if "slice" in summary["alerts"] else "")
               + (f", {summary['alerts']['period']} period alerts ({summary['periods_tested']} of {summary['periods']} "
                  f"periods tested" + "".join(f"; {n} {said}" for c, said in (("routing", "put down to routing"),
                                                                             ("mix", "to the mix"), ("none", "with no cause given"))
                                             if (n := summary["period_causes"][c]))
                  + ")" if "period" in summary["alerts"] else "")
               + (f", {summary['alerts']['period_clients']} clients' test alerts ({summary['periods_clients_tested']} "
                  f"periods tested), {summary['alerts']['period_small_clients']} small clients' test alerts "
                  f"({summary['periods_small_tested']} periods tested)" if "period_clients" in summary["alerts"] else "")
               + (f", {n} period{'' if n == 1 else 's'} accepted into baselines" if (n := len(summary.get("periods_accepted") or ())) else "")
               + (f", the requests of {k['periods']} period{'' if k['periods'] == 1 else 's'} kept for later runs' "
                  f"baselines ({k['mib']:g} MiB)" if (k := summary.get("period_requests")) and k["periods"] else "")
               + " "
               f"(p <= {alpha}); written to {out}")
    u = summary["unwindowed"]
    if u["requests"]:   # scored one at a time only: a client sending fewer than a window is never seen as a stream
        first = (summary.get("early") or [summary["window"]])[0]
        short = f"; {u['clients']} client{'' if u['clients'] == 1 else 's'} sent fewer than {first}" \
            if u["clients"] else ""
        last = "its last window or early look" if summary.get("early") else "its last full window"
        typer.echo(f"{u['requests']} requests are in no window (each client's requests after {last}{short})")


def _task_list(value: str | None) -> list[str] | None:
    from moeguard.cli.app import _names

    return _names(value, "--tasks") if value is not None else None


@app.command("serve")
def serve(
        profile: Annotated[Path, typer.Option("--profile", help="profile from `moeguard monitor profile`")],
        host: Annotated[str, typer.Option("--host", help="address to bind; default localhost only")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="TCP port")] = 8000,
        alpha: Annotated[float, typer.Option("--alpha", help="alert when a calibrated p-value is at most this")] = 0.01,
        alerts: Annotated[Optional[Path], typer.Option("--alerts", help="append alerts here (JSON Lines, no prompts)")] = None,
        max_clients: Annotated[int, typer.Option("--max-clients", help="clients whose windows are tracked (least recent evicted)")] = 1000,
        flush_every: Annotated[int, typer.Option("--flush-every", help="score requests in batches of this many (and at "
                                                 "every /metrics scrape); 1: each as it ends")] = 16,
        max_delay: Annotated[float, typer.Option("--max-delay", help="seconds a request may wait to be scored when "
                                                 "no batch fills")] = 1.0,
        max_waiting: Annotated[int, typer.Option("--max-waiting", help="completions at the model or waiting for it; "
                                                 "more get 503 with Retry-After (each waiting one holds its body)")] = 256,
        metrics_token: Annotated[Optional[str], typer.Option(
            "--metrics-token", envvar="MOEGUARD_METRICS_TOKEN",
            help="/metrics answers only 'Authorization: Bearer TOKEN' (its per-client scores would let a client tune "
                 "against the monitor); required to bind beyond localhost")] = None,
        client_id: Annotated[str, typer.Option(
            "--client-id", help="whose window a request joins: 'address' (the connection's, never a claimed X-Forwarded-For; an "
                                "IPv6 one by its /56, 'address/N' for another prefix), "
                                "'user' (the body's field: the client picks it, so only behind a gateway that sets "
                                "it) or 'header:NAME' (an identity your authenticating gateway sets)")] = "address",
        period: Annotated[Optional[str], typer.Option("--period", help="also test each period of all traffic (24h, 30m, 7d, seconds) for routing load moved beyond what its requests' content predicts, against the --baseline periods before it")] = None,
        baseline: Annotated[Optional[int], typer.Option("--baseline", help="earlier periods (that did not alert) each period is compared with; with --period (default 14)")] = None,
        period_log: Annotated[Optional[Path], typer.Option("--period-log", help="with --period: each closed period is appended here (JSON Lines, no text), and read back at start as the baseline's history (`monitor score --history` reads it too); the open period's counts are kept in FILE.open, every minute and at shutdown, so a restart keeps them")] = None,
        period_alpha: Annotated[Optional[float], typer.Option("--period-alpha", help="alert on a period when its p-value is at most this; with --period (default: --alpha)")] = None,
        accept: Annotated[Optional[str], typer.Option("--accept", help="periods of the --period-log you reviewed and judged benign (a launch, a batch job), comma-separated, each by its start as the log writes it: each joins the baseline even though it alerted (kept in FILE.accepted beside the --period-log and taken again at every later start; the log is not rewritten)")] = None,
        model: ModelOpt = None, device_map: DeviceMapOpt = None) -> None:
    """An OpenAI-compatible completions endpoint with the routing monitor attached, and /metrics."""
    from moeguard.edge import resolve_model
    from moeguard.io import read_json
    from moeguard.monitor.online import RoutingMonitor
    from moeguard.monitor.profile import Profile
    from moeguard.monitor.serve import client_source, create_app
    from moeguard.monitor.periodhistory import parse_accept
    from moeguard.monitor.servesetup import (alert_writer, check_options, listen, lock_period_log, open_period,
                                             period_history, record_start, release_period_log, retried_every,
                                             retrying, state_writer)

    client_source(client_id)   # a bad spec fails before the model loads
    seconds, baseline = check_options(host=host, port=port, alpha=alpha, max_clients=max_clients, flush_every=flush_every,
                                      max_waiting=max_waiting,
                                      max_delay=max_delay, metrics_token=metrics_token, alerts=alerts, period=period,
                                      baseline=baseline, period_log=period_log, period_alpha=period_alpha, accept=accept,
                                      inputs=(profile, model))
    from moeguard.monitor.periods import period_alpha as level

    alpha_p = level(alpha, period_alpha)
    # the socket first: a port already taken is one line now, not uvicorn's error after the model loaded
    # (and no other process can take it between a check and the bind)
    sock = listen(host, port)
    held = None
    try:
        held = lock_period_log(period_log)   # before its files are read: one server to a period log
        from moeguard.monitor.evasion import check_profile

        handle = resolve_model(model, device_map=device_map)
        prof = Profile.from_dict(read_json(profile, what="routing profile", hint="make it with `moeguard monitor profile`"),
                                 where=str(profile))
        check_profile(prof, handle)   # weights, layers, experts and top-k, before the model loads
        history = period_history(prof, period_log, period=seconds, baseline=baseline, alpha=alpha_p, accept=parse_accept(accept))
        saved = open_period(prof, period_log, period=seconds, baseline=baseline, alpha=alpha_p, history=history)
        from moeguard.io import file_sha256

        record_start(alerts, {"profile": str(profile), "profile_sha256": file_sha256(profile), "model": handle.name,
                              "weights": prof.meta.get("weights"), **handle.placement, "alpha": alpha,
                              "client_id": client_id, "max_clients": max_clients, "flush_every": flush_every,
                              "max_delay": max_delay, "period": period, "baseline": baseline if period else None,
                              "period_alpha": alpha_p if period else None,
                              "period_log": str(period_log) if period_log else None, "accept": accept})
        m, tok, _ = handle.load()
        # raise_errors=False: a failing alert log or scoring is logged and counted, never a client's 500
        writer = alert_writer(alerts, period_log)
        save_state = retrying(state_writer(period_log), writer)   # rows a full disk kept: tried every minute
        mon = RoutingMonitor(m, prof, alpha=alpha, max_clients=max_clients, flush_every=flush_every, max_delay_s=max_delay,
                             on_result=writer, raise_errors=False, period=seconds,
                             baseline=baseline, period_history=history, period_open=saved, period_alpha=alpha_p,
                             on_period_state=save_state)
        import uvicorn

        from moeguard.monitor.serve import uvicorn_config

        app_ = create_app(m, tok, mon, name=handle.name, metrics_token=metrics_token, client_id=client_id,
                          max_waiting=max_waiting)
        from moeguard.monitor.servesetup import url_host

        typer.echo(f"serving {handle.name} on http://{url_host(host)}:{port}/v1/completions (metrics: /metrics; "
                   f"clients by {client_id})")
        with mon, retried_every(writer, periods=save_state is not None):
            try:
                from moeguard.monitor.serve import SPARE_CONNECTIONS

                uvicorn.Server(uvicorn_config(app_, host=host, port=port,
                                              limit_concurrency=max_waiting + SPARE_CONNECTIONS)).run(sockets=[sock])
            except KeyboardInterrupt:   # uvicorn shut down cleanly, then raised the signal it caught again
                pass                    # a stop (Ctrl-C, SIGTERM from a service manager) is this command's normal end
        from moeguard.monitor.periodwatch import open_path

        lost = writer.retry() if writer is not None else 0
        if lost:   # a disk still full at the end: say so, not that they are kept
            typer.echo(f"moeguard: {lost} alert or period row{'' if lost == 1 else 's'} could not be written "
                       f"(the disk is full or the file unwritable) and are lost", err=True)
        kept = [f"alerts in {alerts}" if alerts is not None else "",
                f"closed periods in {period_log}" if period_log is not None else "",
                f"the open period in {open_path(period_log)}" if period_log is not None and open_path(period_log).exists() else ""]
        typer.echo("moeguard: serve stopped" + "".join(f"; {k}" for k in kept if k), err=True)
    finally:
        sock.close()
        if held is not None:
            release_period_log(period_log, held)
