"""The weight files a checkpoint folder holds, and each one's header checked against its size before
any reader trusts it (``loading.py`` loads through these; safetensors only, never a pickle)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from moeguard.errors import MoeguardError


def safetensors_files(path: Path) -> list[Path]:
    """The weight files transformers will read, in its own order (``model.safetensors`` before an
    index beside it): the files checked are the files loaded."""
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except OSError as e:
            raise MoeguardError(f"cannot read {index} ({e.strerror})", hint="check the file's permissions") from None
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            names = None
        # each shard a plain file name beside the index ('' named the folder itself, 5 was a TypeError)
        if not names or not all(isinstance(n, str) and n and Path(n).name == n and n.endswith(".safetensors")
                                for n in names):
            raise MoeguardError(f"{index} is not a valid safetensors index (a weight_map of tensor -> shard file names)",
                                hint="re-download or re-save the checkpoint") from None
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise MoeguardError(f"{path} lacks shards {missing} named in its index", hint="re-download the checkpoint")
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise MoeguardError(f"{path} holds only pickle weights (.bin/.pt); moeguard loads safetensors only, "
                            "because unpickling untrusted files can run code",
                            hint="convert the checkpoint to safetensors from a trusted environment")
    raise MoeguardError(f"{path} has no model.safetensors or model.safetensors.index.json",
                        hint="pass a checkpoint directory saved with safe_serialization")


# bits per element of every dtype the safetensors format names (sub-byte floats are packed)
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
               "F8_E8M0": 8, "E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16,
               "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}


_MAX_HEADER = 100_000_000   # the safetensors library refuses larger headers too


def check_safetensors(file: Path) -> list[str]:
    """Validate a safetensors file's header (every entry's dtype, shape and byte span, which must
    tile the data exactly) against its size: catches truncation and corruption before any reader
    trusts a field. Returns the names of its tensors."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length beyond end of file")
            if n > _MAX_HEADER:   # a corrupt length read the whole shard (GBs) as a "header" first
                raise ValueError(f"header length {n} is over {_MAX_HEADER} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
        spans = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                raise ValueError(f"tensor {name!r} lacks dtype, shape or data_offsets")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:   # a list or object was a TypeError
                raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(f"tensor {name!r} has shape {shape!r}, expected a list of sizes")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise ValueError(f"tensor {name!r} has data_offsets {offsets!r}")
            needs = -(-math.prod(shape) * _DTYPE_BITS[dtype] // 8)     # whole bytes (sub-byte dtypes packed)
            if offsets[1] - offsets[0] != needs:
                raise ValueError(f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, its {dtype} shape "
                                 f"{shape} needs {needs}")
            spans.append(offsets)
        spans.sort()
        if any(a[1] != b[0] for a, b in zip(spans, spans[1:])) or (spans and spans[0][0] != 0):
            raise ValueError("its tensors' byte spans overlap or leave gaps")
        end = spans[-1][1] if spans else 0
        if 8 + n + end != size:
            raise ValueError(f"file has {size} bytes, its header describes {8 + n + end}")
        return [name for name in header if name != "__metadata__"]
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MoeguardError(f"{file} is not a valid safetensors file ({e})",
                            hint="the file is truncated or corrupt; re-download or re-save it") from None
    except OSError as e:   # unreadable by this user (mode 000), or an I/O error
        raise MoeguardError(f"cannot read {file} ({e.strerror})", hint="check the file's permissions") from None


def tensor_names(file: Path) -> set[str] | None:
    """The tensor names of a whole, valid safetensors ``file`` (its header tiles the file exactly), or
    None where it is missing, cut short or damaged (a file an interrupted run or a power loss left)."""
    from moeguard.io import read_header

    if not file.is_file():
        return None
    try:
        check_safetensors(file)
        return {k for k in read_header(file) if k != "__metadata__"}
    except (MoeguardError, OSError, ValueError):
        return None
