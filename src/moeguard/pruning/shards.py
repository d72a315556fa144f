"""Safetensors shards written by hand, tensor by tensor: the header computed from shapes first, then
each tensor's bytes streamed in row chunks (or copied by the kernel where they are a plain run of
the source's rows). The streaming surgery (``checkpoint.py``) plans the tensors; the synthetic
checkpoints of ``models/synthetic.py`` are written the same way."""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from moeguard.errors import MoeguardError
from moeguard.io import ShardReader

INDEX_NAME = "model.safetensors.index.json"
_CHUNK = 8 << 20         # bytes per read, so no single read maps or holds a whole large tensor


# Bytes per element of safetensors dtypes; also orders a shard so every tensor is aligned.
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor and where its bytes come from."""

    file: Path                         # source shard
    name: str                          # source key
    out_name: str
    dtype: str
    shape: tuple[int, ...]             # output shape
    nbytes: int                        # output bytes
    runs: tuple[tuple[int, int], ...]  # source dim-0 row ranges, in order; () for a 0-d tensor
    row_bytes: int
    flat: bool = False                 # experts on the last axis of a [1, ..., E] tensor: runs index elements
    # a merge: per-expert keys, ((file, key, weight), ...) of the members; fused or flat, per output
    # expert ((source expert, weight), ...) of its members. None: a plain copy of ``runs``
    mix: tuple | None = None
    keyed: bool = False                # ``mix`` names member keys (a per-expert layout), not rows of ``name``
    block: int = 1                     # source rows per expert (DBRX's [E*I, d] blocks: I)


def write_safetensors(path: Path, tensors: list[PlannedTensor], reader: "PlanReader", *,
                      metadata: dict[str, str], advance=None) -> int:
    """Write one shard tensor by tensor; returns the file size."""
    # Largest items first (as safetensors orders them) keeps every tensor aligned to its dtype.
    tensors = sorted(tensors, key=lambda t: -_ITEMSIZE.get(t.dtype, 0))
    head, offset = header_bytes([(t.out_name, t.dtype, list(t.shape), t.nbytes) for t in tensors], metadata)
    ranges_of = getattr(reader, "ranges", None)
    with open(path, "wb") as f:
        f.write(head)
        for t in tensors:
            ranges = ranges_of(t) if ranges_of is not None else None
            if ranges is not None and _copy_ranges(f, ranges):
                if advance is not None:
                    advance(t.nbytes)
                continue
            written = 0
            for chunk in reader.chunks(t):
                f.write(chunk)
                written += chunk.nbytes
                if advance is not None:
                    advance(chunk.nbytes)
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}")
        size = f.tell()
    if size != len(head) + offset:
        raise RuntimeError(f"{path.name}: {size} bytes, header describes {len(head) + offset}")
    return size


def header_bytes(entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str] | None) -> tuple[bytes, int]:
    """A safetensors file's head (its 8-byte length and the JSON header, padded to 8 bytes) for tensors
    ``(name, dtype, shape, nbytes)`` laid out in this order, and the data bytes they take."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offset


