"""Config = signature: typed, keyword-only dataclasses are the one place a setting is declared.

A field made with :func:`setting` carries its help text, its command-line flag and its bounds.
From that one declaration come:

- the command-line options (:func:`options`): the flag, its help with the default the dataclass
  holds, its type (lists are comma-separated), and nothing restated;
- YAML keys (:func:`from_mapping`): the same names with underscores, coerced by the field's
  real type (``typing.get_type_hints``, never by matching annotation text), unknown keys
  refused with a suggestion;
- validation (:func:`validate`, called from each config's ``__post_init__``): bounds and choices,
  in the library's words (the setting's name), so an error reads the same from the API, a YAML
  file or a flag.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import MISSING, field, fields
from typing import Any, Callable, Sequence

from moeguard.errors import MoeguardError, suggest

KEY = "moeguard"


# a seed's range: numpy's generators refuse negative seeds and torch's overflow past 2**64; derived
# seeds (seed * 1000 + i, seed + k) stay far inside both
SEED_MAX = 2**32 - 1


def setting(default: Any = MISSING, *, help: str, flag: str | None = None, min: float | None = None,
            max: float | None = None, choices: tuple | None = None, factory: Callable[[], Any] | None = None,
            cli: bool = True, negative: str | None = None) -> Any:
    """A config field. ``flag``: the option name (default ``--field-name``); ``negative``: the
    ``--no-x`` form of a boolean flag; ``cli=False``: a YAML/API-only setting."""
    md = {KEY: {"help": help, "flag": flag, "min": min, "max": max, "choices": choices, "cli": cli,
                "negative": negative}}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def like(cls: type, name: str, default: Any = MISSING, **changes: Any) -> Any:
    """Field ``name`` of ``cls`` declared again for another config (the audit's sweep settings are
    the sweep's): the same help, flag and bounds; ``default`` and ``changes`` (help, min, ...) differ."""
    f = next(x for x in fields(cls) if x.name == name)
    md = {KEY: {**meta(f), **changes}}
    if default is MISSING and f.default_factory is not MISSING:  # type: ignore[misc]
        return field(default_factory=f.default_factory, metadata=md)  # type: ignore[misc]
    return field(default=f.default if default is MISSING else default, metadata=md)


def meta(f: dataclasses.Field) -> dict[str, Any]:
    return f.metadata.get(KEY, {})


def flag_of(f: dataclasses.Field) -> str:
    return meta(f).get("flag") or "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


# --------------------------------------------------------------------------- types

def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(type without Optional, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _sequence(tp: Any) -> tuple[type, Any] | None:
    """(list or tuple, element type) for list[X] / tuple[X, ...]."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return origin, (args[0] if args else str)
    return None


def _scalar(name: str, value: Any, tp: Any) -> Any:
    noun = getattr(tp, "__name__", str(tp))
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):   # OverflowError: a 400-digit YAML integer as a float
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise MoeguardError(f"setting '{name}' is {shown}, expected {noun}",
                            hint=f"give {name} {noun} value(s)") from None
    return value


def repeated(values: Sequence[Any]) -> list[str]:
    """The values ``values`` holds more than once, sorted, as text (a list setting's, a comma flag's)."""
    return sorted({str(v) for i, v in enumerate(values) if v in values[:i]})


def coerce(cls: type, name: str, value: Any) -> Any:
    """``value`` (from YAML or a flag's text) as field ``name`` of ``cls`` holds it."""
    tp, optional = _unwrap(typing.get_type_hints(cls)[name])
    if value is None:
        if optional:
            return None
        raise MoeguardError(f"setting '{name}' is empty", hint="leave it out for the default")
    seq = _sequence(tp)
    if seq is not None:
        kind, elem = seq
        if isinstance(value, str):
            value = [x.strip() for x in value.split(",") if x.strip()]
        if not isinstance(value, (list, tuple)):
            raise MoeguardError(f"setting '{name}' is {value!r}, expected a list",
                                hint=f"e.g. {name}: [a, b] in YAML, or a comma-separated flag")
        if not value:
            raise MoeguardError(f"setting '{name}' is empty", hint="leave it out for the default")
        out = kind(_scalar(name, v, elem) for v in value)
        fixed = kind is tuple and Ellipsis not in typing.get_args(tp)   # (LOW, HIGH): may be equal
        twice = repeated(out)
        if twice and not fixed:   # a grid or a list of names: a repeat doubles jobs and skews every pairing
            raise MoeguardError(f"setting '{name}' names {', '.join(twice)} more than once",
                                hint=f"list each value of {name} once")
        if fixed and len(out) != len(typing.get_args(tp)):   # (LOW,): an IndexError later; (a, b, c): c ignored
            raise MoeguardError(f"setting '{name}' has {len(out)} value(s), expected {len(typing.get_args(tp))}",
                                hint=f"give {name} exactly {len(typing.get_args(tp))} values")
        return out
    return _scalar(name, value, tp)


def from_mapping(cls: type, values: dict[str, Any], *, what: str) -> dict[str, Any]:
    """Check the keys of ``values`` against ``cls`` and coerce each; returns constructor kwargs."""
    known = {f.name for f in fields(cls)}
    out = {}
    for k, v in values.items():
        key = str(k).replace("-", "_")
        if key not in known:
            raise MoeguardError(f"unknown {what} setting '{k}'", hint=suggest(key, sorted(known)))
        out[key] = coerce(cls, key, v)
    return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def validate(obj: Any) -> None:
    """Bounds and choices declared with :func:`setting`; call from ``__post_init__``."""
    hints = None
    for f in fields(obj):
        m, value = meta(f), getattr(obj, f.name)
        if value is None or not m:
            continue
        if isinstance(value, tuple):   # a fixed-length one (LOW, HIGH) given another length by a library caller
            hints = hints if hints is not None else typing.get_type_hints(type(obj))
            tp, _ = _unwrap(hints[f.name])
            args = typing.get_args(tp)
            if typing.get_origin(tp) is tuple and args and Ellipsis not in args and len(value) != len(args):
                raise MoeguardError(f"{f.name} has {len(value)} value(s), expected {len(args)}",
                                    hint=f"give {f.name} exactly {len(args)} values")
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):   # nan passes every bound: nan < min is False
                raise MoeguardError(f"{f.name} is {value!r}; it must be a finite number", hint=f"give {f.name} a number")
            if m.get("min") is not None and isinstance(v, (int, float)) and v < m["min"]:
                raise MoeguardError(f"{f.name} is {value!r}; it must be at least {_num(m['min'])}",
                                    hint=f"set {f.name} to {_num(m['min'])} or more")
            if m.get("max") is not None and isinstance(v, (int, float)) and v > m["max"]:
                raise MoeguardError(f"{f.name} is {value!r}; it must be at most {_num(m['max'])}",
                                    hint=f"set {f.name} to {_num(m['max'])} or less")
            if m.get("choices") and v not in m["choices"]:
                raise MoeguardError(f"{f.name} is {v!r}", hint=suggest(str(v), list(m["choices"])))


# --------------------------------------------------------------------------- the command line

def options(cls: type, *, only: list[str] | None = None, exclude: tuple[str, ...] = (), unset: bool = False,
            overrides: dict[str, dict[str, Any]] | None = None) -> list[inspect.Parameter]:
    """Typer parameters for the fields of ``cls`` (``only`` in that order, else every CLI field).

    ``unset``: every option defaults to None ("not given"), so a layer below (a YAML file, a
    model-dependent default) decides; the help text still shows the dataclass default.
    ``overrides``: per field, a different ``flag``/``help``/``default`` for this command."""
    import typer

    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    names = only if only is not None else [f.name for f in fields(cls) if meta(f).get("cli", True)]
    params = []
    for name in names:
        if name in exclude:
            continue
        f = by_name[name]
        m = {**meta(f), **(overrides or {}).get(name, {})}
        tp, optional = _unwrap(hints[name])
        default = m["default"] if "default" in m else default_of(f)
        is_seq = _sequence(tp) is not None
        cli_tp = str if is_seq else tp
        flag = m.get("flag") or flag_of(f)
        decls = [f"{flag}/{m['negative']}"] if tp is bool and m.get("negative") else [flag]
        help_text = m.get("help", "")
        shown = default_of(f) if "default" not in m else m["default"]
        if shown is not MISSING and shown is not None and shown != () and shown != []:
            if isinstance(shown, (list, tuple)):
                shown = ",".join(str(x) for x in shown)
            help_text += f" (default: {shown})"
        opt_kw: dict[str, Any] = {"help": help_text, "show_default": False}
        if not is_seq and tp is int:
            if m.get("min") is not None:
                opt_kw["min"] = m["min"]
            if m.get("max") is not None:
                opt_kw["max"] = m["max"]
        elif not is_seq and tp is float and (m.get("min") is not None or m.get("max") is not None):
            # the bounds are checked by validate(), not typer: nan fails typer's range as "should be at
            # most 10", where validate says it is not a number
            lo, hi = m.get("min"), m.get("max")
            opt_kw["help"] = help_text + " [" + (f"{_num(lo)}<=" if lo is not None else "") + "x" \
                + (f"<={_num(hi)}" if hi is not None else "") + "]"
        if unset:
            annotation, value = typing.Optional[cli_tp], None
        elif default is MISSING:
            annotation, value = cli_tp, inspect.Parameter.empty  # a required option
        elif is_seq:
            annotation, value = typing.Optional[str], (",".join(str(x) for x in default) if default else None)
        else:
            annotation, value = (typing.Optional[tp] if optional else tp), default
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=typing.Annotated[annotation, typer.Option(*decls, **opt_kw)],
                                        default=value))
    return params


