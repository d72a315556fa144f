"""Routing manipulation: a short prefix (or suffix) that makes one MoE layer's router send the
tokens after it to a chosen expert (``moeguard route-attack``; docs/routing-security.md).

Where the crafted text goes decides which tokens follow it:
- **prefix**: the crafted tokens, a newline, then the task's input: the input's tokens follow;
- **suffix**: the task's input, a newline, then the crafted tokens: what follows is the model's
  own reply (``follow_tokens`` greedy tokens, up to its end of text). A hijacked reply is computed by
  expert E: the reach-a-permissive-expert threat. Its positions are those whose output is a reply
  token: the suffix's last, then each reply token but the last. The end-of-text token (each id that
  ends a turn) is not a reply token, so a suffix that makes the model stop at once hijacks nothing:
  success 0 for that input, not the share of one position.

The prefix is described below; a suffix differs in three places. Its objective is over the reply,
teacher-forced: each step generates each training input's reply to the current suffix, so each
step's success (by which the best suffix is kept) is that of replies the suffix really gets, while
its candidates are ranked on the current reply. A candidate must re-tokenize to itself after the
newline, where it is sent. Its training inputs keep their end when cut to ``max_input_tokens``.

The search is GCG (Zou et al., 2023, "Universal and transferable adversarial attacks"), with the
router's logits as the objective instead of the next-token loss:

- **the attack** is ``n`` token ids placed after BOS, then a newline, then the task's input: text a
  user could send. Candidates whose text does not re-tokenize to the same ids are refused;
- **the objective**, on the *input's* tokens only (not the prefix's own): the cross-entropy of the
  layer's router softmax toward expert E, a smooth stand-in for "E is among the top-k", averaged
  over ``train_inputs`` inputs of the task's train split (one universal prefix for them all);
- **each step**: the gradient of the objective with respect to the prefix's one-hot tokens gives
  each position's ``topk`` most promising substitutes; ``candidates`` random single-token
  substitutions are evaluated exactly and the best (routing success first, objective second)
  becomes the prefix (GCG moves even when no candidate improves; the best prefix seen is kept);
- forward passes stop at the target layer's router (a hook raises there): nothing after it can
  change the objective, so a hijack of layer 0 costs an embedding and one attention block.

Reported on held-out inputs (the task's eval split), tokenized from the text (``hijackmeasure.measure``):
- **success**: the share of input tokens routed to E (E among the layer's top-k);
- **load**: E's share of one request's routing assignments (prefix tokens included), the largest
  over requests, against E's share of the same inputs sent without the prefix (its normal share);
- **task effect**: the task's score with the prefix prepended, against without.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from moeguard.errors import MoeguardError
from moeguard.monitor.routertap import SEPARATOR, RouterTap, check_target, following, separator_ids
from moeguard.tasks.base import Task

POSITIONS = ("prefix", "suffix")


@dataclass(frozen=True, kw_only=True)
class HijackConfig:
    layer: int                   # decoder-layer index of an MoE layer
    expert: int
    prefix_tokens: int = 20      # the crafted text's length, a prefix's or a suffix's
    position: str = "prefix"     # POSITIONS: where the crafted text goes
    follow_tokens: int = 16      # suffix: reply tokens generated after it (the tokens measured)
    steps: int = 80
    candidates: int = 96         # single-token substitutions evaluated per step
    topk: int = 32               # substitutes per position, from the gradient
    train_inputs: int = 8        # inputs the universal prefix is optimized on (train split)
    eval_inputs: int = 32        # held-out inputs it is measured on (eval split)
    max_input_tokens: int = 48   # inputs are cut to this many tokens while searching
    eval_limit: int = 64         # records for the task-effect evaluation
    evade_p: float = 0.0         # > 0: keep each request's monitor p-value >= this (a screen; evasion.py)
    evade_order: str = "evasion"  # with evade_p: evasion.ORDERS, what the screened candidates are ranked by first
    screened: int = 32           # with evade_p: the most successful candidates screened per step
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Refuse settings no search can run, before any weight is read."""
        if self.position not in POSITIONS:
            raise MoeguardError(f"position '{self.position}' is not one of {', '.join(POSITIONS)}",
                                hint=f"pass --position {' or '.join(POSITIONS)}")
        for name, value in (("prefix_tokens", self.prefix_tokens), ("follow_tokens", self.follow_tokens)):
            if value < 1:
                raise MoeguardError(f"{name} is {value}", hint=f"pass --{name.replace('_', '-')} of at least 1")
        if not 0.0 <= self.evade_p <= 1.0 or self.screened < 1:
            raise MoeguardError(f"evade_p is {self.evade_p} and screened {self.screened}",
                                hint="pass --evade-p in (0, 1] (0: no screen); screened is at least 1")
        from moeguard.monitor.evasion import ORDERS

        if self.evade_order not in ORDERS:
            raise MoeguardError(f"evade order '{self.evade_order}' is not one of {', '.join(ORDERS)}",
                                hint=f"pass --evade-order {' or '.join(ORDERS)}")


