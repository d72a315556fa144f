"""Expert pruning directly on safetensors files: the model's weights are never loaded.

Each output tensor is either a source tensor copied unchanged or a source tensor cut to the kept
experts on dim 0 (renumbered, for per-expert keys). Output shards are written in the safetensors
format by hand: the header is computed from shapes first, then tensor bytes stream in row chunks.
Memory therefore stays a few tens of MB above the interpreter whatever the model size
(:class:`moeguard.io.ShardReader`).

The on-disk layout is not the in-memory one (transformers converts fused experts to each
family's public layout on save), so which tensors are cut is described by module names as data
in each family's spec (:meth:`moeguard.models.families.FamilySpec.disk_layout`), never by family
branches.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from moeguard.errors import MoeguardError
from moeguard.io import (FLOAT_DTYPES, SCALE_SUFFIXES, check_output, digest, dumps, partial_path, read_header, resumable_dir,
                         started_with, sync_file)
from moeguard.models.families import FAMILIES, DiskLayout, expert_axis, family_for_config
from moeguard.models.identity import weights_identity
from moeguard.models.loading import ModelRef, load_config, meta_model
from moeguard.models.safetensorsfiles import check_safetensors, safetensors_files, tensor_names
from moeguard.pruning.shards import (INDEX_NAME, PlannedTensor, PlanReader, assign_shards, check_space, write_index,
                                     write_safetensors)

RECORD_NAME = "moeguard_pruning.json"
MERGE_RECORD_NAME = "moeguard_merging.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def _runs(kept: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted indices -> maximal [start, stop) ranges, so consecutive experts are one read."""
    out: list[list[int]] = []
    for e in kept:
        if out and out[-1][1] == e:
            out[-1][1] = e + 1
        else:
            out.append([e, e + 1])
    return tuple((a, b) for a, b in out)


class _LayerKeys:
    """Matches a tensor key inside a sparse block of one of the stacks: group(1) is the layer's
    index (counted on across stacks: an encoder-decoder's decoder layers follow its encoder's),
    group(2) the module under the block, group(3) the rest of the key."""

    def __init__(self, stacks: dict[str, int], blocks: list[str], block_offsets: dict[str, int] | None = None):
        # stacks: path -> index of its first layer; block_offsets: a further sparse block of each layer
        # (JetMoE's attention) -> what its MoE layer index adds to its decoder layer's
        alternation = "|".join(re.escape(s) for s in stacks)
        names = "|".join(re.escape(b) for b in blocks)
        self._re = re.compile(rf"^({alternation})\.(\d+)\.({names})\.([^.]+)(.*)$")
        self._offset, self._blocks = stacks, block_offsets or {}

    def match(self, name: str):
        m = self._re.match(name)
        return None if m is None else _LayerKey(m, self._offset[m.group(1)] + self._blocks.get(m.group(3), 0))


class _LayerKey:
    def __init__(self, m: re.Match, offset: int):
        self._m, self._offset = m, offset

    def group(self, i: int) -> str:
        return str(self._offset + int(self._m.group(2))) if i == 1 else self._m.group(i + 2)

    def start(self, i: int) -> int:
        return self._m.start(i + 2)


def block_offsets(adapter) -> dict[str, int]:
    """Each further sparse block of a layer (JetMoE's attention) -> what its MoE layer index adds to
    its decoder layer's (``FamilySpec.more_block_attrs``)."""
    n = len(adapter.decoder_layers)
    return {a: (j + 1) * n for j, a in enumerate(adapter.family.more_block_attrs)}


