"""The re-alignment attack as one Python call: what `moeguard realign` runs.

:func:`realign_checkpoint` fine-tunes a pruned checkpoint on actively chosen labels and writes
the re-aligned checkpoint with its learning curve; a killed call resumes from its last saved
state when called again with the same settings.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.config import is_decimal
from moeguard.errors import MoeguardError


RECORD_FILES = ("moeguard_pruning.json", "moeguard_merging.json")   # prune's, merge's


def pruning_record(path: Path | None) -> tuple[str, dict, dict] | None:
    """The record beside a pruned checkpoint (``moeguard_pruning.json``) or a merged one
    (``moeguard_merging.json``), if any: (its file name, the record as written, and what
    re-alignment reads of it: ``source``, ``keep`` and ``original_num_experts``). A merge's centres
    are its kept experts and the experts folded into them count as dropped, as recovery's merge route
    counts them (a merged checkpoint was re-aligned with no original: retention null, orphan refused)."""
    from moeguard.io import read_json

    f = next((path / n for n in RECORD_FILES if (path / n).exists()), None) if path is not None else None
    if f is None:
        return None
    from moeguard.pruning.plan import expert_indices

    merged = f.name == RECORD_FILES[1]
    hint = f"re-run moeguard {'merge' if merged else 'prune'}, or delete the file to re-align without it"
    written = read_json(f, what=f"{'merging' if merged else 'pruning'} record", hint=hint)
    record = written
    if merged and isinstance(written, dict):   # the surgery's facts (the source's expert counts) are its "pruning" part
        inner = written.get("pruning") if isinstance(written.get("pruning"), dict) else {}
        record = {**{k: inner[k] for k in ("original_num_experts", "original_experts_per_layer") if k in inner},
                  **{k: written[k] for k in ("source", "keep") if k in written}}
    # what re-alignment reads of it: the source model, and for the orphan strategy the keep map and expert count
    keep = record.get("keep") if isinstance(record, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("source", ""), (str, type(None))) \
            or (keep is not None and not (isinstance(keep, dict) and all(
                is_decimal(str(k)) and expert_indices(v) for k, v in keep.items()))) \
            or not (record.get("original_num_experts") is None or (type(record["original_num_experts"]) is int
                                                                   and record["original_num_experts"] >= 1)):
        raise MoeguardError(f"{f} is not a {'merging' if merged else 'pruning'} record (source, keep map of whole "
                            "numbers, original_num_experts)", hint=hint)
    return f.name, written, record


def check_protocol_covers(model, ft) -> None:
    """A protocol's patterns leave the mode something to train on ``model`` (a handle), or one line
    naming the patterns and what they match (found on the meta model, before any weights load)."""
    from moeguard.defense.harden import authorized_names
    from moeguard.models.loading import meta_model
    from moeguard.realign.modes import lora_targets, matching

    meta = meta_model(model.config)
    names = authorized_names(meta, ft.only)
    from moeguard.realign.modes import get_mode

    if get_mode(ft.mode).adapters:   # adapters go where LoRA's targets are
        ok = bool(any(lora_targets(meta, matching(ft.only))))
    else:
        # the mode's own selection (names and ids are enough): patterns matching only attention weights
        # passed "matches some parameter", and router mode failed after the loads (defend-eval: after its grid)
        try:
            get_mode(ft.mode).apply(meta, only=matching(ft.only)).release()
            ok = True
        except MoeguardError:
            ok = False
    if not ok:
        sample = [n for n, _ in meta.named_parameters()][:3]
        what = f"they match {names[:3]}, which {ft.mode} cannot adapt" if names else "they match no parameter"
        raise MoeguardError(f"the protocol's patterns {list(ft.only)} leave {ft.mode} nothing to train on {model.name}: "
                            f"{what}", hint=f"check the protocol against the model's parameter names (e.g. {sample})")


def check_original(original, record: dict, name: str) -> None:
    """The original has the experts the pruning record kept from (an --original of another model
    failed at the first round, after both models loaded, with an IndexError). ``original``: its
    :class:`~moeguard.models.handle.ModelHandle`, checked from the config before any weights load."""
    n = int(record["original_num_experts"])
    # a budget-pruned original: each layer's own count (original_num_experts is the widest layer's)
    per = {int(k): int(v) for k, v in (record.get("original_experts_per_layer") or {}).items()}
    layers = {int(k): int(v) for k, v in original.info["experts_per_layer"].items()}
    keep = {int(k): v for k, v in record["keep"].items()}
    wrong = sorted(l for l in keep if l not in layers)
    if wrong or any(c != per.get(l, n) for l, c in layers.items()) \
            or any(not 0 <= e < per.get(l, n) for l, v in keep.items() for e in v):
        raise MoeguardError(f"{name} is not the model this checkpoint was pruned from: its record kept experts of "
                            f"{n} per layer in MoE layers {sorted(keep)}, and {name} has "
                            f"{sorted(set(layers.values()))} experts in MoE layers {sorted(layers)}",
                            hint="pass --original the unpruned checkpoint named in the pruning (or merging) record's 'source'")


def realign_checkpoint(*, model, task, out: Path, al, original: str | None = None, full_score: float | None = None,
                       overwrite: bool = False, progress: Any = None, run: dict | None = None) -> dict[str, Any]:
    """Re-align ``model`` (a resolved :class:`~moeguard.models.handle.ModelHandle` of a pruned
    checkpoint) on ``task`` with the :class:`~moeguard.realign.loop.ALConfig` ``al``; writes the
    checkpoint, its tokenizer, the pruning record and ``learning_curve.json`` into ``out``.

    ``original``: the unpruned model (the orphan strategy and retention need it); default: the
    source named in the pruning record. ``full_score``: the original's score, if known."""
    from moeguard.edge import resolve_model
    from moeguard.io import resumable_dir, write_json
    from moeguard.models.tokenizer_files import save_tokenizer
    from moeguard.realign.loop import label_pool, run_active_learning
    from moeguard.realign.strategies.base import get_strategy
    from moeguard.realign.strategies.orphan import orphan_shares
    from moeguard.tasks.evaluate import evaluate_task

    if full_score is not None and (not math.isfinite(full_score) or full_score <= 0):
        # every retention was null, 0 or negative, written with exit 0, and the original never evaluated
        # (a perplexity is at least 1; a higher-is-better score of 0 leaves nothing to retain)
        raise MoeguardError(f"--full-score is {full_score}; expected the original's finite score on {task.name}, above 0",
                            hint="pass the score `moeguard eval` gives the original, or leave it out to evaluate it")
    strat = get_strategy(al.strategy, task)
    pool = label_pool(task, pool_size=al.pool_size, budget=al.schedule[-1], seed=al.seed)
    record_file, written, record = pruning_record(model.ref.path) or (RECORD_FILES[0], None, None)
    from_record = original is None and bool((record or {}).get("source"))
    original = original or (record or {}).get("source")
    if strat.needs_original and record is None:
        raise MoeguardError(f"strategy '{al.strategy}' needs the pruning plan and the original model; {model.name} "
                            f"has no {' or '.join(RECORD_FILES)}",
                            hint="prune with `moeguard prune` (or merge with `moeguard merge`), which records both")
    lacking = [k for k in ("keep", "original_num_experts") if strat.needs_original and k not in record]
    if lacking:   # a KeyError traceback after both models had loaded
        raise MoeguardError(f"strategy '{al.strategy}' needs the pruning plan, and {model.name}'s {record_file} "
                            f"has no {' or '.join(lacking)}", hint="prune again with `moeguard prune`, which records both")
    if strat.needs_original and original is None:   # a record without 'source': it failed after the pruned model loaded
        raise MoeguardError(f"strategy '{al.strategy}' needs the original model, and {model.name}'s pruning record names "
                            "no source", hint="pass --original PATH (the unpruned checkpoint)")
    orig = None
    if original is not None and original != "embedded":   # read or not, --out there would replace it
        from moeguard.io import check_output

        check_output(out, overwrite=overwrite, kind="folder", inputs=(original,))
    needed = full_score is None or strat.needs_original   # with --full-score, only orphan reads the original
    if original is not None and needed:  # an unreadable original fails here, before the pruned model loads
        try:
            orig = resolve_model(None if original == "embedded" else original, tasks=False,
                                 device_map=model.device_map)
        except MoeguardError as e:
            if not from_record:
                raise
            # a path the user never typed (recorded where the checkpoint was pruned): say where it came from
            raise MoeguardError(f"{model.name}'s {record_file} names its source {original!r}, which cannot "
                                f"be used here ({e.message})",
                                hint="pass --original PATH (the unpruned checkpoint), or --full-score with a "
                                     "strategy other than orphan") from None
        from moeguard.io import check_output

        # the record's source is an input the command line never named: --out there would replace it
        check_output(out, overwrite=overwrite, kind="folder", inputs=(orig.ref.path,))
        if record is not None and all(k in record for k in ("keep", "original_num_experts")):
            # from its config, before either model loads (the original, the larger one, loaded first)
            check_original(orig, record, orig.name)
    from moeguard.models.identity import weights_identity

    # the weights, not only the path: a checkpoint re-pruned in place after a kill must not resume the old run
    from moeguard.tasks.loaders import task_identity

    # and the task's definition and data: an edited YAML or data file must not resume rounds made on the old one
    # and where it runs: rounds made on a GPU must not resume on the CPU (a curve of neither run)
    # the original's weights too (it sets full_score, so every retention, and orphan's picks): one updated
    # in place after a kill must not resume rounds measured against the old one
    settings = {"model": model.name, "weights": weights_identity(model.arg), "task": task.name,
                "task_identity": task_identity(task), "original": original, "device_map": model.device_map, **model.placement,
                "full_score": full_score, **al.key(),
                **({"original_weights": weights_identity(orig.arg)} if orig is not None else {})}
    if al.finetune.only:
        check_protocol_covers(model, al.finetune)   # before both models load and the original is scored
    orphan = None
    from moeguard import kept as kept_pieces

    # one run at a time from here: what it reads from the original is kept beside --out, which another
    # run to the same --out would replace under it (before the larger model loads, not after)
    with kept_pieces.held_for(Path(out)):
        kept = _OriginalKept(Path(out), settings) if orig is not None else None
        if orig is not None and (full_score is None or strat.needs_original):
            score_kept, shares = kept.read()
            if full_score is None and score_kept is not None:   # a rerun after a kill: the original is not scored again
                full_score = score_kept
            if full_score is None or (strat.needs_original and shares is None):
                # the original first, and gone before the pruned model loads: it is the larger one, and it
                # stayed in memory (or on the GPU) through the whole fine-tune
                o, otok, _ = orig.load()
                if full_score is None:
                    full_score = evaluate_task(o, otok, task, limit=al.eval_limit, batch_size=32, baseline=False).score
                if strat.needs_original and shares is None:
                    shares = orphan_shares(o, otok, task, record["keep"], int(record["original_num_experts"]))(pool)
                del o, otok
                from moeguard.models.loading import release_memory

                release_memory()
                kept.write(full_score if settings["full_score"] is None else None, shares)
            if strat.needs_original:
                orphan = lambda: shares  # noqa: E731
        m, tokenizer, _ = model.load()
        from moeguard.realign.offload import offloaded

        if offloaded(m):   # before any round: LoRA trains over offloaded weights, and the save failed after the last
            raise MoeguardError(f"{model.name} is placed with weights offloaded to the CPU or disk (device map "
                                f"{model.device_map or 'auto'}); realign writes the adapters merged into the weights, "
                                "which cannot be done on offloaded ones", hint="use a device map that holds the whole "
                                "model on the accelerators (e.g. more GPUs), or the recovery study, which measures "
                                "without saving")
        with resumable_dir(out, overwrite=overwrite, settings=settings) as work:
            curve, trainable = run_active_learning(m, tokenizer, task, al, pool=pool, orphan_share=orphan,
                                                   full_score=full_score, state_dir=work / "state", progress=progress,
                                                   keep_trainable=True)
            trainable.merged().save_pretrained(work)
            from moeguard.pruning.apply import keep_source_dtypes, weights_folder

            source = weights_folder(model.ref)
            if source is not None:   # trained in float32, written as the pruned checkpoint stores its weights (bf16)
                keep_source_dtypes(work, source)
            save_tokenizer(tokenizer, work)
            if written is not None:   # the record as the pruning or merge wrote it: the output's lineage
                write_json(work / record_file, written)
            curve["model"] = model.name
            if run is not None:   # made before the run: with what it reused (rounds, state, the original)
                from moeguard.provenance import with_reused

                curve["run"] = with_reused(run)
            write_json(work / "learning_curve.json", curve)
            shutil.rmtree(work / "state")
        # the run is in place: nothing is left to resume (a folder of an earlier run that needed the original
        # and this one, with --full-score, does not, included)
        (kept or _OriginalKept(Path(out), settings)).drop()
        return curve


