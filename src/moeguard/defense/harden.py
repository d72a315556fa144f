"""`moeguard harden`: continue training a model with a defense's objective.

One loop serves every defense; a defense (``defense/methods/``) is a set of term weights and,
for the selective protocol, the authorized parameter groups. Per step, on a batch of one
owner task (round robin over the tasks):

    L = L_task(full model)                                   utility
      + balance     * task_balance(routing of this task)      every task spreads over all experts
      + collapse    * relu(target - L_task(pruned model))     pruning alone hurts (co-dependence)
      + adversarial * relu(target - L_task(pruned, attacked)) first-order meta-gradient of a
                                                              simulated prune-and-fine-tune attack
      + authorized  * L_task(full, adapted on the authorized  the authorized path stays a good
                              parameters only)                place to adapt (selective protocol)

The pruned model is the attacker's: the task's top-``keep`` experts per layer by routing
frequency (read from the task's previous step's forward pass), or, on every other visit of the
task, a random ``keep``-subset (other attributions choose other experts). The simulated attacker fine-tunes every parameter
for ``inner_steps`` AdamW steps at a learning rate drawn log-uniformly from ``inner_lr``, as
tamper-resistance training samples attacks. ``docs/defenses.md`` has the derivation.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from moeguard import trainstate
from moeguard.defense.objectives import (Adaptation, collapse, forward_loss, record_routers, simulate_adaptation,
                                         task_balance, task_shares)
from moeguard.config import SEED_MAX, setting, validate
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.handle import check_keep
from moeguard.models.hooks import mask_experts
from moeguard.realign.modes import matching
from moeguard.registry import Registry
from moeguard.tasks.batches import Example, collate, task_sequences
from moeguard.tasks.tokens import pad_id


SAVE_EVERY = 25   # steps between saved training states (harden --save-every, audit harden_save_every)

@dataclass(frozen=True, kw_only=True)
class HardenConfig:
    method: str = setting("entangle", help="defense (see `moeguard defenses`)")
    tasks: tuple[str, ...] = setting((), help="the owner's tasks to keep (names or YAML paths); default: the embedded suite")
    steps: int = setting(500, min=1, help="training steps")
    batch_size: int = setting(8, min=1, cli=False, help="sequences per training step")
    context: int = setting(128, min=8, cli=False, help="tokens per training sequence (longer ones are cut)")
    lr: float = setting(2e-4, min=1e-12, max=10, help="learning rate")
    keep: int | None = setting(None, min=1, help="experts per layer the simulated attacker keeps; default: half")
    # bounded below: a negative weight or target would train the opposite (a model easier to prune) under the
    # defense's name
    target: float | None = setting(None, min=1e-6, cli=False, help="collapse target loss; default: 0.75 * ln(vocab)")
    balance: float = setting(0.0, min=0, help="weight of per-task routing balance")
    collapse: float = setting(0.0, min=0, help="weight of the pruned-model collapse term")
    adversarial: float = setting(0.0, min=0, help="weight of the simulated prune-and-fine-tune term")
    adv_every: int = setting(1, min=1, cli=False, help="visits of a task between its simulated attacks")
    inner_steps: int = setting(8, min=1, help="simulated attacker's fine-tuning steps")
    inner_lr: tuple[float, float] = setting((1e-4, 3e-3), cli=False, help="simulated attacker's learning-rate range")
    authorized: float = setting(0.0, min=0, cli=False, help="weight of the authorized-adaptation term")
    authorized_patterns: tuple[str, ...] = setting((), flag="--authorized",
                                                   help="selective: comma-separated parameter globs users may adapt")
    authorized_lr: float = setting(1e-3, min=1e-12, max=10, cli=False, help="learning rate of the authorized adaptation")
    records_per_task: int = setting(1000, min=1, cli=False, help="train records read per task")
    seed: int = setting(0, min=0, max=SEED_MAX, help="random seed; the same seed gives the same numbers")

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {**d, "tasks": list(self.tasks), "inner_lr": list(self.inner_lr),
                "authorized_patterns": list(self.authorized_patterns)}


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    description: str
    defaults: dict[str, Any]              # HardenConfig fields this defense sets
    protocol: bool = False                # writes moeguard_protocol.json next to the weights


# importing ``moeguard.defense.methods`` imports every defense file, which registers itself
DEFENSES: Registry[DefenseSpec] = Registry("hardening method", loader="moeguard.defense.methods")


def register_defense(spec: DefenseSpec, *, overwrite: bool = False) -> DefenseSpec:
    return DEFENSES.add(spec.name, spec, overwrite=overwrite)


def get_defense(name: str) -> DefenseSpec:
    return DEFENSES.get(name)


def config_for(method: str, **overrides: Any) -> HardenConfig:
    """The defense's defaults, then the caller's overrides (None means 'keep the default')."""
    spec = get_defense(method)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("authorized_patterns") and not spec.protocol:   # it trained nothing and wrote no protocol, silently
        with_protocol = [n for n in DEFENSES.names() if get_defense(n).protocol]
        raise MoeguardError(f"--authorized is used by defenses that write a protocol, and '{method}' does not",
                            hint=f"use --method {' or '.join(with_protocol) or 'selective'}, or drop --authorized")
    return HardenConfig(method=method, **{**spec.defaults, **given})


def authorized_names(model, patterns) -> list[str]:
    ok = matching(patterns)
    return [n for n, _ in model.named_parameters() if ok(n)]


def preflight(model, cfg: HardenConfig, *, tasks: list | None = None) -> dict[str, Any]:
    """Everything checkable before training: tasks, keep, patterns, step counts. ``tasks``: the
    ``Task`` objects of ``cfg.tasks`` resolved at the edge (``edge.resolve_tasks``); None: resolved
    here from ``cfg.tasks`` (or the embedded suite)."""
    from moeguard.tasks.loaders import load_records
    from moeguard.tasks.registry import embedded_tasks, get_task

    adapter = MoEAdapter(model)
    counts = {l.index: l.num_experts for l in adapter.layers}
    if len(set(counts.values())) > 1:   # one keep and one random subset size serve every layer
        raise MoeguardError(f"harden needs the same number of experts in every MoE layer; this model has {counts} "
                            f"(layer: experts), a budgeted-pruned checkpoint",
                            hint="harden the model before pruning it, or a uniformly pruned one")
    E = adapter.num_experts
    keep = check_keep(cfg.keep if cfg.keep is not None else E // 2, num_experts=E, family=adapter.family,
                      top_k=adapter.top_k, what="the simulated attacker's keep")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.context < 8:
        raise MoeguardError(f"steps={cfg.steps}, batch_size={cfg.batch_size}, context={cfg.context}",
                            hint="use at least 1 step, batch size 1 and a context of 8 tokens")
    if min(cfg.inner_lr) <= 0 or cfg.inner_lr[0] > cfg.inner_lr[1]:
        raise MoeguardError(f"inner learning-rate range {list(cfg.inner_lr)}", hint="pass LOW,HIGH with 0 < LOW <= HIGH")
    from moeguard.tasks.evaluate import fit_to_model

    # trained within the model's positions, as its tasks are scored (the embedded suite too), and
    # within the training context, each kind fitting its own sequences to it (``_examples``)
    given = tasks if tasks is not None else ([get_task(t) for t in cfg.tasks] if cfg.tasks else embedded_tasks())
    tasks = [fit_to_model(t, model) for t in given]
    for t in tasks:
        if "train" not in t.splits:
            raise MoeguardError(f"task '{t.name}' has no train split to harden on",
                                hint="name tasks with a train split (the owner's training data)")
        load_records(t, "train", limit=1)
    names = authorized_names(model, cfg.authorized_patterns)
    if cfg.authorized and not names:
        raise MoeguardError(f"authorized patterns {list(cfg.authorized_patterns)} match no parameter",
                            hint="patterns are fnmatch globs over parameter names, e.g. '*.self_attn.*'")
    if cfg.authorized and get_defense(cfg.method).protocol:
        # the protocol written says LoRA: patterns LoRA cannot adapt (routers, norms, embeddings) made a
        # protocol `realign --protocol` refuses, after every hardening step had run
        from moeguard.realign.modes import lora_targets, matching

        modules, experts = lora_targets(model, matching(cfg.authorized_patterns))
        if not modules and not experts:
            raise MoeguardError(f"authorized patterns {list(cfg.authorized_patterns)} match no module LoRA can adapt "
                                f"(they match {names[:3]}{' ...' if len(names) > 3 else ''})",
                                hint="authorize linear layers or expert tensors, e.g. '*.self_attn.q_proj.*'")
        # the authorized term simulates what users may adapt under the protocol: LoRA on those modules'
        # weights and those expert tensors (bias="none"; no router, no norm). The patterns' other matches (a
        # q_proj's bias, Qwen3's q_norm, a router under '*.mlp.gate.*') were trained at full rank for a path
        # no user can take
        lora = {f"{m}.weight" for m in modules} | set(experts)
        names = [n for n in names if n in lora]
    return {"keep": keep, "tasks": tasks, "authorized": names}


def _examples(tokenizer, task, cfg: HardenConfig, rng: random.Random) -> list[Example]:
    from moeguard.tasks.loaders import load_records

    records = load_records(task, "train")
    rng.shuffle(records)
    out = []
    # each kind fits its sequences to the context itself, as to any max_length: a classification
    # prompt is cut from its start, a summary's source shortened and its target capped to leave the
    # kind's room for the input, a text windowed. Cutting each sequence's end instead dropped 13.5% of
    # code-naming's examples on the embedded model and cut 1.2% mid-target; without the cap,
    # cnn-dailymail's 128 generated tokens in a context of 128 failed the task's own check.
    length = min(task.max_length, cfg.context)
    room = getattr(task.kind_spec, "MIN_INPUT", 0)
    fitted = dataclasses.replace(task, max_length=length, max_new_tokens=max(1, min(task.max_new_tokens, length - room)))
    for ex in task_sequences(tokenizer, fitted, records[:cfg.records_per_task]):
        ids, labels = ex.ids[:cfg.context], ex.labels[:cfg.context]
        if any(x != -100 for x in labels[1:]):
            out.append(Example(ids, labels))
    return out


def harden(model, tokenizer, cfg: HardenConfig, *, progress: Any = None,
           on_step: Callable[[int, dict], None] | None = None, checkpoint: Path | None = None,
           save_every: int = SAVE_EVERY, source: Any = None, tasks: list | None = None) -> dict[str, Any]:
    """Train ``model`` in place with the defense's objective; returns the training log.

    ``checkpoint``: a folder for the training state (``moeguard/trainstate.py``), written every
    ``save_every`` steps; a state of the same run (``cfg`` and ``source``, what identifies the
    starting weights) is resumed from. The caller removes it once the result is saved."""
    from moeguard.realign.offload import offloaded

    if offloaded(model):   # accelerate swaps offloaded weights in per forward: their gradients train copies
        raise MoeguardError("harden trains every weight, and some of this model's are offloaded by accelerate "
                            "(they would not change, and the first saved state failed on them)",
                            hint="harden on a device map that holds the whole model (more GPU memory, or --device-map cpu)")
    plan = preflight(model, cfg, tasks=tasks)
    keep_n, tasks, auth = plan["keep"], plan["tasks"], plan["authorized"]
    adapter = MoEAdapter(model)
    E, score = adapter.num_experts, adapter.family.routing.score
    target = cfg.target if cfg.target is not None else 0.75 * math.log(model.get_input_embeddings().weight.shape[0])
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = {t.name: _examples(tokenizer, t, cfg, rng) for t in tasks}
    empty = [n for n, v in data.items() if not v]
    if empty:
        raise MoeguardError(f"tasks {empty} give no training sequences", hint="check their train splits")
    pad = pad_id(tokenizer)
    device = model.get_input_embeddings().weight.device
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    flags = [p.requires_grad for p in params]   # every weight trains: set inside the try below, put back after
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    shares: dict[str, torch.Tensor] = {}
    subset: dict[str, str] = {}   # which kind of subset each task's last attacker kept
    order = [t.name for t in tasks]

    def draw(task: str) -> Any:
        rows = [data[task][rng.randrange(len(data[task]))] for _ in range(cfg.batch_size)]
        return collate(rows, pad).to(device)

    def attacker_keep(task: str, step: int) -> dict[int, list[int]]:
        # alternate per task, on its own visits: tasks take turns by step, so alternating on the step
        # itself gave an even number of tasks one kind of subset each (each task's parity is fixed)
        # (by visits / adv_every: a simulated attack every adv_every visits meets both kinds too)
        if task in shares and (step // len(order) // cfg.adv_every) % 2 == 1:
            subset[task] = "frequency"
            return {l.index: torch.argsort(shares[task][i], descending=True)[:keep_n].sort().values.tolist()
                    for i, l in enumerate(adapter.layers)}
        subset[task] = "random"
        return {l.index: sorted(rng.sample(range(E), keep_n)) for l in adapter.layers}

    log: list[dict[str, Any]] = []
    named = dict(zip(names, params))
    from moeguard.io import digest

    # the weights' dtype and device too: a float32 state must not resume into a bfloat16 (or GPU) run
    from moeguard.tasks.loaders import task_identity

    # the tasks' definitions and data stamps too: an edited task file resumed state made on the old data
    # (and how examples are made: a state saved when they were cut at the context's end is not resumed)
    tag = digest([cfg.to_dict(), source, sorted({str(p.dtype) for p in params}), str(named[names[0]].device.type),
                  [task_identity(t) for t in tasks], {"examples": "fitted to the context"}])
    start, before = 0, 0.0   # the step resumed at, and the seconds trained before it (as zoo train counts)
    if checkpoint is not None:
        state = trainstate.load(checkpoint, tag=tag, params=named)
        if (state is not None and {"shares", "subset", "log"} <= set(state.meta)
                and set(state.meta["shares"]) == set(state.tensors)):
            state.restore(named, opt, pyrng=rng)
            start, log = state.step, list(state.meta["log"])
            shares.update({t: state.tensors[t].to(device) for t in state.meta["shares"]})   # argsort where it ran
            subset.update(state.meta["subset"])
            before = float(state.meta.get("seconds", 0.0))
    bar = progress.add_task(f"hardening ({cfg.method})", total=cfg.steps, completed=start) if progress is not None else None
    started = time.perf_counter()
    was_training = model.training
    model.train()
    try:
        for p in params:   # here, not before the state's restore: an error there left them all set
            p.requires_grad_(True)
        for step in range(start, cfg.steps):
            task = order[step % len(order)]
            keep = attacker_keep(task, step)
            row: dict[str, Any] = {"step": step + 1, "task": task, "attacker_subset": subset[task]}
            extra: dict[str, torch.Tensor] = {}
            if cfg.adversarial and (step // len(order)) % cfg.adv_every == 0:   # on each task's visits, as above
                lr = math.exp(rng.uniform(math.log(cfg.inner_lr[0]), math.log(cfg.inner_lr[1])))
                g, pre, post = simulate_adaptation(
                    model, Adaptation(params=names, keep=keep, steps=cfg.inner_steps, lr=lr), lambda: draw(task),
                    lambda l: cfg.adversarial * collapse(l, target))
                # a diverged attack's loss after is in no summary either: it added nothing (a NaN mean, an inf
                # one after a resume read it back as null)
                row.update(attack_lr=lr, attack_before=pre,
                           **({"attack_after": post} if _accumulate(extra, g, row, "attack") else {}))
            if cfg.authorized:
                g, pre, post = simulate_adaptation(
                    model, Adaptation(params=auth, keep=None, steps=cfg.inner_steps, lr=cfg.authorized_lr),
                    lambda: draw(task), lambda l: cfg.authorized * l)
                row.update(authorized_before=pre,
                           **({"authorized_after": post} if _accumulate(extra, g, row, "authorized") else {}))
            batch = draw(task)
            opt.zero_grad(set_to_none=True)
            with record_routers(model, adapter=adapter) as tape:
                utility = forward_loss(model, batch)
            valid = batch.attention_mask.reshape(-1).bool()
            total = utility
            row["utility"] = float(utility.detach())
            if cfg.balance:
                bal = task_balance(tape, valid, torch.zeros_like(valid, dtype=torch.long), score=score)
                total = total + cfg.balance * bal
                row["balance"] = float(bal.detach())
            shares[task] = task_shares(tape, valid, E)
            if cfg.collapse:
                with mask_experts(model, keep, adapter=adapter):
                    pruned = forward_loss(model, batch)
                total = total + cfg.collapse * collapse(pruned, target)
                row["pruned"] = float(pruned.detach())
            if not math.isfinite(float(total.detach())):
                raise MoeguardError(f"the hardening loss became {float(total.detach())} at step {step + 1}",
                                    hint=f"lower --lr (now {cfg.lr:g}) or the term weights")
            total.backward()
            for n, p in zip(names, params):
                if n in extra:
                    p.grad = extra[n] if p.grad is None else p.grad + extra[n]
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not math.isfinite(float(norm)):
                # the step would write NaN into every weight, and the state saved next would resume into them
                # (a diverged simulated adaptation adds nothing: _accumulate)
                raise MoeguardError(f"the hardening gradient became {float(norm)} at step {step + 1}",
                                    hint=f"lower --lr (now {cfg.lr:g}) or the term weights; the last saved state "
                                         "resumes with the same settings only")
            opt.step()
            log.append(row)
            if bar is not None:
                progress.update(bar, advance=1, description=f"hardening ({cfg.method}): {task} utility "
                                                            f"{row['utility']:.3f}" + (f", pruned {row['pruned']:.2f}" if "pruned" in row else ""))
            if checkpoint is not None and (step + 1) % save_every == 0 and step + 1 < cfg.steps:
                trainstate.save(checkpoint, tag=tag, step=step + 1, params=named, optimizer=opt, pyrng=rng,
                                tensors=shares, meta={"shares": list(shares), "subset": subset, "log": log,
                                                      "seconds": before + time.perf_counter() - started})
            if on_step is not None:
                on_step(step + 1, row)
    finally:
        opt.zero_grad(set_to_none=True)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    diverged = sum("diverged" in r for r in log)
    if diverged:
        import warnings

        warnings.warn(f"{diverged} of {len(log)} hardening steps had a simulated adaptation that diverged and added no "
                      "gradient (their log rows say which: 'diverged')", stacklevel=2)
    return {"config": cfg.to_dict(), "keep": keep_n, "target": target, "authorized": auth,
            "seconds": round(before + time.perf_counter() - started, 1), "resumed_from": start, "log": log,
            "diverged_steps": diverged, "summary": summarize_log(log)}


def save_hardened(out, model, tokenizer, cfg: HardenConfig, result: dict[str, Any], *, source: str,
                  overwrite: bool = False, run: dict[str, Any] | None = None, like: Path | None = None,
                  named: Path | None = None) -> dict[str, Any]:
    """Write the hardened checkpoint atomically: weights, tokenizer, ``moeguard_hardening.json``
    (the training log), and, for a defense with a protocol, the ``moeguard_protocol.json`` users
    adapt under. Returns the hardening record. ``like``: the folder of the weights it was hardened
    from, whose dtypes the written weights keep (the owner releases bf16, not the float32 it trained in). ``named``: where the
    checkpoint will lie, when ``out`` is a temporary folder renamed later (the protocol names it)."""
    from moeguard.defense.protocol import FILENAME, Protocol
    from moeguard.io import atomic_dir, write_json
    from moeguard.models.tokenizer_files import save_tokenizer

    spec = get_defense(cfg.method)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if like is not None:
            from moeguard.pruning.apply import keep_source_dtypes

            keep_source_dtypes(tmp, like)
        save_tokenizer(tokenizer, tmp)
        doc = {"schema": "moeguard.hardening/1", "source": source, "method": cfg.method,
               "description": spec.description, **result, "run": run or {}}
        write_json(tmp / "moeguard_hardening.json", doc)
        if spec.protocol:
            Protocol(modes=("lora",), patterns=tuple(cfg.authorized_patterns), model=str(named or out),
                     note=f"issued by moeguard harden --method {cfg.method}: adapt with LoRA on these parameters "
                          "only").save(tmp / FILENAME)
    return doc


def _accumulate(into: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], row: dict[str, Any],
                term: str) -> bool:
    """Add a simulated adaptation's meta-gradient, or, where it is not finite (the attacker's drawn
    learning rate diverged: an attacker would not use it, as the attack harness drops a diverged run),
    nothing, said in the step's ``diverged``. It stopped the run with NaN gradients before, on the same
    step at every resume (the random state is restored), with a hint to change settings no flag sets."""
    if not all(bool(torch.isfinite(g).all()) for g in grads.values()):
        row["diverged"] = [*row.get("diverged", []), term]
        return False
    for n, g in grads.items():
        into[n] = into[n] + g if n in into else g
    return True


def summarize_log(log: list[dict[str, Any]], window: int = 20) -> dict[str, dict[str, float]]:
    """Each logged quantity's mean over the first and the last ``window`` steps that have it."""
    keys = sorted({k for r in log for k in r if k not in ("step", "task", "attack_lr", "attacker_subset", "diverged")})
    out = {}
    for k in keys:
        # None: a non-finite value read back from a resumed run's saved log (JSON has no inf), as the
        # uninterrupted run's inf (relu(target - inf) is 0: such a row trains on; summing None raised)
        vals = [float("inf") if r[k] is None else r[k] for r in log if k in r]
        if vals:
            out[k] = {"first": sum(vals[:window]) / len(vals[:window]), "last": sum(vals[-window:]) / len(vals[-window:])}
    return out
