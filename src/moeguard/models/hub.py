"""A hub checkpoint's files on disk, for the commands that stream a checkpoint instead of loading it
(trace, fingerprint): the user's own hub access, and only what a streamed read needs."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from moeguard.errors import MoeguardError

# top-level safetensors weights and their index, config and tokenizer files; never pickled weights (.bin,
# .pt) nor other formats a repository may also hold (.gguf, ONNX, images)
STREAMED_FILES = ("*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken")
# the hub client's patterns match across "/": the same weights in another layout in a subfolder
# (gpt-oss's original/, a repository's onnx/) and Mistral's consolidated copy would double the download
SKIPPED_FILES = ("*/*", "consolidated*")


class HubFailure(NamedTuple):
    what: str                  # what happened, as a clause
    fix: str                   # the hint
    unreachable: bool = False  # the hub was not reached: a local copy is the way round


def hub_failure(exc: BaseException, name: str) -> HubFailure | None:
    """What happened and the fix (a :class:`HubFailure`) for an error the hub client raised while fetching ``name``
    (looked for through the exceptions it was raised from: transformers re-raises them as OSError),
    or None for one it is not. Every failure read "unreachable" or "check your access" before."""
    import errno

    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not c for c in chain) and len(chain) < 16:
        chain.append(e)
        e = e.__cause__ or e.__context__
    local = f"or download it where there is network (hf download {name} --local-dir DIR) and pass DIR"
    for e in chain:   # the most specific reading first: a gated repository is also "not found"
        if isinstance(e, GatedRepoError):
            return HubFailure("it is gated, and your account has not been granted access",
                              f"accept its terms on huggingface.co/{name} and log in (`hf auth login`)")
        if isinstance(e, RevisionNotFoundError):
            return HubFailure("the revision asked for does not exist", "check the revision (a branch, tag or commit)")
        if isinstance(e, RepositoryNotFoundError):
            return HubFailure("it does not exist on the hub, or it is private and this machine is not logged in",
                              "check the id (org/name, as on huggingface.co), and log in for a private one (`hf auth login`)")
        if isinstance(e, OfflineModeIsEnabled) or (isinstance(e, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE):
            return HubFailure("it is not in the local cache, and offline mode is on (HF_HUB_OFFLINE)",
                              f"run once with network access (HF_HUB_OFFLINE unset), {local}")
        if isinstance(e, HfHubHTTPError):
            code = getattr(getattr(e, "response", None), "status_code", None)
            if code == 429:
                return HubFailure("the hub is limiting this machine's requests (HTTP 429)",
                                  "wait a few minutes and retry; logged in (`hf auth login`), the limit is higher")
            if isinstance(code, int) and code >= 500:
                return HubFailure(f"the hub answered with a server error (HTTP {code})", "retry later (status.huggingface.co)")
            if code in (401, 403):
                return HubFailure(f"the hub refused access (HTTP {code})",
                                  "log in with an account that has access (`hf auth login`), or check your token")
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return HubFailure("the disk is full", f"free space where the Hugging Face cache is "
                              f"({constants.HF_HUB_CACHE}), or set HF_HOME to a larger disk")
    for e in chain:   # only then "unreachable": a connection that failed, or a file the cache lacks without it
        kind = type(e).__name__
        if isinstance(e, (ConnectionError, TimeoutError, LocalEntryNotFoundError)) or kind.endswith(
                ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError")):
            return HubFailure("the hub could not be reached, and it is not in the local cache",
                              f"check this machine's network (or proxy), {local}", unreachable=True)
    return None


def _snapshot(hub_id: str, allow: list[str], ignore: list[str]) -> Path:
    """``snapshot_download`` of those files into the Hugging Face cache (or found there), or a one-line error."""
    from huggingface_hub import snapshot_download

    fix = f"download it yourself (hf download {hub_id} --local-dir DIR) and pass DIR"
    try:
        return Path(snapshot_download(hub_id, allow_patterns=allow, ignore_patterns=ignore))
    except Exception as exc:  # noqa: BLE001 -- the hub client raises its own error types, OSError and ValueError
        known = hub_failure(exc, hub_id)
        if known is not None:
            raise MoeguardError(f"cannot fetch {hub_id} from the Hugging Face hub: {known.what}", hint=known.fix) from None
        first = (str(exc).strip().splitlines() or [""])[0][:200] or type(exc).__name__
        raise MoeguardError(f"cannot fetch {hub_id} from the Hugging Face hub ({type(exc).__name__}: {first})",
                            hint=f"check the id, your access (hf auth login) and free disk space, or {fix}") from None


def fetch_config(hub_id: str) -> dict:
    """``hub_id``'s config.json alone, fetched (a few kilobytes) before its weights are: what a command can
    refuse from it is refused before gigabytes come. {} where the snapshot has none (the weights' fetch
    then says what is missing)."""
    import json

    path = _snapshot(hub_id, ["config.json"], list(SKIPPED_FILES)) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise MoeguardError(f"the config.json of {hub_id} cannot be read ({type(exc).__name__})",
                            hint=f"check the repository, or download it (hf download {hub_id} --local-dir DIR)") from None
    return data if isinstance(data, dict) else {}


def download_for_streaming(hub_id: str) -> Path:
    """The local snapshot of ``hub_id`` holding :data:`STREAMED_FILES`, fetched into the Hugging Face
    cache (or found there: with ``HF_HUB_OFFLINE=1`` nothing is fetched), or a one-line error."""
    from huggingface_hub import constants

    fix = f"download it yourself (hf download {hub_id} --local-dir DIR) and pass DIR"
    path = _snapshot(hub_id, list(STREAMED_FILES), list(SKIPPED_FILES))
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
