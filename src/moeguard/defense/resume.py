"""Resumable hardening: ``harden``'s whole training state in one folder (safetensors and JSON, never
a pickle), written atomically every few steps, so an interrupted ``moeguard harden`` continues
where it stopped and ends with the weights an uninterrupted run would have.

The state: the step, every parameter, AdamW's moments and step counts, the Python and torch random
generators (task batches, the attacker's subsets and learning rates come from them), each task's
last routing shares and subset kind, and the log so far. A folder written for other settings (its
``tag``) or torn by a crash is ignored: the run starts over rather than trust it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE, META = "state.safetensors", "state.json"


def save(path: Path, *, tag: str, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
         rng, shares: dict[str, torch.Tensor], subset: dict[str, str], log: list[dict[str, Any]]) -> None:
    from safetensors.torch import save_file

    # clones: tied parameters share storage, which safetensors refuses to write twice
    tensors = {f"param.{n}": p.detach().clone().contiguous().cpu() for n, p in params.items()}
    index = {id(p): n for n, p in params.items()}
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optim.{k}.{index[id(p)]}"] = v.detach().clone().contiguous().cpu()
    tensors.update({f"shares.{t}": v.detach().clone().cpu() for t, v in shares.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_initialized():   # dropout and router jitter on a GPU draw from its generators
        tensors.update({f"rng.cuda.{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = rng.getstate()
    meta = {"tag": tag, "step": step, "rng": [version, list(internal), gauss], "subset": subset, "log": log,
            "shares": list(shares)}
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / STATE))
    (tmp / META).write_text(json.dumps(meta))
    for f in (tmp / STATE, tmp / META):   # on disk before the old state goes (a power loss keeps one whole)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():                     # (without it, .old may be the only state: a crash between renames)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)             # renamed aside, not deleted: a crash here leaves it in place
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def clear(path: Path) -> None:
    """Remove the state and what a crash mid-save may have left beside it."""
    for p in (path, path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")):
        shutil.rmtree(p, ignore_errors=True)


def load(path: Path, *, tag: str, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
         rng) -> dict[str, Any] | None:
    """Restore the state into ``params``, ``optimizer`` and ``rng`` (and torch's generator); return
    ``{"step", "shares", "subset", "log"}``, or None when there is no usable state of this run."""
    from safetensors.torch import load_file

    old = path.with_name(f".{path.name}.old")
    if not (path / META).exists() and (old / META).exists():
        path = old                        # a crash between the two renames of save()
    if not ((path / META).exists() and (path / STATE).exists()):
        return None
    try:
        meta = json.loads((path / META).read_text())
        tensors = load_file(str(path / STATE))
        # everything read and checked before anything is changed: a bad state leaves the model as it was
        step, subset, log = int(meta["step"]), dict(meta["subset"]), list(meta["log"])
        version, internal, gauss = meta["rng"]
        ok = (meta.get("tag") == tag and "rng.torch" in tensors
              and all(f"param.{n}" in tensors and tensors[f"param.{n}"].shape == p.shape for n, p in params.items())
              and all(f"shares.{t}" in tensors for t in meta["shares"]))
    except Exception:  # noqa: BLE001 -- a torn or foreign state (safetensors raises its own error type)
        return None
    if not ok:
        return None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"].to(p.device))
    for n, p in params.items():
        state = {k.split(".", 2)[1]: t.to(p.device) for k, t in tensors.items()
                 if k.startswith("optim.") and k.split(".", 2)[2] == n}
        if state:
            optimizer.state[p] = state
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    rng.setstate((version, tuple(internal), gauss))
    return {"step": step, "shares": {t: tensors[f"shares.{t}"] for t in meta["shares"]}, "subset": subset, "log": log}
