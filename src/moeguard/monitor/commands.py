"""What ``moeguard monitor profile`` and ``monitor score`` do, for a library caller and the CLI alike.

Each checks every input before the weights load, keys the work it keeps for a rerun by what that
work depends on, and writes its output through a resumable folder (an interrupt keeps the finished
steps; the same call resumes). The CLI parses its options into these arguments and prints the
summary lines; nothing here prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

from moeguard.errors import MoeguardError
from moeguard.io import dumps
from moeguard.monitor.fit import check_vocab

Progress = Callable[[], contextlib.AbstractContextManager]   # a progress bar's factory; nullcontext: none


def check_profile_options(*, log: Path | None, tasks: list[str] | None, limit: int | None, topics: str,
                          window: int, reply_tokens: int, slice_len: int) -> int:
    """The options' own checks, before anything is read; returns ``limit`` with its default (200)."""
    if log is not None:
        if tasks is not None or limit is not None:
            raise MoeguardError(f"--log is given with {'--tasks' if tasks is not None else '--limit'}",
                                hint="profile either tasks (--tasks, --limit) or a log of benign traffic (--log)")
    elif topics != "auto":
        raise MoeguardError(f"--topics {topics} without --log", hint="--topics clusters a log's requests; tasks are topics")
    limit = 200 if limit is None else limit
    if limit < 8:
        raise MoeguardError(f"--limit is {limit}", hint="pass --limit of at least 8 inputs per task")
    if window < 1:
        raise MoeguardError(f"--window is {window}", hint="pass --window of at least 1 request")
    if not 0 <= reply_tokens <= 256:
        raise MoeguardError(f"--reply-tokens is {reply_tokens}", hint="pass 0 (prompts only) or 1 to 256 reply tokens")
    from moeguard.monitor.slices import check_slice

    check_slice(slice_len)
    return limit


def _check_options(*, window: int, early: tuple[int, ...], slice_len: int, reply_tokens: int, tasks=None,
                   limit: int | None = None, log: Path | None = None, topics: str = "auto") -> None:
    """A library caller's options, checked as the CLI checks them, before anything loads."""
    from moeguard.monitor.ladder import check_early

    check_profile_options(log=log, tasks=tasks, limit=limit, topics=topics, window=window,
                          reply_tokens=reply_tokens, slice_len=slice_len)
    if early:
        check_early(tuple(early), window)