class _OriginalKept:
    """What a realign run read from the original (its score, which sets every retention, and the
    orphan strategy's routing shares over the pool), kept beside ``--out`` (``.OUT.original``) until
    the run is in place: a rerun after a kill (in the rounds, or while the pruned model loads) does
    not load and score the larger model again. Keyed by the run's settings (the original's weights
    among them); one ``.npz`` of both (exact; a torn one is scored again). A NaN score is not kept."""

    def __init__(self, out: Path, settings: dict):
        self.folder = out.with_name(f".{out.name}.original")
        self.key = settings

    def read(self):
        import torch

        from moeguard import kept

        found = kept.read_arrays(self.folder, "original", key=self.key) or {}
        if found:   # reused: who made it goes in the run record when another version did (pieces of
            # other settings share the folder, so the maker is the piece's own)
            from moeguard.provenance import reusing

            made = json.loads(str(found["made_by"])) if "made_by" in found else None
            reusing(str(self.folder), made, fix="delete it")
        score = float(found["full_score"]) if "full_score" in found else None
        return score, torch.from_numpy(found["shares"]) if "shares" in found else None

    def write(self, full_score, shares) -> None:
        from moeguard import kept

        values = {}
        if full_score is not None and math.isfinite(full_score):
            values["full_score"] = np.float64(full_score)
        if shares is not None:
            values["shares"] = shares.detach().cpu().contiguous().numpy()
        if values:
            from moeguard.provenance import maker

            values["made_by"] = np.array(json.dumps(maker(), sort_keys=True))   # a string array: no pickle
            kept.write_arrays(self.folder, "original", values, key=self.key)
            kept.note(self.folder)   # an interrupt from here on names it as kept work

    def drop(self) -> None:
        from moeguard import kept

        kept.forget(self.folder)
