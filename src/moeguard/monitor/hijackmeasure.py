"""What a crafted prefix (or suffix) does on held-out inputs (``moeguard route-attack``'s report;
``hijack.py`` searches for it, docs/routing-security.md): the share of the input's tokens (or the
reply's) routed to the target expert, with and without the crafted text; the largest load one request
puts on it; and the task's score with it against without. Apart from the search because the search
module passed 400 lines with both."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moeguard.errors import MoeguardError
from moeguard.monitor.hijack import HijackConfig, reply
from moeguard.monitor.routertap import SEPARATOR, RouterTap, check_target, following, separator_ids
from moeguard.tasks.base import Task


def measure(model, tokenizer, adapter, task: Task, cfg: HijackConfig, prefix_text: str, *,
            plain=None, screen=None) -> dict[str, Any]:
    """Success and load on held-out inputs, sent as text with and without the crafted text, and the
    task's score with it against without (``plain``: that score's ``TaskResult`` when already known:
    it is the same for every target of a run). A suffix's success is over the reply each request
    gets (generated here), the request's load over its prompt and reply. With ``screen``: the
    monitor's prompt-only p-values of the held-out requests, with and without the crafted text."""
    from moeguard.tasks.evaluate import evaluate_task
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.tokens import bos_ids, encode, model_device

    cfg.check()
    slot = check_target(adapter, cfg.layer, cfg.expert)
    k = adapter.top_k
    device = model_device(model)
    # the pieces as the request's text encodes them (routertap: a SentencePiece tokenizer's separator
    # and the text after it are not what they are alone)
    head, sep = bos_ids(tokenizer), separator_ids(tokenizer)
    p_ids = following(tokenizer, prefix_text) if cfg.position == "suffix" else encode(tokenizer, prefix_text)
    before = encode(tokenizer, prefix_text + SEPARATOR)   # a prefix and the separator, as sent
    suffix = cfg.position == "suffix"
    rows = {"attacked": [], "normal": []}
    exact = 0
    recs = [r for r in load_records(task, "eval", limit=cfg.eval_inputs) if r["input"]]
    if not recs:
        raise MoeguardError(f"task '{task.name}' has no non-empty eval input to measure the {cfg.position} on",
                            hint="pass --task with a task whose records have inputs")
    with torch.no_grad():
        for r in recs:
            if suffix:   # the input with the separator after it, as one text (Qwen's ':\n' is one token)
                x = encode(tokenizer, r["input"])
                full = encode(tokenizer, r["input"] + SEPARATOR + prefix_text)
                exact += full == encode(tokenizer, r["input"] + SEPARATOR) + p_ids
            else:
                x, full = encode(tokenizer, r["input"]), encode(tokenizer, prefix_text + SEPARATOR + r["input"])
                x_sent = following(tokenizer, r["input"])
                exact += full == p_ids + sep + x_sent
                # the input's tokens start where the prefix and separator end, as sent; where the input
                # merges into the separator, where its own tokens as sent begin (from the end)
                at = len(before) if full[:len(before)] == before else max(0, len(full) - len(x_sent))
            # normal first: a suffix is also measured on the answer the model gives without it
            cases = [("normal", head + x, None), ("attacked", head + full, None)]
            if suffix:
                cases.append(("answer", head + full, "normal"))
            for kind, ids, forced in cases:
                answer = []
                if suffix:   # the positions that make the reply: the prompt's last, then the reply's
                    answer = rows[forced][-1]["ids"] if forced else reply(model, tokenizer, ids, cfg.follow_tokens,
                                                                          device=device)
                    start, ids = len(ids) - 1, ids + answer[:-1]
                else:
                    start = len(head) + at if kind == "attacked" else len(head)
                with RouterTap(adapter, slot) as tap:
                    _, index = tap.run(model, input_ids=torch.tensor([ids], device=device))
                hit = (index == cfg.expert).any(dim=-1)
                # a suffix's reply positions only; an empty reply (the model stopped at once): nothing hijacked
                measured = hit[start:start + len(answer)] if suffix else hit[start:]
                rows.setdefault(kind, []).append({"success": float(measured.float().mean()) if len(measured) else 0.0,
                                                  "reply": len(answer), "ids": answer,
                                                  "load": float((index == cfg.expert).sum()) / (k * index.shape[0])})
    text = {"input_suffix": SEPARATOR + prefix_text} if suffix else {"input_prefix": prefix_text + SEPARATOR}
    full_score = plain or evaluate_task(model, tokenizer, task, limit=cfg.eval_limit, batch_size=32, baseline=False)
    hit_score = evaluate_task(model, tokenizer, task, limit=cfg.eval_limit, batch_size=32, baseline=False, **text)
    a, nrm = rows["attacked"], rows["normal"]
    monitor = {}
    if screen is not None:
        sent = [r["input"] + SEPARATOR + prefix_text if suffix else prefix_text + SEPARATOR + r["input"] for r in recs]
        p_hit, p_plain = screen.p_values(sent), screen.p_values([r["input"] for r in recs])
        monitor = {"monitor": {"p_target": screen.p_target, "passing": round(float((p_hit >= screen.p_target).mean()), 4),
                               "p_median": round(float(np.median(p_hit)), 4),
                               "passing_without": round(float((p_plain >= screen.p_target).mean()), 4),
                               "p_median_without": round(float(np.median(p_plain)), 4)}}
    return {**monitor, "success": round(float(np.mean([r["success"] for r in a])), 4),
            "success_without_prefix": round(float(np.mean([r["success"] for r in nrm])), 4),
            "success_min": round(float(np.min([r["success"] for r in a])), 4),
            "load_max": round(max(r["load"] for r in a), 4), "load_mean": round(float(np.mean([r["load"] for r in a])), 4),
            "normal_load_mean": round(float(np.mean([r["load"] for r in nrm])), 4),
            "normal_load_max": round(max(r["load"] for r in nrm), 4),
            "uniform_load": round(1.0 / adapter.layers[slot].num_experts, 4),
            "inputs": len(recs), "tokenization_exact": exact / max(1, len(recs)),
            # a suffix's success is over this many reply tokens a request (few: a short answer is measured whole)
            **({"reply_tokens_mean": round(float(np.mean([r["reply"] for r in a])), 2),
                "reply_tokens_mean_without": round(float(np.mean([r["reply"] for r in nrm])), 2),
                # the answer the model gives without the suffix, teacher-forced after it: does the suffix
                # route the model's real answer to E, or only the other text it makes the model write?
                "success_on_answer": round(float(np.mean([r["success"] for r in rows["answer"]])), 4)}
               if suffix else {}),
            "task": {"metric": full_score.metric, "score": full_score.score, "with_prefix": hit_score.score,
                     "higher_is_better": full_score.higher_is_better, "limit": cfg.eval_limit}}
