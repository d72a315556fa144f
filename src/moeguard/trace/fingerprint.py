"""The owner's fingerprint: what ``trace`` needs of the original model, at most 1% of its size.

A folder (written atomically) with ``fingerprint.json`` (schema ``moeguard.fingerprint/1``: the
model's shape, the hidden-dimension subset H, the anchor tokens' strings, provenance) and
``fingerprint.safetensors`` (float16):

- ``anchors`` [T, d]: the embedding rows of T anchor tokens (``align.py``);
- per MoE layer ``l``: ``l.a`` and ``l.b`` [E, m*m] (the two views of ``features.py``),
  ``l.v`` [E, d] (gate sums, for merges), ``l.mu_a``/``l.mu_b`` (the
  layer's common directions) and ``l.rows`` [E, k, m] (each expert's first k gate rows on H:
  whether a suspect kept the neuron order).

m (the size of H) is the largest that fits the 1% budget, at most 64 and half the width. An
owner keeps the fingerprint private, or publishes only its SHA-256 as a commitment: it is what
an attacker would test evasions against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeguard.analysis import robust_z
from moeguard.errors import MoeguardError
from moeguard.io import dumps, read_json
from moeguard.trace.features import ROWS, common, features

F16_MAX = float(np.finfo(np.float16).max)   # fingerprints are stored in float16
SCHEMA = "moeguard.fingerprint/1"
META = "fingerprint.json"
TENSORS = "fingerprint.safetensors"
BUDGET = 0.01          # of the checkpoint's bytes
M_MAX = 64


@dataclass(frozen=True, kw_only=True)
class Fingerprint:
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]

    @property
    def H(self) -> np.ndarray:
        return np.asarray(self.meta["H"], dtype=int)

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.meta["layers"]

    def layer(self, index: int) -> dict[str, np.ndarray]:
        return {k.split(".", 1)[1]: v.astype(np.float64) for k, v in self.tensors.items()
                if k.startswith(f"{index}.")}

    def save(self, out: Path, *, overwrite: bool = False) -> None:
        """Written in float16 (the fingerprint's size budget), values beyond its range refused."""
        from safetensors.numpy import save_file

        from moeguard.io import atomic_dir

        with atomic_dir(out, overwrite=overwrite) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in stored(self.tensors).items()}, str(tmp / TENSORS))
            (tmp / META).write_text(dumps(self.meta, indent=1))

    @classmethod
    def load(cls, path: Path) -> "Fingerprint":
        from safetensors.numpy import load_file

        meta_file = path / META
        if not meta_file.is_file() or not (path / TENSORS).is_file():
            raise MoeguardError(f"{path} is not a fingerprint folder (no {META} and {TENSORS})",
                                hint="make one with `moeguard fingerprint --model M --out FP`")
        # a shared fingerprint is another's file: bad bytes, deep nesting or a list are one line
        meta = read_json(meta_file, what="fingerprint metadata", hint="re-make the fingerprint")
        if not isinstance(meta, dict):
            raise MoeguardError(f"{meta_file} holds a JSON {type(meta).__name__}, expected an object",
                                hint="re-make the fingerprint")
        if meta.get("schema") != SCHEMA:
            raise MoeguardError(f"{meta_file} has schema {meta.get('schema')!r}, expected {SCHEMA}",
                                hint="re-make the fingerprint with this moeguard")
        try:
            tensors = load_file(str(path / TENSORS))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for truncated files
            raise MoeguardError(f"{path / TENSORS} cannot be read ({type(exc).__name__}: {exc})",
                                hint="the file is truncated or damaged; re-make the fingerprint") from None
        _check(meta, tensors, path)
        return cls(meta=meta, tensors=tensors)


_KEYS = {"model": str, "family": str, "hidden": int, "intermediate": int, "layers": list, "H": list,
         "anchor_tokens": list}
_PER_LAYER = ("a", "b", "v", "mu_a", "mu_b", "rows")


