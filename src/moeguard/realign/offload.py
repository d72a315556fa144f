"""LoRA over a model whose weights accelerate offloaded (``--max-memory``): the adapters train in
memory while the frozen base weights stay on disk, each layer's read in only while it runs.

Three things stand in the way with peft and accelerate as they are, each handled here:

- peft puts every new adapter on its base weight's device. An offloaded weight sits on "meta"
  between forwards, so the adapter would be made there, without values.
  :func:`weights_unplaced` shows peft CPU stand-ins for those weights while it wraps, and
  :func:`place_adapters` then puts the adapters on the hooks' execution device.
- peft's LoRA on fused expert tensors (``target_parameters``) swaps the tensor for a
  parametrization before it calls the experts module, so accelerate's hook on that module no
  longer finds the tensor to load. :func:`expert_weights_in_place` loads the experts' weights
  around the outermost peft wrapper's call instead.
- Autograd keeps every tensor a backward needs, the loaded weights included, until the backward
  runs. Without checkpointing, one training step would hold every offloaded layer at once.
  :func:`checkpointed` turns on activation checkpointing (non-reentrant), so each decoder layer
  is run again, its weights read in again, during its own backward.

Full, router and experts modes train the base weights themselves, which accelerate cannot
update on disk: :func:`offloaded_names` lets them refuse before any work.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", None) or [hook])


def offloaded(model: nn.Module) -> bool:
    """True when accelerate offloads some of ``model``'s weights (to disk or CPU) between forwards."""
    return any(getattr(h, "offload", False) for m in model.modules() for h in _hooks(m))


def offloaded_names(model: nn.Module) -> set[str]:
    """Names of ``model``'s parameters held on "meta" between forwards (offloaded). A model built
    on "meta" without accelerate's offload (``meta_model``: names and shapes, to check a protocol
    before the weights load) has none: its modes' selections are what the check reads."""
    if not offloaded(model):
        return set()
    return {n for n, p in model.named_parameters() if p.device.type == "meta"}


def execution_device(model: nn.Module) -> torch.device:
    from moeguard.tasks.tokens import model_device

    return model_device(model)


def _base_on_meta(layer) -> bool:
    from peft.tuners.lora.layer import ParamWrapper

    if isinstance(layer, ParamWrapper):
        return layer.get_param().device.type == "meta"
    weight = getattr(layer.get_base_layer(), "weight", None)
    return weight is not None and weight.device.type == "meta"


@contextlib.contextmanager
def weights_unplaced(model: nn.Module) -> Iterator[None]:
    """While peft wraps ``model``: each offloaded ("meta") weight stands in as an uninitialized
    CPU tensor of its shape and dtype, so peft makes and places the adapters as it does in memory
    (the same random draws). The stand-ins are never read; the operating system backs a large
    one with memory only where it is written, and nothing writes to them."""
    swapped = []
    try:
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.device.type == "meta":
                    module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                            requires_grad=p.requires_grad)
                    swapped.append((module, name, p))
        yield
    finally:
        for module, name, p in swapped:   # with the flags peft set (it freezes the base weights)
            module._parameters[name] = p.requires_grad_(module._parameters[name].requires_grad)


def parameter_bindings(model: nn.Module) -> Callable[[], None]:
    """Which parameter each module of ``model`` holds (tied ones: one object in two modules); the
    returned function puts them back. peft's ``unload`` of an offloaded model gives a tied output
    head a "meta" parameter of its own (the embedding's tie broken); after it, this restores the
    model as it was given."""
    held = [(m, n, p) for m in model.modules() for n, p in m._parameters.items() if p is not None]

    def restore() -> None:
        for module, name, p in held:
            if module._parameters.get(name) is not p:
                module._parameters[name] = p
    return restore


def place_adapters(wrapped: nn.Module, device: torch.device) -> None:
    """Adapters of offloaded base weights onto ``device`` (the hooks' execution device), in the dtype
    peft made them (float32 over a bf16 or fp16 base: ``autocast_adapter_dtype``), as for a base weight
    in memory. Casting them to the base's dtype trained bf16 adapters under a cap and float32 ones
    without it: two curves of one attack."""
    from peft.tuners.lora.layer import LoraLayer

    for layer in wrapped.modules():
        if not isinstance(layer, LoraLayer) or not _base_on_meta(layer):
            continue
        for attr in layer.adapter_layer_names:
            holder = getattr(layer, attr, None)
            if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)):
                for name in list(holder.keys()):
                    holder[name] = holder[name].to(device)
    left = [n for n, p in wrapped.named_parameters() if "lora_" in n and p.device.type == "meta"]
    if left:   # peft changed how it makes adapters: fail now, not with a meta tensor mid-step
        raise RuntimeError(f"{len(left)} LoRA tensors are on 'meta' (e.g. {left[0]}): this peft version makes "
                           "adapters of offloaded weights differently")


def expert_weights_in_place(wrapped: nn.Module) -> Callable[[], None]:
    """Load each offloaded experts module's weights around its outermost peft ``ParamWrapper``'s
    call; returns the function that removes this again."""
    from peft.tuners.lora.layer import ParamWrapper

    from moeguard.models.hooks import Hooks, weights_in_place

    outer: dict[int, nn.Module] = {}
    for module in wrapped.modules():    # pre-order: a wrapper comes before the wrappers it holds
        if isinstance(module, ParamWrapper):
            base = module.get_base_layer()
            if any(getattr(h, "offload", False) for h in _hooks(base)):
                outer.setdefault(id(base), module)
    hooks = Hooks()
    try:
        for module in outer.values():
            base, inner = module.get_base_layer(), module.forward

            def forward(*args, _base=base, _inner=inner, **kwargs):
                with weights_in_place(_base, recurse=False):
                    return _inner(*args, **kwargs)

            hooks.replace_forward(module, forward)
    except BaseException:   # those already patched come off again
        hooks.close()
        raise
    return hooks.close


def checkpointed(base: nn.Module) -> Callable[[], None]:
    """Activation checkpointing on ``base`` (non-reentrant: recomputed layers read their offloaded
    weights again); returns the function that turns it off again, if it was off."""
    if not getattr(base, "supports_gradient_checkpointing", False):
        from moeguard.errors import MoeguardError

        raise MoeguardError(f"{type(base).__name__} does not support activation checkpointing, which training over "
                            "offloaded weights needs (each layer's weights are read in again for its backward)",
                            hint="raise --max-memory so the model fits in memory, or drop it")
    was_on = bool(getattr(base, "is_activation_checkpointing", False))
    if was_on:
        return lambda: None
    embeddings = base.get_input_embeddings()
    before = set(embeddings._forward_hooks)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def disable() -> None:
        base.activation_checkpointing_disable()
        # enabling hooked the input embeddings (their output requires grad), and peft hooks them
        # again when it wraps a checkpointed model; transformers removes neither for a model that
        # get_peft_model wrapped, so the hooks added since are removed here
        for key in set(embeddings._forward_hooks) - before:
            if getattr(embeddings._forward_hooks[key], "__name__", "") == "make_inputs_require_grads":
                del embeddings._forward_hooks[key]
                embeddings._forward_hooks_with_kwargs.pop(key, None)   # as RemovableHandle.remove does
                embeddings._forward_hooks_always_called.pop(key, None)
    return disable