def _inputs(task: Task, role: str, n: int, tokenizer, max_tokens: int | None, *, keep_end: bool = False) -> list[list[int]]:
    """Input ids cut to ``max_tokens``: their start (a prefix's inputs, encoded as they follow the
    separator), or with ``keep_end`` their end (a suffix's, which start the request: the text it
    follows and the question its reply answers are there), encoded with the separator after them,
    as the request is: Qwen's tokenizer joins a newline to the punctuation before it (':\n')."""
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.tokens import encode

    recs = [r for r in load_records(task, role, limit=n) if encode(tokenizer, r["input"])]
    if not keep_end:
        ids = [following(tokenizer, r["input"]) for r in recs]
        return [x[:max_tokens] for x in ids] if max_tokens else ids
    ids = [encode(tokenizer, r["input"] + SEPARATOR) for r in recs]
    sep = len(separator_ids(tokenizer))   # max_tokens counts the input's tokens, as before the separator was in
    return [x[-(max_tokens + sep):] for x in ids] if max_tokens else ids


class _Batch:
    """The rows one search step runs, right-padded: per crafted text and input, either
    bos + text + separator + input (prefix: the input's positions are the targets), or
    bos + input-and-separator + text + reply (suffix: the positions whose output is a reply token,
    teacher-forced on ``replies``, the reply each input got with the current suffix; a suffix's
    inputs end with the separator as the request encodes it, ``_inputs``)."""

    def __init__(self, tokenizer, inputs: list[list[int]], position: str = "prefix"):
        from moeguard.tasks.tokens import bos_ids, pad_id

        self.head = bos_ids(tokenizer)
        self.sep = separator_ids(tokenizer)   # as it is encoded after text, within the request
        self.inputs = inputs
        self.pad = pad_id(tokenizer)
        self.position = position
        self.replies: list[list[int]] = [[] for _ in inputs]

    def prompt(self, text: list[int], x: list[int]) -> tuple[list[int], int]:
        """(the request's ids, where the crafted text starts in them)."""
        if self.position == "prefix":
            return self.head + list(text) + self.sep + x, len(self.head)
        return self.head + x + list(text), len(self.head) + len(x)

    def build(self, texts: list[list[int]], *, device=None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """(ids [B, T], attention mask [B, T], target mask [B, T], each row's text start) for every
        crafted text x input."""
        seqs, spans, starts = [], [], []
        for p in texts:
            for x, reply in zip(self.inputs, self.replies):
                ids, at = self.prompt(p, x)
                if self.position == "prefix":
                    spans.append((at + len(p) + len(self.sep), len(ids)))
                else:   # the prompt's last position makes the first reply token; the reply's last makes none
                    spans.append((len(ids) - 1, len(ids) - 1 + len(reply)))
                    ids = ids + reply[:-1]
                seqs.append(ids)
                starts.append(at)
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        target = torch.zeros((len(seqs), T), dtype=torch.bool)
        for r, (s, (a, b)) in enumerate(zip(seqs, spans)):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
            target[r, a:b] = True
        return ids.to(device), mask.to(device), target.to(device), starts


def replies(model, tokenizer, batch: _Batch, text: list[int], n: int) -> list[list[int]]:
    """Each input's greedy reply to ``text`` placed after it (``batch.position`` "suffix"), as
    :func:`reply` gives it."""
    from moeguard.tasks.tokens import model_device

    device = model_device(model)
    return [reply(model, tokenizer, batch.prompt(text, x)[0], n, device=device) for x in batch.inputs]


def reply(model, tokenizer, ids: list[int], n: int, *, device=None) -> list[int]:
    """The greedy reply to the prompt ``ids``: at most ``n`` tokens, up to (not with) its end of text.
    The end-of-text token is not measured: a suffix that makes the model stop at once has no reply
    for E to compute, and its success there is 0, not the share of one position."""
    from transformers import GenerationConfig

    from moeguard.tasks.tokens import eos_ids, greedy_generate, pad_id

    # every id that ends a turn (the tokenizer's, and the checkpoint's: an end-of-turn token beside
    # end of text), so generation stops at each and none of them is counted as reply
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, pad_token_id=pad_id(tokenizer),
                              eos_token_id=eos or None)
    with torch.no_grad():
        out = greedy_generate(model, config, input_ids=torch.tensor([ids], device=device),
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device))
    got = out[0, len(ids):].tolist()
    ends = [i for i, t in enumerate(got) if t in eos]
    return got[:ends[0]] if ends else got


