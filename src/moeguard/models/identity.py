"""What a checkpoint is, for resumed runs, cached jobs and monitor profiles: a cheap identity of its
weight files and config (and, without names and times, a digest of what the weights are)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeguard.models.loading import resolve


def weights_identity(ref_str: str | None) -> dict[str, Any]:
    """What notices a changed checkpoint, for resumed runs and cached jobs, without reading a large
    one whole.

    Per weight file: its name, size, modification time in nanoseconds (whole seconds missed a file
    rewritten within the second: same-architecture weights have the same size), and a digest of
    its bytes: all of them when the checkpoint's weights total at most ``_WHOLE`` bytes (the
    embedded and test models; any edit), beyond that ``_SAMPLES`` blocks spread over each file,
    header included. Sampled, a copy that keeps times
    (``cp -p``, ``rsync -a``) of weights that differ only in a few tensors (router-only or LoRA
    fine-tuning) can go unseen; the time catches every ordinary write. ``config.json`` whole: a
    changed top-k or router setting changes every number with the same weights.

    A hub id is its name and the commit its cached ``config.json`` resolves to (``revision``; the
    edge has read the config, so it is cached by then): files under a commit are immutable, and
    the weights, fetched later, come from the same commit. A new commit on the hub (``main``
    moved) changes it; the cache is read, never the network."""
    from moeguard.io import file_sha256

    ref = resolve(ref_str)
    files: list[list[Any]] = []
    out: dict[str, Any] = {"name": ref.name, "files": files}
    if ref.path is None:
        snapshot = hub_snapshot(ref.hub_id)
        if snapshot is not None:
            out["revision"] = snapshot.name
            out["config"] = file_sha256(snapshot / "config.json")[:16]
        return out
    if not ref.path.is_dir():
        return out
    config = ref.path / "config.json"
    if config.exists():
        out["config"] = file_sha256(config)[:16]
    protocol = ref.path / "moeguard_protocol.json"    # a hardened model's fine-tuning protocol changes its numbers
    if protocol.exists():
        out["protocol"] = file_sha256(protocol)[:16]
    generation = ref.path / "generation_config.json"   # its end-of-output ids cut every generated summary
    if generation.exists():
        out["generation"] = file_sha256(generation)[:16]
    tokenizer = tokenizer_digest(ref.path)   # its ids are every task batch, context and profile cell
    if tokenizer is not None:
        out["tokenizer"] = tokenizer
    weights = sorted(ref.path.glob("*.safetensors"))
    whole = sum(f.stat().st_size for f in weights) <= _WHOLE   # the checkpoint's total: many shards cost the same
    for f in weights:
        files.append(_file_row(f, whole=whole))
    return out


# what a tokenizer is read from (transformers' fast and slow tokenizers, SentencePiece, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.tiktoken",
                   "chat_template.jinja", "chat_template.json")


def tokenizer_digest(folder: Path) -> str | None:
    """A digest of ``folder``'s tokenizer files, whole (they are small), or None where it has none:
    a tokenizer fixed in place (add_bos_token, a replaced tokenizer.json) changes every token id."""
    import hashlib

    h, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        f = folder / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16] if found else None


def file_identity(path: Path) -> dict[str, Any]:
    """:func:`weights_identity` of a checkpoint that is one file (a ``.gguf``): its name, size,
    time and digest (whole up to ``_WHOLE`` bytes, sampled beyond)."""
    return {"name": str(path), "files": [_file_row(path, whole=path.stat().st_size <= _WHOLE)]}


def _file_row(f: Path, *, whole: bool) -> list[Any]:
    import hashlib

    st = f.stat()
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        if whole:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        else:
            for i in range(_SAMPLES):
                fh.seek(st.st_size * i // _SAMPLES)
                h.update(fh.read(_BLOCK))
    return [f.name, st.st_size, st.st_mtime_ns, h.hexdigest()[:16]]


def digest_of(identity: dict[str, Any]) -> dict[str, Any]:
    """A recorded :func:`weights_identity` without its name and times (a run record's ``model``): equal for
    the same weights anywhere (:func:`weights_digest` without the routers, which records do not hold)."""
    out = {k: v for k, v in identity.items() if k != "name"}
    out["files"] = [[row[0], row[1], row[-1]] for row in identity.get("files") or [] if isinstance(row, list) and row]
    return out


def weights_digest(ref_str: str | None) -> dict[str, Any]:
    """:func:`weights_identity` without the name and the modification times: what the weights are,
    not where or when they were written (the same checkpoint given as ./ckpt or ckpt/, or copied,
    gives the same digest). A checkpoint hashed by samples (over ``_WHOLE``) adds ``routers``: its
    routers' tensors read whole. Without the times, the samples alone missed a router-only fine-tune
    saved anywhere (a router is ~64 KiB per layer in a multi-GB shard): a profile of the original
    then scored the tuned model's routing against a null it never saw."""
    out = weights_identity(ref_str)
    out.pop("name", None)
    out["files"] = [[name, size, digest] for name, size, _, digest in out["files"]]
    ref = resolve(ref_str)
    if ref.path is not None and ref.path.is_dir():
        weights = sorted(ref.path.glob("*.safetensors"))
        if sum(f.stat().st_size for f in weights) > _WHOLE and (routers := router_digest(weights)) is not None:
            out["routers"] = routers
    return out


# a router's tensors on disk, by a segment of their names (families differ in the module's name:
# Mixtral's, Qwen's, DeepSeek's `gate`; GPT-OSS's, Granite's, DBRX's, Switch's `router`) and the
# selection biases the family table names (DeepSeek's and ERNIE's `e_score_correction_bias`, LFM2's
# block-held `expert_bias`); never an expert's (`experts.` in the name)
_ROUTER_SEGMENTS = frozenset({"gate", "router"})
_ROUTER_MAX = 64 << 20   # a router tensor is E x hidden; anything larger is no router


def _router_biases() -> frozenset[str]:
    from moeguard.models.families import FAMILIES

    return frozenset(f.routing.correction_bias.rsplit(".", 1)[-1] for f in FAMILIES.items() if f.routing.correction_bias)


def router_digest(files: list[Path]) -> str | None:
    """A digest of the router tensors of safetensors ``files`` (name, dtype, shape and bytes), or
    None where none is found by name. Reads their headers and those tensors' bytes only."""
    import hashlib
    import struct

    from moeguard.io import read_header

    h, found, biases = hashlib.sha256(), False, _router_biases()
    for f in files:
        header = read_header(f)
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            for name in sorted(k for k in header if k != "__metadata__"):
                parts = name.split(".")
                if "experts" in parts or not (_ROUTER_SEGMENTS & set(parts) or parts[-1] in biases):
                    continue
                info = header[name]
                a, b = info["data_offsets"]
                if b - a > _ROUTER_MAX:
                    continue
                fh.seek(8 + n + a)
                h.update(f"{name}\0{info['dtype']}\0{info['shape']}\0".encode() + fh.read(b - a))
                found = True
    return h.hexdigest()[:16] if found else None


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder (named by its commit) that ``repo_id``'s ``main`` resolves to in the
    Hugging Face cache, or ``None`` when its config is not cached. Reads the cache only."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


_WHOLE = 256 << 20            # checkpoints up to this size are hashed whole (about 0.2 s)
_SAMPLES, _BLOCK = 16, 4096   # beyond it, 64 KiB read per weight file, whatever its size
