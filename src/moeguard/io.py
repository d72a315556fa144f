"""Atomic outputs (write to a temporary sibling, rename when complete, never clobber silently),
and bounded-memory reads of safetensors shards."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from moeguard.errors import MoeguardError

# safetensors dtypes that hold plain float values, and the key suffixes of quantization scales and
# packed blocks: what readers that need real numbers (trace, merging) refuse otherwise
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# quantized layouts' companion tensors: FP8 block scales, bitsandbytes/GPTQ-like scales, MXFP4 blocks, and
# llm-compressor's packed int weights with their scales and zero points
SCALE_SUFFIXES = ("_scale_inv", ".scales", "_scales", "_blocks", "weight_packed", "weight_scale", "weight_zero_point")


def check_output(path: str | os.PathLike, *, overwrite: bool, kind: str | None = None,
                 inputs: Iterable[Any] = ()) -> Path:
    """Fail before any work if ``path`` exists and may not be replaced, or (``kind`` "file" or
    "folder": what the command writes) is of the other kind: --overwrite swaps like for like, and a
    file over a folder failed only at the rename, after all the work. ``inputs``: the command's
    local input paths (others, hub ids and None, are skipped); an output that is one of them, or
    a folder holding one, would destroy it when replaced, and one inside an input model's folder
    would change that model."""
    path = Path(path)
    if path.name in ("", ".", ".."):   # '.', '..': the temporary sibling and the swap need a name (a traceback, after the work)
        raise MoeguardError(f"output {str(path)!r} names no file or folder of its own",
                            hint="pass a new path, e.g. ./out")
    looked_up(path, said=f"output {str(path)!r}", follow=False,
              hint="choose an --out in a folder you can reach, with a shorter name")
    if path.is_symlink():   # the swap would move the link and leave its target stale (or write beside a dangling one)
        raise MoeguardError(f"output {path} is a symbolic link (to {os.readlink(path)})",
                            hint="pass the path it points to as --out")
    check_not_inputs(path, inputs)
    if path.exists() and not overwrite:
        raise MoeguardError(f"output {path} already exists", hint="choose another path or pass --overwrite")
    if kind is not None and path.exists() and path.is_dir() != (kind == "folder"):
        raise MoeguardError(f"output {path} is a {'folder' if path.is_dir() else 'file'}; this command writes a {kind}",
                            hint=f"pass a {kind} path for --out")
    parent = path.parent
    if not parent.exists():
        raise MoeguardError(f"output folder {parent} does not exist", hint=f"create it: mkdir -p {parent}")
    # a parent that is a file, or one this user cannot write, failed in mkstemp after all the work
    if not parent.is_dir():
        raise MoeguardError(f"output {path} is inside {parent}, which is a file, not a folder",
                            hint="choose an --out inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoeguardError(f"output folder {parent} is not writable by this user",
                            hint="choose an --out in a folder you can write, or fix its permissions")
    return path


def check_not_inputs(path: Path, inputs: Iterable[Any]) -> None:
    """A one-line error where the output ``path`` is, or holds, one of ``inputs`` (local paths; others,
    hub ids and None, are skipped), or lies inside an input model's folder: replacing it would destroy
    the input, and writing in a checkpoint's folder would change that model."""
    out, inputs = Path(path).resolve(), list(inputs)   # read twice below
    for given, inp in local_inputs(inputs):
        # by name, and by the file itself where both exist: on a case-insensitive file system (macOS's APFS,
        # Windows) ./OLMoE is ./olmoe, and --overwrite replaced the model it was cut from
        if out == inp or out in inp.parents or any(_same_file(out, p) for p in (inp, *inp.parents)):
            raise MoeguardError(f"output {path} is (or holds) the input {given}: writing it would replace the input",
                                hint="choose another path for --out")
    check_outside_models(path, inputs)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:   # either missing (an output not made yet), or not to be looked at
        return False


