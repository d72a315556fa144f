"""PrunePlan -> a physically smaller checkpoint on disk, in memory or by streaming surgery.

Everything checkable is checked before weights are read: the model's config and family, the
plan against a meta-device copy (layers named, expert indices, router minimums, equal counts
for a vanilla-loadable config). The output appears only when complete (``atomic_dir``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from moeguard.errors import MoeguardError
from moeguard.io import atomic_dir, check_output, write_json
from moeguard.models.adapter import MoEAdapter
from moeguard.models.loading import inspect, meta_model
from moeguard.pruning.plan import PrunePlan, check_plan
from moeguard.provenance import run_record

from moeguard.pruning.checkpoint import check_apart, RECORD_NAME as RECORD
from moeguard.pruning.checkpoint import previous_records, side_files


def preflight(model_ref: str | None, plan: PrunePlan, out: str | Path, *, overwrite: bool):
    """Validate everything before any weights are read; returns (ref, config, adapter, keep)."""
    check_output(out, overwrite=overwrite)
    ref, config, family = inspect(model_ref)
    if ref.path is not None:
        check_apart(ref.path, Path(out))     # before anything is read or written: the input is never touched
    adapter = MoEAdapter(meta_model(config))
    keep = check_plan(plan, adapter)
    from moeguard.models.prune import pruned_config

    pruned_config(adapter, keep)  # refuses what the family cannot express (e.g. DeepSeek groups)
    return ref, config, adapter, keep


def write_pruned(model_ref: str | None, plan: PrunePlan, out: str | Path, *, overwrite: bool = False,
                 streaming: bool | None = None, progress: Any = None, settings: dict | None = None) -> dict[str, Any]:
    """Prune ``model_ref`` by ``plan`` into ``out``. ``streaming=None`` picks streaming surgery
    for a local checkpoint (weights are never loaded) and in-memory pruning for a hub id."""
    ref, config, adapter, keep = preflight(model_ref, plan, out, overwrite=overwrite)
    if streaming is None:
        streaming = ref.path is not None
    if streaming and ref.path is None:
        raise MoeguardError(f"--streaming needs a local checkpoint, got hub id {ref.hub_id}",
                            hint=f"download it first: hf download {ref.hub_id} --local-dir DIR")
    extra = {"plan": plan.to_dict(), "run": run_record(settings or {}), "loadable_by": loadable_by(keep)}
    if streaming:
        from moeguard.pruning.checkpoint import prune_checkpoint

        return prune_checkpoint(ref.path, Path(out), keep, overwrite=overwrite, progress=progress, extra=extra)
    return _in_memory(ref, keep, Path(out), overwrite=overwrite, extra=extra)


def _in_memory(ref, keep, out: Path, *, overwrite: bool, extra: dict) -> dict[str, Any]:
    from moeguard.models.loading import load_model
    from moeguard.models.prune import prune_model

    model, tokenizer, _ = load_model(ref.name, dtype=checkpoint_dtype(ref))
    small, record = prune_model(model, keep, share_unchanged=True)   # the source is dropped: nothing to copy for it
    del model
    record = {**record, "method": "in_memory", "source": ref.recorded, **previous_records(ref.path), **extra}
    save_checkpoint(small, tokenizer, ref, out, overwrite=overwrite, records={RECORD: record})
    return record


def loadable_by(keep: dict) -> str:
    """Who loads a checkpoint cut to ``keep`` (layer -> kept or centre experts): vanilla transformers
    when every layer keeps the same count."""
    if len({len(v) for v in keep.values()}) == 1:
        return "transformers"
    return ("moeguard.models.loading.load_model (per-layer expert counts; vanilla transformers configs "
            "hold one count and refuse it with a size mismatch)")


def save_checkpoint(model, tokenizer, ref, out: Path, *, overwrite: bool, records: dict[str, dict]) -> None:
    """A model made in memory from ``ref`` (pruned or merged) into ``out``, atomically: its
    weights, the tokenizer, what else the owner shipped beside the weights, and ``records``
    (file name -> JSON)."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        source = weights_folder(ref)
        if source is not None:
            keep_source_dtypes(tmp, source)
        if tokenizer is not None:
            from moeguard.models.tokenizer_files import save_tokenizer

            save_tokenizer(tokenizer, tmp)
        if source is not None:  # what else the owner shipped (licence, README) goes along, as streaming does
            from moeguard.models.safetensorsfiles import safetensors_files

            copies, skipped = side_files(source, safetensors_files(source))   # a hub id's too: its cached snapshot
            for f in copies:
                if not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
            from moeguard.pruning.checkpoint import resave_linked

            # the tokenizer is saved above; a link out of the folder otherwise (a NOTES.txt) is said
            written = {p.name for p in tmp.iterdir()}
            resave_linked(source, tmp, [n for n in skipped if n not in written])
        for name, doc in records.items():
            write_json(tmp / name, doc)