def plan_tensors(files: list[Path], headers: dict[Path, dict], *, layers_path: str | dict[str, int],
                 experts: dict[int, int], keep: dict[int, list[int]],
                 layout: DiskLayout | None = None, merge: dict[int, list] | None = None,
                 block_offsets: dict[str, int] | None = None) -> list[PlannedTensor]:
    """Every output tensor, in source order; raises before any write when the layout is not understood.

    ``layers_path``: where the layers are, or each stack's path and the index of its first layer.

    ``experts`` maps each MoE decoder layer to its expert count; other layers are copied.
    ``layout``: the family's module names (``FamilySpec.disk_layout()``); None for a checkpoint
    of unknown family, read with every name any registered family uses. ``merge``: per layer,
    (centre, members, weights) of each cluster (``operation.cluster_weights``); the centres are
    ``keep``, and each kept expert's slice becomes its cluster's weighted average.
    """
    if layout is None:   # the decoder-only families' names (they share the per-expert key pattern)
        layout = DiskLayout.union(f.disk_layout() for f in FAMILIES.items() if not f.encoder_decoder)
    key_re = _LayerKeys(layers_path if isinstance(layers_path, dict) else {layers_path: 0}, list(layout.block_names),
                        block_offsets)
    new_index = {li: {e: i for i, e in enumerate(kept)} for li, kept in keep.items()}
    found: dict[int, dict[str, set]] = {li: {"router": set(), "experts": set()} for li in experts}
    per_expert_seen: dict[tuple[int, str], set[int]] = {}
    mixes = {li: {c: (g, [float(x) for x in w]) for c, g, w in clusters} for li, clusters in (merge or {}).items()}
    if merge:
        _check_mergeable(files, headers, key_re, set(mixes))
    where = _per_expert_keys(files, headers, key_re, layout) if merge else {}
    plan: list[PlannedTensor] = []
    for file in files:
        header = headers[file]
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            shape = tuple(int(s) for s in info["shape"])
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            row_bytes = nbytes // shape[0] if shape and shape[0] else 0
            whole = ((0, shape[0]),) if shape else ()
            m = key_re.match(name)
            li = int(m.group(1)) if m else None
            if m is None or li not in experts or m.group(2) in layout.shared_modules:
                plan.append(PlannedTensor(file, name, name, info["dtype"], shape, nbytes, whole, row_bytes))
                continue
            module, rest, n_exp = m.group(2), m.group(3), experts[li]
            per = layout.per_expert.match(module + rest)
            if per is not None:
                e = int(per.group(1))
                if e >= n_exp:
                    raise MoeguardError(f"{file.name}: {name} is expert {e}, but layer {li} has {n_exp} experts",
                                        hint="the checkpoint's weights do not match its config.json")
                per_expert_seen.setdefault((li, per.group(2)), set()).add(e)
                found[li]["experts"].add(name)
                if e in new_index[li]:
                    out_name = name[: m.start(2)] + f"{layout.per_expert_name.format(new_index[li][e])}.{per.group(2)}"
                    if li in mixes:   # the centre's key: the weighted sum of its members' keys
                        g, w = mixes[li][e]
                        try:
                            mix = tuple((*where[(li, per.group(2), j)], wj) for j, wj in zip(g, w))
                        except KeyError as exc:
                            raise MoeguardError(f"layer {li}: expert {exc.args[0][2]} has no {per.group(2)} tensor",
                                                hint="the checkpoint is incomplete; re-download it") from None
                        plan.append(PlannedTensor(file, name, out_name, info["dtype"], shape, nbytes, whole, row_bytes,
                                                  mix=mix, keyed=True))
                    else:
                        plan.append(PlannedTensor(file, name, out_name, info["dtype"], shape, nbytes, whole, row_bytes))
                continue
            role = "router" if module in layout.router_modules else "experts" if module in layout.expert_modules else None
            if role is None:
                if shape and shape[0] == n_exp:
                    raise MoeguardError(
                        f"{file.name}: {name} sits in the sparse block of layer {li} with {n_exp} rows, and "
                        "moeguard cannot tell whether they are experts",
                        hint="prune this checkpoint in memory (--in-memory), or report its layout")
                plan.append(PlannedTensor(file, name, name, info["dtype"], shape, nbytes, whole, row_bytes))
                continue
            kept = keep[li]
            if (expert_axis(shape, n_exp) or 0) > 0:
                found[li][role].add(name)   # ERNIE's [1, E] selection bias: experts on the last axis
                plan.append(PlannedTensor(file, name, name, info["dtype"], (*shape[:-1], len(kept)),
                                          nbytes // n_exp * len(kept), _runs(kept), nbytes // n_exp, flat=True,
                                          mix=_rows_mix(mixes.get(li), kept)))
                continue
            # rows per expert: 1, or a block of rows in a blocked layout ([E*I, d], DBRX)
            block = shape[0] // n_exp if shape and layout.blocked and shape[0] % n_exp == 0 else 1
            if not shape or shape[0] != n_exp * block or nbytes % n_exp:
                raise MoeguardError(f"{file.name}: {name} has shape {list(shape)}; its dim 0 should be the "
                                    f"{n_exp} experts of layer {li}",
                                    hint="the checkpoint's weights do not match its config.json, or its layout is unsupported")
            found[li][role].add(name)
            plan.append(PlannedTensor(file, name, name, info["dtype"], (len(kept) * block, *shape[1:]),
                                      row_bytes * block * len(kept), tuple((a * block, b * block) for a, b in _runs(kept)),
                                      row_bytes, mix=_rows_mix(mixes.get(li), kept), block=block))
    for li, roles in found.items():
        for role, names in roles.items():
            if not names:
                raise MoeguardError(f"no {role} tensors of MoE layer {li} were found in the checkpoint",
                                    hint="its on-disk layout is not one moeguard knows; prune it in memory instead")
    for (li, suffix), seen in per_expert_seen.items():
        if seen != set(range(experts[li])):
            missing = sorted(set(range(experts[li])) - seen)
            raise MoeguardError(f"layer {li}: experts {missing} have no {suffix} tensor",
                                hint="the checkpoint is incomplete; re-download it")
    return plan


