"""What ``moeguard serve`` sets up around its app (``serve.py``), before the model loads and beside it:
its options checked, the listening socket, the period log read back (the baseline's history and the
open period), and the writers that append alerts and closed periods. The app is what a server of your
own would copy; this is the command's own plumbing.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from pathlib import Path

from moeguard.errors import MoeguardError
from moeguard.io import dumps


def check_options(*, host: str, port: int, alpha: float, max_clients: int, flush_every: int, max_delay: float,
                  metrics_token: str | None, alerts: Path | None, period: str | None, baseline: int | None,
                  period_log: Path | None, period_alpha: float | None = None,
                  accept: str | None = None, inputs: tuple = (), max_waiting: int = 256) -> tuple[float | None, int]:
    """``serve``'s options checked before the socket is bound and the model loads (one-line errors);
    the period in seconds (None: off) and the baseline. ``inputs``: the files the server reads (the
    profile, a local model), which --alerts and --period-log, appended to, must not be."""
    from moeguard.monitor.periodhistory import accepted_path, parse_accept
    from moeguard.monitor.periods import check_period
    from moeguard.monitor.periodwatch import open_path

    seconds, baseline = check_period(period, baseline, period_log=period_log, period_alpha=period_alpha, accept=accept)
    if accept is not None and period_log is None:
        raise MoeguardError(f"--accept {accept} without --period-log",
                            hint="pass the --period-log whose periods you accept (serve reads its closed periods at start)")
    parse_accept(accept)
    if not 0 < port < 65536:
        raise MoeguardError(f"--port is {port}", hint="pass a TCP port between 1 and 65535")
    if not 0 < alpha < 1:
        raise MoeguardError(f"--alpha is {alpha}", hint="pass a level between 0 and 1, e.g. 0.01")
    if max_clients < 1:
        raise MoeguardError(f"--max-clients is {max_clients}", hint="pass at least 1")
    if max_waiting < 1:
        raise MoeguardError(f"--max-waiting is {max_waiting}", hint="pass at least 1 (1: one completion at a time, the rest 503)")
    if flush_every < 1:
        raise MoeguardError(f"--flush-every is {flush_every}", hint="pass at least 1 (1 scores each request as it ends)")
    if not 0 < max_delay < math.inf:
        raise MoeguardError(f"--max-delay is {max_delay}", hint="pass a positive number of seconds, e.g. 1")
    if metrics_token is not None and not (metrics_token.isascii() and metrics_token.isprintable()
                                          and metrics_token.strip() == metrics_token and metrics_token):
        raise MoeguardError(f"--metrics-token is empty, or has spaces at an end or characters beyond printable ASCII "
                            f"({len(metrics_token)} characters)",
                            hint="pass a secret of printable ASCII (an HTTP header carries it), e.g. from `openssl rand -hex 32`")
    if metrics_token is None and not is_loopback(host):
        raise MoeguardError(f"--host {host} serves beyond this machine, and /metrics without a token would show any "
                            f"client its own anomaly scores to tune against",
                            hint="pass --metrics-token TOKEN (or set MOEGUARD_METRICS_TOKEN), or bind to 127.0.0.1")
    if alerts is not None and period_log is not None and alerts.resolve() == period_log.resolve():
        raise MoeguardError(f"--alerts and --period-log are both {alerts}", hint="pass two files: the period log is read back at start")
    for beside, what in ((open_path, "the open period"), (accepted_path, "the periods you accepted")):
        if alerts is not None and period_log is not None and alerts.resolve() == beside(period_log).resolve():
            raise MoeguardError(f"--alerts {alerts} is where --period-log keeps {what}", hint="pass another file for the alerts")
    for flag, path in (("--alerts", alerts), ("--period-log", period_log)):
        if path is None:
            continue
        for given in inputs:   # appending a line to the profile (or a model's file) damaged it for the next start
            inp = Path(str(given)).expanduser().resolve() if given is not None else None
            if inp is not None and (inp == path.resolve() or inp in path.resolve().parents):
                raise MoeguardError(f"{flag} {path} is (or is inside) the input {given}: the server would write there",
                                    hint=f"pass another file for {flag}")
        if not path.parent.is_dir():
            raise MoeguardError(f"folder {path.parent} for {flag} does not exist", hint=f"create it: mkdir -p {path.parent}")
        try:    # now, not at the first alert: a server that cannot record alerts should not start
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as e:
            raise MoeguardError(f"{flag} {path} cannot be written ({e.strerror})",
                                hint="pass a file this user may append to") from None
    if period_log is not None and not os.access(period_log.parent, os.W_OK):   # the open period is saved beside it
        raise MoeguardError(f"folder {period_log.parent} of --period-log cannot be written",
                            hint="pass a --period-log in a folder this user may create files in")
    return seconds, baseline


def period_history(prof, period_log: Path | None, *, period: float | None, baseline: int, alpha: float,
                   accept: list[str] | None = None) -> list | None:
    """``--period-log``'s rows as the baseline's history (``periodhistory.read_history``), checked against
    the profile and the clock, before the model loads; ``accept``: the starts of its periods the owner
    judged benign, which join the baseline whatever their tests said (``periodhistory.check_accept``). The
    log is not rewritten: they are kept in ``FILE.accepted`` beside it (``periodhistory.accepted_path``)
    and taken again at every later start, with any new ones. A kept start whose period is no longer in
    the log (its older lines dropped) is left out."""
    from moeguard.monitor.periodhistory import (accepted_path, check_accept, mark_accepted, read_accepted, read_history,
                                                warn_stale, write_accepted)
    from moeguard.monitor.periods import neighbours_of

    if period is None:
        return None
    digest = neighbours_of(prof, "serve").digest      # a profile without references fails here, log or not
    if period_log is None:
        return None
    history = read_history(period_log, period=period, digest=digest, shape=prof.mean.shape,
                           baseline=baseline, alpha=alpha, empty_ok=True)   # made empty at the first start
    if history and int(history[-1]["index"]) >= math.floor(time.time() / period):
        raise MoeguardError(f"{period_log}'s last period ({history[-1]['start']}) is not over yet: no request could be "
                            f"counted before it ends", hint="check this machine's clock, or pass another --period-log")
    kept = read_accepted(accepted_path(period_log))
    if accept:
        check_accept(accept, [], period=period, history=history)
        if not set(accept) <= set(kept):
            write_accepted(accepted_path(period_log), kept + accept)
    starts = {h["start"] for h in history}
    history = mark_accepted(history, {a for a in kept + (accept or []) if a in starts})
    warn_stale(history, baseline=baseline, alpha=alpha, layers=prof.meta["layers"])   # alerts an earlier test raised
    return history


def open_period(prof, period_log: Path | None, *, period: float | None, baseline: int, alpha: float,
                history: list | None) -> dict | None:
    """The open period ``serve`` saved beside ``--period-log`` before it stopped (``periodwatch.read_open``),
    checked before the model loads; None where there is none."""
    from moeguard.monitor.periodwatch import open_path, read_open

    if period is None or period_log is None:
        return None
    return read_open(open_path(period_log), period=period, digest=prof.neighbours.digest, shape=prof.mean.shape,
                     baseline=baseline, alpha=alpha, history=history, now=time.time())


def state_writer(period_log: Path | None):
    """``on_period_state``: the open period's counts to ``periodwatch.open_path(period_log)``, replaced
    whole (a temporary sibling and a rename: a crash mid-write leaves the last save); removed when
    the open period has no request."""
    from moeguard.io import write_json
    from moeguard.monitor.periodwatch import open_path

    if period_log is None:
        return None
    path = open_path(period_log)

    def save(state):
        if state is None:
            path.unlink(missing_ok=True)
        else:
            write_json(path, state, sync=True)   # a power loss must not leave an empty file at the next start
    return save


def _period_lock(period_log: Path) -> Path:
    return period_log.with_name(period_log.name + ".lock")


def release_period_log(period_log: Path, held) -> None:
    """Release :func:`lock_period_log`'s lock, its file removed while still held (as ``io.held`` removes
    every other lock file: a stray FILE.lock was left after every stop)."""
    _period_lock(period_log).unlink(missing_ok=True)
    held.close()


def lock_period_log(period_log: Path | None):
    """An exclusive lock on ``FILE.lock`` beside ``--period-log FILE``, held while the server runs (the
    open file: close it to release), or a one-line error where another server holds it: two servers
    appending the same period's row, and saving over each other's open period, left a log no start
    could read. None without a period log."""
    from moeguard.io import hold_lock

    if period_log is None:
        return None
    return hold_lock(_period_lock(period_log),
                     busy=f"another server uses --period-log {period_log}",
                     hint="give each server its own --period-log, or stop the other one")


def listen(host: str, port: int):
    """A bound TCP socket for ``host:port`` (uvicorn listens on it), or a one-line error."""
    import socket

    try:   # [::1], as a URL writes it and is_loopback takes it: getaddrinfo takes the address bare
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise MoeguardError(f"--host {host} does not resolve ({e})", hint="pass an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn does: a restart need not wait
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise MoeguardError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                            hint="pass another --port, or stop the process that holds it") from None
    sock.set_inheritable(True)
    return sock


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets (``http://[::1]:8000``)."""
    bare = host.strip("[]")
    return f"[{bare}]" if ":" in bare else bare


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:   # another name: it may resolve beyond this machine
        return False
    mapped = getattr(ip, "ipv4_mapped", None)   # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def retrying(save_state, writer):
    """``on_period_state`` that first appends the rows ``writer`` (``alert_writer``'s) kept from a
    failed write: every minute, not only at the next period's close."""
    if save_state is None or writer is None:
        return save_state

    def save(state):
        writer.retry()
        save_state(state)
    return save