def check_outside_models(path: Path, inputs: Iterable[Any]) -> None:
    """A one-line error where the output ``path`` lies inside an input checkpoint's folder (its
    config.json): an output there changes the model (a task's data folder may take outputs beside
    the data)."""
    out = Path(path).resolve()
    for given, inp in local_inputs(inputs):
        if inp.is_dir() and (inp in out.parents or any(_same_file(inp, p) for p in out.parents)) \
                and (inp / "config.json").is_file():
            raise MoeguardError(f"output {path} is inside the model folder {given}: writing it would change the model",
                                hint="choose an --out outside it")


def local_inputs(inputs: Iterable[Any]) -> Iterator[tuple[Any, Path]]:
    """``(as given, resolved path)`` of each input that is a path on this machine (None, names and hub
    ids are skipped). os.path.exists: False where the path cannot even be looked at (a recorded source
    under another user's mode-700 home: Path.exists raised PermissionError, a traceback)."""
    for given in inputs:
        if given is not None and os.path.exists(Path(str(given)).expanduser()):
            yield given, Path(str(given)).expanduser().resolve()


def hold_lock(path: Path, *, busy: str, hint: str):
    """An exclusive lock on the file ``path`` (made if missing), held while the returned open file
    is: close it to release. ``busy``/``hint``: the one-line error where another process holds it."""
    import errno
    import fcntl

    while True:
        try:
            f = open(path, "a")   # noqa: SIM115 -- held open for the locker's life
        except OSError as e:   # a parent that is a file, or a folder this user cannot write
            raise MoeguardError(f"cannot make the lock file {path}: {e.strerror}",
                                hint="choose an output in a folder you can write") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MoeguardError(f"{busy} (it holds {path})", hint=hint) from None
            # NFS without a lock daemon (ENOLCK), Lustre mounted noflock (ENOSYS): no other run holds it
            raise MoeguardError(f"cannot lock {path}: {e.strerror} (the file system of {path.parent} does not "
                                f"take file locks)", hint="write the output on a local file system") from None
        try:   # a holder that unlinks the file as it releases it: the lock taken must be on the file there now
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block completes."""
    path = check_output(path, overwrite=overwrite, kind="folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _move_into_place(tmp, path, overwrite=overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sync_file(path: str | os.PathLike) -> None:
    """``path``'s bytes (or a folder's entries: its renames) onto the disk, before a rename or a record
    says it is done (after a power loss an unsynced file renamed into place can be empty)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:   # Windows does not open folders this way (nor need it: renames are journaled there)
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:   # some filesystems refuse fsync on a folder; the files themselves are synced
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (read in blocks: a request log can be large)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def looked_up(path: Path, *, said: str, hint: str, follow: bool = True) -> os.stat_result | None:
    """``path``'s stat (``follow``: through a link), None where it does not exist, or a one-line error
    naming it as ``said``: pathlib's is_file/is_symlink/exists raise past ENOENT (EACCES on a folder
    above it, a name over 255 bytes) and os.stat raises ValueError on a NUL byte (a name from YAML or a
    library call): tracebacks."""
    try:
        return os.stat(path) if follow else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise MoeguardError(f"{said} cannot be looked at ({getattr(e, 'strerror', None) or e})", hint=hint) from None


def read_json(path: str | os.PathLike, *, what: str, hint: str) -> Any:
    """A JSON file the user handed over: a missing or malformed one is a one-line error naming ``what``."""
    p = Path(path)
    found = looked_up(p, said=f"{what} {p}", hint="check the path and its folders' permissions")
    if found is None:
        raise MoeguardError(f"{what} {p} does not exist", hint=hint)
    if not stat.S_ISREG(found.st_mode):
        raise MoeguardError(f"{what} {p} {'is a folder' if stat.S_ISDIR(found.st_mode) else 'is not a regular file'}",
                            hint=hint)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:   # unreadable by this user (mode 000), or an I/O error
        raise MoeguardError(f"{what} {p} cannot be read ({exc.strerror})", hint="check the file's permissions") from None
    except UnicodeDecodeError as exc:
        raise MoeguardError(f"{what} {p} is not valid JSON ({exc})", hint=hint) from None
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise MoeguardError(f"{what} {p} is not valid JSON ({exc})", hint=hint) from None
    except RecursionError:   # [[[[... deeper than the parser recurses
        raise MoeguardError(f"{what} {p} is not valid JSON (nested too deeply to read)", hint=hint) from None