def command(params: list[inspect.Parameter]) -> Callable[[Callable], Callable]:
    """Give ``fn(**kwargs)`` the signature ``params`` for typer (its own parameters are ignored)."""
    def wrap(fn: Callable) -> Callable:
        def cmd(**kwargs):
            return fn(**kwargs)
        cmd.__name__, cmd.__doc__, cmd.__module__ = fn.__name__, fn.__doc__, fn.__module__
        cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        cmd.__annotations__ = {p.name: p.annotation for p in params}
        return cmd
    return wrap


def build(cls: type, flags: dict[str, Any], *, what: str, base: dict[str, Any] | None = None, **fixed: Any):
    """``cls`` from defaults < ``base`` (a YAML file's values) < given flags (None: not given) <
    ``fixed`` (values the command resolved itself)."""
    values = {**from_mapping(cls, base or {}, what=what)}
    names = {f.name for f in fields(cls)}
    for k, v in flags.items():
        if k in names and v is not None:
            values[k] = coerce(cls, k, v)
    values.update(fixed)
    return cls(**values)


def run_seeds(seed: int, n: int) -> list[int]:
    """The seeds of ``n`` runs from ``seed``: seed, seed + 1, ... kept within the seeds every setting
    accepts (``--seed`` at SEED_MAX gave its second run SEED_MAX + 1, refused after the expensive
    first phase)."""
    return [(seed + i) % (SEED_MAX + 1) for i in range(n)]


def is_decimal(text: Any) -> bool:
    """Whether ``text`` is written in ASCII digits only: ``str.isdigit()`` also takes '²' and other
    digits ``int()`` refuses (a ValueError and a traceback on a plan's layer key, a 500 on a header)."""
    return isinstance(text, str) and text.isascii() and text.isdecimal()


def seed_everything(seed: int) -> None:
    """Python's and torch's generators from ``seed``, before a command's model work (``--seed``)."""
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)