@contextlib.contextmanager
def retried_every(writer, seconds: float = 60.0, *, periods: bool):
    """Without periods (whose minute-by-minute state save retries, ``retrying``) a thread calls
    ``writer.retry()`` every ``seconds``: alert rows a full disk kept waited for the next alert or the
    server's stop, and a crash lost them."""
    if writer is None or periods:
        yield
        return
    stop = threading.Event()

    def loop():
        while not stop.wait(seconds):
            writer.retry()
    t = threading.Thread(target=loop, name="moeguard-alert-retry", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def starts_path(alerts: Path) -> Path:
    return alerts.with_name(alerts.name + ".starts.jsonl")


def record_start(alerts: Path | None, settings: dict) -> None:
    """Append this start's run record (the settings, the profile's digest, versions and commit) beside the
    alert log, one line per start: alerts gathered over weeks name neither the profile nor the alpha that
    raised them. The alert log itself holds alerts only (what a SIEM ingests)."""
    if alerts is None or (alerts.exists() and not alerts.is_file()):   # /dev/stdout, a pipe: no folder beside it
        return
    import datetime as _dt

    from moeguard.provenance import run_record

    row = {"started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **run_record(settings)}
    path = starts_path(alerts)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (dumps(row) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:   # before the model loads: a server that cannot record its settings does not start
        raise MoeguardError(f"cannot append the start record {path} ({e.strerror or e})",
                            hint="let this user write beside --alerts, or choose another --alerts") from None


def alert_writer(path: Path | None, period_log: Path | None = None):
    """Append each request's, window's, slice's and period's alert to ``path`` (JSON Lines; never the
    prompt), and each closed period to ``period_log`` (the row ``monitor score --history`` reads).

    A failed append (a full disk) is cut back to where it began, so no half line is left for the next
    row to be glued to (a broken line mid-log, which no later start could read past), and its rows are
    kept and appended again, first, at the next write: the closed period the server's baseline
    already holds reaches its log once the disk has room. Each file is written whatever the other
    did; the first failure is raised after both (the monitor counts it)."""
    import threading

    if path is None and period_log is None:
        return None
    lock = threading.Lock()
    pending: dict[Path, list[str]] = {}   # rows a failed append kept, per file, in order

    def append(file: Path, lines: list[str], *, sync: bool) -> None:
        waiting = pending.setdefault(file, [])
        waiting += lines
        data = "".join(waiting).encode("utf-8")
        # unbuffered: a failed write leaves no buffer that closing would flush after the cut
        fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
                if sync:
                    os.fsync(fd)   # once a period: the next start's baseline must be on disk
            except OSError:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        waiting.clear()

    def write(client, result):
        failed = None
        # the period log first: it is the next start's baseline, and a failing alert log must not lose it
        if result.get("period") and period_log is not None:
            row = result["period"]
            try:
                with lock:
                    append(period_log, [dumps({**row, **({"alert": True} if row.get("alert") else {})}) + "\n"],
                           sync=True)
            except OSError as e:
                failed = e
        rows = [a for a in (result.get("alert"), (result.get("window") or {}).get("alert"),
                            (result.get("slice") or {}).get("alert"), (result.get("period") or {}).get("alert")) if a]
        if rows and path is not None:
            try:
                with lock:   # a slice's or period's alert is no one client's
                    append(path, [dumps({"client": None if a["kind"] in ("slice", "period") else client, **a}) + "\n"
                                  for a in rows], sync=False)
            except OSError as e:
                failed = failed or e
        if failed is not None:
            raise failed

    def retry() -> int:
        """Append the rows a failed write kept (the server calls it every minute and at shutdown);
        returns how many are still unwritten. Never raises: a disk still full waits for the next try."""
        with lock:
            for file, rows in pending.items():
                if rows:
                    try:
                        append(file, [], sync=file == period_log)
                    except OSError:
                        pass
            return sum(len(rows) for rows in pending.values())

    write.retry = retry
    return write
