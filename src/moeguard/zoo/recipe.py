"""The embedded model's recipe: data, tokenizer and architecture, all from the embedded suite.

Kept apart from the training loop (``train.py``) so the audit can cite the exact settings.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from moeguard.tasks.base import Task, TaskKind

EOS, PAD = "<|endoftext|>", "<pad>"


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

    def to_dict(self) -> dict:
        return asdict(self)


def training_text(task: Task, record: dict) -> str:
    """The string the model learns from for one record: what evaluation will ask, then the answer."""
    if task.kind is TaskKind.LANGUAGE_MODELING:
        return record["text"]
    if task.kind is TaskKind.CLASSIFICATION:
        labels = {str(k): v for k, v in task.labels.items()}
        return record["input"] + labels[record["label"]]
    target = record["target"]
    return record["input"] + (target if target[:1].isspace() else " " + target)


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


def pack_blocks(token_lists: list[list[int]], *, context: int, eos_id: int) -> list[list[int]]:
    """Whole examples packed greedily into blocks that each start at an example boundary
    (evaluation always shows a prompt at position 0); an example longer than a block is cut."""
    blocks, cur = [], []
    for ids in token_lists:
        ids = (ids + [eos_id])[:context]
        if cur and len(cur) + len(ids) > context:
            blocks.append(cur)
            cur = []
        cur = cur + ids
    if cur:
        blocks.append(cur)
    return blocks


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
