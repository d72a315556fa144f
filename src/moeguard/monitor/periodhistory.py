"""A period test's history (``monitor score --history``, ``serve --period-log``): an earlier run's
``periods.jsonl`` read back as the first periods of the baseline, checked line by line before the
model loads, so that a daily run replays only the new day and gets the numbers one run over all
the days gets (``periods.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.monitor.embed import unpack
from moeguard.monitor.periods import MIN_REQUESTS, TEST, _when
from moeguard.monitor.periodsmall import SIZES


def _unpack(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """A period's stored state: float64, exactly (a period scored with a history gets the numbers it
    gets in one run), and finite."""
    a = unpack(text, shape, "<f8")
    if not np.isfinite(a).all():
        raise ValueError("a stored value is not finite")
    return a


def read_history(path: Path, *, period: float, digest: str, shape: tuple[int, int], baseline: int,
                 alpha: float, clients_test: bool = False, empty_ok: bool = False) -> list[dict[str, Any]]:
    """``--history``: an earlier run's ``periods.jsonl``, checked line by line (one-line errors
    naming the line): the same period length, neighbour references, baseline, alpha and clients'
    test (which decided which of its periods alerted and so joins a baseline), periods in time order.
    An empty file is an error unless ``empty_ok`` (``serve``'s period log, made at its first start)."""
    from moeguard.io import strict_loads

    unedited = "pass the periods.jsonl an earlier run wrote, unedited"
    if not path.is_file():
        raise MoeguardError(f"period history {path} " + ("is a folder" if path.is_dir() else "does not exist"),
                            hint="pass the periods.jsonl of an earlier `monitor score --period` run")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise MoeguardError(f"period history {path} cannot be read ({e.strerror})", hint="check its permissions") from None
    rows, last = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = strict_loads(line)
            index, seconds, state = int(row["index"]), float(row["seconds"]), row.get("state")
            int(row["requests"])
            settings = (int(row["settings"]["baseline"]), float(row["settings"]["alpha"]))
            str(row["start"])
            if state is not None:
                row["_state"] = (_unpack(state["mean"], shape), _unpack(state["noise"], shape))
            if row.get("small_state"):   # the small clients' test's pools (periodsmall), by their size bound
                row["_small_state"] = {int(u): (_unpack(v["mean"], shape), _unpack(v["noise"], shape), int(v["requests"]))
                                       for u, v in row["small_state"].items() if int(u) in SIZES}
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:   # OverflowError: an index of 1e999;
            # AttributeError: a small_state that is not an object
            if n == len(text.splitlines()) and not text.endswith("\n"):   # a row whose append never finished
                raise MoeguardError(f"{where}, the last line, is cut short ({type(e).__name__}: {e}): a write that did not "
                                    "finish (a full disk, a crash)", hint=f"remove that line (its period's row is lost), "
                                    f"e.g. sed -i '$ d' {path}, and start again") from None
            raise MoeguardError(f"{where} is not a period of `monitor score --period` ({type(e).__name__}: {e})",
                                hint=unedited) from None
        if seconds != period:
            raise MoeguardError(f"{where} is a period of {seconds:g} s, this run's are {period:g} s",
                                hint="pass the same --period as the run that wrote the history")
        if row.get("neighbours") != digest:
            raise MoeguardError(f"{where} was scored with another profile's neighbour references",
                                hint="score with the profile that wrote the history, or start without --history")
        if row["settings"].get("test") != TEST:
            raise MoeguardError(f"{where} was tested by another version of the period test "
                                f"({row['settings'].get('test') or 'the first'}; this one is {TEST})",
                                hint="score the history's logs again with this version, or start without --history: "
                                     "the test decided which of its periods join a baseline")
        if settings != (baseline, alpha):
            raise MoeguardError(f"{where} was scored with --baseline {settings[0]} --period-alpha {settings[1]:g}, this "
                                f"run with --baseline {baseline} --period-alpha {alpha:g}",
                                hint="pass the history's settings (--period-alpha is --alpha where not given): they "
                                     "decided which of its periods join a baseline")
        if bool(row["settings"].get("clients_test")) != clients_test:
            raise MoeguardError(f"{where} was scored {'with' if not clients_test else 'without'} --period-clients, this "
                                f"run {'with' if clients_test else 'without'}",
                                hint="pass the history's setting: its clients' test decided which of its periods join a baseline")
        if last is not None and index <= last:
            raise MoeguardError(f"{where} is period {index}, not after the line before it ({last})", hint=unedited)
        rows.append(row)
        last = index
    if not rows and not empty_ok:   # every score --period run writes a row a period: an empty file is damaged
        raise MoeguardError(f"period history {path} holds no period", hint=unedited + ", or start without --history")
    return rows


def stale_alerts(rows: list[dict[str, Any]], *, baseline: int, alpha: float, layers: list[int]) -> list[dict[str, Any]]:
    """The history's periods (``read_history``'s rows) that alerted when they were scored, in an
    expert that most of their baseline periods routed nothing to, and that this version of the test
    passes against the same baseline periods: judged again from the states the rows keep (the load
    test, and the small clients' test on the pools it tested then). Versions before 2026-12-07 alerted
    there (``periodstats``' sparse cells): one benign request routed to such an expert was an alert,
    and every later day like it too, since an alerted period never joins a baseline. The rows keep
    their alerts; this says which to review and accept. ``layers``: the profile's MoE layers, as the
    rows name them.

    A history this version wrote gives none: the same states, the same test. The periods accepted may
    have been accepted after a period was scored, so each is judged against its baselines with them and
    without, those of the size its row records, and named only where every such one passes it; none
    of that size (a log whose older lines were dropped): not named. The clients' test needs the requests and is not
    judged again: a period it alerted on is not named. One pass, the baselines built as the rows go."""
    from moeguard.monitor.periods import Baseline, joins
    from moeguard.monitor.periodsmall import SmallClients

    # with the periods accepted and without (an acceptance may have come after a period was scored)
    loads = [Baseline(baseline=baseline, alpha=alpha, layers=layers) for _ in range(2)]
    smalls = [SmallClients(baseline=baseline, alpha=alpha, layers=layers) for _ in range(2)]
    out = []
    for row in rows:
        if "_state" in row and (row.get("alert") or row.get("small_alert")) and not (row.get("accepted")
                                                                                       or row.get("clients_alert")):
            try:   # the baselines of the size the row's test had; each must pass it now
                now = [got for load, small in zip(loads, smalls)
                       if (got := _judged_again(row, load, small, alpha=alpha, layers=layers)) is not _OTHER]
            except (KeyError, TypeError, ValueError, IndexError):   # a field an edited history lacks: only a warning is at stake
                now = []
            if now and all(now):
                out.append({"start": row["start"], "tests": now[0]})
        for load, small, joined in zip(loads, smalls, (joins(row), joins({**row, "accepted": False}))):
            if joined and "_state" in row:                        # as Baseline and SmallClients take a history
                load.keep(row["_state"] + (int(row["requests"]),))
            if joined and "_small_state" in row:
                for u, state in row["_small_state"].items():
                    small.by_size[u].keep(state)
    return out


_OTHER = object()   # _judged_again: a baseline of another size than the row's test had


def _judged_again(row: dict[str, Any], load, small, *, alpha: float, layers: list[int]) -> Any:
    """``stale_alerts``' test of one alerted row against the baselines as they stood before it: its
    tests that alerted, each now passing in a sparse cell; None where one does not; ``_OTHER`` where
    a baseline is not the size the row's test had."""
    from moeguard.monitor.periodstats import SPARSE

    def sparse(kept, layer, expert) -> bool:
        slot = layers.index(int(layer))
        return bool(kept) and float(np.mean([m[slot, int(expert)] == 0 for m, _, _ in kept])) >= SPARSE

    now: dict[str, Any] = {}
    if row.get("alert"):
        got: dict[str, Any] = {}
        if len(load.kept) != int(row["baseline"]):
            return _OTHER
        if load.judge(got, *row["_state"], int(row["requests"]), hold=True) is None or got.get("alert") \
                or not sparse(load.kept, row["layer"], row["expert"]):
            return None
        now["load"] = {"p_then": float(row["p"]), "p_now": got["p"], "layer": row["layer"], "expert": row["expert"]}
    if row.get("small_alert"):
        ps, under = [], int(row["small_under"])
        if len(small.by_size[under].kept) != int(row["small_baseline"]):
            return _OTHER
        for pool in row["small_pools"]:
            got = {}
            if small.by_size[int(pool["under"])].judge(got, *row["_small_state"][int(pool["under"])], hold=True) is None:
                return None
            ps.append(got["p"])
        p = min(1.0, min(ps) * len(ps)) if ps else 0.0
        if p <= alpha or not sparse(small.by_size[under].kept, row["small_layer"], row["small_expert"]):
            return None
        now["small_clients"] = {"p_then": float(row["small_p"]), "p_now": p, "layer": row["small_layer"],
                                "expert": row["small_expert"]}
    return now or None


def warn_stale(rows: list[dict[str, Any]] | None, *, baseline: int, alpha: float, layers: list[int]) -> list[dict[str, Any]]:
    """``stale_alerts``, said as one warning line where there are any (what ``score`` and ``serve`` read)."""
    import warnings

    stale = stale_alerts(rows or [], baseline=baseline, alpha=alpha, layers=layers)
    if stale:
        said = "; ".join(f"{s['start']} (" + ", ".join(f"{'load' if k == 'load' else 'small clients'} p {v['p_then']:.2g} -> "
                                                     f"{v['p_now']:.2g}, layer {v['layer']} expert {v['expert']}"
                                                     for k, v in s["tests"].items()) + ")" for s in stale)
        warnings.warn(f"{len(stale)} period{'' if len(stale) == 1 else 's'} of the history alerted when scored and "
                      f"{'passes' if len(stale) == 1 else 'pass'} this version of the test against the same baseline periods: {said}. Versions before 2026-12-07 "
                      f"alerted on experts that most baseline periods routed nothing to. Such a period stays out of later "
                      f"baselines until accepted: review it, and if it is benign pass --accept "
                      f"{','.join(s['start'] for s in stale)}", stacklevel=2)
    return stale


def check_after(t, *, period: float, history: list[dict[str, Any]] | None) -> None:
    """A one-line error unless every request ``t`` (seconds) falls after the history's last period
    (before the model loads: a daily run is given the new day's log)."""
    if history and len(t) and math.floor(min(t) / period) <= int(history[-1]["index"]):
        raise MoeguardError(f"the log has requests from {_when(math.floor(min(t) / period) * period)}, in or before the "
                            f"history's last period ({history[-1]['start']})",
                            hint="score only the requests after the history's last period, or drop --history")


def parse_accept(accept: str | None) -> list[str] | None:
    """``--accept``'s period starts (comma-separated), as ``score`` and ``serve`` take them (None: not given);
    a one-line error where it names none."""
    if accept is None:
        return None
    starts = [a.strip() for a in accept.split(",") if a.strip()]
    if not starts:
        raise MoeguardError(f"--accept is {accept!r}", hint="pass one or more period starts, comma-separated, as "
                                                           "periods.jsonl (or serve's period log) writes them")
    return starts


def mark_accepted(history: list[dict[str, Any]] | None, accept) -> list[dict[str, Any]]:
    """The history's rows, those whose start is in ``accept`` marked ``accepted`` (copies; the rows
    given are not changed): ``Baseline`` then keeps them whatever their tests said."""
    return [dict(old, accepted=True) if old["start"] in accept else old for old in history or []]


def accepted_path(period_log: Path) -> Path:
    """Where ``serve`` keeps the periods of ``--period-log`` the owner accepted: ``FILE.accepted`` beside it."""
    return period_log.with_name(period_log.name + ".accepted")


def read_accepted(path: Path) -> list[str]:
    """The period starts an earlier ``serve --accept`` kept in ``path`` ([] where there is no file); a
    one-line error where it is not that file, before the model loads."""
    from moeguard.io import strict_loads

    if not path.exists():
        return []
    fix = "it lists the periods accepted at earlier starts: fix it, or delete it and pass them to --accept again"
    try:
        got = strict_loads(path.read_text(encoding="utf-8"))
        starts = got["accepted"]
        if not (isinstance(starts, list) and all(isinstance(a, str) for a in starts)):
            raise TypeError("'accepted' is not a list of period starts")
    except OSError as e:
        raise MoeguardError(f"{path} cannot be read ({e.strerror})", hint="check its permissions") from None
    except (ValueError, KeyError, TypeError) as e:
        raise MoeguardError(f"{path} is not a list of accepted periods ({type(e).__name__}: {e})", hint=fix) from None
    return starts


def write_accepted(path: Path, starts: list[str]) -> None:
    """Keep ``starts`` in ``path`` (sorted, no repeats), whole or not at all (``io.write_text``: a temporary
    sibling, then a rename)."""
    from moeguard.io import dumps, write_text

    write_text(path, dumps({"accepted": sorted(set(starts))}) + "\n")


def check_accept(accept: list[str], t, *, period: float, history: list[dict[str, Any]] | None) -> None:
    """``--accept``: each a period's start as periods.jsonl writes it, of the history's periods or the log's
    (``t``: its requests' times, seconds); a history period it names must have been tested (it has a state
    to join a baseline with). One-line errors before the model loads."""
    keys, sizes = np.unique(np.floor(np.asarray(t, dtype=np.float64) / period), return_counts=True)
    counts = {_when(k * period): int(c) for k, c in zip(keys, sizes)}   # the log's periods, by start
    starts = [old["start"] for old in history or []] + sorted(counts)
    for a in accept:
        if a not in starts:
            near = f"the first is {starts[0]}, the last {starts[-1]}" if starts else "there are none"
            raise MoeguardError(f"--accept {a}: no period of the history or the log starts then ({near})",
                                hint="pass a period's start as periods.jsonl writes it (its \"start\"), e.g. "
                                     + (starts[-1] if starts else "2026-12-01T00:00:00Z"))
        old = next((o for o in history or [] if o["start"] == a), None)
        n = counts.get(a, 0)   # the log's requests in it
        if old is None and n < MIN_REQUESTS:   # accepted, yet never in a baseline: said now, not silently
            raise MoeguardError(f"--accept {a}: that period of the log has {n} requests, fewer than the {MIN_REQUESTS} a "
                                "period needs to be tested or to join a baseline", hint="accept a period with more requests")
        if old is not None and "_state" not in old:
            raise MoeguardError(f"--accept {a}: that period of the history was not tested ({old.get('why', 'no state')}), "
                                "so it has nothing to add to a baseline", hint="accept a period that was tested")