def json_safe(value: Any) -> Any:
    """``value`` with every float that is not a finite number (NaN, +-inf; numpy's too) as None.

    JSON has no NaN or Infinity: Python writes them as bare tokens that jq, JavaScript and strict
    parsers refuse. Where a non-finite number means something (a broken model's NaN perplexity),
    its producer says so in a field of its own (``analysis.retention``: such a model retains 0);
    here it is only an unknown number."""
    if isinstance(value, float):          # numpy's float64 is a float
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind == "f" \
            and getattr(value, "ndim", None) == 0:
        return json_safe(float(value))   # float32/float16 scalars (json.dumps refuses them anyway)
    return value


def dumps(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` (``data``), strict: the text is valid JSON for any reader."""
    return json.dumps(json_safe(data), allow_nan=False, **kwargs)


def strict_loads(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity, which :func:`dumps` never writes (ValueError):
    a file that holds them was written by something else, or before this rule."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:   # [[[[... deeper than the parser recurses: damaged, as any other non-JSON
        raise ValueError("nested too deeply to read") from None


def whole_json(path: Path) -> bool:
    """Whether ``path`` reads as strict JSON (a kept output is trusted only then: a kill mid-write
    leaves one cut short)."""
    return read_kept_json(path) is not None


def read_kept_json(path: Path) -> Any:
    """A kept output's JSON, or None where it does not read whole (cut short by a kill or a power loss:
    the work is done again, never a traceback at every rerun)."""
    try:
        return strict_loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):   # UnicodeDecodeError is a ValueError
        return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = True, sync: bool = False) -> Path:
    return write_text(path, dumps(data, indent=2, sort_keys=False) + "\n", overwrite=overwrite, sync=sync)


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True, sync: bool = False) -> Path:
    """Write via a temporary sibling and a rename, with the permissions a plain open() would give.
    ``sync``: the file's bytes reach the disk before the rename (a state a server rewrites every
    minute: on some file systems a power loss after a rename without it leaves an empty file)."""
    path = check_output(path, overwrite=overwrite, kind="file")
    # a replaced file keeps its mode, as open() would (a chmod 600 alert log stays private)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:   # a link fails where another run wrote the file since the check (a rename would replace it)
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise _appeared(path) from None
            except OSError:   # a file system without hard links: the check, then the rename
                if path.exists():
                    raise _appeared(path) from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def resumable_dir(path: str | os.PathLike, *, overwrite: bool = False, settings: Any = None) -> Iterator[Path]:
    """Like :func:`atomic_dir`, but the temporary sibling ``.NAME.partial`` survives a failure or
    a kill, so running the same command again continues from what it holds. A partial run
    started with other ``settings`` is discarded. The block should delete its own scratch
    files before it ends; everything left in the folder becomes ``path``."""
    path = check_output(path, overwrite=overwrite, kind="folder")
    with one_run(path):
        partial = _partial(path, settings)
        yield partial
        # the stamp goes once the folder is in place: a failed move keeps the kept steps resumable
        _move_into_place(partial, path, overwrite=overwrite)
        _open_partials.remove(partial)
        (path / STAMP).unlink(missing_ok=True)
        (path / MADE_BY).unlink(missing_ok=True)


@contextlib.contextmanager
def resumable_scratch(path: str | os.PathLike, *, overwrite: bool = False, settings: Any = None) -> Iterator[Path]:
    """For a command whose output is one file: the scratch folder ``.NAME.partial`` beside
    ``path`` keeps finished steps (``kept.kept_arrays``) across a failure or a kill, as
    :func:`resumable_dir` does, and is deleted when the block completes. The block writes
    ``path`` itself (``write_json``)."""
    path = check_output(path, overwrite=overwrite, kind="file")
    with one_run(path):
        partial = _partial(path, settings)
        yield partial
        _open_partials.remove(partial)
        shutil.rmtree(partial, ignore_errors=True)


@contextlib.contextmanager
def lazy_scratch(path: str | os.PathLike, *, overwrite: bool = False, kind: str = "file") -> Iterator[Path]:
    """Like :func:`resumable_scratch`, for a block that creates the scratch folder itself, and only
    once its inputs have passed their checks (a command refused for bad input leaves nothing
    behind): ``.NAME.partial`` is yielded, not created. What goes in it is keyed by the block (its
    settings stamp is not used); it is deleted when the block completes."""
    path = check_output(path, overwrite=overwrite, kind=kind)
    with one_run(path):
        partial = partial_path(path)
        if partial.exists() and not partial.is_dir():
            partial.unlink()
        _open_partials.append(partial)
        yield partial
        _open_partials.remove(partial)
        shutil.rmtree(partial, ignore_errors=True)


def one_run(path: Path):
    """One resumable run at a time writing ``path``: an exclusive lock on ``.NAME.partial.lock`` beside
    it while the block runs (removed after). A second run of the same output (another suspect, other
    settings) emptied the first's kept steps under it: a traceback, or its progress lost."""
    return held(partial_path(path).with_name(partial_path(path).name + ".lock"),
                busy=f"another moeguard run is writing {path}",
                hint="wait for it to finish (or stop it), or give this run another --out")


@contextlib.contextmanager
def held(lock_file: Path, *, busy: str, hint: str) -> Iterator[None]:
    """:func:`hold_lock` on ``lock_file`` for the block; the file is removed after it."""
    f = hold_lock(lock_file, busy=busy, hint=hint)
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)   # while still held: no stray file after the run
        f.close()


# the partial folders of resumable blocks that started and have not completed (running, or left by
# a failure): an interrupt's message names the latest one still on disk
_open_partials: list[Path] = []


def forget_progress() -> None:
    """Start a new command: the partial folders listed so far belong to earlier ones."""
    _open_partials.clear()


def kept_progress() -> Path | None:
    """The partial folder of the latest resumable block an interrupt left that holds work (None: no
    such block). One that holds nothing but its settings stamp (interrupted before its first kept
    step, or by a method that keeps none) is removed: there is nothing in it to resume from."""
    for p in reversed(_open_partials):
        if not p.is_dir():
            continue
        if any(f.name not in (STAMP, MADE_BY) for f in p.iterdir()):
            return p
        shutil.rmtree(p, ignore_errors=True)
    return None


STAMP = ".moeguard-settings.json"
MADE_BY = ".moeguard-made-by.json"   # provenance.mark's: which versions made what a partial folder holds


def partial_path(path: Path) -> Path:
    """Where a resumable block keeps ``path``'s finished steps: ``.NAME.partial`` beside it."""
    return path.with_name(f".{path.name}.partial")


def started_with(path: Path, settings: Any) -> bool:
    """Whether ``path``'s ``.NAME.partial`` folder is one a run with ``settings`` started: what
    :func:`resumable_dir` keeps; another's is emptied before the block runs."""
    stamp = partial_path(path) / STAMP
    return stamp.is_file() and stamp.read_text() == json.dumps(settings, sort_keys=True, default=str)


def _partial(path: Path, settings: Any) -> Path:
    """``.NAME.partial`` beside ``path``, emptied unless it was started with the same ``settings``;
    listed as open until its block completes (left listed when the block fails: an interrupt's
    message names it)."""
    partial = partial_path(path)
    if partial.exists() and not started_with(path, settings):
        shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
    partial.mkdir(exist_ok=True)
    (partial / STAMP).write_text(json.dumps(settings, sort_keys=True, default=str))
    from moeguard.provenance import mark

    mark(partial, fix="delete it")   # what it holds from another moeguard is reused: the run record says so
    _open_partials.append(partial)
    return partial


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value (job keys, stage keys, derived-model tags, kept pieces' names)."""
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _appeared(path: Path) -> MoeguardError:
    return MoeguardError(f"{path} appeared while this run worked (another run wrote it), and it is not replaced "
                         "without --overwrite", hint="pass --overwrite to replace it, or another --out")


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block ends (they are raised again right after it): the
    CLI turns them into an interrupt at any bytecode, and one between the two renames of a swap left
    the old output hidden aside and the new one deleted by the clean-up. The main thread's Python
    handlers are swapped for one that only records the signal: a signal mask is per thread, and torch's,
    tokenizers' and rich's threads took the signal and had the main thread raise it all the same.
    Off the main thread (no handler can be set there) the block runs as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    before = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None or signal.getsignal(sig) in (None, signal.SIG_IGN):   # absent, set outside Python, or ignored
            continue
        before[sig] = signal.signal(sig, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(got):   # each once, in the order they came
            signal.raise_signal(sig)


def _move_into_place(tmp: Path, path: Path, *, overwrite: bool = True) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` (allowed by --overwrite) is swapped out first.
    Without ``overwrite`` a ``path`` another run wrote since the start is kept (two runs to one --out:
    the later one replaced the first's finished output)."""
    if not overwrite and (path.exists() or path.is_symlink()):
        raise _appeared(path)
    if path.exists():
        # a name no earlier swap left (an interrupt during the removal below leaves its copy; in a
        # container every run is PID 1, and replacing onto that non-empty folder failed after the work)
        import uuid

        old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with signals_held():   # the old copy's removal too: an interrupt left it hidden beside the output
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)


def read_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (validate it first with ``models.safetensorsfiles.check_safetensors``)."""
    import struct

    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


class ShardReader:
    """Slices of safetensors tensors through ``safe_open``, with the resident memory bounded.

    ``safe_open`` memory-maps the file, and every page a read touches counts in RSS until the map
    is closed, so the handle is re-opened every ``map_budget`` bytes read: streaming a checkpoint
    of any size stays a few tens of MB above the interpreter (pruning's surgery, trace's reads).
    """

    def __init__(self, *, map_budget: int = 32 << 20):
        self._handle = None
        self._path: Path | None = None
        self._mapped = 0
        self._budget = map_budget

    def _open(self, path: Path):
        from safetensors import safe_open

        if self._path != path or self._mapped >= self._budget:
            self._handle = None  # unmap before mapping again, so the two never add up
            self._handle = safe_open(path, framework="pt")
            self._path, self._mapped = path, 0
        return self._handle

    def read(self, file: Path, name: str, index=None):
        """``name[index]`` from ``file`` as a torch tensor (the whole tensor when ``index`` is None)."""
        handle = self._open(file)
        t = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        self._mapped += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        self._handle = self._path = None


def strict_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key repeated in one mapping (a task file or an audit config:
    the last of two 'splits:' lines, or of labels {0: ' no', 0: ' yes'}, won silently). Raises
    ``yaml.YAMLError`` (a ``ConstructorError`` with the key's line) as safe_load does."""
    import yaml

    try:
        return yaml.load(text, Loader=_unique_keys_loader())
    except RecursionError:   # [[[[... deeper than the composer recurses: not a YAMLError of its own
        raise yaml.YAMLError("nested too deeply to read") from None


@functools.lru_cache(maxsize=1)
def _unique_keys_loader():
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # '<<: *defaults': flattened by construct_mapping
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:   # an unhashable key: construct_mapping says so
                break
            if repeated:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is repeated in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeys
