"""A pruned copy of a model loaded under a memory cap (``--max-memory``).

In memory, :func:`moeguard.models.prune.prune_model` slices the loaded model's tensors. A model
loaded under a cap holds most of its weights on disk (accelerate's offload), so there is nothing
to slice: the copy is instead written by streaming surgery (:func:`prune_checkpoint`, each kept
tensor copied from the source files, never the whole model in RAM) into a temporary folder and
loaded from there under the same cap. The folder lives as long as the returned model (removed
when it is collected), as the loader's offload folder does.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Mapping

from moeguard.errors import MoeguardError

# the fields of prune_model's record, so a study's record reads the same in memory and capped
# (a budget-pruned source's own per-layer counts too: prune_model records them where the layers differ)
_RECORD_KEYS = ("family", "original_num_experts", "original_experts_per_layer", "num_experts", "experts_per_layer",
                "keep", "config_changes")


def checkpoint_folder(ref: str | None) -> Path:
    """The local folder holding ``ref``'s safetensors: its directory, or a hub id's cached
    snapshot (loaded already, so present; nothing is downloaded here)."""
    from moeguard.models.loading import resolve

    r = resolve(ref)
    if r.path is not None:
        return r.path
    from transformers.utils.hub import cached_file

    try:   # the snapshot folder is where the config sits; the weights beside it were loaded already
        return Path(cached_file(r.hub_id, "config.json", local_files_only=True)).parent
    except (OSError, ValueError):
        raise MoeguardError(f"{r.hub_id} is not in the local hub cache, and a pruned copy under max_memory is "
                            "written from the checkpoint's files",
                            hint=f"download it first (huggingface-cli download {r.hub_id}) or pass its folder") from None


def pruned_under_cap(ref: str | None, keep: Mapping[int, list[int]], *, max_memory: int | None, dtype=None,
                     device_map=None) -> tuple[Any, dict[str, Any]]:
    """``(model, record)``: checkpoint ``ref`` pruned to ``keep`` (layer -> original experts) by
    streaming surgery and loaded under ``max_memory`` bytes. The record has
    :func:`~moeguard.models.prune.prune_model`'s fields and ``method: "streaming"``."""
    from moeguard.models.loading import load_model
    from moeguard.pruning.checkpoint import prune_checkpoint

    src = checkpoint_folder(ref)
    folder = Path(tempfile.mkdtemp(prefix="moeguard-pruned-"))
    try:
        record = prune_checkpoint(src, folder / "model", {int(l): list(v) for l, v in keep.items()})
        model, _, _ = load_model(str(folder / "model"), dtype=dtype, device_map=device_map, with_tokenizer=False,
                                 max_memory=max_memory)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(model, shutil.rmtree, folder, True)
    return model, {**{k: record[k] for k in _RECORD_KEYS if k in record}, "method": "streaming"}
