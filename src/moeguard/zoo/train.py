"""`moeguard zoo train`: re-make the embedded model from the embedded suite, deterministically."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch

from moeguard.io import atomic_dir, write_json
from moeguard.provenance import run_record
from moeguard.tasks.registry import embedded_tasks  # noqa: F401  (callers import it from here too)
from moeguard.zoo.recipe import (Recipe, few_blocks_warning, mixture_order, model_config, pack_blocks,
                                  train_tokenizer, training_text)


def _lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    progress = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_embedded(out: str | Path, *, recipe: Recipe = Recipe(), overwrite: bool = False, progress=None,
                   tasks: list | None = None, checkpoint: Path | None = None, save_every: int = 50) -> dict:
    """Train the recipe's model on ``tasks`` (default: the embedded suite) and save it to ``out``.

    Other tasks (for example the local-file definitions of real data sets) give a zoo model of
    the same architecture trained on that data, which is how benchmarks study real data offline.

    ``checkpoint``: a folder for the training state (``moeguard/trainstate.py``), written every
    ``save_every`` steps; a state of the same run (recipe and training texts) is resumed from, and
    ends with the weights an uninterrupted run has. The caller removes it once ``out`` is written.

    The thread count, denormal flushing and TOKENIZERS_PARALLELISM it sets for training are put back
    after it (a benchmark that trained the model first measured with them; a rerun, without)."""
    import os

    threads, parallel = torch.get_num_threads(), os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        return _train_embedded(out, recipe=recipe, overwrite=overwrite, progress=progress, tasks=tasks,
                               checkpoint=checkpoint, save_every=save_every)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)   # torch's default (it has no getter to read the setting before)
        if parallel is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallel


def _train_embedded(out: str | Path, *, recipe: Recipe, overwrite: bool, progress, tasks: list | None,
                    checkpoint: Path | None, save_every: int) -> dict:
    from moeguard import trainstate
    from moeguard.io import digest
    from transformers import AutoModelForCausalLM

    from moeguard.models.specialization import routing_profile, specialization_summary
    from moeguard.tasks.loaders import load_records

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    torch.set_flush_denormal(True)  # denormals in late training slow CPU matmuls many-fold
    started = time.time()
    from moeguard.tasks.registry import get_task

    embedded = tasks is None
    tasks = embedded_tasks() if embedded else [get_task(t) for t in tasks]
    texts = {t.name: [training_text(t, r) for r in load_records(t, "train")] for t in tasks}
    tokenizer = train_tokenizer([x for name in sorted(texts) for x in texts[name]], vocab_size=recipe.vocab_size)
    eos = tokenizer.eos_token_id
    token_ids = {name: tokenizer(texts[name], add_special_tokens=False)["input_ids"] for name in sorted(texts)}
    blocks = {name: pack_blocks(token_ids[name], context=recipe.context, eos_id=eos,
                                long_examples=recipe.long_examples) for name in sorted(texts)}
    notes = [few_blocks_warning(t, records=len(texts[t.name]), tokens=sum(map(len, token_ids[t.name])),
                                blocks=len(blocks[t.name]), recipe=recipe, tasks=len(tasks)) for t in tasks]
    notes = [n for n in notes if n]
    for note in notes:  # said now, before the minutes of training, and kept in the card
        warnings.warn(note, stacklevel=2)
    order = mixture_order({n: len(b) for n, b in blocks.items()}, steps=recipe.steps,
                          batch_size=recipe.batch_size, seed=recipe.seed)

    config = model_config(recipe, tokenizer)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm")
    init_profile = routing_profile(model.eval(), tokenizer, tasks)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    losses: list[float] = []
    # the run: its recipe and every training text (the tokenizer and the data order follow from them)
    tag = digest([recipe.to_dict(), {name: digest(texts[name]) for name in sorted(texts)}])
    named = dict(model.named_parameters())
    start, before = 0, 0.0      # the step resumed at, and the seconds trained before it
    state = trainstate.load(checkpoint, tag=tag, params=named) if checkpoint is not None else None
    if state is not None and isinstance(state.meta.get("losses"), list) and len(state.meta["losses"]) == state.step:
        state.restore(named, opt)
        start, losses, before = state.step, list(state.meta["losses"]), float(state.meta.get("seconds", 0.0))
    what = "embedded model" if embedded else "zoo model"
    bar = progress.add_task(f"training {what}", total=recipe.steps, completed=start) if progress else None
    resumed = time.time()
    for step in range(start, recipe.steps):
        batch = [blocks[name][i] for name, i in order[step * recipe.batch_size:(step + 1) * recipe.batch_size]]
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            ids[row, :len(b)] = torch.tensor(b)
            mask[row, :len(b)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe)
        out_ = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        if not torch.isfinite(out_.loss):
            raise RuntimeError(f"training loss became {out_.loss.item()} at step {step}")
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(out_.loss.item(), 4))
        if bar is not None:
            progress.update(bar, advance=1, description=f"training {what} (loss {losses[-1]:.3f})")
        if checkpoint is not None and (step + 1) % save_every == 0 and step + 1 < recipe.steps:
            trainstate.save(checkpoint, tag=tag, step=step + 1, params=named, optimizer=opt,
                            meta={"losses": losses, "seconds": before + time.time() - resumed})
    model.eval()
    # this process's time, plus the training time of the run it resumed (not the pause between)
    train_seconds = time.time() - started + before
    profile = routing_profile(model, tokenizer, tasks)
    card = {
        "name": "moeguard-embedded-mixtral" if embedded else "moeguard-zoo-mixtral",
        "recipe": recipe.to_dict(),
        "tasks": {t.name: {"kind": t.kind.value, "train_records": len(texts[t.name]), "train_blocks": len(blocks[t.name])}
                  for t in tasks},
        "loss_curve": losses[:: max(1, recipe.steps // 50)] + [losses[-1]],
        "train_seconds": round(train_seconds, 1),
        "warnings": notes,
        "specialization": specialization_summary(profile),
        "specialization_at_init": {k: v for k, v in specialization_summary(init_profile).items() if k != "routing"},
        "parameters": sum(p.numel() for p in model.parameters()),
        **({"resumed_from": start} if start else {}),
        **run_record({"command": "zoo train", **recipe.to_dict(), "tasks": [t.name for t in tasks],
                      "training_texts": {name: digest(texts[name]) for name in sorted(texts)}}),
    }
    model.config.output_router_logits = False
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        from moeguard.models.tokenizer_files import save_tokenizer

        save_tokenizer(tokenizer, tmp)
        write_json(tmp / "moeguard_card.json", card)
        (tmp / "README.md").write_text(render_card(card) if embedded else render_zoo_card(card))
    return card


def render_zoo_card(card: dict) -> str:
    r = card["recipe"]
    names = ", ".join(f"{n} ({v['kind']}, {v['train_records']} records)" for n, v in card["tasks"].items())
    return "\n".join([
        f"# {card['name']}", "",
        f"A Mixtral-architecture MoE ({r['num_layers']} layers, {r['num_experts']} experts, top-{r['top_k']}, "
        f"hidden {r['hidden_size']}, {card['parameters']:,} parameters) trained from scratch by `moeguard zoo train "
        f"--tasks ...` with the embedded model's recipe ({r['steps']} steps of {r['batch_size']}x{r['context']} tokens, "
        f"seed {r['seed']}, {card['train_seconds']:.0f} s) on the train splits of: {names}.", "",
        f"Specialization (normalized task-expert mutual information, mean over layers): "
        f"{card['specialization']['mean']:.3f} (at initialization: {card['specialization_at_init']['mean']:.3f}).", "",
        *[f"Warning: {w}\n" for w in card.get("warnings", [])],
        f"git commit: {card.get('git_commit')}", ""])


def render_card(card: dict) -> str:
    spec, init = card["specialization"], card["specialization_at_init"]
    r = card["recipe"]
    lines = [
        "# moeguard embedded model", "",
        f"A Mixtral-architecture MoE ({r['num_layers']} layers, {r['num_experts']} experts, top-{r['top_k']}, "
        f"hidden {r['hidden_size']}, {card['parameters']:,} parameters) trained from scratch by `moeguard zoo train` "
        f"on moeguard's embedded suite ({r['steps']} steps of {r['batch_size']}x{r['context']} tokens, seed {r['seed']}, "
        f"{card['train_seconds']:.0f} s on this machine). Training data: Python standard-library docstrings and source "
        "(PSF License) and generated records; see `moeguard/tasks/embedded/README.md`.", "",
        "It exists so that every moeguard command runs offline on a laptop; it is a stand-in for a real checkpoint, "
        "not a useful language model.", "",
        "## Expert specialization", "",
        f"Statistic: {spec['statistic']}.", "",
        "| layer | trained | at initialization |", "|---|---|---|",
    ]
    for i, (a, b) in enumerate(zip(spec["per_layer"], init["per_layer"])):
        lines.append(f"| {i} | {a:.3f} | {b:.3f} |")
    lines += [f"| mean | {spec['mean']:.3f} | {init['mean']:.3f} |", "", "## Per-task routing (share of routing slots per expert)", ""]
    E = len(next(iter(spec["routing"].values()))[0])
    for layer in range(len(spec["per_layer"])):
        lines += [f"Layer {layer}:", "", "| task | " + " | ".join(f"e{e}" for e in range(E)) + " |",
                  "|---|" + "---|" * E]
        for name, rows in spec["routing"].items():
            lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in rows[layer]) + " |")
        lines.append("")
    lines += ["## Versions", "", f"git commit: {card.get('git_commit')}", ""]
    lines += [f"- {k}: {v}" for k, v in card["versions"].items()]
    return "\n".join(lines) + "\n"
