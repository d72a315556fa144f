"""The active-learning loop: pick samples to label, reveal their labels, fine-tune, evaluate, repeat.

Round 0 scores the pruned model as it is. Round r asks the strategy for the samples that take
the labeled set to ``schedule[r]`` (using the model re-aligned in round r-1), reveals their
labels from the task's train split, fine-tunes *from the pruned model* on every label so far
(so the score at n labels depends only on which n samples were chosen, the learning curve's
definition) and evaluates on the eval split.

With ``state_dir`` every round's selection and result is saved as it completes, and the
running fine-tune checkpoints every ``save_every`` steps: a killed run started again with the
same settings continues where it stopped and ends with the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from moeguard.errors import MoeguardError
from moeguard.io import sync_file, write_json
from moeguard.analysis import read_score, retention
from moeguard.realign.engine import FinetuneConfig, finetune, fingerprint
from moeguard.realign.features import unlabeled
from moeguard.realign.modes import Trainable, apply_mode
from moeguard.realign.strategies.base import Query, get_strategy
from moeguard.tasks.base import Task
from moeguard.tasks.batches import task_sequences
from moeguard.tasks.evaluate import TaskResult, evaluate_task
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task
from moeguard.tasks.tokens import pad_id


@dataclass(frozen=True, kw_only=True)
class ALConfig:
    strategy: str
    schedule: tuple[int, ...]            # labels after each round (cumulative, increasing)
    pool_size: int = 1000
    eval_limit: int = 200
    eval_batch_size: int = 32
    seed: int = 0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "schedule": list(self.schedule), "finetune": self.finetune.to_dict()}

    def key(self) -> dict[str, Any]:
        """What the run's numbers depend on (FinetuneConfig.key: not --save-every)."""
        return {**self.to_dict(), "finetune": self.finetune.key()}


def round_seed(seed: int, r: int) -> int:
    """Round r's fine-tuning seed: distinct per round, and within the seeds every setting accepts (a
    --seed above ~4.26 million made seed * 1009 + r overflow SEED_MAX in round 1, after the work)."""
    from moeguard.config import SEED_MAX

    return (seed * 1009 + r) % (SEED_MAX + 1)

def schedule_for(*, budget: int, query_size: int) -> tuple[int, ...]:
    """Rounds of ``query_size`` labels up to ``budget`` (the last round takes the remainder)."""
    if query_size < 1:
        raise MoeguardError(f"query size is {query_size}", hint="pass --query-size of at least 1")
    if budget < 1:
        raise MoeguardError(f"label budget is {budget}", hint="pass --budget of at least 1")
    steps = list(range(query_size, budget + 1, query_size))
    return tuple(steps if steps and steps[-1] == budget else steps + [budget])


