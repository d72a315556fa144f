"""The fine-tuning engine: the attacker's re-alignment of a (pruned) MoE model on labeled records.

A lean loop on ``accelerate`` (device placement, backward, gradient clipping) rather than
``transformers.Trainer``: the loss is moeguard's task loss (``tasks/batches.py``: the tokens a
task is about, plus the family's load-balancing loss), rounds of active learning start hundreds
of short runs, and ``benchmarks/finetune_throughput.py`` measures this loop against a plain
Trainer on the same model and batches.

Deterministic: the batch order is a function of (seed, step), so a run resumed from a
checkpoint sees exactly the batches it would have seen. Checkpoints are safetensors (trainable
tensors, optimizer moments, RNG state) plus JSON, written atomically; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from moeguard import trainstate
from moeguard.config import SEED_MAX, setting, validate
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.realign.modes import Trainable, get_mode
from moeguard.tasks.batches import Example, collate
from moeguard.tasks.tokens import decoder_start, model_device


class TrainingDiverged(MoeguardError):
    """The loss or the gradient norm stopped being finite; nothing after that step is kept."""


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    mode: str = setting("full", help="what fine-tuning may change: full, lora, router, experts")
    lr: float | None = setting(None, help="learning rate; default: the mode's (full 2e-4, lora 3e-3, router 5e-3, "
                                          "experts 2e-4)")
    epochs: float = setting(4.0, help="passes over the labeled set per round")
    min_steps: int = setting(10, min=0, help="fewest optimizer steps per round")  # a handful of labels still gets a few updates
    max_steps: int | None = setting(None, min=1, help="most optimizer steps per round")
    batch_size: int = setting(8, min=1, help="training batch size")
    grad_clip: float = setting(1.0, min=0, help="gradient norm clip (0: none)")   # a negative one climbed the loss
    weight_decay: float = setting(0.0, min=0, help="AdamW weight decay")
    warmup_ratio: float = setting(0.1, min=0, max=1, help="share of steps warming the learning rate up")
    aux_loss: bool = setting(True, help="add the family's load-balancing loss, where it has one")
    lora_r: int = setting(8, min=1, help="LoRA rank")
    lora_alpha: int = setting(16, min=1, help="LoRA alpha")
    save_every: int = setting(0, min=0, help="checkpoint the running fine-tune every N steps (0: never)")
    only: tuple[str, ...] = setting((), cli=False, help="a protocol's authorized parameter globs (empty: all)")
    seed: int = setting(0, min=0, max=SEED_MAX, help="random seed")

    def __post_init__(self) -> None:
        validate(self)
        get_mode(self.mode)
        if self.lr is not None and not self.lr > 0:
            raise MoeguardError(f"learning rate is {self.lr}", hint="pass a positive --lr, e.g. 5e-4")
        if self.batch_size < 1 or self.epochs <= 0 or self.min_steps < 0:
            raise MoeguardError(f"fine-tuning settings batch_size={self.batch_size}, epochs={self.epochs}, "
                                f"min_steps={self.min_steps}", hint="use a positive batch size and epochs")

    def key(self) -> dict[str, Any]:
        """The settings the training depends on: how often a running fine-tune is checkpointed
        changes no number, and a rerun with another --save-every resumes what was done."""
        return {k: v for k, v in self.to_dict().items() if k != "save_every"}

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_mode(self.mode).default_lr

    def steps_for(self, n_examples: int) -> int:
        # rounded first: 1.1 * 50 / 1 is 55.00000000000001 in floats, which ceil made 56 steps
        steps = max(self.min_steps, math.ceil(round(self.epochs * n_examples / self.batch_size, 9)))
        return min(steps, self.max_steps) if self.max_steps else steps

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lr": self.learning_rate, "only": list(self.only)}

    def allowed(self):
        """The protocol's test on parameter names, or None when nothing is restricted."""
        from moeguard.realign.modes import matching

        return matching(self.only) if self.only else None


@dataclass
class FinetuneResult:
    steps: int
    examples: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "examples": self.examples, "tokens": self.tokens,
                "seconds": round(self.seconds, 3), "tokens_per_second": round(self.tokens_per_second, 1),
                "final_loss": self.losses[-1] if self.losses else None, "resumed_from": self.resumed_from}


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices of every step: epochs of seeded permutations, concatenated."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch_size:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order += torch.randperm(n, generator=g).tolist()
        epoch += 1
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def fingerprint(cfg: FinetuneConfig, examples: Sequence[Example], extra: Any = None) -> str:
    h = hashlib.sha256(json.dumps([cfg.key(), extra], sort_keys=True, default=str).encode())
    for ex in examples:
        h.update(str(ex.ids).encode())
        h.update(str(ex.labels).encode())
    return h.hexdigest()[:16]