def _check_mergeable(files, headers, key_re, layers: set[int]) -> None:
    """Averaging needs float values: fp8 codes, packed blocks and their scales are not numbers
    that average (the sum of two codes is not the code of the mean). Refused before any write."""
    for file in files:
        for name, info in headers[file].items():
            m = key_re.match(name) if name != "__metadata__" else None
            if m and int(m.group(1)) in layers and (info["dtype"] not in FLOAT_DTYPES or name.endswith(
                    (*SCALE_SUFFIXES, "_scale", ".qweight", ".qzeros"))):
                raise MoeguardError(f"{file.name}: {name} is stored as {info['dtype']} (quantized); merging averages "
                                    "expert weights, which quantized storage cannot do",
                                    hint="dequantize the checkpoint to bf16/fp16/fp32 first, then merge it")


def _rows_mix(clusters: dict | None, kept: list[int]) -> tuple | None:
    """Per kept expert, in output order: its members and their weights (a fused or flat tensor)."""
    if clusters is None:
        return None
    return tuple(tuple(zip(clusters[c][0], clusters[c][1])) for c in kept)


def _per_expert_keys(files, headers, key_re, layout) -> dict[tuple[int, str, int], tuple[Path, str]]:
    """(layer, suffix, expert) -> (file, key) of every per-expert tensor: a merged key reads its
    members wherever the shards put them."""
    out = {}
    for file in files:
        for name in headers[file]:
            m = key_re.match(name)
            per = layout.per_expert.match(m.group(2) + m.group(3)) if m else None
            if per is not None:
                out[(int(m.group(1)), per.group(2), int(per.group(1)))] = (file, name)
    return out


def check_apart(src: Path, out: Path) -> None:
    """Refuse an output that is, holds or lies inside the source checkpoint: writing there (and
    --overwrite's swap, which deletes what it replaces) would change or delete the input."""
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise MoeguardError(f"output {out} overlaps the source checkpoint {src}",
                            hint="write the pruned checkpoint to a separate directory")


def side_files(src: Path, weight_files: list[Path]) -> tuple[list[Path], list[str]]:
    """Top-level files copied unchanged, and entries left out (other weights, folders, and links that
    lead out of the checkpoint)."""
    # moeguard_card.json holds the *full* model's measured numbers; they do not describe the copy
    rewritten = {"config.json", INDEX_NAME, RECORD_NAME, MERGE_RECORD_NAME, "moeguard_card.json"} | {f.name for f in weight_files}
    copy, skipped = [], []
    for p in sorted(src.iterdir()):
        if p.name in rewritten:
            continue
        # weights in other formats would be unpruned copies that a loader could pick up instead
        if not p.is_file() or p.name.endswith(_WEIGHT_SUFFIXES) or p.name.startswith(".") or not _own_file(src, p):
            skipped.append(p.name)
        else:
            copy.append(p)
    return copy, skipped


