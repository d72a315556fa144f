"""Resumable training state, one format for every trainer (``realign``'s fine-tune, ``defense``'s
``harden``): a folder of safetensors and JSON, never a pickle, so an interrupted run continues where
it stopped and ends with the weights an uninterrupted run would have.

What every trainer needs is here; what is its own rides along (``tensors``, ``meta``):

- the step, the trained parameters, the optimizer's per-parameter tensors (AdamW's moments and step
  counts), torch's CPU generator, every CUDA generator when CUDA ran, and optionally a Python
  ``random.Random``;
- **written atomically and durably**: into a temporary folder, fsynced, the old state renamed aside
  (not deleted: a crash between the two renames leaves it, and ``load`` falls back to it), then the
  new one renamed into place;
- **read, then checked, then applied**: ``load`` reads and checks everything (format, the run's
  ``tag``, every parameter's name and shape, the optimizer's tensors' owners and shapes, the
  generators' states) without touching the model; a
  state of other settings, of an older format, or torn by a crash is ignored (None) and the run
  starts over rather than trust it. ``State.restore`` then writes it into the model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeguard.io import dumps, signals_held, sync_file

FORMAT = "moeguard.train-state/1"
STATE, META = "state.safetensors", "state.json"


def _aside(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}")


@dataclass(frozen=True, kw_only=True)
class State:
    """A state read and checked by ``load``; nothing of it is in the model until ``restore``."""

    step: int
    where: str                                  # the state's path, as load was given it
    tag: str
    made_by: list[Any]                          # provenance.maker of every run that trained it (None: unrecorded)
    meta: dict[str, Any]                        # the trainer's own JSON
    tensors: dict[str, torch.Tensor]            # the trainer's own tensors (CPU)
    params: dict[str, torch.Tensor] = field(repr=False)
    optim: dict[str, dict[str, torch.Tensor]] = field(repr=False)   # param name -> {key: tensor}
    rng: dict[str, Any] = field(repr=False)

    def restore(self, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, *,
                pyrng: random.Random | None = None) -> None:
        """Parameters, optimizer state and generators back as they were at ``step``; the runs that
        trained it are this run's lineage (``save`` lists them, ``provenance.reusing`` is told)."""
        from moeguard.provenance import reusing

        for m in self.made_by:
            reusing(self.where, m, fix="delete it")
        _lineage[self.where] = (self.tag, list(self.made_by))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.params[n].to(p.device, p.dtype))
        for n, p in params.items():
            if n in self.optim:
                optimizer.state[p] = {k: t.to(p.device) for k, t in self.optim[n].items()}
        torch.set_rng_state(self.rng["torch"])
        cuda = self.rng["cuda"]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        elif cuda:
            import warnings

            warnings.warn(f"the state was saved with {len(cuda)} CUDA generators and this process has "
                          f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} devices: GPU randomness "
                          f"(dropout, router jitter) will not continue as it would have", stacklevel=2)
        if pyrng is not None and self.rng["python"] is not None:
            version, internal, gauss = self.rng["python"]
            pyrng.setstate((version, tuple(internal), gauss))


