"""``summarization``: ROUGE of the model's greedy continuation of the prompt.

Greedy decoding with left padding; the output is cut at the first EOS and then at its first
newline. Prompts longer than ``max_length - max_new_tokens`` lose the *end* of the source
text (the instruction after it survives). Baseline: Lead-k, the first k words of the source
text, k the median target length in words on the train split.
"""

from __future__ import annotations

import re

import math

from moeguard.errors import MoeguardError
from moeguard.tasks import metrics as M
from moeguard.tasks import tokens as T
from moeguard.tasks.kinds.base import IGNORE, Example, TaskKindSpec, register_kind
from moeguard.tasks.loaders import cell_text, render_input


class Summarization(TaskKindSpec):
    name = "summarization"
    description = "ROUGE of the model's greedy summary against the reference(s)"
    required_fields = ("input", "target")
    metrics = M.ROUGE_TYPES
    primary_metric = "rougeL"
    baseline = "lead_k"
    reads_raw_input = True
    generates = True
    MIN_INPUT = 16     # tokens the prompt keeps for the input beside the generated ones

    def validate(self, task):
        room = task.max_length - task.max_new_tokens
        if room < self.MIN_INPUT:   # the prompt is cut to the room (evaluate): the article would be dropped
            raise MoeguardError(
                f"summarization task '{task.name}' generates {task.max_new_tokens} of its max_length "
                f"{task.max_length} tokens, leaving {room} for the input",
                hint=f"raise max_length or lower generation.max_new_tokens so at least {self.MIN_INPUT} tokens "
                     f"remain for the input")

    def record(self, task, row, split, where):
        fields = task.fields
        target = row[fields["target"]]
        references = [str(t) for t in target] if isinstance(target, (list, tuple)) else [cell_text(target)]
        # one line each: a generation is cut at its first newline, and CNN/DailyMail's highlights (3-4
        # sentences, one per line) trained a model to write the lines of which only the first was scored.
        # ROUGE's tokens are the same either way.
        references = [re.sub(r"\s*\n\s*", " ", r) if "\n" in r else r for r in references]
        references = [r for r in references if r.strip()]
        if not references:
            return None
        source_text = cell_text(row[fields["input"]]).strip()
        return {"input": render_input(task, row, fields["input"]), "target": references[0],
                "references": references, "source_text": source_text}

    def evaluate(self, model, tokenizer, task, records, train, batch_size, reference, ticker):
        # the prompt leaves room for the generated tokens inside max_length (lm-evaluation-harness'
        # max_length - max_gen_toks), so generation never runs past the model's context
        room = max(2, task.max_length - task.max_new_tokens)
        device, pad = T.model_device(model), T.pad_id(tokenizer)
        # an empty prompt (an empty input, no prompt template, a tokenizer without BOS: Qwen's) generates
        # from the pad token, as scoring conditions on it (an empty row was a fully masked batch row)
        prompts = [T.fit_prompt(tokenizer, rec, room) or [pad] for rec in records]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        ticker.start(math.ceil(len(prompts) / batch_size))
        eos = T.eos_ids(model, tokenizer)
        config = T.generation_config(task, pad, eos, tokenizer)
        seq2seq = T.decoder_start(model)
        if seq2seq is not None:
            config.decoder_start_token_id = seq2seq
        outputs = [""] * len(prompts)
        for begin in range(0, len(order), batch_size):
            idx = order[begin:begin + batch_size]
            # a causal LM continues after the prompt (left-padded); an encoder reads it right-padded, so
            # padding never takes a capacity-limited expert's place (Switch counts a sequence's tokens in order)
            ids, mask = T.pad_batch([prompts[i] for i in idx], pad, left=seq2seq is None, device=device)
            generated = T.greedy_generate(model, config, input_ids=ids, attention_mask=mask)
            # a causal LM returns prompt + new tokens; an encoder-decoder the decoder's start token + new ones
            skip = ids.shape[1] if seq2seq is None else 1
            for row, i in enumerate(idx):
                new = generated[row, skip:].tolist()
                cut = next((j for j, t in enumerate(new) if t in eos), len(new))
                outputs[i] = first_line(tokenizer.decode(new[:cut], skip_special_tokens=True))
            ticker.advance()
        refs = [rec["references"] for rec in records]
        metrics = M.rouge(outputs, refs)
        base = None
        if train is not None:
            k = M.median_words(rec["target"] for rec in train)
            lead = [M.lead_words(rec["source_text"], k) for rec in records]
            base = {"name": f"lead_{k}", "description": f"the first {k} words of the source text; {k} is the "
                    f"median target length in words on the train split ({len(train)} records)",
                    "metrics": M.rouge(lead, refs)}
        return metrics, None, base

    def examples(self, tokenizer, task, record):
        # the reference summary (at most max_new_tokens tokens, then EOS) after the fitted prompt
        eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
        target = record["target"] if record["target"][:1].isspace() else " " + record["target"]
        # as it follows the prompt (a SentencePiece tokenizer's ' ' + target alone starts with a lone '▁')
        cont = T.continuation(tokenizer, record["input"], target)[: max(1, task.max_new_tokens)] + eos
        # an empty prompt is the pad token, as evaluation generates from it (the reference's first token was
        # at position 0, which no loss predicts)
        ctx = T.fit_prompt(tokenizer, record, max(2, task.max_length - len(cont))) or [T.pad_id(tokenizer)]
        return [Example(ctx + cont, [IGNORE] * len(ctx) + cont)]

    def training_text(self, task, record):
        target = record["target"]
        return record["input"] + (target if target[:1].isspace() else " " + target)

    def input_ids(self, tokenizer, task, record):
        return T.fit_prompt(tokenizer, record, max(2, task.max_length - task.max_new_tokens)) or [T.pad_id(tokenizer)]


def first_line(text: str) -> str:
    """The first non-blank line of a generation, stripped (leading blank lines are skipped:
    "Summary:\\n<text>" is a common completion shape)."""
    stripped = text.lstrip()
    return stripped.split("\n", 1)[0].strip()


SUMMARIZATION = register_kind(Summarization())