def _own_file(src: Path, p: Path) -> bool:
    """Whether ``p`` (an entry of the checkpoint folder ``src``) is the checkpoint's own file, copied
    byte for byte: a link is followed only into the folder itself, or, in a hub snapshot, into its
    repository's blobs/ (every file of a snapshot is such a link). A received checkpoint's NOTES.txt ->
    /proc/self/environ (HF_TOKEN) or -> ~/.ssh/id_rsa was copied into the pruned checkpoint a user then
    publishes. Tokenizer and generation files linked from elsewhere (a symlink farm of a shared model,
    an older hub download's local_dir) are written again from what transformers reads (``resave_linked``)."""
    if not p.is_symlink():
        return True
    try:
        target, root = p.resolve(strict=True), src.resolve()
    except (OSError, RuntimeError):   # a dangling link, a loop
        return False
    roots = [root]
    repo = root.parents[1] if len(root.parents) > 1 else None
    if root.parent.name == "snapshots" and repo is not None and repo.name.startswith("models--"):
        roots.append(repo / "blobs")   # <cache>/models--org--name/snapshots/<commit>/x -> ../../blobs/<hash>
    return target.is_file() and any(r in target.parents for r in roots)


# what transformers reads a tokenizer and a generation config from: re-written through it where the
# checkpoint links them from outside its folder (they are not copied then: _own_file)
RESAVED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
           "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.tiktoken",
           "chat_template.jinja", "chat_template.json", "generation_config.json")


def resave_linked(src: Path, dst: Path, skipped: list[str]) -> list[str]:
    """The tokenizer and generation config of ``src`` written to ``dst`` through transformers where
    ``skipped`` holds them as links out of ``src`` (a link named like one that is no tokenizer, one to a
    secret, fails to load and stays out, said). Returns the names still left out. Each link left out
    is said in one warning: a tokenizer missing from the output fails every later command on it."""
    import warnings

    # links left out for leading out of the folder (not those left out as weights, folders or hidden files)
    linked = [n for n in skipped if (src / n).is_symlink() and not n.startswith(".") and not n.endswith(_WEIGHT_SUFFIXES)
              and not (src / n).is_dir() and not _own_file(src, src / n)]
    redo = [n for n in linked if n in RESAVED]
    done: set[str] = set()
    if any(n != "generation_config.json" for n in redo):
        try:
            from moeguard.models.loading import load_tokenizer
            from moeguard.models.tokenizer_files import save_tokenizer

            save_tokenizer(load_tokenizer(str(src)), dst)
            done |= {n for n in redo if n != "generation_config.json"}
        except Exception:  # noqa: BLE001 -- not a tokenizer transformers reads: it stays out, said below
            pass
    if "generation_config.json" in redo:
        try:
            from transformers import GenerationConfig

            GenerationConfig.from_pretrained(str(src)).save_pretrained(dst)
            done.add("generation_config.json")
        except Exception:  # noqa: BLE001 -- as above
            pass
    left = [n for n in linked if n not in done]
    if left:
        warnings.warn(f"{src}: {', '.join(left)} link(s) out of the checkpoint's folder and are not copied (a link "
                      "could lead to any file of this machine); copy the files into the folder to ship them", stacklevel=2)
    return [n for n in skipped if n not in done]


def _finished(shard: Path, tensors: list) -> bool:
    """Whether an interrupted run's ``shard`` is whole and holds the planned tensors: its header tiles
    the file exactly (``check_safetensors``) and names them. Anything else is written again."""
    return tensor_names(shard) == {t.out_name for t in tensors}