def profile_tasks(*, out: Path, tasks: list[str] | None, limit: int, window: int, early: tuple[int, ...],
                  slice_len: int, reply_tokens: int, model: str | None, device_map: str | None, overwrite: bool,
                  seed: int, progress: Progress = contextlib.nullcontext):
    """The profile of benign traffic made of tasks' eval inputs (default: the embedded suite), written
    to ``out``. Returns ``(profile, handle, prompts)``."""
    from moeguard.edge import embedded_or, resolve_model, task_inputs
    from moeguard.io import check_output
    from moeguard.monitor.fit import build, check_prompts
    from moeguard.tasks.loaders import load_records, prompt_text

    _check_options(tasks=tasks, limit=limit, window=window, early=early, slice_len=slice_len, reply_tokens=reply_tokens)
    check_output(out, overwrite=overwrite, inputs=(model,), kind="file")
    handle = resolve_model(model, device_map=device_map)
    # a request's histogram is one [layers, experts] array: refused from the config, not after the load
    handle.check_uniform("the routing monitor", hint="monitor the model as served before budget pruning, or prune it with --keep")
    ts = embedded_or(tasks, what="--tasks", train=False)   # benign traffic: eval records only
    check_output(out, overwrite=overwrite, inputs=task_inputs(ts), kind="file")
    # a running-text task's benign traffic is its texts (a language-modeling task has no inputs)
    prompts = {t.name: [x for r in load_records(t, "eval", limit=limit) if (x := prompt_text(t, r))] for t in ts}
    # the calibration requests there are (half of each task's inputs, which may be fewer than --limit):
    # a window is drawn from them, before any weights load
    check_prompts(prompts)   # before the weights load (and before a partial profile is begun)
    held = sum(len(p) - len(p) // 2 for p in prompts.values())
    if window > held:
        raise MoeguardError(f"--window is {window}; benign windows are drawn from at most {held} calibration requests "
                            f"(half of each task's inputs: --limit {limit}, {len(ts)} tasks)",
                            hint=f"pass --window of at most {held}, or raise --limit (or give tasks with more inputs)")
    from moeguard.models.identity import weights_identity

    # what the kept per-task arrays depend on: an interrupted run resumes only on the same inputs,
    # seed (the halves) and weights
    resume = {"prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), "seed": seed, "reply_tokens": reply_tokens,
              "model": weights_identity(handle.arg), **handle.placement}
    settings = {"model": handle.name, "tasks": list(prompts), "limit": limit, "window": window, "seed": seed,
                "reply_tokens": reply_tokens, **({"early": list(early)} if early else {}),
                **({"slice": slice_len} if slice_len else {})}
    def make(m, tok, tmp, bar):
        check_vocab(m, tok, ((f"task {t}'s input {i + 1}", x) for t, xs in prompts.items() for i, x in enumerate(xs)))
        return build(m, tok, prompts, window=window, seed=seed, name=handle.name, cache=tmp, progress=bar,
                     reply_tokens=reply_tokens, early=early, slice_len=slice_len)

    prof = make_profile(out=out, overwrite=overwrite, resume=resume, handle=handle, seed=seed, settings=settings,
                        progress=progress, make=make)
    return prof, handle, prompts


def profile_log(*, out: Path, log: Path, topics: str, window: int, early: tuple[int, ...], slice_len: int,
                reply_tokens: int, model: str | None, device_map: str | None, overwrite: bool, seed: int,
                progress: Progress = contextlib.nullcontext):
    """The profile of a deployment's own benign traffic (monitor/fromlog.py), written to ``out``.
    Returns ``(profile, handle)``."""
    from moeguard.edge import resolve_model
    from moeguard.io import check_output, file_sha256
    from moeguard.models.identity import weights_identity
    from moeguard.monitor import fromlog
    from moeguard.monitor.score import read_log

    _check_options(log=log, topics=topics, window=window, early=early, slice_len=slice_len, reply_tokens=reply_tokens)
    check_output(out, overwrite=overwrite, inputs=(model, log), kind="file")
    k = fromlog.check_topics(topics)
    records = read_log(log)
    fromlog.check(records, window=window, slice_len=slice_len, seed=seed, topics=k)     # before any weights load
    handle = resolve_model(model, device_map=device_map)
    handle.check_uniform("the routing monitor", hint="monitor the model as served before budget pruning, or prune it with --keep")
    digest = file_sha256(log)
    # what the kept chunks depend on: the records as read (a log appended to since, or read with another
    # time zone for naive ISO times, splits differently), the seed (the split) and the weights
    read = hashlib.sha256(json.dumps([[r["client"], r["_t"], r["prompt"], r.get("reply"), r.get("topic")]
                                      for r in records]).encode()).hexdigest()
    # "clients": how a client is keyed (its id's text since 2026-12-05: 1 and "1" one client); chunks kept
    # by an earlier version split a mixed-id log otherwise, and are not reused
    resume = {"records": read, "seed": seed, "reply_tokens": reply_tokens, "model": weights_identity(handle.arg),
              "clients": "text", **handle.placement}
    settings = {"model": handle.name, "log": str(log), "topics": topics, "window": window, "seed": seed,
                "reply_tokens": reply_tokens, **({"early": list(early)} if early else {}),
                **({"slice": slice_len} if slice_len else {})}
    def make(m, tok, tmp, bar):
        check_vocab(m, tok, _texts(records))
        return fromlog.build(m, tok, records, window=window, topics=k, seed=seed, name=handle.name, cache=tmp,
                             progress=bar, early=early, slice_len=slice_len, reply_tokens=reply_tokens,
                             log={"log": str(log), "sha256": digest})

    prof = make_profile(out=out, overwrite=overwrite, resume=resume, handle=handle, seed=seed, settings=settings,
                        progress=progress, make=make)
    return prof, handle


def make_profile(*, out: Path, overwrite: bool, resume: dict, handle, seed: int, settings: dict,
                 make: Callable, progress: Progress = contextlib.nullcontext):
    """Load the model and build the profile (``make(model, tokenizer, scratch, progress)``) in a resumable
    scratch folder, then write it with its run record. An interrupt keeps what was observed for a rerun."""
    from moeguard.config import seed_everything
    from moeguard.io import resumable_scratch, write_json
    from moeguard.models.identity import weights_digest
    from moeguard.provenance import run_record

    with resumable_scratch(out, overwrite=overwrite, settings=resume) as tmp:
        seed_everything(seed)
        m, tok, _ = handle.load()
        with progress() as bar:
            prof = make(m, tok, tmp, bar)
        prof.meta["weights"] = weights_digest(handle.arg)   # what score and serve compare, not the name typed
        write_json(out, {**prof.to_dict(), "run": run_record({**settings, **handle.placement})}, overwrite=overwrite)
    return prof


def score_log(*, profile: Path, log: Path, out: Path, window: int | None, alpha: float, log_prompts: bool,
              period: str | None, baseline: int | None, history: Path | None, period_alpha: float | None,
              period_clients: bool, accept: str | None, no_period_requests: bool, model: str | None,
              device_map: str | None, overwrite: bool, progress: Progress = contextlib.nullcontext,
              note: Callable[[str], None] | None = None):
    """Replay logged requests through the model and write ``out`` (scores, windows, alerts, slices,
    periods and the summary; docs/routing-security.md). ``note``: where a line for the user goes
    (default: a warning). Returns ``(summary, handle)``."""
    from moeguard.edge import resolve_model
    from moeguard.io import check_output, file_sha256, read_json, resumable_dir
    from moeguard.monitor.evasion import check_profile
    from moeguard.monitor.footprint import check_score
    from moeguard.monitor.periodclients import REQUESTS_FOLDER
    from moeguard.monitor.periodhistory import parse_accept, read_history
    from moeguard.monitor.periodrequests import wanted
    from moeguard.monitor.periods import check_period
    from moeguard.monitor.periods import period_alpha as level
    from moeguard.monitor.profile import Profile
    from moeguard.monitor.score import check_settings, read_log

    note = note or (lambda line: warnings.warn(line, stacklevel=2))
    seconds, baseline = check_period(period, baseline, history=history, period_alpha=period_alpha,
                                     period_clients=period_clients or None, accept=accept,
                                     no_period_requests=no_period_requests or None)
    alpha_p = level(alpha, period_alpha)
    accepted = parse_accept(accept)
    # the history's kept requests are inputs too: an --out there would replace them with this run's
    check_output(out, overwrite=overwrite, kind="folder",
                 inputs=(model, profile, log, history, history and history.parent / REQUESTS_FOLDER))
    handle = resolve_model(model, device_map=device_map)
    prof = Profile.from_dict(read_json(profile, what="routing profile", hint="make it with `moeguard monitor profile`"),
                             where=str(profile))
    check_profile(prof, handle)   # this model's profile (weights, layers, experts, top-k): before any history is read
    window = check_settings(prof, window=window, alpha=alpha, period=seconds, baseline=baseline)
    earlier = read_history(history, period=seconds, digest=prof.neighbours.digest, shape=prof.mean.shape,
                           baseline=baseline, alpha=alpha_p, clients_test=period_clients) if history is not None else None
    stale = None
    if earlier:   # alerts an earlier version of the test raised that this one would not: one warning line
        from moeguard.monitor.periodhistory import mark_accepted, warn_stale

        stale = warn_stale(mark_accepted(earlier, set(accepted or ())), baseline=baseline, alpha=alpha_p,
                           layers=prof.meta["layers"])
    records = read_log(log)
    if seconds is not None:
        from moeguard.monitor.periods import check_times

        check_times(records)
    if earlier:
        from moeguard.monitor.periodhistory import check_after

        check_after([r["_t"] for r in records], period=seconds, history=earlier)
    if accepted:
        from moeguard.monitor.periodhistory import check_accept

        check_accept(accepted, [r["_t"] for r in records], period=seconds, history=earlier)
    held, want = None, []
    if earlier:   # the history's baseline periods whose requests its run kept (period_requests beside it)
        want = wanted(earlier, baseline=baseline, accept=accepted or ())
    check_score(prof, records, period=seconds, history=history, want=want)   # before anything large loads
    if earlier:
        from moeguard.monitor.periodrequests import read as read_held

        held = read_held(history, want, dim=prof.neighbours.x.shape[1], shape=prof.mean.shape)
        if len(held) < len(want):
            note(f"note: {len(want) - len(held)} of the {len(want)} baseline periods read from --history have no "
                 f"kept requests (none in {history.parent / REQUESTS_FOLDER}): the clients' test and an alert's "
                 f"cause match among the requests of the other {len(held)}")
    brought = len(held or ())   # score_periods empties held as it takes them
    from moeguard.models.identity import weights_identity
    from moeguard.provenance import run_record

    # what the replayed arrays depend on: an interrupted run resumes only on the same profile, log and weights
    resume = {"profile": file_sha256(profile), "log": file_sha256(log), "model": weights_identity(handle.arg),
              **handle.placement}
    with resumable_dir(out, overwrite=overwrite, settings=resume) as tmp:
        m, tok, _ = handle.load()
        check_vocab(m, tok, _texts(records))   # before the replay: a token past the embeddings failed inside it
        from moeguard.monitor.score import score

        with progress() as bar:
            scores, windows, alerts, summary = score(m, tok, prof, records, window=window, alpha=alpha,
                                                     log_prompts=log_prompts, cache=tmp, period=seconds,
                                                     baseline=baseline, history=earlier, period_alpha=alpha_p,
                                                     period_clients=period_clients, accept=accepted,
                                                     held=held, progress=bar)
        summary["run"] = run_record({"profile": str(profile), "log": str(log), "model": handle.name, "window": window,
                                     "alpha": alpha, "log_prompts": log_prompts, **handle.placement,
                                     **({"period": seconds, "baseline": baseline, "period_alpha": alpha_p,
                                         "history": None if history is None else str(history),
                                         "period_clients": period_clients, "accept": accepted,
                                         "period_requests": not no_period_requests}
                                        if seconds is not None else {})})
        _write_scores(tmp, prof, scores, windows, alerts, summary, seconds=seconds, baseline=baseline,
                      keep_requests=not no_period_requests, history=history, brought=brought, want=want, stale=stale,
                      earlier=earlier)
    return summary, handle


def _texts(records: list[dict]):
    """(where, text) of a log's prompts and logged replies, for :func:`check_vocab`."""
    for r in records:
        yield f"request {r['id']!r}'s prompt", r["prompt"]
        if isinstance(r.get("reply"), str):
            yield f"request {r['id']!r}'s reply", r["reply"]


def _write_scores(tmp: Path, prof, scores, windows, alerts, summary: dict, *, seconds, baseline, keep_requests: bool,
                  history, brought: int, want: list, stale, earlier) -> None:
    """``score``'s files into the run's folder (which becomes ``--out`` once the block ends)."""
    from moeguard.monitor.score import clear_outputs, drop_replay

    clear_outputs(tmp)   # an interrupted attempt's outputs (other flags, a half-written file) do not carry over
    (tmp / "scores.jsonl").write_text("".join(dumps(s) + "\n" for s in scores))
    (tmp / "windows.jsonl").write_text("".join(dumps(w) + "\n" for w in windows))
    traffic = summary.pop("traffic_slices")
    if prof.meta.get("slice"):
        (tmp / "slices.jsonl").write_text("".join(dumps(t) + "\n" for t in traffic))
    spans = summary.pop("traffic_periods")
    if seconds is not None:
        (tmp / "periods.jsonl").write_text("".join(dumps(t) + "\n" for t in spans))
    (tmp / "alerts.jsonl").write_text("".join(dumps(a) + "\n" for a in alerts))
    arrays = summary.pop("period_arrays")
    if seconds is not None and keep_requests:   # each period a later baseline can take, with its requests
        from moeguard.monitor.periodrequests import save

        summary["period_requests"] = {**save(tmp, spans, **arrays, baseline=baseline, digest=prof.neighbours.digest,
                                             history=history), "read": brought, "history_baseline": len(want)}
    if earlier:
        summary["history_stale_alerts"] = stale
    (tmp / "summary.json").write_text(dumps(summary, indent=2) + "\n")
    drop_replay(tmp)