def check_schedule(schedule: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    s = tuple(int(x) for x in schedule)
    if not s or s[0] < 1 or any(b <= a for a, b in zip(s, s[1:])):
        raise MoeguardError(f"label budgets {list(s)} are not increasing positive counts",
                            hint="pass increasing budgets, e.g. --budgets 8,16,32,64")
    return s


def label_pool(task: Task | str, *, pool_size: int, budget: int, seed: int,
               budget_flag: str = "--budget") -> list[dict[str, Any]]:
    """The attacker's unlabeled pool: ``pool_size`` train records, shuffled with ``seed``.
    Fails before any model work when the pool cannot supply ``budget`` labels. ``budget_flag``: what the
    command calls its budget (recovery's and the audit's is --budgets, the audit's harness --defense-budget)."""
    task = get_task(task)
    if "train" not in task.splits:
        raise MoeguardError(f"task '{task.name}' has no train split, so there are no labels to reveal",
                            hint="re-alignment draws labels from a train split; add 'train: <split>' under 'splits:'")
    if pool_size < 1:
        raise MoeguardError(f"pool size is {pool_size}", hint="pass --pool-size of at least 1")
    records = load_records(task, "train")
    random.Random(seed).shuffle(records)
    pool = records[:pool_size]
    if budget > len(pool):
        where = (f"the {len(records)} train records of '{task.name}'" if len(pool) == len(records)
                 else f"a pool of {len(pool)} (of {len(records)} train records of '{task.name}')")
        hint = (f"lower {budget_flag} to at most {len(pool)}" if len(pool) == len(records)
                else f"raise --pool-size to at least {budget}, or lower {budget_flag}")
        raise MoeguardError(f"a budget of {budget} labels is larger than {where}", hint=hint)
    return pool


def run_active_learning(model, tokenizer, task: Task | str, cfg: ALConfig, *, pool: list[dict[str, Any]] | None = None,
                        orphan_share: Callable[[], torch.Tensor] | None = None, full_score: float | None = None,
                        initial: TaskResult | None = None, state_dir: str | Path | None = None, progress: Any = None,
                        keep_trainable: bool = False,
                        after: Callable[[Any], dict[str, Any]] | None = None) -> tuple[dict[str, Any], Trainable | None]:
    """Run the loop on ``model`` (the pruned model); returns (curve document, trainable).

    ``model`` is given back unchanged unless ``keep_trainable`` (then the caller owns the
    returned :class:`Trainable` with the last round's weights and must ``release`` it).
    ``after(trained)``: called with the last round's model (LoRA folded into a copy) before it
    is restored; what it returns is the curve's ``after`` entry (the audit traces it)."""
    from moeguard.tasks.evaluate import fit_to_model

    task = fit_to_model(get_task(task), model)   # fine-tuned within the model's positions, as it is scored
    schedule = check_schedule(cfg.schedule)
    strategy = get_strategy(cfg.strategy, task)
    if strategy.needs_original and orphan_share is None:
        raise MoeguardError(f"strategy '{strategy.name}' needs the original model and the pruning plan",
                            hint="prune with moeguard (the checkpoint records both) or pass --original")
    pool = pool if pool is not None else label_pool(task, pool_size=cfg.pool_size, budget=schedule[-1], seed=cfg.seed)
    if schedule[-1] > len(pool):
        raise MoeguardError(f"a budget of {schedule[-1]} labels is larger than the pool of {len(pool)}",
                            hint=f"lower the budget to at most {len(pool)}")
    visible = unlabeled(task, pool)
    pad = pad_id(tokenizer)
    state_dir = Path(state_dir) if state_dir is not None else None
    tag = fingerprint(cfg.finetune, [], extra=[cfg.key(), task.name, len(pool), pool[0], pool[-1]])
    # the trained weights are kept after a round only where something reads them: the next round's
    # selection, or after the last one ``after`` and a caller keeping the trainable (round 0's are the
    # model's own, and a one-round curve's weights were written twice, up to a whole model each, unread)
    rounds = len(schedule) + 1
    weighed = lambda done: 1 < done < rounds or (done == rounds and (after is not None or keep_trainable))  # noqa: E731
    state = _load_state(state_dir, tag, weighed)
    shares = _cached(orphan_share) if orphan_share is not None else None

    trainable = apply_mode(model, cfg.finetune.mode, lora_r=cfg.finetune.lora_r, lora_alpha=cfg.finetune.lora_alpha,
                           seed=cfg.finetune.seed, only=cfg.finetune.allowed())
    try:   # the copy below can fail (host memory, an interrupt): the mode's changes are undone then too
        # host memory: in full mode a second copy of every weight on the accelerator halved what fits there
        init = trainable.state(device="cpu")
        bar = progress.add_task(f"{strategy.name} seed {cfg.seed}", total=len(schedule) + 1) if progress else None
    except BaseException:
        trainable.release()
        raise
    try:
        if weighed(len(state["rounds"])):
            from safetensors.torch import load_file

            trainable.load(load_file(str(state_dir / "current.safetensors")))
        if not state["rounds"]:
            result = initial or _evaluate(trainable.model, tokenizer, task, cfg)
            state["rounds"].append(_point(0, [], result, full_score, {}))
            _save_state(state_dir, state, trainable, save_weights=False)
        if bar is not None:
            progress.update(bar, completed=len(state["rounds"]))
        for r in range(len(state["rounds"]), len(schedule) + 1):
            target = schedule[r - 1]
            labeled = [i for p in state["rounds"] for i in p["selected"]]
            times: dict[str, float] = {}
            if state.get("pending", {}).get("round") == r:
                chosen = state["pending"]["selected"]
            else:
                t0 = time.perf_counter()
                chosen = _select(strategy, trainable.model, tokenizer, task, visible, labeled, target - len(labeled),
                                 random.Random(cfg.seed * 7919 + r), cfg, shares)
                times["select_s"] = round(time.perf_counter() - t0, 3)
                state["pending"] = {"round": r, "selected": chosen, "select_s": times["select_s"]}
                _save_state(state_dir, state, trainable, save_weights=False)
            times.setdefault("select_s", state["pending"].get("select_s", 0.0))
            trainable.load(init)
            examples = task_sequences(tokenizer, task, [pool[i] for i in labeled + chosen])
            ft = finetune(trainable, examples, dataclasses.replace(cfg.finetune, seed=round_seed(cfg.finetune.seed, r)),
                          pad_id=pad, checkpoint=state_dir / "finetune" if state_dir else None, progress=None)
            t0 = time.perf_counter()
            result = _evaluate(trainable.model, tokenizer, task, cfg)
            times["eval_s"] = round(time.perf_counter() - t0, 3)
            times["train_s"] = round(ft.seconds, 3)
            state["rounds"].append(_point(target, chosen, result, full_score, {**times, "finetune": ft.to_dict()}))
            state.pop("pending", None)
            _save_state(state_dir, state, trainable, save_weights=weighed(len(state["rounds"])))
            if bar is not None:
                progress.update(bar, advance=1, description=f"{strategy.name} seed {cfg.seed}: {target} labels, "
                                                            f"{task.primary_metric} {result.score:.4g}")
    except BaseException:
        trainable.load(init)
        trainable.release()
        raise
    curve = {"strategy": strategy.name, "seed": cfg.seed, "task": task.name, "metric": task.primary_metric,
             "higher_is_better": task.higher_is_better, "full_score": full_score, "pool_size": len(pool),
             "schedule": list(schedule), "points": state["rounds"], "settings": cfg.to_dict()}
    if after is not None:
        try:
            curve["after"] = _after(after, trainable)
        except BaseException:  # an interrupt: restore the model as on any other way out
            trainable.load(init)
            trainable.release()
            raise
    if keep_trainable:
        return curve, trainable
    trainable.load(init)
    trainable.release()
    return curve, None


def _after(after: Callable[[Any], dict[str, Any]], trainable: Trainable) -> dict[str, Any]:
    """``after(trained model)``; LoRA is folded into a copy, so the model itself is restored as
    usual. A failure is recorded, not raised: the curve is finished and worth keeping."""
    import copy

    try:
        trained = copy.deepcopy(trainable.model).merge_and_unload() if trainable.adapters else trainable.base
        return after(trained)
    except Exception as exc:  # noqa: BLE001 - whatever the inspection hits, the curve stands
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def _select(strategy, model, tokenizer, task, visible, labeled, k, rng, cfg, shares) -> list[int]:
    taken = set(labeled)
    candidates = [i for i in range(len(visible)) if i not in taken]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            chosen = strategy.select(Query(model=model, tokenizer=tokenizer, task=task, pool=visible,
                                           candidates=candidates, labeled=list(labeled), k=k, rng=rng,
                                           batch_size=cfg.eval_batch_size, orphan_share=shares))
    finally:
        model.train(was_training)
    chosen = [int(i) for i in chosen]
    if len(chosen) != k or len(set(chosen)) != k or not set(chosen) <= set(candidates):
        raise RuntimeError(f"strategy '{strategy.name}' returned {len(chosen)} samples ({len(set(chosen))} distinct, "
                           f"{len(set(chosen) - set(candidates))} not candidates); {k} unlabeled ones were asked for")
    return sorted(chosen)


def _evaluate(model, tokenizer, task, cfg: ALConfig) -> TaskResult:
    return evaluate_task(model, tokenizer, task, limit=cfg.eval_limit, batch_size=cfg.eval_batch_size, baseline=False)


def _point(labels: int, selected: list[int], result: TaskResult, full: float | None, extra: dict) -> dict[str, Any]:
    # a result rebuilt from JSON (the recovery study's round 0) holds null for a score that was not finite
    return {"labels": labels, "selected": list(selected), "score": result.score,
            "retention": retention(read_score(result.score), full, higher_is_better=result.higher_is_better),
            "metrics": result.metrics, **extra}


def _cached(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    box: list[torch.Tensor] = []

    def get() -> torch.Tensor:
        if not box:
            box.append(fn())
        return box[0]
    return get


def _load_state(state_dir: Path | None, tag: str, weighed: Callable[[int], bool]) -> dict[str, Any]:
    """The loop's kept state of run ``tag``, or a fresh one; ``weighed(rounds done)``: whether the
    trained weights were kept with that many rounds (and must be there to resume)."""
    fresh = {"tag": tag, "rounds": []}
    if state_dir is None:
        return fresh
    state_dir.mkdir(parents=True, exist_ok=True)
    f = state_dir / "loop.json"
    if not f.exists():
        return fresh
    try:
        state = json.loads(f.read_text())
    except ValueError:
        return fresh
    from moeguard.models.safetensorsfiles import tensor_names

    if state.get("tag") != tag or (weighed(len(state["rounds"])) and tensor_names(state_dir / "current.safetensors") is None):
        return fresh   # a weights file a power loss left empty or cut short: start over, not a traceback
    return state


def _save_state(state_dir: Path | None, state: dict, trainable: Trainable, *, save_weights: bool) -> None:
    if state_dir is None:
        return
    if save_weights:
        import os

        from safetensors.torch import save_file

        tmp = state_dir / ".current.safetensors.tmp"
        save_file({n: p.detach().contiguous().cpu() for n, p in trainable.params.items()}, str(tmp))
        sync_file(tmp)   # on disk before loop.json says the round is done: a power loss left an empty file behind it
        os.replace(tmp, state_dir / "current.safetensors")
    write_json(state_dir / "loop.json", state, sync=True)