def _read_checkpoint(src: Path):
    """``(config, family, weight files, their headers, sharded)`` of the checkpoint ``src``, each file a
    valid safetensors file and, sharded, its index naming them."""
    config = load_config(ModelRef(str(src), src, None))
    family = family_for_config(config)
    files = safetensors_files(src)
    for f in files:
        check_safetensors(f)
    headers = {f: read_header(f) for f in files}
    # transformers reads model.safetensors before an index beside it (safetensors_files): a stale index
    # next to a single file is not this checkpoint's (and is not copied)
    sharded = files != [src / "model.safetensors"]
    if sharded:
        _check_index(src, files, headers)
    return config, family, files, headers, sharded


def check_merge_files(src: Path) -> None:
    """Before a capped merge loads and calibrates: the checkpoint's files are valid safetensors, its
    index names them, and its MoE layers' experts are stored as floats. These were checked when the
    merged shards were written, after the offloaded load and every calibration forward (an MXFP4 or
    FP8 release was refused at the end)."""
    from moeguard.models.adapter import MoEAdapter

    config, family, files, headers, _ = _read_checkpoint(src)
    adapter = MoEAdapter(meta_model(config), family=family)
    stacks = disk_stacks(family, adapter, headers)
    key_re = _LayerKeys(stacks, list(family.disk_layout().block_names), block_offsets(adapter))
    _check_mergeable(files, headers, key_re, {l.index for l in adapter.layers})


