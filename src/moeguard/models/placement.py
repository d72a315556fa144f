"""Where a model's weights go: ``--device-map`` and ``--max-memory`` checked before any weights load,
and the ``from_pretrained`` arguments that keep host memory under a cap (accelerate's offload)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from moeguard.errors import MoeguardError

PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")   # accelerate's strategies


def check_device_map(value: str | None, *, what: str = "--device-map", on_this_machine: bool = True) -> str | None:
    """``value`` as ``from_pretrained`` takes it, or a one-line error before any weights load: one of
    accelerate's strategies (:data:`PLACEMENTS`: auto spreads the layers over the visible GPUs,
    then the CPU) or one device this machine has (cpu, cuda, cuda:N, xpu...; not Apple's mps, which has no
    float64, nor a strategy that would fill it). None: the CPU.

    ``on_this_machine=False``: the weights load elsewhere (Ray workers; a head node often has no
    GPU), so only the spelling is checked here; each worker checks its own devices as it loads."""
    if value is None:
        return None
    import torch

    v = str(value).strip()
    if v in PLACEMENTS:
        if on_this_machine and placed_on(v) == "mps":   # accelerate's strategies fill Apple's GPU first
            raise MoeguardError(f"{what} {v} would place the weights on Apple's MPS device, which has no float64 "
                                "(moeguard's scores and merges use it)", hint=f"drop {what} to use the CPU")
        return v
    hint = f"pass one of {', '.join(PLACEMENTS)}, or a device: cpu, cuda, cuda:N"
    try:
        dev = torch.device(v)
    except (RuntimeError, ValueError):
        raise MoeguardError(f"{what} {value!r} is neither a placement nor a device", hint=hint) from None
    if dev.type == "mps":
        raise MoeguardError(f"{what} {v}: Apple's MPS device has no float64, which moeguard's scores and merges "
                            "use", hint=f"drop {what} to use the CPU")
    if dev.type == "cpu" or not on_this_machine:
        return v
    backend = getattr(torch, dev.type, None)
    try:
        n = int(backend.device_count()) if backend is not None and backend.is_available() else 0
    except Exception:  # noqa: BLE001 -- a backend torch names but cannot query (no driver) has no devices
        n = 0
    if n == 0:
        build = f"torch {torch.__version__}" + (", a CPU build" if dev.type == "cuda" and torch.version.cuda is None else "")
        raise MoeguardError(f"{what} {v}: no {dev.type} device is visible ({build})",
                            hint=f"run on a machine with one (and a torch built for it), or drop {what} to use the CPU")
    if dev.index is not None and dev.index >= n:
        raise MoeguardError(f"{what} {v}: this machine has {n} {dev.type} device(s), {dev.type}:0..{n - 1}",
                            hint=f"pass one of them, or {what} auto to spread the model over all")
    return v


def placed_on(device_map: str | None, *, capped: bool = False) -> str:
    """The kind of device a strategy (:data:`PLACEMENTS`) puts the first weights on here: the first
    accelerator torch sees, else the CPU. A run keyed by ``auto`` alone resumed a GPU run's kept work on
    a machine without one, mixing the two's numerics; a device names its own kind. ``capped``: the auto
    map of a --max-memory load, whose budget leaves Apple's MPS out (offload_settings)."""
    import torch

    if device_map is None:
        return "cpu"
    if device_map not in PLACEMENTS:
        return torch.device(device_map).type
    for kind in ("cuda", "xpu", "npu") if capped else ("cuda", "xpu", "npu", "mps"):
        backend = getattr(torch, kind, None)
        try:
            if backend is not None and backend.is_available() and (kind == "mps" or backend.device_count() > 0):
                return kind
        except Exception:  # noqa: BLE001 -- a backend torch names but cannot query has no devices
            continue
    return "cpu"


def capped_placement(device_map: str | None, max_memory: int | None) -> dict[str, str]:
    """The ``device_map``/``placed_on`` entries of a load (records and resume keys). A --max-memory load
    without a map is accelerate's auto: where that puts weights on an accelerator it says so (a capped
    run killed on a GPU resumed on the CPU); on the CPU (and disk) nothing, the same entries as an
    uncapped CPU run, whose stages a capped one shares."""
    if device_map is None and max_memory is not None:
        kind = placed_on("auto", capped=True)
        return {} if kind == "cpu" else {"device_map": "auto", "placed_on": kind}
    if device_map is None:
        return {}
    return {"device_map": device_map, **({"placed_on": placed_on(device_map)} if device_map in PLACEMENTS else {})}


_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_memory(text: str, *, what: str = "--max-memory", device_map: str | None = None,
                 map_flag: str = "--device-map") -> int:
    """Bytes from a size such as ``8GiB``, ``512MB``, ``1.5G`` (G, M, K alone are binary, as in
    ``ulimit``) or a plain byte count. ``device_map``: the placement asked beside the cap; one
    device (cpu, cuda:0) is refused, since transformers applies the cap only to a strategy (auto...)
    and would load the whole model there without a word."""
    if device_map is not None and str(device_map).strip() not in PLACEMENTS:
        raise MoeguardError(f"{what} places layers across devices and disk itself, and {map_flag} {device_map} puts "
                            "every layer on one device (the cap would be ignored)",
                            hint=f"drop {map_flag}, or pass {map_flag} auto to fill the GPUs first")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise MoeguardError(f"{what} '{text}' is not a memory size", hint="write a size such as 8GiB, 512MiB or 20GB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 2**20:
        raise MoeguardError(f"{what} '{text}' is {size} bytes", hint="give at least 1MiB (e.g. 4GiB)")
    return size


def offload_settings(max_memory: int, *, device_map=None, folder=None) -> tuple[dict[str, Any], Path | None]:
    """``from_pretrained`` arguments that keep the weights in host memory under ``max_memory``
    bytes, and the temporary offload folder made here (None when ``folder`` was given).

    accelerate's ``auto`` map fills the GPUs first (each with what it has free), then host memory
    up to the cap, then disk; it never splits a decoder layer."""
    from accelerate.utils import get_max_memory

    # mps is Apple's unified memory, the host's own: with it in the budget the cap held nothing (the weights
    # went there first, up to all the RAM free), and moeguard's float64 scoring does not run on it
    budget = {k: v for k, v in get_max_memory().items() if k not in ("cpu", "disk", "mps")}
    budget["cpu"] = int(max_memory)
    made = None
    if folder is None:
        folder = made = Path(tempfile.mkdtemp(prefix="moeguard-offload-"))
    return {"device_map": device_map or "auto", "max_memory": budget, "offload_folder": str(folder)}, made
