"""The embedded model's recipe: data, tokenizer and architecture, all from the embedded suite.

Kept apart from the training loop (``train.py``) so the audit can cite the exact settings.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from moeguard.tasks.base import Task

EOS, PAD = "<|endoftext|>", "<pad>"
LONG_EXAMPLES = ("windows", "truncate")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    context: int = 256
    batch_size: int = 16
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    aux_loss_coef: float = 0.01
    grad_clip: float = 1.0
    threads: int = 2
    # an example longer than `context`: "windows" trains on all of it (pack_blocks); "truncate" on its
    # first block only, which is how the shipped embedded model was made (EMBEDDED_RECIPE)
    long_examples: str = "windows"

    def __post_init__(self) -> None:
        if self.long_examples not in LONG_EXAMPLES:
            raise ValueError(f"long_examples is {self.long_examples!r}; expected one of {LONG_EXAMPLES}")

    def to_dict(self) -> dict:
        return asdict(self)


# The recipe the shipped embedded model was trained with. Its suite has 55 examples longer than a
# block (code-naming 2, stdlib-code 37, stdlib-docs 16), which that run cut to their first block;
# rebuilding the embedded model keeps that, so `moeguard zoo train` still re-makes the shipped
# weights that every measured number comes from. Other tasks train on all of their tokens.
EMBEDDED_RECIPE = Recipe(long_examples="truncate")


def training_text(task: Task, record: dict) -> str:
    """The string the model learns from for one record: what evaluation will ask, then the answer
    (the task's kind says how, ``TaskKindSpec.training_text``)."""
    return task.kind_spec.training_text(task, record)


def train_tokenizer(texts: list[str], *, vocab_size: int):
    """Byte-level BPE with single-digit tokens, trained on the suite (deterministic: no parallelism)."""
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # single digits (as LLaMA does): numbers then share one representation per digit, which is
    # what lets a tiny model learn the arithmetic comparison task at all
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1_000_000, clean_up_tokenization_spaces=False)


def pack_blocks(token_lists: list[list[int]], *, context: int, eos_id: int,
                long_examples: str = "windows") -> list[list[int]]:
    """Whole examples packed greedily into blocks that each start at an example boundary
    (evaluation always shows a prompt at position 0).

    An example longer than a block gives all of its tokens, not only the first block's worth
    (a long text cut to one block would leave most of a language-modeling corpus unseen): it
    is cut into windows of ``context`` tokens that overlap by one token, the way evaluation
    reads long texts, so every token after the first is a training target exactly once. Each
    full window is a block of its own; the last, shorter one opens a block that the following
    examples fill. Examples that fit in a block are packed exactly as before. ``long_examples=
    "truncate"`` keeps only a long example's first block (the shipped embedded model's recipe)."""
    if context < 2:
        raise ValueError(f"context is {context}; a block needs at least 2 tokens")
    blocks, cur = [], []
    for ids in token_lists:
        ids = ids + [eos_id]
        pieces = _windows(ids, context) if long_examples == "windows" else [ids[:context]]
        for piece in pieces:
            if cur and len(cur) + len(piece) > context:
                blocks.append(cur)
                cur = []
            cur = cur + piece
    if cur:
        blocks.append(cur)
    return blocks


def _windows(ids: list[int], context: int) -> list[list[int]]:
    if len(ids) <= context:
        return [ids]
    step = context - 1  # the one-token overlap: a window's first token only gives context
    return [ids[s:s + context] for s in range(0, len(ids) - 1, step)]


def few_blocks_warning(task: Task, *, records: int, tokens: int, blocks: int, recipe: Recipe,
                       tasks: int = 1) -> str | None:
    """Why ``task``'s training data is too small to learn from, or ``None`` when it is not.

    The mixture gives every task the same share of the steps whatever its size, so a task of
    fewer blocks than one batch holds is repeated hundreds of times: the model memorizes those
    blocks and its scores on the task say little. Data sets that arrive in an unexpected shape
    (one huge record, or a split far smaller than meant) show up here first."""
    if blocks >= recipe.batch_size:
        return None
    seen = recipe.steps * recipe.batch_size / max(1, tasks) / max(1, blocks)
    src = task.source
    txt = src.format == "txt" or (src.format is None and bool(src.files)
                                  and all(f.endswith((".txt", ".txt.gz")) for f in src.files.values()))
    if records <= 1 and task.kind_spec.running_text and txt:
        cause = ("its txt file is short enough to be a single record (txt files are cut into records of about "
                 f"{task.max_length * 4} characters, max_length x 4, at blank lines and line ends)")
    elif records <= 1:
        cause = "its train split holds a single record"
    elif tokens / records < recipe.context / 8:
        cause = f"its {records} records are short (about {tokens / records:.0f} tokens each) and few"
    else:
        cause = f"its train split holds only {records} records"
    return (f"task '{task.name}' gives only {blocks} training block(s) of up to {recipe.context} tokens from "
            f"{records} record(s) ({tokens} tokens): {cause}. Each block is seen about {seen:.0f} times in "
            f"{recipe.steps} steps, so the model memorizes it rather than learning the task; add data to the "
            f"split that 'splits: train:' names (now '{task.splits.get('train')}'), or point it at a larger one")


def mixture_order(blocks_per_task: dict[str, int], *, steps: int, batch_size: int, seed: int) -> list[tuple[str, int]]:
    """Equal weight per task: round-robin over tasks, each cycling its own shuffled blocks."""
    rng = random.Random(seed)
    names = sorted(blocks_per_task)
    orders = {n: [] for n in names}
    out = []
    for i in range(steps * batch_size):
        name = names[i % len(names)]
        if not orders[name]:
            perm = list(range(blocks_per_task[name]))
            rng.shuffle(perm)
            orders[name] = perm
        out.append((name, orders[name].pop()))
    return out


def model_config(recipe: Recipe, tokenizer):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, num_local_experts=recipe.num_experts,
        num_experts_per_tok=recipe.top_k, max_position_embeddings=recipe.context,
        tie_word_embeddings=True, router_aux_loss_coef=recipe.aux_loss_coef,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