def _objective(logits: torch.Tensor, expert: int) -> torch.Tensor:
    """Per token: the cross-entropy of the router softmax toward expert E. (A softplus hinge on
    the top-k rule itself did no better: 0.69 against 0.67 held-out success on one layer-0
    target, 0.65 against 0.72 on one layer-3 target, 40 steps each.)"""
    return -torch.log_softmax(logits.float(), dim=-1)[:, expert]


def _scores(logits, index, target, expert, per: int, *, per_input: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per group of ``per`` rows (one prefix): (success share, mean objective). ``per_input``: the
    success is the mean of each row's share, a row without target positions (a suffix whose reply
    is empty) counting 0, so a suffix that silences replies gains nothing (as ``measure`` counts)."""
    B = target.shape[0]
    t = target.reshape(-1).to(logits.device)   # the router's layer may sit on another GPU than the embeddings
    hit = (index == expert).any(dim=-1).float() * t
    ce = _objective(logits, expert) * t
    rows = t.float().reshape(B, -1).sum(1)
    counted = rows.reshape(-1, per).sum(1)
    n = counted.clamp(min=1)
    if per_input:
        success = (hit.reshape(B, -1).sum(1) / rows.clamp(min=1)).reshape(-1, per).mean(1)
    else:
        success = hit.reshape(B, -1).sum(1).reshape(-1, per).sum(1) / n
    loss = ce.reshape(B, -1).sum(1).reshape(-1, per).sum(1) / n
    loss = torch.where(counted > 0, loss, torch.full_like(loss, float("inf")))   # no reply at all: the worst, not 0
    return success.cpu().numpy(), loss.cpu().numpy()


def _encoded(value: Any) -> Any:
    """``value`` with each float that is no finite number as ``{"float": "inf"}`` (JSON holds it then)."""
    if isinstance(value, float) and not np.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, dict):
        return {k: _encoded(v) for k, v in value.items()}
    return [_encoded(v) for v in value] if isinstance(value, list) else value


def _decoded(value: Any) -> Any:
    if isinstance(value, dict):
        return float(value["float"]) if set(value) == {"float"} else {k: _decoded(v) for k, v in value.items()}
    return [_decoded(v) for v in value] if isinstance(value, list) else value


def search(model, tokenizer, adapter, task: Task, cfg: HijackConfig, *, allowed: np.ndarray,
           first: np.ndarray | None = None, progress=None, screen=None, keep=None) -> dict[str, Any]:
    """The GCG search for one (layer, expert); returns the best prefix and its training curve.
    ``keep`` (a ``kept.KeptJSON`` keyed by everything the search depends on): the search's state is
    kept there as each step ends (the text, the best so far, the curve, the candidates' generator) and
    a rerun continues from it, to the result of an uninterrupted search; the caller removes it.
    ``first``: the ids a suffix's first token may be, as it follows the separator
    (``allowed_tokens(after_separator=True)``); None: ``allowed``.
    ``screen`` (``evasion.MonitorScreen``, with ``cfg.evade_p``): an attacker who holds the monitor's
    profile. Each step screens the ``cfg.screened`` most successful candidates and ranks them by
    ``evasion.rank`` in ``cfg.evade_order``; the best text kept is ranked the same way. Without a
    screen every text passes and the ranking is success, then objective, as it always was."""
    slot = check_target(adapter, cfg.layer, cfg.expert)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    cfg.check()
    suffix = cfg.position == "suffix"
    batch = _Batch(tokenizer, _inputs(task, "train", cfg.train_inputs, tokenizer, cfg.max_input_tokens, keep_end=suffix),
                   cfg.position)
    P = len(batch.inputs)
    if P == 0:
        raise MoeguardError(f"task '{task.name}' has no non-empty train input to craft a {cfg.position} on",
                            hint="pass --task with a task whose records have inputs")
    embed = model.get_input_embeddings()
    W = embed.weight.detach()
    device = W.device     # batches follow the embeddings (GPU or CPU); the random draws stay on the CPU
    banned = torch.ones(W.shape[0], dtype=torch.bool, device=device)
    banned[torch.as_tensor(allowed, device=device)] = False
    prefix = [int(t) for t in rng.choice(allowed, size=cfg.prefix_tokens)]
    n = cfg.prefix_tokens
    # per position, the ids a candidate may put there: a suffix's first follows the separator
    banned_at = banned.cpu().numpy()[None].repeat(n, axis=0)
    if suffix and first is not None:
        banned_at[0] = True
        banned_at[0, first] = False
        if banned_at[0, prefix[0]]:   # drawn after the others: where every token may start a suffix, the same draws
            prefix[0] = int(rng.choice(first))
    banned_rows = torch.as_tensor(banned_at, device=device)

    def sendable(c: list[int]) -> bool:   # as text it tokenizes back to itself, where it is sent
        text = tokenizer.decode(c)
        return (following(tokenizer, text) == c if suffix else
                tokenizer.encode(text, add_special_tokens=False) == c
                and tokenizer.encode(text + SEPARATOR, add_special_tokens=False) == c + batch.sep)

    # the random start's tokens each round-trip alone, not always together (byte-level merges): a start
    # that does not is searched from but never reported as the prefix (its ids are not what is sent)
    start_sendable = sendable(prefix)
    moved = 0   # steps that found a candidate sendable as text (none: the search never left its start)
    best = {"prefix": list(prefix), "success": -1.0, "loss": float("inf"), "step": 0, "evasion": (-1.0, -1.0)}
    evasion = (lambda texts: screen.evasion(texts, batch.inputs, cfg.position)) if screen is not None else None
    from moeguard.monitor.evasion import rank

    def ranked(ev, s, c) -> tuple:
        return rank(cfg.evade_order, ev, s, c)
    curve = []
    start = 0
    state = keep.read() if keep is not None else None
    if state is not None:   # a search killed after step ``next`` - 1 ended: everything the next step reads
        state = _decoded(state)
        start, prefix, moved, curve = state["next"], state["prefix"], state["moved"], state["curve"]
        start_sendable = state["start_sendable"]
        best = {**state["best"], "evasion": tuple(state["best"]["evasion"])}
        gen.set_state(torch.tensor(list(bytes.fromhex(state["generator"])), dtype=torch.uint8))

    def kept(next_step: int) -> None:
        if keep is not None:   # a loss that is no finite number (a suffix whose replies all end at once) as text
            keep.write(_encoded({"next": next_step, "prefix": prefix, "moved": moved, "curve": curve,
                                 "best": {**best, "evasion": list(best["evasion"])}, "start_sendable": start_sendable,
                                 "generator": bytes(gen.get_state().tolist()).hex()}), exact=True)
    task_id = progress.add_task(f"hijack layer {cfg.layer} expert {cfg.expert}", total=cfg.steps,
                                completed=start) if progress else None
    was_training = model.training
    model.eval()
    try:
        for step in range(start, cfg.steps + 1):
            if suffix:   # the reply this suffix gets, which the step's targets follow
                batch.replies = replies(model, tokenizer, batch, prefix, cfg.follow_tokens)
            # 1. the gradient w.r.t. the crafted tokens' one-hot (the forward stops at the router)
            ids, mask, target, starts = batch.build([prefix], device=device)
            onehot = torch.zeros(n, W.shape[0], dtype=W.dtype, device=device)
            onehot[torch.arange(n, device=device), torch.tensor(prefix, device=device)] = 1.0
            onehot.requires_grad_(True)
            x = embed(ids).detach()
            if not suffix:   # a prefix: one offset for every row
                lead = len(batch.head)
                x = torch.cat([x[:, :lead], (onehot @ W).expand(P, n, -1), x[:, lead + n:]], dim=1)
            else:                          # after inputs of different lengths
                x = torch.stack([torch.cat([x[r, :a], onehot @ W, x[r, a + n:]]) for r, a in enumerate(starts)])
            with RouterTap(adapter, slot) as tap:
                logits, index = tap.run(model, inputs_embeds=x, attention_mask=mask)
            succ, ce = _scores(logits.detach(), index, target, cfg.expert, P, per_input=suffix)
            t = target.reshape(-1).to(logits.device)
            loss = (_objective(logits, cfg.expert) * t).sum() / t.sum().clamp(min=1)
            (grad,) = torch.autograd.grad(loss, onehot)
            ev = tuple(float(v) for v in evasion([prefix])[0]) if evasion else (1.0, 1.0)   # unscreened: all pass
            curve.append({"step": step, "success": round(float(succ[0]), 4), "loss": round(float(ce[0]), 4),
                          **({"evading": round(ev[0], 4), "evasion_mean": round(ev[1], 4)} if evasion else {})})
            if (moved or start_sendable) and ranked(ev, succ[0], ce[0]) > ranked(best["evasion"], best["success"],
                                                                                 best["loss"]):
                best = {"prefix": list(prefix), "success": float(succ[0]), "loss": float(ce[0]), "step": step,
                        "evasion": ev}
            if step == cfg.steps or (best["success"] >= 1.0 and best["evasion"][0] >= 1.0):
                break
            # 2. candidates: random single-token substitutions among each position's top-k
            grad[banned_rows] = float("inf")
            top = (-grad).topk(cfg.topk, dim=1).indices.cpu()                 # [n, topk]
            pos = torch.randint(0, n, (cfg.candidates,), generator=gen)
            pick = top[pos, torch.randint(0, cfg.topk, (cfg.candidates,), generator=gen)]
            cands, seen = [], set()
            for p_, t_ in zip(pos.tolist(), pick.tolist()):
                if banned_at[p_, t_]:   # fewer usable ids than topk at this position: the rest are banned ones
                    continue
                c = list(prefix)
                c[p_] = t_
                key = tuple(c)
                if key in seen or key == tuple(prefix):
                    continue
                seen.add(key)
                if sendable(c):
                    cands.append(c)
            if not cands:
                kept(step + 1)
                if task_id is not None:   # the bar counts every finished step, as a resumed one starts at it
                    progress.advance(task_id)
                continue
            moved += 1
            # 3. evaluate them exactly, in chunks of rows
            succ_all, ce_all = [], []
            per_chunk = max(1, 512 // P)
            with torch.no_grad():
                for i in range(0, len(cands), per_chunk):
                    ids, mask, target, _ = batch.build(cands[i:i + per_chunk], device=device)
                    with RouterTap(adapter, slot) as tap:
                        logits, index = tap.run(model, input_ids=ids, attention_mask=mask)
                    s_, c_ = _scores(logits, index, target, cfg.expert, P, per_input=suffix)
                    succ_all.append(s_)
                    ce_all.append(c_)
            s_, c_ = np.concatenate(succ_all), np.concatenate(ce_all)
            order = np.lexsort((c_, -s_))                                      # most success, then least loss
            j = int(order[0])
            if evasion:   # of the most successful, the best by the attacker's order
                top = order[:cfg.screened]
                ev_top = evasion([cands[i] for i in top])
                j = int(top[max(range(len(top)), key=lambda i: ranked(ev_top[i], s_[top[i]], c_[top[i]]))])
            prefix = cands[j]
            kept(step + 1)
            if task_id is not None:
                progress.advance(task_id)
    finally:
        model.train(was_training)
        if task_id is not None:
            progress.update(task_id, completed=cfg.steps)
    # never set: the start could not be sent and no step found a text that can (--steps 0 among them); its
    # ids and figures are no prefix anyone sends, so none is given as measured (-1.0 was written as success)
    unsendable = best["success"] < 0
    return {"prefix_ids": best["prefix"], "prefix_text": tokenizer.decode(best["prefix"]),
            "train_success": None if unsendable else round(best["success"], 4),
            "train_loss": None if unsendable else round(best["loss"], 4),
            **({"start_unsendable": True} if unsendable else {}),
            **({"train_evading": None if unsendable else round(best["evasion"][0], 4)} if evasion else {}),
            "best_step": best["step"], "steps_run": len(curve) - 1, "steps_moved": moved, "curve": curve}

