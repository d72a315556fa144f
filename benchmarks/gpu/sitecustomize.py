"""Device smoke only (benchmarks/gpu/smoke.sh): with MOEGUARD_SMOKE_DEVICE_MAP set, every
``from_pretrained`` without a device map gets that one, so commands that load on the CPU (they
take no --device-map) run their model on the GPU and show which code paths mix devices."""
import os

_map = os.environ.get("MOEGUARD_SMOKE_DEVICE_MAP")
if _map:
    import transformers.modeling_utils as _mu

    _orig = _mu.PreTrainedModel.from_pretrained.__func__

    def _from_pretrained(cls, *args, **kwargs):
        if kwargs.get("device_map") is None:
            kwargs["device_map"] = _map
        return _orig(cls, *args, **kwargs)

    _mu.PreTrainedModel.from_pretrained = classmethod(_from_pretrained)
