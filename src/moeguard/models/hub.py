"""A hub checkpoint's files on disk, for the commands that stream a checkpoint instead of loading it
(trace, fingerprint): the user's own hub access, and only what a streamed read needs."""

from __future__ import annotations

from pathlib import Path

from moeguard.errors import MoeguardError

# top-level safetensors weights and their index, config and tokenizer files; never pickled weights (.bin,
# .pt) nor other formats a repository may also hold (.gguf, ONNX, images)
STREAMED_FILES = ("*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken")
# the hub client's patterns match across "/": the same weights in another layout in a subfolder
# (gpt-oss's original/, a repository's onnx/) and Mistral's consolidated copy would double the download
SKIPPED_FILES = ("*/*", "consolidated*")


def download_for_streaming(hub_id: str) -> Path:
    """The local snapshot of ``hub_id`` holding :data:`STREAMED_FILES`, fetched into the Hugging Face
    cache (or found there: with ``HF_HUB_OFFLINE=1`` nothing is fetched), or a one-line error."""
    from huggingface_hub import constants, snapshot_download

    fix = f"download it yourself (hf download {hub_id} --local-dir DIR) and pass DIR"
    try:
        path = Path(snapshot_download(hub_id, allow_patterns=list(STREAMED_FILES), ignore_patterns=list(SKIPPED_FILES)))
    except Exception as exc:  # noqa: BLE001 -- the hub client raises its own error types, OSError and ValueError
        first = (str(exc).strip().splitlines() or [""])[0][:200] or type(exc).__name__
        raise MoeguardError(f"cannot fetch {hub_id} from the Hugging Face hub ({type(exc).__name__}: {first})",
                            hint=f"check the id, your access (hf auth login) and free disk space, or {fix}") from None
    if not any(path.glob("*.safetensors")):
        if constants.HF_HUB_OFFLINE:   # a partial snapshot (a config fetched earlier), not the repository's content
            raise MoeguardError(f"the cached snapshot of {hub_id} holds no .safetensors weights, and HF_HUB_OFFLINE "
                                "is set, so nothing was fetched", hint=f"run once with network access, or {fix}")
        raise MoeguardError(f"{hub_id} holds no .safetensors weights", hint="moeguard reads safetensors only")
    return path


def local_checkpoint(ref: str | None) -> tuple[str | None, str | None]:
    """``(what to open, its name in reports)``: ``ref`` itself for a local folder or the embedded model;
    for a hub id, its fetched snapshot folder and the id."""
    from moeguard.models.loading import resolve

    r = resolve(ref)
    if r.path is not None:
        return ref, None
    return str(download_for_streaming(r.hub_id)), r.name
