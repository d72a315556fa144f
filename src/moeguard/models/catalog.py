"""`moeguard families`: the built-in specs, and for every MoE model type in the installed
transformers whether moeguard supports it built in, by a verified inferred spec, or not (and why).

A model type counts as MoE when its (text) config has an expert count above 1 under one of the
keys families use. Inference runs on each type's *default* config: a checkpoint whose config
turns on another routing switch (a logit soft-cap, say) is verified again when it is loaded.
"""

from __future__ import annotations

from moeguard.models.families import FAMILIES, _BY_MODEL_TYPE, moe_config
from moeguard.models.infer import _COUNT_KEYS, infer_family


def check_model_types(value: str) -> list[str]:
    """``--model-types``: comma-separated model types the installed transformers knows (a typo is
    refused with the nearest names, not reported as "unsupported")."""
    import difflib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from moeguard.errors import MoeguardError

    types = [t.strip() for t in value.split(",") if t.strip()]
    if not types:
        raise MoeguardError(f"--model-types '{value}' names no model type", hint="pass e.g. --model-types flint")
    unknown = [t for t in types if t not in CONFIG_MAPPING_NAMES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(CONFIG_MAPPING_NAMES), n=3, cutoff=0.6)
        raise MoeguardError(f"--model-types names {unknown}, which the installed transformers does not know",
                            hint=(f"did you mean {', '.join(close)}? " if close else "")
                            + "`moeguard families` lists every MoE model type")
    return types


def builtin_rows() -> list[dict]:
    """One row per built-in family: model types, where its pieces live and its routing rule
    (described on the family's default config)."""
    from transformers import AutoConfig

    rows = []
    for name in FAMILIES.names():
        f = FAMILIES.get(name)
        try:   # read where the family keeps its keys (DBRX: ffn_config)
            rule = f.routing.describe(moe_config(AutoConfig.for_model(f.model_types[0])))
        except Exception:   # a config class that needs arguments: describe the rule alone
            rule = f.routing.describe(object())
        rows.append({"family": name, "model_types": list(f.model_types), "block": "|".join(f.block_attrs),
                     "router": f"{f.router_attr}.{f.router_weight_attr}", "count_key": f.config_key(f.num_experts_key),
                     "top_k_key": f.config_key(f.top_k_key) if f.top_k_key else f"fixed: {f.fixed_top_k}", "shared": list(f.shared_attrs), "routing": rule})
    return rows


def moe_model_types() -> list[str]:
    """Every model type of the installed transformers whose default config counts experts."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    out = []
    for model_type in sorted(CONFIG_MAPPING_NAMES):
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:
            continue
        if model_type in _BY_MODEL_TYPE or any(_experts(c) for c in _sub_configs(config)):
            out.append(model_type)
    return out


def _sub_configs(config) -> list:
    subs = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            subs.extend(_sub_configs(sub))
    return subs


def _experts(config) -> bool:
    d = config.to_dict()
    return any(isinstance(d.get(k), int) and not isinstance(d.get(k), bool) and d[k] > 1 for k in _COUNT_KEYS)


def installed_rows(model_types: list[str] | None = None, *, progress=None) -> list[dict]:
    """Status of each MoE model type (all of the installed transformers', or those named)."""
    from transformers import AutoConfig

    types = model_types if model_types is not None else moe_model_types()
    task = progress.add_task("inferring family specs", total=len(types)) if progress is not None else None
    rows = []
    for model_type in types:
        if model_type in _BY_MODEL_TYPE:
            row = {"model_type": model_type, "status": "built-in", "family": _BY_MODEL_TYPE.get(model_type).name,
                   "reasons": []}
        else:   # a causal LM, a multimodal wrapper (image-text-to-text) or a text sub-config (its base model)
            try:
                found = infer_family(AutoConfig.for_model(model_type))
                row = {"model_type": model_type, "status": found.status,
                       "family": found.spec.name if found.spec is not None else None, "reasons": list(found.reasons)}
                if found.note:
                    row["note"] = found.note
            except Exception as e:   # one type's failure is that type's row, never the whole listing
                row = {"model_type": model_type, "status": "unsupported", "family": None,
                       "reasons": [f"inference failed ({type(e).__name__}: {str(e).strip()[:160]})"]}
        rows.append(row)
        if task is not None:
            progress.advance(task)
    return rows


def catalog(model_types: list[str] | None = None, *, progress=None) -> dict:
    installed = installed_rows(model_types, progress=progress)
    counts: dict[str, int] = {}
    for r in installed:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    import transformers

    return {"transformers": transformers.__version__, "builtin": builtin_rows(), "installed": installed,
            "counts": counts}
