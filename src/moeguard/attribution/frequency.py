"""``frequency``: the share of a layer's routing slots each expert receives on the task."""

from moeguard.attribution.base import MethodOutput, register_method


@register_method("frequency", "share of the layer's routing slots the expert receives on the task's tokens")
def frequency(ctx) -> MethodOutput:
    stats = ctx.routing_stats()
    return MethodOutput(scores=stats.frequency().double(), tokens=stats.layers[0].tokens)
