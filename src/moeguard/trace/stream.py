"""A trace source read straight from a checkpoint's safetensors files, a slice at a time.

A trace needs little of a model (``features.Sketch``): the anchors' embedding rows, and per
expert its gate and up columns on the m sampled hidden dimensions H, its down rows on H, and its
gate sums. So a checkpoint is never loaded: the gate and up tensors are read once in row chunks
of ``CHUNK`` bytes (their columns on H, and the gate's row sums), the down tensor only on its m
rows (DBRX's blocked w2 holds down transposed, so each expert's block is read whole, in chunks),
the embedding only on the anchors' rows (the owner's fingerprint also sums its squares in
chunks). Reads go through :class:`moeguard.io.ShardReader`, which unmaps pages every 32 MB, so
resident memory stays near the interpreter plus one layer's sketch, whatever the model size.

Where each tensor sits on disk is the family's data (``FamilySpec.disk_expert_tensors``,
``disk_layout()``, ``expert_layout``), never a family branch here. Values are read in the stored
dtype and widened to float64 per chunk, so a bf16 checkpoint gives exactly the float64 numbers the
in-memory path gives, up to summation order (and float32 partial gate sums, ``_column_sums``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError
from moeguard.io import FLOAT_DTYPES, SCALE_SUFFIXES
from moeguard.trace.features import ROWS, Sketch
from moeguard.trace.weights import LayerCounts, traced_layers

CHUNK = 1 << 20              # bytes per read: its float temporaries stay small, so glibc's
                             # heap reuses them (8 MB chunks raised peak RSS by 100-250 MB)
GAP = 256 << 10              # rows closer than this are read through (``_rows``)


@dataclass(frozen=True)
class _Layer:
    index: int
    num_experts: int
    # per expert (gate, up, down) keys, or one fused (gate_up, down) pair for the whole layer, or
    # one blocked (gate, up, down-transposed) triple of [E*I, d] tensors (DBRX)
    tensors: list[tuple[str, ...]]
    fused: bool


def _float(x) -> np.ndarray:
    import torch

    return x.to(torch.float64).numpy()


def _columns(x, C: np.ndarray) -> np.ndarray:
    """x[:, C] as float64 ([r, n] -> [r, m]). The gather runs on the raw bits (numpy's take on
    an integer view is 3x faster than torch's indexing of bf16), the widening on m columns only."""
    import torch

    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return torch.from_numpy(np.take(x.view(bits).numpy(), C, axis=1)).view(x.dtype).to(torch.float64).numpy()


def _column_sums(x) -> np.ndarray:
    """[r, d] -> [d] float64: float32 sums of 64-row blocks, then float64 across blocks. Four
    times faster than widening to float64 first (the gate-sum pass would otherwise cost more than
    reading the checkpoint), and exact for bf16 weights of similar magnitude (8-bit mantissas:
    64 of them fit float32's 24 bits); 1e-7 relative otherwise."""
    x = x.float()
    k = x.shape[0] - x.shape[0] % 64
    out = x[:k].reshape(-1, 64, x.shape[1]).sum(1).double().sum(0) if k else 0.0
    return (out + x[k:].sum(0).double()).numpy() if k < x.shape[0] else out.numpy()


@dataclass(kw_only=True)
class StreamedCheckpoint(LayerCounts):
    """A trace source (``weights.py``) over a checkpoint directory; nothing is read until asked."""

    name: str
    family: str
    layout: str                      # FamilySpec.expert_layout: how a fused pair is arranged
    where: dict[str, Path]           # tensor key -> shard
    shapes: dict[str, tuple[int, ...]]
    spans: dict[str, tuple[int, int]]  # tensor key -> its bytes' [start, stop) in the shard
    embed_key: str
    layers: list[_Layer]
    tokens: list[str]
    hidden: int
    intermediate: int
    source: dict[str, Any] = field(default_factory=dict)

    # --- opening: every check that needs no tensor data -------------------------------------
    @classmethod
    def open(cls, ref: str | None, *, name: str | None = None) -> "StreamedCheckpoint":
        """``name``: what the source is called in reports (a hub id fetched into its cache snapshot)."""
        from moeguard.io import read_header
        from moeguard.models.adapter import MoEAdapter
        from moeguard.models.loading import inspect, meta_model
        from moeguard.models.safetensorsfiles import safetensors_files

        r, config, family = inspect(ref)  # config and family checked, every shard's header validated
        files = safetensors_files(r.path)
        where: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        spans: dict[str, tuple[int, int]] = {}
        dtypes: set[str] = set()
        dtype_of: dict[str, str] = {}
        for f in files:
            header = read_header(f)
            with open(f, "rb") as fh:
                base = 8 + int.from_bytes(fh.read(8), "little")   # data start after the header
            for key, info in header.items():
                if key != "__metadata__":
                    where[key], shapes[key] = f, tuple(int(s) for s in info["shape"])
                    spans[key] = (base + info["data_offsets"][0], base + info["data_offsets"][1])
                    dtypes.add(info["dtype"])
                    dtype_of[key] = info["dtype"]
        from moeguard.models.loading import check_layer_count

        check_layer_count(config, list(where), where=str(r.path))   # before a model is built from the config
        model = meta_model(config)
        adapter = MoEAdapter(model, family=family)
        emb = model.get_input_embeddings().weight
        embed_key = family.disk_name(next(n for n, p in model.named_parameters() if p is emb))
        if embed_key not in where:
            raise MoeguardError(f"{r.path} has no tensor {embed_key} (the token embeddings)",
                                hint="the checkpoint is incomplete; re-download it")
        if len(shapes[embed_key]) != 2 or shapes[embed_key][1] != emb.shape[1]:
            raise MoeguardError(f"{r.path}: {embed_key} has shape {list(shapes[embed_key])}, expected [vocab, "
                                f"{emb.shape[1]}] (the config's hidden size)",
                                hint="the checkpoint's weights and config.json disagree; re-download it")
        hidden = shapes[embed_key][1]
        # the dtypes of what trace reads (the embedding, the experts), not of every buffer: an int64 buffer
        # was refused as "quantized", and F4, E8M0 or I16 experts reached a KeyError in _columns
        unusual = {dtype_of[k] for k in where if k == embed_key or "expert" in k} - FLOAT_DTYPES
        # llm-compressor's packed layouts (int32 weight_packed + weight_scale) and a config that says it is
        # quantized too: they reached "no expert tensors ... re-download it"
        quantized = getattr(config, "quantization_config", None)
        if quantized or any(k.endswith(SCALE_SUFFIXES) for k in where) or unusual:
            what = ", ".join(sorted(unusual)) or (f"quantization_config {dict(quantized).get('quant_method', '?')}"
                                                  if isinstance(quantized, dict) else "with scale tensors")
            raise MoeguardError(f"{r.path} stores quantized weights ({what})",
                                hint="trace streams float checkpoints (F32, F16, BF16); dequantize it first, or "
                                     "pass its GGUF export")
        lay = family.disk_layout()
        names = family.disk_expert_tensors
        layers, inter = [], None
        on_disk = dict(zip(family.stacks, family.disk_stacks))
        for l in traced_layers(adapter):
            stack, local = adapter.stack_of(l.layer_index)   # an encoder-decoder's decoder layers count on from its encoder's
            layer, I = cls._find_layer(l.index, l.num_experts, family, lay.block_names, names, where, shapes,
                                       hidden=hidden, path=r.path, at=f"{on_disk[stack]}.{local}",
                                       expert=lay.per_expert_name)
            if inter is not None and I != inter:
                raise MoeguardError(f"{r.path}: layer {l.index}'s experts have {I} neurons, layer "
                                    f"{layers[0].index}'s {inter}", hint="trace reads models with one expert size")
            inter = I
            layers.append(layer)
        if not layers:
            raise MoeguardError(f"{r.path} has no MoE layer", hint="trace reads Mixture-of-Experts checkpoints")
        odd = sorted({dtype_of[k] for layer in layers for ks in layer.tensors for k in ks} - FLOAT_DTYPES)
        if odd:   # expert tensors named without "expert" (a family's own layout) are checked here
            raise MoeguardError(f"{r.path} stores its experts as {', '.join(odd)}",
                                hint="trace streams float checkpoints (F32, F16, BF16); dequantize it first, or "
                                     "pass its GGUF export")
        tokens = cls._tokens(r.path, shapes[embed_key][0])
        return cls(name=name or r.name, family=family.name, layout=family.expert_layout, where=where, shapes=shapes, spans=spans,
                   embed_key=embed_key, layers=layers, tokens=tokens, hidden=hidden, intermediate=int(inter),
                   source={"format": "safetensors", "streamed": True, "dtypes": sorted(dtypes), "quantization": None})

    @staticmethod
    def _find_layer(index, E, family, blocks, names, where, shapes, *, hidden, path, at: str,
                    expert: str = "experts.{}") -> tuple[_Layer, int]:
        """The layer's expert tensors, with their shapes checked; returns (layer, neurons per expert).
        ``at``: the layer's key prefix on disk; ``expert``: expert e's module name under the block."""
        fix = "the checkpoint's weights do not match its config.json, or it is incomplete; re-download it"
        prefixes = [f"{at}.{b}." for b in blocks]
        if family.expert_layout == "blocked":   # three [E*I, d] tensors under the block
            found = [p for p in prefixes if f"{p}{names[0]}" in where]
            if not found:
                raise MoeguardError(f"{path}: no expert tensors of MoE layer {index} (looked for "
                                    f"{prefixes[0]}{names[0]})", hint=fix)
            keys = tuple(f"{found[0]}{n}" for n in names)
            missing = [k for k in keys if k not in where]
            if missing:
                raise MoeguardError(f"{path} lacks tensor {missing[0]}", hint=fix)
            rows = shapes[keys[0]][0] if shapes[keys[0]] else -1   # a scalar: refused below (an IndexError before)
            for k in keys:
                if len(shapes[k]) != 2 or shapes[k] != (rows, hidden) or rows % E:
                    raise MoeguardError(f"{path}: {k} has shape {list(shapes[k])}, expected [{E} x I, {hidden}]",
                                        hint=fix)
            return _Layer(index, E, [keys], fused=True), rows // E
        if len(names) == 3:
            found = [p for p in prefixes if f"{p}{expert.format(0)}.{names[0]}" in where]
            if not found:
                raise MoeguardError(f"{path}: no expert tensors of MoE layer {index} (looked for "
                                    f"{prefixes[0]}{expert.format(0)}.{names[0]})", hint=fix)
            keys = [tuple(f"{found[0]}{expert.format(e)}.{n}" for n in names) for e in range(E)]
            for ks in keys:
                missing = [k for k in ks if k not in where]
                if missing:
                    raise MoeguardError(f"{path} lacks tensor {missing[0]}", hint=fix)
            I = shapes[keys[0][0]][0] if shapes[keys[0][0]] else -1   # a scalar: refused below
            want = [(I, hidden), (I, hidden), (hidden, I)]
            for ks in keys:
                for k, w in zip(ks, want):
                    if shapes[k] != w:
                        raise MoeguardError(f"{path}: {k} has shape {list(shapes[k])}, expected {list(w)}", hint=fix)
            return _Layer(index, E, keys, fused=False), I
        found = [p for p in prefixes if f"{p}{names[0]}" in where]
        if not found:
            raise MoeguardError(f"{path}: no expert tensors of MoE layer {index} (looked for {prefixes[0]}{names[0]})",
                                hint=fix)
        gu, dn = (f"{found[0]}{n}" for n in names)
        if dn not in where:
            raise MoeguardError(f"{path} lacks tensor {dn}", hint=fix)
        for k in (gu, dn):   # [E, ., .]: read before its rank was checked (an IndexError, not one line)
            if len(shapes[k]) != 3:
                raise MoeguardError(f"{path}: {k} has shape {list(shapes[k])}, expected 3 dimensions [{E}, ., .] "
                                    "(the layer's experts stacked)", hint=fix)
        if family.expert_layout == "gate_up":
            I = shapes[gu][1] // 2
            want = [(E, 2 * I, hidden), (E, hidden, I)]
        else:  # gate_up_t, gate_up_interleaved_t: [E, d, 2I] and [E, I, d]
            I = shapes[gu][2] // 2
            want = [(E, hidden, 2 * I), (E, I, hidden)]
        for k, w in zip((gu, dn), want):
            if shapes[k] != w:
                raise MoeguardError(f"{path}: {k} has shape {list(shapes[k])}, expected {list(w)}", hint=fix)
        return _Layer(index, E, [(gu, dn)], fused=True), I

    @staticmethod
    def _tokens(path: Path, vocab: int) -> list[str]:
        from moeguard.models.loading import load_tokenizer
        from moeguard.trace.weights import token_strings

        tok = load_tokenizer(str(path), hint="trace aligns hidden dimensions through token strings; the checkpoint "
                                              "directory needs its tokenizer files (tokenizer.json)")
        return token_strings(tok, vocab)

    # --- the source interface -----------------------------------------------------------------
    @property
    def vocab(self) -> int:
        return self.shapes[self.embed_key][0]

    def embed_rows(self, ids) -> np.ndarray:
        from moeguard.io import ShardReader

        reader = ShardReader()
        try:
            return self._rows(reader, self.embed_key, (), np.asarray(ids, dtype=int))
        finally:
            reader.close()

    def embed_norms(self) -> np.ndarray:
        import torch

        from moeguard.io import ShardReader

        sq = np.zeros(self.hidden)
        reader = ShardReader()
        try:
            for _, _, x in self._chunks(reader, self.embed_key, ()):
                sq += x.to(torch.float64).square().sum(0).numpy()
        finally:
            reader.close()
        return np.sqrt(sq)

    def quant_sample(self) -> np.ndarray:
        from moeguard.io import ShardReader

        layer = self.layers[0]
        key = layer.tensors[0][0]
        lead = (0,) if layer.fused and self.layout != "blocked" else ()   # blocked: expert 0's rows come first
        r = min(-(-8192 // self.hidden), self.intermediate)       # gate rows holding 8192 values
        reader = ShardReader()
        try:
            if layer.fused and self.layout not in ("gate_up", "blocked"):  # [E, d, 2I]: gate rows G[n, :] are columns here
                x = _float(reader.read(self.where[key], key, (0, slice(None), slice(0, 2 * r))))
                x = (x[:, 0::2] if self.layout == "gate_up_interleaved_t" else x[:, :r]).T  # gpt-oss / Llama-4
            else:  # gate rows [., d] in storage order (a fused gate-up tensor holds its up rows after row I)
                x = _float(reader.read(self.where[key], key, (*lead, slice(0, r))))
        finally:
            reader.close()
        return x.reshape(-1)[:8192]

    def sketch(self, position: int, H: np.ndarray, frame) -> Sketch:
        from moeguard.io import ShardReader

        layer = self.layers[position]
        C, s = frame.cols[H], frame.signs[H]
        E, I, m = layer.num_experts, self.intermediate, len(H)
        ka, kb = np.empty((E, m, m)), np.empty((E, m, m))
        v, rows = np.empty((E, self.hidden)), np.empty((E, min(ROWS, I), m))
        reader = ShardReader()
        try:
            self._prefetch(layer, 0)
            for e in range(E):
                self._prefetch(layer, e + 1)  # the disk reads expert e + 1 while expert e is computed
                g, u, dn, v_raw = self._expert(reader, layer, e, C, I)
                g, u, dn = g * s, u * s, dn * s[:, None]          # [I, m], [I, m], [m, I]
                ka[e], kb[e] = g.T @ g, dn @ u
                v[e] = v_raw[frame.cols] * frame.signs
                rows[e] = g[:ROWS]
        finally:
            reader.close()
        return Sketch(index=layer.index, ka=ka, kb=kb, v=v, rows=rows, intermediate=I)

    # --- reads ------------------------------------------------------------------------------
    def _prefetch(self, layer: _Layer, e: int) -> None:
        """Ask the kernel to start reading expert ``e``'s bytes (``posix_fadvise(WILLNEED)``), so
        reading overlaps computing; a no-op where the call does not exist."""
        import os

        if e >= layer.num_experts or not hasattr(os, "posix_fadvise"):
            return
        ranges = []
        for key in (layer.tensors[0] if layer.fused else layer.tensors[e]):
            a, b = self.spans[key]
            if layer.fused:  # expert e's slice of a tensor fused over experts
                a, b = a + e * (b - a) // layer.num_experts, a + (e + 1) * (b - a) // layer.num_experts
            ranges.append((self.where[key], a, b - a))
        for file, offset, length in ranges:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def _chunks(self, reader, key: str, lead: tuple, *, span: tuple[int, int] | None = None):
        """(start, stop, rows) over the axis after ``lead`` of tensor ``key``, CHUNK bytes at a time;
        ``span``: only rows [a, b) of that axis, numbered from a (one expert's block of a blocked
        tensor)."""
        shape = self.shapes[key][len(lead):]
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * 4)
        step = max(1, CHUNK // row_bytes)
        first, stop = span or (0, shape[0])
        for a in range(first, stop, step):
            b = min(a + step, stop)
            yield a - first, b - first, reader.read(self.where[key], key, (*lead, slice(a, b)))

    def _rows(self, reader, key: str, lead: tuple, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (of the axis after ``lead``) of tensor ``key``, in ``idx``'s order, as
        float64. Rows closer than GAP bytes are read as one slice (up to CHUNK): a read costs
        ~50 us of overhead, more than copying a few hundred kB through the gap, and the disk
        reads ahead through such gaps anyway."""
        import torch

        shape = self.shapes[key][len(lead):]
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * 4)
        gap, most = max(1, GAP // row_bytes), max(1, CHUNK // row_bytes)
        order = np.argsort(idx, kind="stable")
        s = idx[order]
        out = np.empty((len(idx), *shape[1:]))
        breaks = [0, *(np.flatnonzero(np.diff(s) > gap) + 1).tolist(), len(s)]
        for lo, hi in zip(breaks[:-1], breaks[1:]):
            while lo < hi:  # one run, cut to reads of at most `most` rows
                end = lo + int(np.searchsorted(s[lo:hi], s[lo] + most))
                a = int(s[lo])
                x = reader.read(self.where[key], key, (*lead, slice(a, int(s[end - 1]) + 1)))
                out[order[lo:end]] = _float(x[torch.as_tensor(s[lo:end] - a)])
                lo = end
        return out

    def _expert(self, reader, layer: _Layer, e: int, C: np.ndarray, I: int):
        """Expert ``e``'s gate and up columns C [I, m], down rows C [m, I] and gate sums [d]
        (suspect frame)."""
        import torch

        g, u = np.empty((I, len(C))), np.empty((I, len(C)))
        v = np.zeros(self.hidden)
        if self.layout == "blocked":   # DBRX: expert e is rows [e*I, (e+1)*I) of w1 (gate), v1 (up), w2 (down^T)
            gk, uk, dk = layer.tensors[0]
            span = (e * I, (e + 1) * I)
            for a, b, x in self._chunks(reader, gk, (), span=span):
                g[a:b] = _columns(x, C)
                v += _column_sums(x)
            for a, b, x in self._chunks(reader, uk, (), span=span):
                u[a:b] = _columns(x, C)
            d_rows = np.empty((len(C), I))
            for a, b, x in self._chunks(reader, dk, (), span=span):
                d_rows[:, a:b] = _columns(x, C).T
            return g, u, d_rows, v
        if not layer.fused or self.layout == "gate_up":
            if layer.fused:
                gu, dn = layer.tensors[0]
                parts, lead = [(gu, 0)], (e,)                  # rows [0, I) gate, [I, 2I) up
            else:
                gk, uk, dn = layer.tensors[e]
                parts, lead = [(gk, 0), (uk, I)], ()
            for key, offset in parts:
                for a, b, x in self._chunks(reader, key, lead):
                    cols = _columns(x, C)
                    a, b = a + offset, b + offset
                    if a < I:  # gate rows
                        n = min(b, I) - a
                        g[a:a + n] = cols[:n]
                        v += _column_sums(x[:n])
                    if b > I:  # up rows
                        lo = max(a, I)
                        u[lo - I:b - I] = cols[lo - a:]
            return g, u, self._rows(reader, dn, lead, C), v
        gu, dn = layer.tensors[0]                                # [E, d, 2I], [E, I, d]
        gate = slice(0, None, 2) if self.layout == "gate_up_interleaved_t" else slice(0, I)  # gpt-oss / Llama-4
        up = slice(1, None, 2) if self.layout == "gate_up_interleaved_t" else slice(I, 2 * I)
        picked = np.empty((len(C), 2 * I))                       # rows C of gate-up, in one pass
        for a, b, x in self._chunks(reader, gu, (e,)):
            v[a:b] = x[:, gate].sum(1, dtype=torch.float64).numpy()
            sel = np.flatnonzero((C >= a) & (C < b))
            if sel.size:
                picked[sel] = _float(x[torch.as_tensor(C[sel] - a)])
        g, u = picked[:, gate].T.copy(), picked[:, up].T.copy()
        d_rows = np.empty((len(C), I))
        for a, b, x in self._chunks(reader, dn, (e,)):
            d_rows[:, a:b] = _columns(x, C).T
        return g, u, d_rows, v
