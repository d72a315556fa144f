"""A routing profile from a deployment's own benign request log (``moeguard monitor profile --log``).

A profile from tasks calibrates its nulls on traffic drawn like the tasks' inputs: windows drawn
from one task or a uniform mix of them, slices from Dirichlet mixes of tasks. Real traffic is
neither. Its topics are not the tasks and are not equally popular, and its users have habits
(sessions on one subject, a favourite topic). Fresh benign blocks unlike the profile's inputs
alerted at 1.7x the nominal rate, and slices at 2.5-3.5x (docs/routing-security.md). From a log of
the deployment's own benign traffic (the ``score`` log format), every null describes that traffic:

- **the split is by client** (seeded): the fit half's clients give the statistics' parameters and
  the token table, the other clients calibrate, so every p-value is what a *new* user of this
  deployment would get. Where that puts under a third of the requests in either half (one client
  dominates), the split is by time instead: the log's first half fits, the second calibrates.
- **topics** are the records' ``topic`` field where every record has one (an endpoint, an app, a
  product); otherwise clusters of the fit half's embeddings (k-means, seeded). Topics with fewer
  than ``MIN_FIELD_TOPIC`` fit requests (a long tail of rare apps) are merged into ``OTHER``, with
  a warning naming them, where together they have that many.
- **benign windows are real clients' blocks**: ``window`` consecutive requests of one calibration
  client (every start, drawn at random), as ``score`` sees a client; early looks are their first
  requests. A log where no calibration client sent a full window falls back to drawn windows.
- **benign slices are real slices** of the calibration half's traffic in time order, each with its
  clients (so a heavy user's own pairs are left out, as when scoring).

With ``reply_tokens``, each request's reply is profiled as ``score`` replays it: the record's logged
``reply`` where it has one, else the model's greedy reply (``replies.routing``).

Requests' own nulls (``request.*``) are as with tasks: the calibration half's requests. A prompt the
fit half also holds is more familiar than new traffic (its embedding is a kernel reference), so the
share of calibration prompts repeating one is reported, with a warning above ``REPEATED``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.kept import kept_arrays
from moeguard.monitor.embed import Embedding
from moeguard.monitor.fit import assemble, observe
from moeguard.monitor.profile import Profile, check_uniform
from moeguard.monitor.tokens import TokenRoutingCounts

CHUNK = 256          # requests observed (and kept for a resumed run) at a time
MIN_TOPIC = 8        # smallest cluster kept as a topic: its mean histogram and kernel references need a few
MAX_TOPICS = 16
MIN_FIELD_TOPIC = 4  # fit requests a topic of the records' field needs (its mean histogram, kernel references)
OTHER = "other"      # where rare field topics are merged (a topic of that name already there takes them)
REPEATED = 0.1           # share of calibration prompts also in the fit half above which build warns
# below this many non-overlapping benign client blocks a 0.01 window p-value is extrapolation: fresh
# benign blocks alerted at 0.5-3.8% at 0.01 from 230, depending on which users calibrated
# (benchmarks/routing_monitor_own_log.py), at about nominal from 389
INDEPENDENT_BLOCKS = 300


def check_topics(value: Any) -> int:
    """``--topics``: 0 (auto) or 1 to ``MAX_TOPICS`` clusters."""
    if isinstance(value, str):
        value = 0 if value == "auto" else int(value) if value.strip().isascii() and value.strip().isdecimal() else value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOPICS:
        raise MoeguardError(f"--topics is {value!r}", hint=f"pass 'auto' or 1 to {MAX_TOPICS} clusters")
    return value


def split(records: list[dict[str, Any]], *, window: int, rng: np.random.Generator) -> tuple[list[int], list[int], str]:
    """(fit indices, calibration indices, "clients" or "time") into ``records`` in time order (module
    docstring). Checked before any weights load."""
    n = len(records)
    if n < max(16, 2 * window):
        raise MoeguardError(f"the benign log holds {n} requests", hint=f"profile a log of at least {max(16, 2 * window)} "
                            f"requests (twice --window {window}, and at least 16)")
    clients = list(dict.fromkeys(str(r["client"]) for r in records))   # 1 and "1" are one client, as in score
    by = {c: [] for c in clients}
    for i, r in enumerate(records):
        by[str(r["client"])].append(i)
    fit: list[int] = []
    for j in rng.permutation(len(clients)):   # a client joins the fit half where that brings it nearer n / 2:
        ix = by[clients[j]]                     # one large client drawn late is skipped, not a reason to split by time
        if abs(len(fit) + len(ix) - n / 2) < abs(len(fit) - n / 2):
            fit += ix
    how = "clients"
    if min(len(fit), n - len(fit)) < n / 3:
        fit, how = list(range(n // 2)), "time"
    chosen = set(fit)
    return sorted(fit), [i for i in range(n) if i not in chosen], how


def check(records: list[dict[str, Any]], *, window: int, slice_len: int, seed: int, topics: int = 0) -> None:
    """``build``'s one-line errors on the log (sizes, topics, the split), before any weights load."""
    _plan(records, window=window, slice_len=slice_len, rng=np.random.default_rng(seed), topics=topics)


