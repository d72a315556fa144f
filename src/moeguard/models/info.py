"""`moeguard info`: a model's MoE facts without reading its weights."""

from __future__ import annotations

from moeguard.models.adapter import MoEAdapter
from moeguard.models.loading import inspect, meta_model


def model_info(ref: str | None) -> dict:
    model_ref, config, family = inspect(ref)
    adapter = MoEAdapter(meta_model(config), family=family)
    out = adapter.describe()
    from moeguard.models.infer import infer_family

    found = infer_family(config)
    out["family_spec"] = {"status": found.status, "reasons": list(found.reasons)}
    if found.note:
        out["family_spec"]["note"] = found.note
    if found.status != "built-in":
        from moeguard.models.infer import spec_summary

        out["family_spec"]["spec"] = spec_summary(family)
    out["name"] = model_ref.name
    out["path"] = str(model_ref.path) if model_ref.path else None
    out["hub_id"] = model_ref.hub_id
    return out
