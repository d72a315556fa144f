"""A hub checkpoint's files on disk, for the commands that stream a checkpoint instead of loading it
(trace): the user's own hub access, and only what a streamed read needs."""

from __future__ import annotations

from pathlib import Path

from moeguard.errors import MoeguardError

# safetensors weights and their index, config and tokenizer files; never pickled weights (.bin, .pt)
# nor other formats a repository may also hold (.gguf, ONNX, images)
STREAMED_FILES = ("*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken")


def download_for_streaming(hub_id: str) -> Path:
    """The local snapshot of ``hub_id`` holding :data:`STREAMED_FILES`, fetched into the Hugging Face
    cache (or found there: with ``HF_HUB_OFFLINE=1`` nothing is fetched), or a one-line error."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(hub_id, allow_patterns=list(STREAMED_FILES)))
    except Exception as exc:  # noqa: BLE001 -- the hub client raises its own error types, OSError and ValueError
        first = (str(exc).strip().splitlines() or [""])[0][:200] or type(exc).__name__
        raise MoeguardError(f"cannot fetch {hub_id} from the Hugging Face hub ({type(exc).__name__}: {first})",
                            hint="check the id and your access (hf auth login), or download it "
                                 f"(hf download {hub_id} --local-dir DIR) and pass DIR") from None
    if not any(path.glob("*.safetensors")):
        raise MoeguardError(f"{hub_id} holds no .safetensors weights", hint="moeguard reads safetensors only")
    return path