def _plan(records: list[dict[str, Any]], *, window: int, slice_len: int, rng: np.random.Generator, topics: int = 0):
    """(records in time order, fit indices, calibration indices, how they were split, the rare field
    topics merged into ``OTHER``), checked. Records whose topic is merged are copies: the log's are
    never changed."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise MoeguardError(f"window is {window!r}", hint="pass a window of at least 1 request")
    records = sorted(records, key=lambda r: r["_t"])          # stable: equal times keep the log's order
    labelled = [r for r in records if "topic" in r]
    bad = next((r for r in labelled if not isinstance(r["topic"], str) or not r["topic"].strip()), None)
    if labelled and (len(labelled) < len(records) or bad is not None):
        which = f"record {bad['id']!r} has topic {bad['topic']!r}" if bad is not None else \
            f"record {next(r for r in records if 'topic' not in r)['id']!r} has none"
        raise MoeguardError(f"{len(labelled)} of the log's {len(records)} records have a topic, and every topic must be "
                            f"a non-empty string ({which})", hint="give every record a topic (an endpoint, an app), or "
                            "none (topics are then clusters)")
    if labelled and topics:
        raise MoeguardError(f"--topics {topics} with a log whose records name their topics",
                            hint="drop --topics (the records' topics are used), or the records' topic fields")
    fit_ix, cal_ix, how = split(records, window=window, rng=rng)
    if len(cal_ix) < window:   # every benign window would repeat requests (as fit.build refuses)
        raise MoeguardError(f"the calibration half of the log ({how} split) holds {len(cal_ix)} requests, fewer than "
                            f"--window {window}", hint="pass a smaller --window, or a longer log")
    merged: list[str] = []
    if labelled:   # a topic needs a few fit requests for its mean histogram and kernel references
        fitted = Counter(records[j]["topic"] for j in fit_ix)
        rare = sorted(t for t in {r["topic"] for r in records} if fitted[t] < MIN_FIELD_TOPIC)
        pooled = sum(fitted[t] for t in set(rare) | {OTHER})
        if rare and pooled < MIN_FIELD_TOPIC:
            raise MoeguardError(f"topic{'s' if len(rare) > 1 else ''} {rare} {'have' if len(rare) > 1 else 'has'} fewer "
                                f"than {MIN_FIELD_TOPIC} requests in the fit half ({how} split: their clients fell mostly "
                                f"in the calibration half), and {pooled} together in '{OTHER}'",
                                hint="drop or merge rare topics in the log, pass another --seed, or profile a longer log")
        if rare:
            merged = [t for t in rare if t != OTHER]
            records = [{**r, "topic": OTHER} if r["topic"] in merged else r for r in records]
    if slice_len and len(cal_ix) < 2 * slice_len:
        raise MoeguardError(f"--slice {slice_len} needs at least {2 * slice_len} calibration requests; the log gives "
                            f"{len(cal_ix)} (half of its {len(records)})", hint="pass a smaller --slice, or a longer log")
    return records, fit_ix, cal_ix, how, merged


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """Cluster labels [n] of unit embeddings ``x`` [n, dim]: k-means++ seeding, Lloyd's steps; clusters
    under ``MIN_TOPIC`` are dissolved into the nearest kept one."""
    n = len(x)
    k = max(1, min(k, n // MIN_TOPIC))
    centres = [x[rng.integers(n)]]
    for _ in range(k - 1):
        d = np.min(((x[:, None] - np.stack(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(n, p=d / d.sum())] if d.sum() > 0 else x[rng.integers(n)])
    c = np.stack(centres)
    labels = np.zeros(n, dtype=int)
    for _ in range(iters):
        new = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        if _ and (new == labels).all():
            break
        labels = new
        c = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(len(c))])
    while True:   # dissolve the smallest cluster under MIN_TOPIC, until none is
        sizes = np.bincount(labels, minlength=len(c))
        small = [j for j in np.argsort(sizes) if sizes[j] < MIN_TOPIC]
        if not small or len(c) == 1:
            break
        keep = [j for j in range(len(c)) if j != small[0]]
        c = c[keep]
        labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(len(c))])
    order = np.argsort(-np.bincount(labels, minlength=len(c)), kind="stable")   # cluster-0 the largest
    rank = np.empty(len(c), dtype=int)
    rank[order] = np.arange(len(c))
    return rank[labels]


def build(model, tokenizer, records: list[dict[str, Any]], *, window: int = 16, topics: int = 0, seed: int = 0,
          name: str = "", cache: Path | None = None, progress=None, early: tuple[int, ...] | None = None,
          slice_len: int = 0, windows: int | None = None, reply_tokens: int = 0,
          log: dict[str, Any] | None = None) -> Profile:
    """The profile of a benign request log (``score.read_log``'s records); see the module docstring.
    ``topics``: clusters (0: auto, about one per 100 fit requests, at most 8) where the records carry
    no ``topic``. ``cache``: each chunk's observed arrays, kept for a resumed run. ``reply_tokens`` > 0:
    each request's reply is profiled too, the record's logged ``reply`` where it has one and the model's
    greedy reply otherwise (as ``score`` replays it). ``log``: what the profile records of the log (its
    path and digest)."""
    from moeguard.models.adapter import MoEAdapter
    from moeguard.monitor import ladder, replies, slices

    early = ladder.check_early(early, window)
    slice_len = slices.check_slice(slice_len)
    topics = check_topics(topics)
    reply_tokens = replies.check_length(reply_tokens)
    windows = windows if windows is not None else (ladder.BENIGN_BLOCKS if early else 400)
    rng = np.random.default_rng(seed)
    records, fit_ix, cal_ix, how, merged = _plan(records, window=window, slice_len=slice_len, rng=rng, topics=topics)
    if merged:
        warnings.warn(f"topic{'s' if len(merged) > 1 else ''} {merged} had fewer than {MIN_FIELD_TOPIC} requests in the "
                      f"fit half and {'are' if len(merged) > 1 else 'is'} merged into '{OTHER}'")
    labelled = "topic" in records[0]
    adapter = MoEAdapter(model)
    check_uniform(adapter)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    shape = dict(vocab=vocab, layers=len(adapter.layers), experts=adapter.num_experts)
    counts = TokenRoutingCounts(**shape)
    bar = progress.add_task("profiling the benign log", total=len(records)) if progress else None
    prompts = [r["prompt"] for r in records]

    def fit_part(ps: list[str]) -> dict[str, np.ndarray]:
        own = TokenRoutingCounts(**shape)
        h, sums, ntok, _ = observe(model, tokenizer, ps, adapter=adapter, tokens=own)
        return {"h": h, "sums": sums, "ntok": ntok, **own.arrays()}

    parts = []
    for i in range(0, len(fit_ix), CHUNK):
        z = kept_arrays(cache, f"log-fit-{i // CHUNK}", lambda: fit_part([prompts[j] for j in fit_ix[i:i + CHUNK]]))
        counts.merge(z["count_tokens"], z["counts"])
        # what the fit reads from a chunk, not its token counts (merged above): each chunk's [tokens, L, E]
        # table kept to the end grew with the log, not with its distinct tokens (GBs at DeepSeek-V3's size)
        parts.append({k: z[k] for k in ("h", "sums", "ntok")})
        if bar is not None:
            progress.advance(bar, len(z["h"]))
    table = counts.table(adapter.top_k, getattr(tokenizer, "bos_token_id", None))
    H, S, N = (np.concatenate([z[k] for z in parts]) for k in ("h", "sums", "ntok"))
    space = Embedding.fit(S, N, seed=seed)
    if labelled:
        names = sorted({r["topic"] for r in records})
        label = [names.index(records[j]["topic"]) for j in fit_ix]
        kind = "field"
    else:
        k = topics or min(8, max(1, len(fit_ix) // 100))
        X = space(S, N)
        label, kind = kmeans(X, k, rng), "clusters"
        names = [f"cluster-{j}" for j in range(int(max(label)) + 1)]
    label = np.asarray(label)   # every topic has 4 fit requests or more: _plan checked a field's, kmeans keeps 8
    fit = {t: (H[label == j], S[label == j], N[label == j]) for j, t in enumerate(names)}
    given = [r.get("reply") for r in records]

    def reply_part(ix: list[int]) -> dict[str, np.ndarray]:
        h, surprise = replies.routing(model, tokenizer, [prompts[j] for j in ix], [given[j] for j in ix],
                                      adapter=adapter, table=table, max_tokens=reply_tokens)
        return {"h": h, "surprise": surprise}

    fit_replies: dict[str, np.ndarray] = {}
    if reply_tokens:
        RH = np.concatenate([kept_arrays(cache, f"log-reply-fit-{i // CHUNK}", lambda: reply_part(fit_ix[i:i + CHUNK]))["h"]
                             for i in range(0, len(fit_ix), CHUNK)])
        fit_replies = {t: RH[label == j] for j, t in enumerate(names)}
    cal = []
    for i in range(0, len(cal_ix), CHUNK):
        cal.append(kept_arrays(cache, f"log-calibration-{i // CHUNK}", lambda: dict(zip(
            ("h", "sums", "ntok", "surprise"),
            observe(model, tokenizer, [prompts[j] for j in cal_ix[i:i + CHUNK]], adapter=adapter, tokens=table)))))
        if bar is not None:
            progress.advance(bar, len(cal[-1]["h"]))
    C, CS, CN, CU = (np.concatenate([z[k] for z in cal]) for k in ("h", "sums", "ntok", "surprise"))
    cal_replies = [kept_arrays(cache, f"log-reply-calibration-{i // CHUNK}", lambda: reply_part(cal_ix[i:i + CHUNK]))
                   for i in range(0, len(cal_ix), CHUNK)] if reply_tokens else []
    cal_clients = [str(records[j]["client"]) for j in cal_ix]
    by_client = _client_blocks(cal_clients, window)
    runs = [r for rs in by_client.values() for r in rs]
    # each calibration request's topic: read only by drawn windows (no client sent a full one); a log's
    # slices are its own traffic
    cal_topic: list[str] = []
    if not runs and labelled:
        cal_topic = [records[j]["topic"] for j in cal_ix]
    elif not runs:   # the nearest cluster centre
        XC = space(CS, CN)
        centres = np.stack([X[label == j].mean(0) for j in range(len(names))])
        cal_topic = [names[j] for j in ((XC[:, None] - centres[None]) ** 2).sum(-1).argmin(1)]
    seen = {prompts[j] for j in fit_ix}
    repeated = sum(prompts[j] in seen for j in cal_ix) / len(cal_ix)
    if repeated > REPEATED:
        warnings.warn(f"{100 * repeated:.0f}% of the calibration requests repeat a prompt of the fit half: they look "
                      "more familiar than new traffic, and fresh requests will alert more than alpha; drop repeats "
                      "(retries, canned prompts) from the log unless live traffic repeats as much")
    per_client = Counter(cal_clients).values()
    distinct = sum(n >= window for n in per_client)
    disjoint = sum(n // window for n in per_client)      # the null's independent evidence, whatever its draws
    if not runs:
        warnings.warn(f"no calibration client sent {window} requests: benign windows are drawn from the log's requests "
                      "(one topic or mixed), not real clients' blocks; profile a longer log")
    elif disjoint < INDEPENDENT_BLOCKS:
        warnings.warn(f"benign windows come from {disjoint} non-overlapping blocks of {distinct} calibration client(s), "
                      f"fewer than {INDEPENDENT_BLOCKS}: window p-values near 0.01 rest on too few users to be calibrated "
                      "(fresh benign blocks alerted at up to 4x alpha from 230); profile a longer log (more clients)")

    def real_block(i: int) -> np.ndarray:        # a run of one client's requests, every start equally likely
        return np.asarray(runs[int(rng.integers(len(runs)))])

    def real_slices(kernel, XC: np.ndarray) -> np.ndarray:   # consecutive calibration traffic, with its clients
        out = np.empty(windows)
        for i in range(windows):
            a = int(rng.integers(len(cal_ix) - slice_len + 1))
            out[i] = slices.fit(kernel, XC[a:a + slice_len], cal_clients[a:a + slice_len])[0]
        return np.sort(out)

    source = {**(log or {}), "split": how,
              "topics": kind, "clients": {"fit": len({str(records[j]["client"]) for j in fit_ix}),
                                          "calibration": len(set(cal_clients)), "calibrating_windows": distinct},
              **({"merged_topics": merged} if merged else {}), "disjoint_blocks": disjoint, "repeated": round(repeated, 4),
              "windows": "clients" if runs else "drawn", **({"slices": "traffic"} if slice_len else {})}
    return assemble(adapter=adapter, name=name, seed=seed, rng=rng, window=window, windows=windows, early=early,
                    slice_len=slice_len, reply_tokens=reply_tokens, table=table, fit=fit, cal=(C, CS, CN, CU),
                    cal_topic=cal_topic, fit_replies=fit_replies, cal_replies=cal_replies, space=space, blocks=real_block if runs else None, sidak=bool(runs),
                    slice_null=real_slices if slice_len else None, source=source)


def _client_blocks(clients: list, window: int) -> dict[Any, list[list[int]]]:
    """Per client, every run of ``window`` of its consecutive requests (indices into ``clients``, in
    time order), at every start: the benign blocks a window is calibrated on."""
    by: dict[Any, list[int]] = {}
    for i, c in enumerate(clients):
        by.setdefault(c, []).append(i)
    return {c: [ix[a:a + window] for a in range(len(ix) - window + 1)] for c, ix in by.items()}
