"""``classification``: the label whose verbalizer the model finds most likely after the prompt.

Each verbalizer's summed log-likelihood given the prompt is scored the lm-evaluation-harness
way (see :func:`moeguard.tasks.evaluate.loglikelihoods`); the highest wins, ties go to the
first label. Baseline: always the most frequent label of the train split.
"""

from __future__ import annotations

import math

from moeguard.errors import MoeguardError
from moeguard.tasks import metrics as M
from moeguard.tasks import tokens as T
from moeguard.tasks.kinds.base import IGNORE, Example, TaskKindSpec, register_kind
from moeguard.tasks.loaders import render_input


class Classification(TaskKindSpec):
    name = "classification"
    description = "pick the label whose verbalizer is most likely after the prompt"
    required_fields = ("input", "label")
    metrics = ("accuracy", "macro_f1")
    primary_metric = "accuracy"
    baseline = "majority_class"

    def validate(self, task):
        if len(task.labels) < 2:
            raise MoeguardError(
                f"classification task '{task.name}' defines {len(task.labels)} label verbalizers",
                hint="add at least two entries under 'labels:' (label value -> verbalizer text)",
            )
        seen: dict[str, str] = {}
        for label, verbalizer in task.labels.items():   # a tie goes to the first: the other is never predicted
            if str(verbalizer) in seen:
                raise MoeguardError(
                    f"classification task '{task.name}' gives labels {seen[str(verbalizer)]} and {label} the same "
                    f"verbalizer {verbalizer!r}: the second could never be predicted",
                    hint="give each label its own verbalizer text under 'labels:'")
            seen[str(verbalizer)] = str(label)

    def record(self, task, row, split, where):
        label = row[task.fields["label"]]
        label = "" if label is None else str(label)
        known = [str(k) for k in task.labels]
        if label not in known:
            raise MoeguardError(
                f"split '{split}' of task '{task.name}' ({where}) has label '{label}', "
                f"which has no verbalizer (labels: {known})",
                hint="add it under 'labels:', or use a labelled split (GLUE test splits carry label -1)",
            )
        return {"input": render_input(task, row, task.fields["input"]), "label": label}

    def evaluate(self, model, tokenizer, task, records, train, batch_size, reference, ticker):
        from moeguard.tasks.evaluate import loglikelihoods

        labels = [(str(k), v) for k, v in task.labels.items()]
        requests = [(rec["input"], verbalizer) for rec in records for _, verbalizer in labels]
        scores = loglikelihoods(model, tokenizer, requests, max_length=task.max_length,
                                batch_size=batch_size, ticker=ticker)
        golds = [rec["label"] for rec in records]
        preds: list[str | None] = []
        for i in range(len(records)):
            row = scores[i * len(labels):(i + 1) * len(labels)]
            if not all(math.isfinite(x) for x in row):
                # a NaN never compares greater: max() picked the first label, which read as chance
                # accuracy; no prediction counts as wrong, and is said
                preds.append(None)
                continue
            preds.append(labels[max(range(len(labels)), key=row.__getitem__)][0])  # ties: first label
        if (bad := preds.count(None)):
            import warnings

            warnings.warn(f"task '{task.name}': the model's label log-likelihoods are not finite on {bad} of "
                          f"{len(preds)} records (NaN or inf: broken weights or an overflowing dtype); they count "
                          f"as wrong", stacklevel=2)
        metrics = {"accuracy": M.accuracy(preds, golds), "macro_f1": M.macro_f1(preds, golds)}
        base = None
        if train is not None:
            majority = M.majority_label(rec["label"] for rec in train)
            constant = [majority] * len(golds)
            base = {"name": "majority_class", "description": f"always label {majority!r}, the most frequent "
                    f"in the train split ({len(train)} records)",
                    "metrics": {"accuracy": M.accuracy(constant, golds), "macro_f1": M.macro_f1(constant, golds)}}
        return metrics, None, base

    def examples(self, tokenizer, task, record):
        # the gold verbalizer after the prompt; trailing prompt whitespace moves into the target,
        # as in evaluation, and an over-long prompt loses tokens on the left
        verbalizers = {str(k): v for k, v in task.labels.items()}
        context = record["input"].rstrip()
        target = record["input"][len(context):] + verbalizers[str(record["label"])]
        cont = T.continuation(tokenizer, context, target)   # as it follows the prompt (and is scored)
        if len(cont) > task.max_length - 1:   # as evaluation refuses it: [-0:] kept the whole prompt, uncut
            raise MoeguardError(f"task '{task.name}': the verbalizer after a prompt, {target!r}, is {len(cont)} tokens, "
                                f"max_length is {task.max_length}", hint="shorten the verbalizer or raise max_length")
        # nothing to condition on (an empty input, no prompt, no BOS: Qwen's) is the pad token, as evaluation
        # scores it: an empty context made the verbalizer position 0, which no loss predicts (no target)
        ctx = (T.bos_ids(tokenizer) + T.encode(tokenizer, context)) or [T.pad_id(tokenizer)]
        ctx = ctx[-(task.max_length - len(cont)):]
        return [Example(ctx + cont, [IGNORE] * len(ctx) + cont)]

    def training_text(self, task, record):
        labels = {str(k): v for k, v in task.labels.items()}
        return record["input"] + labels[record["label"]]

    def input_ids(self, tokenizer, task, record):
        ids = (T.bos_ids(tokenizer) + T.encode(tokenizer, record["input"].rstrip())) or [T.pad_id(tokenizer)]
        return ids[-task.max_length:]

    def uncertainty(self, q):
        """The entropy of the model's distribution over the label verbalizers."""
        p = q.class_probs
        return -(p * p.clamp_min(1e-12).log()).sum(-1)

    def entropy(self, q):
        return self.uncertainty(q)


CLASSIFICATION = register_kind(Classification())