def weights_folder(ref) -> Path | None:
    """Where ``ref``'s weights lie on this machine: its folder, or the cached snapshot a hub id was
    loaded from."""
    from moeguard.models.identity import hub_snapshot

    return ref.path if ref.path is not None else (hub_snapshot(ref.hub_id) if ref.hub_id else None)


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def keep_source_dtypes(out: Path, src: Path) -> list[str]:
    """Cast each float tensor of the checkpoint just written in ``out`` back to the dtype the source
    stored it in; returns the names cast. Loading a bf16 checkpoint up-casts the parameters a family
    keeps in float32 (DeepSeek's router and its correction bias: ``_keep_in_fp32_modules_strict``),
    and ``save_pretrained`` wrote them as F32, where streaming surgery keeps the source's BF16: the
    two paths gave different files (and merged router rows rounded differently)."""
    from moeguard.io import FLOAT_DTYPES, read_header
    from moeguard.models.safetensorsfiles import safetensors_files

    source = {k: v["dtype"] for f in safetensors_files(src) for k, v in read_header(f).items() if k != "__metadata__"}
    cast: list[str] = []
    files = safetensors_files(out)
    for f in files:
        header = read_header(f)
        wrong = {k for k, v in header.items() if k != "__metadata__" and v["dtype"] in FLOAT_DTYPES
                 and source.get(k) in FLOAT_DTYPES and source[k] != v["dtype"]}
        if not wrong:
            continue
        _rewrite_cast(f, {k: source[k] for k in wrong})
        cast += sorted(wrong)
    if cast:   # the config says what the weights are now (a float32 run's config said float32)
        _config_dtype(out, src)
    index = out / "model.safetensors.index.json"
    if cast and index.exists():   # its total size counts the bytes the casts changed
        doc = json.loads(index.read_text())
        doc.setdefault("metadata", {})["total_size"] = sum(
            v["data_offsets"][1] - v["data_offsets"][0] for f in files for k, v in read_header(f).items() if k != "__metadata__")
        index.write_text(json.dumps(doc, indent=2) + "\n")
    return cast


def _rewrite_cast(f: Path, dtypes: dict[str, str]) -> None:
    """Rewrite the shard ``f`` with the tensors ``dtypes`` names cast to the dtype given, one tensor in
    memory at a time: a shard read whole (transformers writes up to 50 GB in one) held a second copy
    of the weights beside the model being saved."""
    import math

    import torch
    from safetensors import safe_open

    from moeguard.io import read_header
    from moeguard.pruning.shards import _ITEMSIZE, header_bytes

    header = read_header(f)
    meta = header.pop("__metadata__", None)
    items = sorted(((k, dtypes.get(k, v["dtype"]), v["shape"]) for k, v in header.items()),
                   key=lambda x: (-_ITEMSIZE[x[1]], x[0]))   # safetensors' order: aligned to each dtype
    head, _ = header_bytes([(k, dtype, shape, math.prod(shape) * _ITEMSIZE[dtype]) for k, dtype, shape in items], meta)
    tmp = f.with_name(f".{f.name}.dtype")
    try:
        with safe_open(str(f), "pt") as fh, open(tmp, "wb") as out:
            out.write(head)
            for k, dtype, _ in items:
                t = fh.get_tensor(k)
                if k in dtypes:
                    t = t.to(getattr(torch, _TORCH_DTYPES[dtype]))
                out.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
                del t
        os.replace(tmp, f)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_dtype(ref):
    """The dtype to load ``ref`` in so that a model rewritten from it keeps its own on disk
    (pruning or merging must not up-cast a bf16 model to fp32); "auto" for a hub id."""
    import torch

    return (_dtype_of(ref.path) or torch.float32) if ref.path is not None else "auto"


def _dtype_of(path: Path):
    import torch

    name = _dtype_name(path)
    return getattr(torch, name, None) if name is not None else None


def _dtype_name(path: Path) -> str | None:
    """The dtype checkpoint ``path`` is in: the one its config declares, else the one most of its
    weights are stored in (float32 loaded a bf16 model at twice its size, saved as float32); None
    where its config cannot be read."""
    try:
        config = json.loads((path / "config.json").read_text())
        name = config.get("dtype") or config.get("torch_dtype")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or name == "auto":   # a config that does not say: what the weights are stored in
        name = _stored_dtype(path)
    return name if isinstance(name, str) else None


def _stored_dtype(path: Path) -> str | None:
    """The float dtype most of the checkpoint's bytes are stored in (its safetensors headers), or None."""
    from moeguard.io import read_header
    from moeguard.models.safetensorsfiles import safetensors_files

    sizes: dict[str, int] = {}
    try:
        for f in safetensors_files(path):
            for k, v in read_header(f).items():
                if k != "__metadata__" and v["dtype"] in _TORCH_DTYPES:
                    sizes[v["dtype"]] = sizes.get(v["dtype"], 0) + v["data_offsets"][1] - v["data_offsets"][0]
    except (OSError, ValueError, KeyError, MoeguardError):
        return None
    return _TORCH_DTYPES[max(sizes, key=sizes.get)] if sizes else None


def _config_dtype(out: Path, src: Path) -> None:
    """Set ``out``'s config dtype to the source's (:func:`_dtype_name`)."""
    name = _dtype_name(src)
    path = out / "config.json"
    if name is None or not path.exists():
        return
    config = json.loads(path.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    if all(config.get(k) == name for k in keys):
        return
    for k in keys:
        config[k] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