def _check(meta: Any, tensors: dict[str, np.ndarray], path: Path) -> None:
    """A fingerprint folder as :meth:`Fingerprint.save` writes it, or a one-line error."""
    fix = "re-make the fingerprint with `moeguard fingerprint --model M --out FP`"
    if not isinstance(meta, dict):
        raise MoeguardError(f"{path / META} holds a {type(meta).__name__}, expected a mapping", hint=fix)
    for key, kind in _KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise MoeguardError(f"{path / META} has no valid '{key}' (expected {kind.__name__})", hint=fix)
    d, m = meta["hidden"], len(meta["H"])
    if not all(isinstance(h, int) and 0 <= h < d for h in meta["H"]) or m < 8:
        raise MoeguardError(f"{path / META}: 'H' must list at least 8 hidden dimensions below {d}", hint=fix)
    layers = meta["layers"]
    if not layers or not all(isinstance(l, dict) and type(l.get("index")) is int and l["index"] >= 0
                             and type(l.get("experts")) is int and l["experts"] >= 1 for l in layers) \
            or len({l["index"] for l in layers}) != len(layers):
        raise MoeguardError(f"{path / META}: 'layers' must list distinct {{index, experts}} entries of whole numbers",
                            hint=fix)
    if not all(isinstance(t, str) for t in meta["anchor_tokens"]):
        raise MoeguardError(f"{path / META}: 'anchor_tokens' must be token strings", hint=fix)
    need = ["anchors"] + [f"{l['index']}.{k}" for l in layers for k in _PER_LAYER]
    missing = [n for n in need if n not in tensors]
    if missing:
        raise MoeguardError(f"{path / TENSORS} lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}", hint=fix)
    if tensors["anchors"].shape != (len(meta["anchor_tokens"]), d):
        raise MoeguardError(f"{path / TENSORS}: anchors have shape {list(tensors['anchors'].shape)}, expected "
                            f"[{len(meta['anchor_tokens'])}, {d}]", hint=fix)
    for l in layers:      # each layer's tensors as `fingerprint` writes them for its E experts and m dimensions
        E, i = l["experts"], l["index"]
        want = {"a": (E, m * m), "b": (E, m * m), "v": (E, d), "mu_a": (m * m,), "mu_b": (m * m,)}
        wrong = [k for k, shape in want.items() if tensors[f"{i}.{k}"].shape != shape]
        rows = tensors[f"{i}.rows"]
        if rows.ndim != 3 or rows.shape[0] != E or rows.shape[2] != m:
            wrong.append("rows")
        if wrong:
            k = wrong[0]
            raise MoeguardError(f"{path / TENSORS}: {i}.{k} has shape {list(tensors[f'{i}.{k}'].shape)}, which does not "
                                f"fit {E} experts and {m} dimensions in H", hint=fix)
    bad = [n for n in need if not np.isfinite(tensors[n]).all()]
    if bad:
        raise MoeguardError(f"{path / TENSORS}: {bad[0]} holds NaN or infinite values", hint=fix)


def is_fingerprint(path: str | None) -> bool:
    return path is not None and (Path(path) / META).is_file()


def _size(T: int, d: int, m: int, experts: list[int]) -> int:
    """Bytes of the tensors a fingerprint stores (float16): the anchors [T, d]; per expert a and b
    [m*m] each, v [d] and rows [ROWS, m]; per layer mu_a and mu_b [m*m] each. (v was counted twice
    until 2026-12-04, which left budget-bound fingerprints a hidden dimension short.)"""
    per_expert = 2 * m * m + d + ROWS * m
    return 2 * (T * d + sum(E * per_expert + 2 * m * m for E in experts))


class FingerprintTooLarge(MoeguardError):
    """The model's fingerprint budget (a share of its size) holds no fingerprint."""