def prune_checkpoint(src: Path, out: Path, keep: dict[int, list[int]], *, overwrite: bool = False,
                     progress=None, max_shard_bytes: int | None = None, extra: dict | None = None,
                     merge: dict[int, list] | None = None) -> dict:
    """Write to ``out`` the checkpoint ``src`` keeping ``keep[layer]`` (original expert indices).
    With ``merge`` (per layer, ``operation.cluster_weights``; the centres are ``keep``), each kept
    expert is its cluster's weighted average and the record is ``moeguard_merging.json``.

    Layers not in ``keep`` keep every expert; counts may differ per layer (a budget plan; see models.prune.PER_LAYER_KEY). The
    output appears only once complete; ``src`` is only read. Returns the pruning record, also
    written to ``out/moeguard_pruning.json``.
    """
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.hooks import normalize_keep
    from moeguard.models.prune import original_counts, pruned_config

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise MoeguardError(f"source checkpoint {src} is not a directory", hint="pass a checkpoint directory holding config.json")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise MoeguardError(f"max_shard_bytes is {max_shard_bytes}", hint="pass a positive size in bytes, or None")
    check_apart(src, out)
    check_output(out, overwrite=overwrite)
    config, family, files, headers, sharded = _read_checkpoint(src)

    if merge is not None:   # as merge_experts refuses it: both merge paths give the same model or none
        from moeguard.models.handle import check_merge_route

        check_merge_route(family, True)
    adapter = MoEAdapter(meta_model(config), family=family)
    keep = normalize_keep(adapter, keep)
    new_config, changes = pruned_config(adapter, keep)
    # each stack's path on disk -> the index of its first layer
    stacks = disk_stacks(family, adapter, headers)
    plan = plan_tensors(files, headers, layers_path=stacks,
                        experts={l.index: l.num_experts for l in adapter.layers}, keep=keep,
                        layout=family.disk_layout(), merge=merge, block_offsets=block_offsets(adapter))
    # tensors transformers does not load (DeepSeek-V3's and GLM-4.5's multi-token-prediction layer past the
    # decoder's, qwen3_next's mtp.*): copied whole they kept every expert beside a config of K, and the
    # in-memory path, which loads through transformers, never wrote them
    plan, dropped = _loaded_only(plan, adapter, stacks)
    shards = assign_shards(plan, sharded=sharded, max_shard_bytes=max_shard_bytes)
    copies, skipped = side_files(src, files)
    tensor_bytes = sum(t.nbytes for t in plan)
    # Resumable: each shard is written under a temporary name and renamed when whole, so a killed run
    # (a 90 GB checkpoint) continues with the shards it had not finished when started again with the
    # same source weights, plan, sharding and shard plan; anything else starts over. The merge's weights go
    # in as full floats (str() of a tensor keeps four decimals: another merge's shards matched). The shard
    # plan's own digest: after an upgrade that changes which tensors are written (a dropped MTP layer) the
    # old run's shards, of other names, were moved into the output beside the new ones
    clusters = {str(l): [[centre, list(members), [float(x) for x in (w.tolist() if hasattr(w, "tolist") else w)]]
                         for centre, members, w in parts] for l, parts in sorted(merge.items())} if merge else None
    stamp = {"source": weights_identity(str(src)), "keep": {str(k): v for k, v in sorted(keep.items())},
             "merge": clusters, "max_shard_bytes": max_shard_bytes,
             "shards": digest([[name, [t.name for t in tensors]] for name, tensors in shards])}
    # shards an interrupted run of this stamp finished (another stamp's are deleted, so they free no space)
    partial, same = partial_path(out), started_with(out, stamp)
    kept = sum((partial / name).stat().st_size for name, _ in shards if same and (partial / name).is_file())
    check_space(out, tensor_bytes + sum(p.stat().st_size for p in copies) - kept)
    previous = previous_records(src)

    task = progress.add_task(f"writing {'merged' if merge else 'pruned'} shards", total=tensor_bytes) \
        if progress is not None else None
    advance = (lambda n: progress.advance(task, n)) if progress is not None else None
    reader = PlanReader(headers)
    bytes_out = 0
    with resumable_dir(out, overwrite=overwrite, settings=stamp) as tmp:
        try:
            for name, tensors in shards:
                if _finished(tmp / name, tensors):   # finished by the interrupted run
                    size = (tmp / name).stat().st_size
                    bytes_out += size
                    if advance is not None:
                        advance(sum(t.nbytes for t in tensors))
                    continue
                meta = {"format": "pt", **headers[tensors[0].file].get("__metadata__", {})} if tensors else {"format": "pt"}
                part = tmp / f".{name}.part"
                bytes_out += write_safetensors(part, tensors, reader, metadata=meta, advance=advance)
                sync_file(part)   # on disk before it counts as finished: a power loss left an empty "finished" shard
                os.replace(part, tmp / name)
        finally:
            reader.close()
        write_index(tmp, shards, tensor_bytes)
        for p in copies:
            shutil.copy2(p, tmp / p.name)
        skipped = resave_linked(src, tmp, skipped)   # tokenizer files linked from outside: through transformers
        with tempfile.TemporaryDirectory(dir=tmp) as cfg_dir:
            new_config.save_pretrained(cfg_dir)
            os.replace(Path(cfg_dir) / "config.json", tmp / "config.json")
        record = {
            "family": family.name,
            **original_counts(adapter),
            "num_experts": max(len(v) for v in keep.values()),
            "experts_per_layer": {str(k): len(v) for k, v in sorted(keep.items())},
            "keep": {str(k): v for k, v in sorted(keep.items())},
            "config_changes": changes,
            "method": "streaming",
            "source": str(src.resolve()),
            "bytes_in": sum(f.stat().st_size for f in files),
            "bytes_out": bytes_out,
            "shards": [name for name, _ in shards],
            "skipped_files": skipped,
            # not written: what transformers does not load (a multi-token-prediction layer: its experts unpruned)
            **({"dropped_tensors": {"count": len(dropped), "examples": dropped[:5],
                                    "why": f"{type(adapter.model).__name__}, the class transformers loads this "
                                           "checkpoint with, does not load them (multi-token-prediction layers past "
                                           "the decoder's, or a multimodal release's vision tower): they are not "
                                           "written"}} if dropped else {}),
        }
        record.update(previous)   # cutting a pruned or merged checkpoint: this record's indices are relative to it
        extra = extra or {}   # the caller's plan and provenance, inside the same atomic write
        if "run" in extra:    # made before the surgery: what it reused since (kept shards of another version)
            from moeguard.provenance import with_reused

            extra = {**extra, "run": with_reused(extra["run"])}
        if merge:   # the merging record holds this surgery's facts (those the caller does not give) as its "pruning" part
            record = {**extra, "pruning": {k: v for k, v in record.items() if k not in extra}}
        else:
            record.update(extra)
        (tmp / (MERGE_RECORD_NAME if merge else RECORD_NAME)).write_text(dumps(record, indent=2) + "\n")
    return record


