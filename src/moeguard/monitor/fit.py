"""Fitting a routing profile (``profile.py``'s ``Profile``) from benign requests: each request's
routing, hidden state and token surprise observed in one forward pass (``observe``, also how
``score`` replays a log), the profile of task inputs (``build``), and the profile from observed
arrays however they were drawn (``assemble``, which ``fromlog.build`` shares). ``profile.py`` holds
what a profile is and how it scores; this module, how one is made."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.kept import kept_arrays
from moeguard.models.families import text_config
from moeguard.monitor.embed import Embedding, KernelReference
from moeguard.monitor.neighbours import Neighbours
from moeguard.monitor.profile import NOT_MEASURED, NOT_MEASURED_FIX, WINDOW_STATISTICS, Profile, check_uniform, unmeasured
from moeguard.monitor.replies import ReplyReference
from moeguard.monitor.tokens import RoutedIds, TokenRouting, TokenRoutingCounts


def histograms(model, tokenizer, prompts: list[str], **kw) -> np.ndarray:
    """[N, L, E] routing histograms of ``prompts`` (``observe``'s first part)."""
    return observe(model, tokenizer, prompts, **kw)[0]


def check_vocab(model, tokenizer, texts) -> None:
    """Before a replay: every text's tokens have a row in the model's embeddings. A tokenizer whose
    added tokens lie past them (a checkpoint not resized) failed mid-replay with an IndexError (on a
    GPU, a device-side assert), at the same chunk again on every rerun. ``texts``: (where, text)
    pairs, ``where`` naming the record in the error."""
    from moeguard.errors import MoeguardError
    from moeguard.tasks.tokens import encode

    vocab = embedding_rows(model)
    if vocab is None:
        return
    for where, text in texts:
        said = past_embeddings(encode(tokenizer, text) if text else (), vocab)
        if said:
            raise MoeguardError(f"{where} {said}",
                                hint="use the checkpoint's own tokenizer, or resize its embeddings to the tokenizer's "
                                     "vocabulary; or drop the record")


def embedding_rows(model) -> int | None:
    """The rows of the model's input embeddings (None where it does not say)."""
    n = getattr(model.get_input_embeddings(), "num_embeddings", None)
    return int(n) if n is not None else None


def past_embeddings(ids, vocab: int | None) -> str | None:
    """What is wrong with token ``ids`` the model has no embedding row for (a tokenizer whose added
    tokens lie past them), said as "holds a token (id ...) ..."; None where every id has one."""
    if vocab is None or not len(ids) or max(ids) < vocab:
        return None
    return f"holds a token (id {max(ids)}) the model has no embedding for (it has {vocab})"


def observe(model, tokenizer, prompts: list[str], *, batch_size: int = 16, max_length: int | None = None,
            adapter=None, tokens: TokenRoutingCounts | TokenRouting | None = None,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Per prompt, from one forward: its routing histogram [N, L, E] (padding excluded), the sum of
    its final hidden states [N, hidden], its token count [N] (``embed.py``), and with a token
    table its ``surprise`` [N] (``tokens.py``; with counts instead, the prompts' routing is added
    to them and ``None`` returned). A prompt longer than ``max_length`` tokens (default: the
    model's positions) is routed as consecutive chunks of that length and their
    assignments summed (surprise: the largest of its chunks'): a payload placed after a long
    benign opening is still seen."""
    import torch

    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.hooks import RoutingCapture
    from moeguard.monitor.embed import PooledHidden
    from moeguard.tasks.tokens import bos_ids, encode, model_device, pad_batch, pad_id

    adapter = adapter or MoEAdapter(model)
    device = model_device(model)
    if max_length is None:
        # the model's own limit (not lower): the online hook sees a served prompt in one forward,
        # and offline replay must route it the same way
        max_length = int(getattr(text_config(model.config), "max_position_embeddings", 4096) or 4096)
    head = bos_ids(tokenizer)
    rows, owner = [], []                      # token chunks, and the prompt each belongs to
    for n, p in enumerate(prompts):
        ids = head + encode(tokenizer, p)
        for a in range(0, max(len(ids), 1), max_length):
            rows.append(ids[a:a + max_length])
            owner.append(n)
    counts = np.zeros((len(prompts), len(adapter.layers), adapter.num_experts))
    sums: np.ndarray | None = None
    ntok = np.zeros(len(prompts))
    surprise = np.zeros(len(prompts)) if isinstance(tokens, TokenRouting) else None
    with torch.no_grad(), PooledHidden(adapter) as pooled, RoutedIds(adapter) as routed:
        for i in range(0, len(rows), batch_size):
            seqs = rows[i:i + batch_size]
            ids, mask = pad_batch(seqs, pad_id(tokenizer), left=False, device=device)
            pooled.mask, pooled.sums = mask, []
            with RoutingCapture(model, per_sample=True, adapter=adapter) as cap:
                model(input_ids=ids, attention_mask=mask)
            hidden = pooled.sums[0].double().numpy()      # [B, hidden]
            per_token = routed.rows(len(seqs)) if tokens is not None else None   # [L, B, T, k]
            if sums is None:
                sums = np.zeros((len(prompts), hidden.shape[1]))
            for j, h in enumerate(cap.stats.per_sample):  # each row's shares, weighted by its tokens
                o, n = owner[i + j], len(seqs[j])
                counts[o] += h.numpy() * n
                sums[o] += hidden[j]
                ntok[o] += n
                if per_token is not None:
                    r = per_token[:, j, :n]
                    if surprise is None:
                        tokens.add(np.asarray(seqs[j]), r)
                    else:
                        surprise[o] = max(surprise[o], tokens.surprise(np.asarray(seqs[j]), r))
    if sums is None:
        sums = np.zeros((0, 1))
    return counts / np.maximum(counts.sum(-1, keepdims=True), 1e-12), sums, ntok, surprise


def check_prompts(prompts: dict[str, list[str]]) -> None:
    """A one-line error unless every task gives at least 4 benign inputs (half fit, half calibrate):
    ``monitor profile`` calls it before the model loads, ``build`` again for library callers."""
    for t, ps in prompts.items():
        if len(ps) < 4:
            raise MoeguardError(f"task '{t}' gives {len(ps)} benign inputs", hint="a profile needs at least 4 per task")


def build(model, tokenizer, prompts: dict[str, list[str]], *, window: int = 16, windows: int | None = None,
          seed: int = 0, name: str = "", cache: Path | None = None, progress=None, reply_tokens: int = 0,
          early: tuple[int, ...] | None = None, slice_len: int = 0) -> Profile:
    """The profile of benign ``prompts`` (task -> inputs); see ``profile.py``'s module docstring.
    ``reply_tokens`` > 0: each benign input's greedy reply of at most that many tokens is routed too,
    and the profile scores requests' replies (``replies.py``). With ``cache``
    (``io.resumable_scratch``), each task's observed arrays are kept there as they finish and read
    back on a resumed run: the same numbers as one uninterrupted build. ``early``: lengths at which
    a client's window is also scored as it grows (``ladder.py``); ``windows``: benign windows per
    calibration set (default 400, or ``ladder.BENIGN_BLOCKS`` with early lengths); ``slice_len``: requests
    per slice of all traffic (``slices.py``; 0: none), as many benign slices calibrated."""
    from moeguard.models.adapter import MoEAdapter
    from moeguard.monitor import ladder, replies, slices

    if window < 1:
        raise MoeguardError(f"window is {window}", hint="pass a window of at least 1 request")
    early = ladder.check_early(early, window)
    slice_len = slices.check_slice(slice_len)
    windows = windows if windows is not None else (ladder.BENIGN_BLOCKS if early else 400)
    reply_tokens = replies.check_length(reply_tokens)
    check_prompts(prompts)                    # before any forward
    rng = np.random.default_rng(seed)
    held_out = sum(len(ps) - len(ps) // 2 for ps in prompts.values())
    if held_out < window:   # every benign window would repeat requests, inflating drift's null and every spread
        raise MoeguardError(f"a window of {window} requests is larger than the {held_out} benign calibration requests "
                            "(half of each task's inputs)", hint=f"pass --window of at most {held_out}, or profile more inputs")
    adapter = MoEAdapter(model)
    check_uniform(adapter)
    fit, cal, cal_topic = [], [], []
    fit_hidden, cal_hidden = [], []           # (hidden sums, token counts) of each half
    topics, held = {}, {}
    vocab = int(model.get_input_embeddings().weight.shape[0])
    counts = TokenRoutingCounts(vocab=vocab, layers=len(adapter.layers), experts=adapter.num_experts)
    bar = progress.add_task("profiling benign requests", total=sum(map(len, prompts.values()))) if progress else None

    def fit_part(ps: list[str]) -> dict[str, np.ndarray]:
        # each task's token counts apart, merged in task order (TokenRoutingCounts.merge): a
        # resumed build reads a finished task's counts instead of observing it again
        own = TokenRoutingCounts(vocab=vocab, layers=len(adapter.layers), experts=adapter.num_experts)
        h, sums, ntok, _ = observe(model, tokenizer, ps, adapter=adapter, tokens=own)
        return {"h": h, "sums": sums, "ntok": ntok, **own.arrays()}

    def reply_part(ps: list[str]) -> dict[str, np.ndarray]:
        from moeguard.monitor import replies

        h, surprise = replies.observe(model, tokenizer, ps, replies.generate(model, tokenizer, ps, reply_tokens),
                                      adapter=adapter, table=table, max_tokens=reply_tokens)
        return {"h": h, "surprise": surprise}

    fit_replies, cal_replies = {}, []
    for i, (t, ps) in enumerate(prompts.items()):   # the fit half: statistics' parameters, and the token table
        order = rng.permutation(len(ps))
        half = len(ps) // 2
        z = kept_arrays(cache, f"fit-{i}", lambda: fit_part([ps[j] for j in order[:half]]))
        if reply_tokens:   # their routing only: the token table is the prompts' (the fit half's, complete below)
            fit_replies[t] = [ps[j] for j in order[:half]]
        counts.merge(z["count_tokens"], z["counts"])
        fit.append(z["h"])
        fit_hidden.append((z["sums"], z["ntok"]))
        topics[t] = z["h"].mean(0)
        held[t] = [ps[j] for j in order[half:]]
        if bar is not None:
            progress.advance(bar, half)
    table = counts.table(adapter.top_k, getattr(tokenizer, "bos_token_id", None))
    for i, t in enumerate(fit_replies):
        ps = fit_replies[t]
        fit_replies[t] = kept_arrays(cache, f"reply-fit-{i}", lambda: reply_part(ps))["h"]
    cal_surprise = []
    for i, (t, ps) in enumerate(held.items()):   # the calibration half: every statistic's null
        z = kept_arrays(cache, f"calibration-{i}", lambda: dict(zip(
            ("h", "sums", "ntok", "surprise"), observe(model, tokenizer, ps, adapter=adapter, tokens=table))))
        cal.append(z["h"])
        cal_hidden.append((z["sums"], z["ntok"]))
        cal_surprise.append(z["surprise"])
        if reply_tokens:
            cal_replies.append(kept_arrays(cache, f"reply-calibration-{i}", lambda: reply_part(ps)))
        cal_topic += [t] * len(ps)
        if bar is not None:
            progress.advance(bar, len(ps))
    return assemble(adapter=adapter, name=name, seed=seed, rng=rng, window=window, windows=windows, early=early,
                    slice_len=slice_len, reply_tokens=reply_tokens, table=table, fit_replies=fit_replies,
                    fit={t: (h, a, b) for t, h, (a, b) in zip(topics, fit, fit_hidden)},
                    cal=(np.concatenate(cal), np.concatenate([a for a, _ in cal_hidden]),
                         np.concatenate([b for _, b in cal_hidden]), np.concatenate(cal_surprise)),
                    cal_topic=cal_topic, cal_replies=cal_replies)


def assemble(*, adapter, name: str, seed: int, rng: np.random.Generator, window: int, windows: int,
             early: tuple[int, ...], slice_len: int, reply_tokens: int, table: TokenRouting,
             fit: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], cal: tuple[np.ndarray, ...], cal_topic: list[str],
             fit_replies: dict[str, np.ndarray], cal_replies: list[dict[str, np.ndarray]], space: Embedding | None = None,
             blocks=None, slice_null=None, sidak: bool = False, source: dict[str, Any] | None = None) -> Profile:
    """The profile from observed benign requests, whichever way they were drawn (``build``: tasks;
    ``fromlog.build``: a deployment's own log). ``fit``: topic -> (histograms [n, L, E], hidden sums
    [n, hidden], token counts [n]) of the fit half; ``cal``: the calibration half's (histograms, hidden
    sums, token counts, surprise), each request's topic in ``cal_topic`` (read only by the default
    ``blocks`` and ``slice_null``; a log with its own blocks and slices passes none). ``blocks(i)``: benign block
    ``i`` of ``window`` calibration requests (indices, in order; default: drawn from one topic or
    mixed, alternately); ``slice_null(kernel, XC)``: the sorted benign slice drifts (default: Dirichlet
    topic mixes, ``slices.calibrate``); ``space``: an embedding already fitted on the fit half;
    ``sidak``: early looks adjusted by Sidak's formula instead of benign blocks' min-p (``ladder.calibrate``)."""
    from moeguard.monitor import ladder, slices

    topics = {t: h.mean(0) for t, (h, _, _) in fit.items()}
    F = np.concatenate([h for h, _, _ in fit.values()])
    C, cal_sums, cal_ntok, cal_surprise = cal
    mean = F.mean(0)
    sd = np.maximum(F.std(0), 0.5 / math.sqrt(max(1, len(F))) * np.maximum(mean, 1e-3) + 1e-3)
    if space is None:
        space = Embedding.fit(np.concatenate([a for _, a, _ in fit.values()]), np.concatenate([b for _, _, b in fit.values()]),
                              seed=seed)
    kernel = KernelReference.fit({t: space(a, b) for t, (_, a, b) in fit.items()}, seed=seed)
    XC = space(cal_sums, cal_ntok)
    null: dict[str, np.ndarray] = {}
    reply_ref = ReplyReference.fit(fit_replies, max_tokens=reply_tokens) if reply_tokens else None
    prof = Profile(meta={}, mean=mean, sd=sd, topics=topics, null=null, space=space, kernel=kernel,
                   tokens=table, replies=reply_ref)                       # null: filled below
    s = prof.statistics(C, XC, cal_surprise,
                        np.concatenate([z["h"] for z in cal_replies]) if reply_tokens else None,
                        np.concatenate([z["surprise"] for z in cal_replies]) if reply_tokens else None)
    bad = np.flatnonzero(unmeasured(s, prof.request_statistics))
    if len(bad) or not all(np.isfinite(r).all() for r in kernel.refs):   # a null of NaN was written as null values,
        # and the next score refused the profile as damaged; a NaN reference made every request's unfamiliar NaN
        raise MoeguardError(f"{max(1, len(bad))} of the profile's benign requests cannot be measured: {NOT_MEASURED}",
                            hint=NOT_MEASURED_FIX)
    for k in prof.request_statistics:
        # a calibration request without a reply (-inf: no evidence) is kept as the most negative
        # finite float, which ranks the same and survives strict JSON (which writes -inf as null)
        null[f"request.{k}"] = np.sort(np.maximum(s[k], -np.finfo(np.float64).max))
    req_p = prof.p_values(s, "request", own=True)["combined"]   # the calibration requests', each left out of its null
    if blocks is None:
        # benign windows: alternately one topic (a single-topic user) and a mix of topics
        # a single-topic window repeats no request: topics with fewer calibration requests than a
        # window give none (repeats would inflate drift's null and every statistic's spread)
        by_topic = {t: ix for t in topics if len(ix := np.flatnonzero(np.asarray(cal_topic) == t)) >= window}
        if not by_topic:
            warnings.warn(f"no topic has {window} calibration inputs (half of its benign inputs): benign windows are all "
                          f"mixed; profile more inputs per topic (--limit, or a longer --log) for single-topic windows")

        def blocks(i: int) -> np.ndarray:
            pool = by_topic[list(by_topic)[i // 2 % len(by_topic)]] if i % 2 == 0 and by_topic else np.arange(len(C))
            return rng.choice(pool, size=window, replace=len(pool) < window)

    picks = [blocks(i) for i in range(windows)]
    ws = prof.window_statistics(*ladder.first(picks, window, C, XC, req_p))
    for k in WINDOW_STATISTICS:
        null[f"window.{k}"] = np.sort(ws[k])
    if early:   # drawn after the windows above, which are then the same as without early looks
        ladder.calibrate(prof, window=window, early=early, fit_blocks=picks,
                         ladder_blocks=None if sidak else [blocks(windows + i) for i in range(windows)], C=C, XC=XC,
                         request_p=req_p)
    if slice_len:   # drawn last: every null above is what it is without slices
        null["slice.drift"] = slice_null(kernel, XC) if slice_null is not None else slices.calibrate(
            kernel, n=slice_len, XC=XC, cal_topic=cal_topic, topics=list(topics), count=windows, rng=rng)
    meta = {"model": name, "tasks": list(topics), "requests": {"fit": int(len(F)), "calibration": int(len(C))},
            "window": window, "benign_windows": windows, "seed": seed,
            "layers": [l.index for l in adapter.layers], "num_experts": adapter.num_experts, "top_k": adapter.top_k,
            "reply_tokens": reply_tokens, **({"early": list(early)} if early else {}),
            **({"slice": slice_len} if slice_len else {}), **({"source": source} if source else {})}
    # what a request's content predicts its routing to be (periods.py): the fit half's requests, in
    # F's order, drawn with their own generator
    neighbours = Neighbours.fit(np.concatenate([space(a, b) for _, a, b in fit.values()]), F, seed=seed)
    return Profile(meta=meta, mean=mean, sd=sd, topics=topics, null=null, space=space, kernel=kernel, tokens=table,
                   replies=reply_ref, neighbours=neighbours)