def choose(d: int, experts: list[int], budget_bytes: float, vocab: int) -> tuple[int, int]:
    """(m, T): the most hidden dimensions (and anchors) the budget allows."""
    T = min(vocab, max(128, 2 * d))
    for m in range(min(M_MAX, d // 2), 7, -1):
        if _size(T, d, m, experts) + 8192 <= budget_bytes:
            return m, T
    raise FingerprintTooLarge(f"a fingerprint of this model does not fit in {BUDGET:.0%} of its size "
                        f"({budget_bytes / 1e3:.0f} kB)", hint="the model is too small to fingerprint")


def _outliers(norms: np.ndarray) -> np.ndarray:
    """Hidden dimensions with an outsized embedding norm (``norms`` [d], over the vocabulary):
    'massive' dimensions that independent models share, kept out of H so they cannot make
    unrelated experts look alike."""
    return robust_z(norms) > 6.0


def build(w, *, checkpoint_bytes: int, seed: int = 0, source: dict | None = None, progress=None,
          keep: Path | None = None) -> Fingerprint:
    """The fingerprint of ``w`` (a trace source, ``weights.py``). ``progress``: a rich Progress
    to advance once per MoE layer; ``keep``: where each layer's sketch is kept for a resumed run
    (``resume.keyed``: a folder for this checkpoint and seed), None to keep nothing."""
    from moeguard.trace.align import identity
    from moeguard.trace.resume import kept_sketch

    rng = np.random.default_rng(seed)
    d = w.hidden
    m, T = choose(d, w.experts, BUDGET * checkpoint_bytes, w.vocab)
    candidates = np.flatnonzero(~_outliers(w.embed_norms()))
    H = np.sort(rng.choice(candidates, size=m, replace=False))
    named = [i for i, t in enumerate(w.tokens) if t]
    if len(named) < T:
        T = len(named)
    anchors = np.sort(rng.choice(named, size=T, replace=False))
    tensors: dict[str, np.ndarray] = {"anchors": w.embed_rows(anchors)}
    if not np.isfinite(tensors["anchors"]).all():   # a fingerprint of them is unusable by every later trace
        raise MoeguardError(f"{w.name}'s token embeddings hold NaN or infinite values",
                            hint="fingerprint a sound copy of the checkpoint")
    frame = identity(d)
    task = progress.add_task("fingerprinting MoE layers", total=w.num_layers) if progress is not None else None
    layers = []
    for position in range(w.num_layers):
        sk = kept_sketch(keep, f"original-{position}", H, frame, lambda: w.sketch(position, H, frame))
        if not all(np.isfinite(x).all() for x in (sk.ka, sk.kb, sk.v)):
            raise MoeguardError(f"{w.name}'s MoE layer {sk.index} holds NaN or infinite weights",
                                hint="fingerprint a sound copy of the checkpoint")
        f = features(sk)
        tensors.update({f"{sk.index}.a": f["a"], f"{sk.index}.b": f["b"], f"{sk.index}.v": f["v"],
                        f"{sk.index}.mu_a": common(f["a"]), f"{sk.index}.mu_b": common(f["b"]),
                        f"{sk.index}.rows": sk.rows})
        layers.append({"index": sk.index, "experts": sk.num_experts})
        if task is not None:
            progress.advance(task)
    # as saved and loaded: a trace against a fingerprint made on the fly (float64) differed from one against
    # the same fingerprint saved, in the third decimal of a similarity and in p where the null ties
    tensors = stored(tensors)
    meta = {"schema": SCHEMA, "model": w.name, "family": w.family, "hidden": d, "intermediate": w.intermediate,
            "layers": layers,
            "H": H.tolist(), "anchor_tokens": [w.tokens[i] for i in anchors], "seed": seed,
            "checkpoint_bytes": checkpoint_bytes, "source": source or {}}
    return Fingerprint(meta=meta, tensors=tensors)


def stored(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``tensors`` in float16, as a fingerprint stores them (its size budget), values beyond its range
    refused (float16 would hold inf: every later trace would refuse the fingerprint as damaged)."""
    big = {k: float(np.abs(v).max()) for k, v in tensors.items() if v.size and np.abs(v).max() > F16_MAX}
    if big:
        k, v = next(iter(big.items()))
        raise MoeguardError(f"the fingerprint's {k} holds {v:.3g}, beyond float16's range ({F16_MAX:g})",
                            hint="the checkpoint's weights are unusually large; fingerprint a sound copy")
    return {k: v.astype(np.float16) for k, v in tensors.items()}


def checkpoint_bytes(ref: str | None) -> int:
    """Bytes of the weight files a checkpoint is read from (what the 1% budget is of; a hub id's are
    fetched first): those transformers and the streamed read use, so a folder that also holds another
    copy (Mistral's consolidated.safetensors) budgets as the same model fetched by its hub id does."""
    from moeguard.models.hub import local_checkpoint
    from moeguard.models.loading import resolve
    from moeguard.models.safetensorsfiles import safetensors_files

    refuse_gguf(ref)
    r = resolve(local_checkpoint(ref)[0])
    return sum(f.stat().st_size for f in safetensors_files(r.path))


def refuse_gguf(ref: str | None) -> None:
    """A fingerprint is made from safetensors: a .gguf original is refused by name (a path like
    models/m.gguf would otherwise pass for a hub id, org/name, and be asked of the hub)."""
    from moeguard.trace.weights import is_gguf

    if is_gguf(ref):
        raise MoeguardError(f"{ref} is a GGUF file; a fingerprint is made from the original's safetensors checkpoint",
                            hint="pass the original's checkpoint folder (or its fingerprint folder)")


def digest(path: Path) -> str:
    """SHA-256 of a fingerprint's files: the commitment an owner can publish."""
    h = hashlib.sha256()
    for name in (META, TENSORS):
        h.update((path / name).read_bytes())
    return h.hexdigest()
