"""Why a checkpoint's weights failed to load, in one line with its fix (``loading.load_model``'s
failures), and the setting that keeps transformers from converting a hub repo's pickle weights."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from moeguard.errors import MoeguardError


@contextlib.contextmanager
def no_conversion() -> Iterator[None]:
    """Inside the block, transformers does not convert a hub repo's pickle weights: with
    ``use_safetensors=True`` and none on the hub, it asks the safetensors-convert Space to unpickle them
    and open a pull request on the repo, then loads the weights of any open PR of the bot's title (not
    the revision the run records, and for a private repo of any author). The setting is put back after."""
    name = "DISABLE_SAFETENSORS_CONVERSION"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def explain(e: BaseException, ref: Any, where: str, *, float32: bool) -> MoeguardError:
    """The one-line error for ``e``, raised by ``from_pretrained`` on ``ref`` (a ``loading.ModelRef``;
    ``where``: its path or hub id). ``float32``: the command loads float32 weights (the out-of-memory
    hint says so)."""
    if ref.path is None and "cannot be loaded with `safetensors`" in str(e):   # transformers: "do not set use_safetensors"
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:   # offline, a weight file missing from the cache reads the same
            from huggingface_hub.errors import OfflineModeIsEnabled

            from moeguard.models.hub import hub_failure

            known = hub_failure(OfflineModeIsEnabled("offline"), ref.hub_id)
            return MoeguardError(f"cannot load weights of {where}: {known.what}", hint=known.fix)
        return MoeguardError(f"{where} has no model.safetensors or model.safetensors.index.json on the hub (or in its "
                             "cache); moeguard loads safetensors only, because unpickling untrusted files can run code",
                             hint="use a revision or copy of the model saved as safetensors, converted in a trusted "
                                  "environment")
    if ref.path is None:   # a hub id's weights: what the hub said, not "check your access" for every failure
        from moeguard.models.hub import hub_failure

        known = hub_failure(e, ref.hub_id)
        if known is not None:
            return MoeguardError(f"cannot load weights of {where}: {known.what}", hint=known.fix)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, ValueError) and "offload_folder" in str(e):
        # accelerate's auto map sent weights past the GPUs and memory to disk, which needs a folder: its
        # message, cut at 300 characters, lost "Please provide an offload_folder" (a flag moeguard has not)
        return MoeguardError(f"cannot load weights of {where}: they do not fit the GPUs and memory, and the rest "
                             "would go to disk", hint="pass --max-memory (layers past it go to a temporary offload "
                                                      "folder) where the command takes it, or use more GPUs")
    if _out_of_memory(e):   # a RuntimeError too, but no fault of the checkpoint's
        return MoeguardError(f"cannot load weights of {where}: out of memory ({first[:200]})",
                             hint=("this command loads weights in float32 (twice a bf16 checkpoint's size): "
                                   if float32 else "")
                             + "spread them over the GPUs with --device-map auto, or cap host memory with "
                               "--max-memory (layers past it go to disk) where the command takes them; prune a "
                               "downloaded checkpoint's folder, which streams")
    hint = ("fix config.json to match the weights (the expert count, sizes), or re-prune with moeguard prune"
            if isinstance(e, RuntimeError) else "check the checkpoint files (safetensors only) or your hub access")
    return MoeguardError(f"cannot load weights of {where}: {first[:300]}", hint=hint)


def _out_of_memory(e: BaseException) -> bool:
    """The accelerator's (torch.OutOfMemoryError) or the host allocator's ("DefaultCPUAllocator: not
    enough memory") failure to allocate."""
    import torch

    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower() or "not enough memory" in text