# where a multimodal release keeps its language model's layers on disk, beside the text model's own path:
# Llama-4's language_model.model.layers, Qwen3.5-MoE's model.language_model.layers (transformers renames
# them when it loads; the surgery matched nothing, planned every tensor as a copy and stopped at "no router
# tensors of MoE layer N")
_WRAPPED = (lambda p: f"language_model.{p}", lambda p: p.replace("model.", "model.language_model.", 1))


def disk_stacks(family, adapter, headers: dict) -> dict[str, int]:
    """Each stack's path on disk -> the index of its first layer: the family's path where the checkpoint's
    tensor names use it, else the first of a multimodal release's that they do."""
    names = [n for h in headers.values() for n in h]
    out = {}
    for path, on_disk in zip(family.stacks, family.disk_stacks):
        found = on_disk
        if not any(n.startswith(f"{on_disk}.") for n in names):
            found = next((c for c in (w(on_disk) for w in _WRAPPED) if any(n.startswith(f"{c}.") for n in names)), on_disk)
        out[found] = adapter.stack_starts[path]
    return out


def _loaded_only(plan: list, adapter, stacks: dict[str, int]) -> tuple[list, list[str]]:
    """(the planned tensors transformers loads, the names of those it does not): layers past each
    stack's length (DeepSeek-V3's model.layers.61, GLM-4.5's 92, GLM-4.5-Air's 46: their
    multi-token-prediction layers), and, outside the stacks, names the model class's
    ``_keys_to_ignore_on_load_unexpected`` matches (qwen3_next's ``mtp.*``). The class's patterns
    are not applied to layer keys: transformers ignores only keys the model does not expect, and
    GLM's class lists both 'model.layers.92' and 'model.layers.46', the second a real layer of
    the 92-layer model."""
    patterns = list(getattr(type(adapter.model), "_keys_to_ignore_on_load_unexpected", None) or [])
    starts = list(stacks.items())
    total = len(adapter.decoder_layers)
    counts = {path: (starts[i + 1][1] if i + 1 < len(starts) else total) - first for i, (path, first) in enumerate(starts)}
    layer_res = [(re.compile(rf"{re.escape(path)}\.(\d+)\."), n) for path, n in counts.items()]

    def unloaded(name: str) -> bool:
        for r, n in layer_res:
            m = r.match(name)
            if m is not None:
                return int(m.group(1)) >= n
        return any(re.search(p, name) for p in patterns)

    out, dropped = [], []
    for t in plan:
        if unloaded(t.name):
            dropped.append(t.name)
        else:
            out.append(t)
    return out, dropped


def _previous_record(src: Path, name: str = RECORD_NAME) -> dict | None:
    try:
        return json.loads((src / name).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"unreadable": name}


def previous_records(src: Path | None) -> dict[str, dict]:
    """The source's own pruning and merging records, for the record of a checkpoint cut from it:
    its indices are relative to the source, and a merged source's record says which originals went
    into each of its experts (what trace needs as ground truth). Neither file is copied as it is."""
    if src is None:
        return {}
    found = {"previous_pruning": _previous_record(src), "previous_merging": _previous_record(src, MERGE_RECORD_NAME)}
    return {k: v for k, v in found.items() if v is not None}


def _check_index(src: Path, files: list[Path], headers: dict[Path, dict]) -> None:
    """The index must name exactly the tensors the shards hold, each once."""
    weight_map = json.loads((src / INDEX_NAME).read_text())["weight_map"]
    where: dict[str, str] = {}
    for f in files:
        for k in headers[f]:
            if k == "__metadata__":
                continue
            if k in where:
                raise MoeguardError(f"tensor {k} is in both {where[k]} and {f.name}",
                                    hint="the checkpoint is corrupt; re-download or re-save it")
            where[k] = f.name
    wrong = [k for k, v in weight_map.items() if where.get(k) != v]
    if wrong:
        raise MoeguardError(f"{INDEX_NAME} places {len(wrong)} tensors (e.g. {wrong[0]}) in shards that do not hold them",
                            hint="the checkpoint is corrupt; re-download or re-save it")
