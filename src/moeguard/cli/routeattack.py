"""`moeguard route-attack`: how hijackable each expert's routing is (routing security)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moeguard.cli.app import DeviceMapOpt, JsonOpt, ModelOpt, OverwriteOpt, SeedOpt, _console, _progress, app
from moeguard.io import dumps


@app.command("route-attack")
def route_attack(
        out: Annotated[Path, typer.Option("--out", help="folder for route_attack.json (and the heat map with several targets)")],
        layer: Annotated[Optional[str], typer.Option("--layer", help="MoE layer index(es), comma-separated, or 'all'; default: all")] = None,
        expert: Annotated[Optional[int], typer.Option("--expert", help="the expert the router should pick")] = None,
        every: Annotated[bool, typer.Option("--all", help="every expert of the layer(s)")] = False,
        task: Annotated[Optional[str], typer.Option("--task", help="task whose inputs the crafted text goes with; default: the embedded suite's first")] = None,
        position: Annotated[str, typer.Option("--position", help="prefix (the input's tokens follow it) or suffix (the model's reply follows it)")] = "prefix",
        prefix_tokens: Annotated[int, typer.Option("--prefix-tokens", help="length of the crafted prefix or suffix, in tokens")] = 20,
        follow_tokens: Annotated[int, typer.Option("--follow-tokens", help="suffix: reply tokens generated after it and measured")] = 16,
        steps: Annotated[int, typer.Option("--steps", help="GCG steps per target")] = 80,
        candidates: Annotated[int, typer.Option("--candidates", help="substitutions evaluated per step")] = 96,
        evade: Annotated[Optional[Path], typer.Option("--evade", help="a monitor profile the attacker holds: keep the crafted requests' monitor p-values high (an adaptive attacker)")] = None,
        evade_p: Annotated[Optional[float], typer.Option("--evade-p", help="with --evade: the monitor p-value each request should keep (default 0.5)")] = None,
        evade_order: Annotated[str, typer.Option("--evade-order", help="with --evade: rank candidates by 'evasion' first, or by 'hijack' (routing success up to 90%) first")] = "evasion",
        model: ModelOpt = None, device_map: DeviceMapOpt = None, overwrite: OverwriteOpt = False, seed: SeedOpt = 0,
        as_json: JsonOpt = False) -> None:
    """Craft a prefix (or suffix) that makes a layer's router send the following tokens to a chosen expert (GCG)."""
    from moeguard.cli.app import _ints, _seed
    from moeguard.edge import embedded_or, resolve_model
    from moeguard.errors import MoeguardError
    from moeguard.io import check_output
    from moeguard.monitor.hijack import HijackConfig
    from moeguard.monitor.routeattack import run, targets

    for name, value, least in (("--prefix-tokens", prefix_tokens, 1), ("--steps", steps, 0), ("--candidates", candidates, 1),
                               ("--follow-tokens", follow_tokens, 1)):
        if value < least:
            raise MoeguardError(f"{name} is {value}", hint=f"pass {name} of at least {least}")
    if evade is None and (evade_p is not None or evade_order != "evasion"):
        raise MoeguardError("--evade-p and --evade-order need the monitor's profile", hint="pass --evade P.json")
    if evade is not None and evade_p is not None and not 0.0 < evade_p <= 1.0:
        raise MoeguardError(f"--evade-p is {evade_p}", hint="pass --evade-p in (0, 1], e.g. 0.5")
    evade_p = (0.5 if evade_p is None else evade_p) if evade is not None else 0.0
    # a misspelt --position or --evade-order before the model loads
    HijackConfig(layer=0, expert=0, position=position, evade_p=evade_p, evade_order=evade_order).check()
    check_output(out, overwrite=overwrite, inputs=(model, evade), kind="folder")
    handle = resolve_model(model, device_map=device_map)
    prof = None
    if evade is not None:   # the profile is the model's, before any search
        from moeguard.io import read_json
        from moeguard.monitor.evasion import check_profile
        from moeguard.monitor.profile import Profile

        prof = Profile.from_dict(read_json(evade, what="routing profile", hint="make it with `moeguard monitor profile`"),
                                 where=str(evade))
        check_profile(prof, handle)
    layers = None if layer in (None, "all") else _ints(layer, "--layer")
    pairs = targets(handle, layers, expert, every)
    t = embedded_or([task] if task is not None else None, what="--task")[0]   # "" is refused, not the default
    handle.check_fits([t])
    from moeguard.edge import task_inputs

    check_output(out, overwrite=overwrite, inputs=task_inputs([t]), kind="folder")
    _seed(seed)
    cfg = HijackConfig(layer=pairs[0][0], expert=pairs[0][1], prefix_tokens=prefix_tokens, steps=steps,
                       candidates=candidates, seed=seed, position=position, follow_tokens=follow_tokens, evade_p=evade_p,
                       evade_order=evade_order)
    with _progress(stderr=as_json) as progress:
        doc = run(handle, t, pairs, cfg, out=out, overwrite=overwrite, progress=progress, evade=prof)
    if as_json:
        typer.echo(dumps(doc, indent=2))
        return
    from rich.table import Table

    tab = Table(title=f"route-attack on {doc['model']} (task {doc['task']}, {position} {prefix_tokens} tokens"
                      + (f", replies of {follow_tokens} tokens)" if position == "suffix" else ")"))
    cols = ["layer", "expert", "success", f"without {position}", "max load (normal)", f"task score with {position}"]
    if prof is not None:
        cols.append(f"monitor passes (p >= {evade_p:g})")
    for c in cols:
        tab.add_column(c, justify="right")
    for r in doc["targets"]:
        m = r["measured"]
        tab.add_row(str(r["layer"]), str(r["expert"]), f"{100 * m['success']:.0f}%", f"{100 * m['success_without_prefix']:.0f}%",
                    f"{100 * m['load_max']:.0f}% ({100 * m['normal_load_max']:.0f}%)",
                    f"{m['task']['with_prefix']:.4g} ({m['task']['score']:.4g})",
                    *([f"{100 * m['monitor']['passing']:.0f}% ({100 * m['monitor']['passing_without']:.0f}%)"]
                      if prof is not None else []))
    _console().print(tab)
    for l, s in doc["summary"]["layers"].items():
        already = f", routed there already without the text {s['routed_already']}" if s.get("routed_already") else ""
        typer.echo(f"layer {l}: hijacked (>= 90%) {s['hijacked']}{already}, resist {s['resist']}")
    typer.echo(f"written to {out}")