def save(path: str | os.PathLike, *, tag: str, step: int, params: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer, pyrng: random.Random | None = None,
         tensors: dict[str, torch.Tensor] | None = None, meta: dict[str, Any] | None = None) -> None:
    """Write the state of a run (``tag``: a digest of its settings) after ``step`` steps."""
    from safetensors.torch import save_file

    path = Path(path)
    # clones: tied parameters share storage, which safetensors refuses to write twice
    # copied straight to the host (a clone on the accelerator first doubled each tensor there)
    out = {f"param.{n}": p.detach().to("cpu", copy=True).contiguous() for n, p in params.items()}
    index = {id(p): n for n, p in params.items()}
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v):
                out[f"optim.{k}.{index[id(p)]}"] = v.detach().to("cpu", copy=True).contiguous()
    out.update({f"extra.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in (tensors or {}).items()})
    out["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_initialized():   # dropout and router jitter on a GPU draw from its generators
        out.update({f"rng.cuda.{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    python = None
    if pyrng is not None:
        version, internal, gauss = pyrng.getstate()
        python = [version, list(internal), gauss]
    from moeguard.provenance import joined

    # the makers of every step so far: a run that restored another version's state lists it first
    tag_, restored = _lineage.get(str(path), (None, []))
    makers = joined(restored if tag_ == tag else [])
    doc = {"format": FORMAT, "tag": tag, "step": int(step), "rng": python, "meta": meta or {}, "made_by": makers}
    tmp, old = _aside(path, "tmp"), _aside(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(out, str(tmp / STATE))
    (tmp / META).write_text(dumps(doc))
    for f in (tmp / STATE, tmp / META, tmp):   # on disk before the old state goes (a power loss keeps one whole)
        sync_file(f)
    if path.exists() and not _whole(path) and _whole(old):
        shutil.rmtree(path)               # a broken state beside a whole set-aside one: keep the whole one
    if path.exists():                     # (without it, .old may be the only state: a crash between renames)
        shutil.rmtree(old, ignore_errors=True)
    with signals_held():                  # an interrupt between the renames waits for the second
        if path.exists():
            os.replace(path, old)         # renamed aside, not deleted: a crash here leaves it in place
        os.replace(tmp, path)
    sync_file(path.parent)                # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


# path -> (tag, makers) of the state a run restored there: its saves list them (a state loaded and then
# refused by its trainer, which starts over, is not its lineage)
_lineage: dict[str, tuple[str, list[Any]]] = {}


def _whole(path: Path) -> bool:
    return (path / META).exists() and (path / STATE).exists()


def load(path: str | os.PathLike, *, tag: str, params: dict[str, torch.Tensor]) -> State | None:
    """The state of this run (``tag``) for these ``params``, read and checked; None when there is
    none usable. Nothing is changed: ``State.restore`` applies it."""
    from safetensors.torch import load_file

    path = Path(path)
    where, old = str(path), _aside(path, "old")
    _lineage.pop(where, None)   # a run starts here: its lineage is what it restores, if anything
    if not _whole(path) and _whole(old):
        path = old                        # a crash between the two renames of save()
    if not _whole(path):
        return None
    try:
        doc = json.loads((path / META).read_text())
        if doc.get("format") != FORMAT or doc.get("tag") != tag:
            return None
        raw = load_file(str(path / STATE))
        saved = {k[len("param."):]: t for k, t in raw.items() if k.startswith("param.")}
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for k, t in raw.items():
            if k.startswith("optim."):
                _, key, name = k.split(".", 2)
                optim.setdefault(name, {})[key] = t
        cuda = sorted((k for k in raw if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        made = doc.get("made_by")
        state = State(step=int(doc["step"]), where=where, tag=tag, made_by=made if isinstance(made, list) else [None],
                      meta=dict(doc["meta"]),
                      tensors={k[len("extra."):]: t for k, t in raw.items() if k.startswith("extra.")},
                      params=saved, optim=optim,
                      rng={"torch": raw["rng.torch"], "cuda": [raw[k] for k in cuda], "python": doc["rng"]})
        if doc["rng"] is not None:
            version, internal, gauss = doc["rng"]
            random.Random().setstate((version, tuple(internal), gauss))   # a malformed one fails here, not mid-restore
    except Exception:  # noqa: BLE001 -- a torn or foreign state (safetensors raises its own error type)
        return None
    # everything restore() will use, checked here: a state that passes cannot fail half-way through
    rng = state.rng["torch"]
    fits = (state.step >= 0 and set(saved) == set(params) and set(optim) <= set(params)
            and all(saved[n].shape == p.shape for n, p in params.items())
            and all(t.shape == params[n].shape or (k == "step" and t.dim() == 0)
                    for n, kv in optim.items() for k, t in kv.items())
            and rng.dtype == torch.uint8 and rng.dim() == 1 and rng.shape == torch.get_rng_state().shape
            and all(t.dtype == torch.uint8 and t.shape == (16,) for t in state.rng["cuda"]))   # Philox: seed, offset
    return state if fits else None


def clear(path: str | os.PathLike) -> None:
    """Remove the state and what a crash mid-save may have left beside it."""
    path = Path(path)
    _lineage.pop(str(path), None)
    for p in (path, _aside(path, "tmp"), _aside(path, "old")):
        shutil.rmtree(p, ignore_errors=True)