def finetune(trainable: Trainable, examples: Sequence[Example], cfg: FinetuneConfig, *, pad_id: int,
             checkpoint: str | os.PathLike | None = None, progress: Any = None,
             on_step: Callable[[int, float], None] | None = None, description: str = "fine-tuning") -> FinetuneResult:
    """Train ``trainable``'s parameters on ``examples`` for ``cfg.steps_for(len(examples))`` steps.

    ``checkpoint`` is a folder for resumable state: an existing checkpoint of the same run
    (same settings and examples) is resumed; one of another run is ignored and replaced.
    ``on_step(step, loss)`` is called after every optimizer step (tests interrupt through it).

    Dropout and router jitter draw from torch's global generator: it is seeded with ``cfg.seed``
    here, inside a fork that gives the caller's state back, so a run resumed at a round boundary
    draws what an uninterrupted one does (they drew from whatever state the caller had reached).
    """
    import torch

    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        return _finetune(trainable, examples, cfg, pad_id=pad_id, checkpoint=checkpoint, progress=progress,
                         on_step=on_step, description=description)


def _finetune(trainable: Trainable, examples: Sequence[Example], cfg: FinetuneConfig, *, pad_id: int,
              checkpoint: str | os.PathLike | None, progress: Any, on_step: Callable[[int, float], None] | None,
              description: str) -> FinetuneResult:
    from accelerate import Accelerator
    from transformers import get_scheduler

    if not examples:
        raise MoeguardError("no labeled examples to fine-tune on", hint="label at least one sample (--budget >= 1)")
    model = trainable.model
    steps = cfg.steps_for(len(examples))
    order = batch_order(len(examples), steps, cfg.batch_size, cfg.seed)
    # backward and clipping, in the model's own precision: an ACCELERATE_MIXED_PRECISION=fp16 in the
    # environment scaled the loss by ~65536 and clipped the scaled gradients (every step clipped)
    # and no gradient accumulation whatever ACCELERATE_GRADIENT_ACCUMULATION_STEPS says: backward divided every
    # loss by it with nothing accumulated (gradients N times smaller, the clip N times looser)
    from accelerate.utils import GradientAccumulationPlugin

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                              gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1))
    if accelerator.num_processes > 1:   # under `accelerate launch`: nothing shares gradients, all write one folder
        raise MoeguardError(f"fine-tuning runs in one process, and this is one of {accelerator.num_processes} "
                            "(accelerate launch / torchrun)", hint="run moeguard as a plain command; spread "
                            "studies over machines with --backend ray")
    params = list(trainable.params.values())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # the fused kernel: the for-loop AdamW costs 6x more per step on small models
    # (benchmarks/finetune_throughput.py), and resumes bitwise all the same
    device = model_device(trainable.base)   # an offloaded model's embeddings sit on "meta" until they run
    fused = device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), fused=fused)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps),
                              num_training_steps=steps)
    aux_coef = _aux_coef(trainable, cfg)
    # the model's load-balancing loss: what its forward returns, or (NLLB-MoE) computed from its router logits
    aux_of = (_stack_aux_loss(MoEAdapter(trainable.base)) or (lambda out, batch: _aux_loss(out))) if aux_coef else None
    ckpt = Path(checkpoint) if checkpoint is not None else None
    tag = fingerprint(cfg, examples) if ckpt is not None else None
    start = _resume(ckpt, tag, trainable, optimizer, scheduler) if ckpt is not None else 0
    result = FinetuneResult(steps=steps, examples=len(examples), tokens=0, seconds=0.0, resumed_from=start)
    bar = progress.add_task(description, total=steps, completed=start) if progress is not None else None
    was_training = trainable.base.training   # peft's wrapper is made in train mode: the base's own is given back
    start_token = decoder_start(model)   # an encoder-decoder trains through its seq2seq head
    model.train()
    began = time.perf_counter()
    try:
        for step in range(start, steps):
            # models are placed when loaded (device_map through accelerate); batches follow the embeddings
            batch = collate([examples[i] for i in order[step]], pad_id, decoder_start=start_token).to(device)
            out = model(**batch.inputs(), use_cache=False, **({"output_router_logits": True} if aux_coef else {}))
            loss = task_loss(out.logits, batch.labels)
            aux = aux_of(out, batch) if aux_of else None
            if aux is not None:
                loss = loss + aux_coef * aux.to(loss.device)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(f"the training loss became {value} at step {step + 1} of {steps} "
                                       f"(last finite loss {result.losses[-1] if result.losses else 'none'})",
                                       hint=f"lower the learning rate (now {cfg.learning_rate:g}) or use --mode lora")
            accelerator.backward(loss)
            norm = accelerator.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else None
            if norm is not None and not math.isfinite(float(norm)):
                raise TrainingDiverged(f"the gradient norm became {float(norm)} at step {step + 1} of {steps}",
                                       hint=f"lower the learning rate (now {cfg.learning_rate:g})")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.tokens += int(batch.attention_mask.sum()) + (
                int(batch.decoder_attention_mask.sum()) if batch.decoder_attention_mask is not None else 0)
            result.losses.append(round(value, 5))
            del out, loss, aux   # not alive through the next forward: [B, T, V] logits (GBs at a 152k vocabulary)
            if bar is not None:
                progress.update(bar, advance=1, description=f"{description} (loss {value:.3f})")
            if ckpt is not None and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                _save(ckpt, tag, step + 1, trainable, optimizer, scheduler)
            if on_step is not None:
                on_step(step + 1, value)
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    result.seconds = time.perf_counter() - began
    if ckpt is not None:
        trainstate.clear(ckpt)  # finished: the caller saves what it keeps
    return result


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (``tasks/batches.py``'s definition).

    Only target positions reach the softmax: a classification row has one or two targets among
    dozens of prompt tokens, and padding would otherwise cost a full-vocabulary softmax each."""
    from moeguard.tasks.batches import IGNORE, next_token_targets

    B, T, V = logits.shape
    target = next_token_targets(labels).reshape(-1)
    keep = (target != IGNORE).nonzero().squeeze(1)
    if keep.numel() == 0:
        return logits.sum() * 0.0
    picked = logits.reshape(B * T, V).index_select(0, keep.to(logits.device)).float()
    return torch.nn.functional.cross_entropy(picked, target[keep].to(picked.device))


def _aux_loss(out):
    """The model's load-balancing loss, unscaled: a causal LM's ``aux_loss``, or an encoder-decoder's
    encoder and decoder terms summed, as Switch Transformers adds them to its own loss (transformers
    5.24 computes them only when a stack's sparse step is above 1; otherwise they are 0: None here)."""
    aux = getattr(out, "aux_loss", None)
    if aux is None:
        parts = [p for p in (getattr(out, "encoder_aux_loss", None), getattr(out, "decoder_aux_loss", None))
                 if isinstance(p, torch.Tensor)]
        aux = sum(parts) if parts else None
    return aux


def _stack_aux_loss(adapter: MoEAdapter):
    """For a family whose forward computes its load-balancing terms only given labels
    (``FamilySpec.aux_loss_from_logits``, NLLB-MoE): ``(out, batch) -> the encoder's and the decoder's
    terms summed``, each by the family's own function on that stack's router logits and padding mask,
    as its forward would add them; a stack whose sparse layers layerdrop skipped adds nothing (the
    forward would fail). None for every other family."""
    path = adapter.family.aux_loss_from_logits
    if not path:
        return None
    import importlib

    module, _, name = path.partition(":")
    fn = getattr(importlib.import_module(module), name)
    experts, k = adapter.num_experts, adapter.top_k

    def aux(out, batch):
        stacks = ((getattr(out, "encoder_router_logits", None), batch.attention_mask),
                  (getattr(out, "decoder_router_logits", None), batch.decoder_attention_mask))
        parts = [fn(tuple(logits), experts, top_k=k, attention_mask=mask) for logits, mask in stacks if logits]
        return sum(p.to(parts[0].device) for p in parts) if parts else None   # stacks may sit on two devices
    return aux


def _aux_coef(trainable: Trainable, cfg: FinetuneConfig) -> float:
    from moeguard.models.families import family_for_config, moe_config

    if not cfg.aux_loss:
        return 0.0
    config = moe_config(trainable.base.config)   # a wrapper's keys are in its text config
    key = family_for_config(trainable.base.config).aux_loss_key
    if key and len({l.num_experts for l in MoEAdapter(trainable.base).layers}) > 1:
        # a budget-pruned model: transformers' load-balancing loss stacks every layer's router
        # logits into one tensor, which needs one expert count; train without it
        return 0.0
    return float(getattr(config, key, 0.0) or 0.0) if key else 0.0


# --------------------------------------------------------------------------- checkpoints

def _save(ckpt: Path, tag: str, step: int, trainable: Trainable, optimizer, scheduler) -> None:
    trainstate.save(ckpt, tag=tag, step=step, params=trainable.params, optimizer=optimizer,
                    meta={"scheduler": scheduler.state_dict()})


def _resume(ckpt: Path, tag: str, trainable: Trainable, optimizer, scheduler) -> int:
    state = trainstate.load(ckpt, tag=tag, params=trainable.params)
    if state is None or "scheduler" not in state.meta:
        return 0  # none, another run's, or torn: start over rather than trust it
    state.restore(trainable.params, optimizer)
    scheduler.load_state_dict(state.meta["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the scheduler set these at the step the checkpoint was taken
    return state.step