def _copy_ranges(f, ranges: list[tuple[int, int, int]]) -> bool:
    """Append the source byte ranges ``(fd, offset, length)`` to ``f`` inside the kernel
    (``copy_file_range``: no copy through this process, as ``cp`` does); False, with ``f`` where it
    was, where the kernel or filesystem cannot (another filesystem, an old kernel): the caller
    then writes the tensor through memory."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None:
        return False
    f.flush()
    start = pos = f.tell()
    try:
        for fd, offset, length in ranges:
            while length:
                n = copy(fd, f.fileno(), length, offset, pos)
                if n <= 0:
                    raise OSError("copy_file_range copied nothing")
                offset, pos, length = offset + n, pos + n, length - n
    except OSError:
        f.seek(start)
        return False
    f.seek(pos)
    return True


class PlanReader(ShardReader):
    """Row chunks of planned tensors, as bytes; and, for a plain copy of rows, where those bytes
    lie in the source file (``ranges``), so they can be copied without passing through memory."""

    def __init__(self, headers: dict[Path, dict] | None = None):
        super().__init__()
        self.headers = headers or {}
        self._fds: dict[Path, int] = {}
        self._starts: dict[Path, int] = {}

    def ranges(self, t: PlannedTensor) -> list[tuple[int, int, int]] | None:
        """``(fd, offset, length)`` of ``t``'s kept rows in its source file, or None unless ``t`` is
        a plain copy of whole rows in the source's own dtype."""
        entry = self.headers.get(t.file, {}).get(t.name)
        if t.mix is not None or t.flat or not t.runs or entry is None or entry.get("dtype") != t.dtype:
            return None
        if t.file not in self._fds:
            self._fds[t.file] = os.open(t.file, os.O_RDONLY)
            with open(t.file, "rb") as h:
                self._starts[t.file] = 8 + struct.unpack("<Q", h.read(8))[0]
        base = self._starts[t.file] + int(entry["data_offsets"][0])
        out = [(self._fds[t.file], base + a * t.row_bytes, (b - a) * t.row_bytes) for a, b in t.runs]
        return out if sum(n for _, _, n in out) == t.nbytes else None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        super().close()

    def chunks(self, t: PlannedTensor) -> Iterator:
        if t.mix is not None:
            yield from self._mixed(t)
            return
        if not t.runs:
            yield _as_bytes(self.read(t.file, t.name))
            return
        if t.flat:   # a [1, ..., E] vector: small, read whole and cut
            flat = self.read(t.file, t.name).reshape(-1)
            for start, stop in t.runs:
                yield _as_bytes(flat[start:stop])
            return
        step = max(1, _CHUNK // max(t.row_bytes, 1))
        for start, stop in t.runs:
            for a in range(start, stop, step):
                yield _as_bytes(self.read(t.file, t.name, slice(a, min(a + step, stop))))


    def _mixed(self, t: PlannedTensor) -> Iterator:
        """A merged tensor's bytes: every merged expert the weighted sum of its members, in
        float64 and in cluster order as in memory (``weighted_sum``), so the two are bit-identical.
        Per-expert keys are summed in row chunks; a fused tensor one expert row at a time."""
        from moeguard.pruning.merging.operation import weighted_sum

        if t.keyed:   # per-expert keys: the members are whole tensors of the same shape
            rows = t.shape[0] if t.shape else 0
            step = max(1, _CHUNK // max(t.row_bytes, 1))
            for a in (range(0, rows, step) if rows else [None]):
                index = None if a is None else slice(a, min(a + step, rows))
                parts = [self.read(f, n, index) for f, n, _ in t.mix]
                yield _as_bytes(weighted_sum(parts, [w for _, _, w in t.mix]).to(parts[0].dtype))
            return
        if t.flat:
            flat = self.read(t.file, t.name).reshape(-1)
            for members in t.mix:
                yield _as_bytes(weighted_sum([flat[e:e + 1] for e, _ in members], [w for _, w in members]).to(flat.dtype))
            return
        for members in t.mix:
            parts = [self.read(t.file, t.name, slice(e * t.block, (e + 1) * t.block)) for e, _ in members]
            yield _as_bytes(weighted_sum(parts, [w for _, w in members]).to(parts[0].dtype))


def _as_bytes(tensor):
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def assign_shards(plan: list[PlannedTensor], *, sharded: bool, max_shard_bytes: int | None) -> list[tuple[str, list[PlannedTensor]]]:
    """Output files: one per source shard, or greedy packing up to ``max_shard_bytes``."""
    groups: list[list[PlannedTensor]] = []
    if max_shard_bytes is None:
        by_file: dict[Path, list[PlannedTensor]] = {}
        for t in plan:
            by_file.setdefault(t.file, []).append(t)
        groups = [g for g in by_file.values() if g]
    else:
        size = 0
        for t in plan:
            if not groups or (size + t.nbytes > max_shard_bytes and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        sharded = len(groups) > 1
    if not sharded:
        return [("model.safetensors", [t for g in groups for t in g])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def write_index(directory: Path, shards: list[tuple[str, list[PlannedTensor]]], total: int) -> None:
    """``model.safetensors.index.json`` for ``assign_shards``' files (none for a single file)."""
    if shards[0][0] == "model.safetensors":
        return
    weight_map = {t.out_name: name for name, tensors in shards for t in tensors}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def check_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out.resolve().parent).free
    if free < needed:
        raise MoeguardError(f"the pruned checkpoint needs {needed / 1e9:.2f} GB, but {out.parent} has "
                            f"{free / 1e9:.2f} GB free", hint="free disk space or write elsewhere")
