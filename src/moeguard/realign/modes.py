"""What re-alignment may change: a *mode* picks the trainable parameters of a (pruned) MoE model.

``full`` trains everything; ``router`` only the routers; ``experts`` only the (kept) routed
experts; ``lora`` adds peft low-rank adapters to every linear layer except routers and the LM
head, and to the fused 3-D expert tensors through peft's ``target_parameters``. A new mode is
one function and one ``register_mode`` line.

Each mode returns a :class:`Trainable`: the model to run (peft-wrapped for ``lora``), its
trainable parameters by name, and ``release`` to give the base model back as it was found
(requires_grad flags restored; peft layers removed without merging).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.registry import Registry


@dataclass
class Trainable:
    model: nn.Module
    base: nn.Module
    mode: str
    params: dict[str, nn.Parameter]
    _flags: dict[str, bool] = field(default_factory=dict, repr=False)
    # what ``release`` undoes besides the flags (LoRA over offloaded weights: realign/offload.py)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    # after LoRA's unload: the base's own parameters back in their modules (offload.parameter_bindings)
    _rebind: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def adapters(self) -> bool:
        """The mode trains adapters over frozen base weights (its spec says: LoRA, any later peft mode)."""
        return get_mode(self.mode).adapters

    @property
    def offloaded(self) -> bool:
        """The base weights are offloaded by accelerate (only LoRA trains then)."""
        from moeguard.realign.offload import offloaded

        return offloaded(self.base)

    def state(self, *, device: str | None = None) -> dict[str, torch.Tensor]:
        """A copy of every trainable tensor (what a round resets to, what a checkpoint holds), on
        ``device`` (default: where each is)."""
        if device is None:
            return {n: p.detach().clone() for n, p in self.params.items()}
        return {n: p.detach().to(device, copy=True) for n, p in self.params.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise MoeguardError(f"trainable state lacks {len(missing)} tensors (e.g. {missing[0]})",
                                hint="the checkpoint was written for another mode or model; start a fresh run")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state[n].to(p.device, p.dtype))

    def merged(self) -> nn.Module:
        """The model to save: LoRA folded into the base weights (a plain transformers checkpoint)."""
        if self.offloaded:
            raise MoeguardError("the adapters cannot be folded into offloaded base weights (--max-memory)",
                                hint="fine-tune where the model fits in memory (no --max-memory) to save a merged checkpoint")
        if self.adapters:
            return self.model.merge_and_unload()
        return self.base

    def release(self) -> nn.Module:
        while self._undo:
            self._undo.pop()()
        if self.adapters and hasattr(self.model, "unload"):
            self.model.unload()
            if self._rebind is not None:
                self._rebind()
        for n, p in self.base.named_parameters():
            p.requires_grad_(self._flags.get(n, p.requires_grad))
        return self.base


@dataclass(frozen=True)
class ModeSpec:
    name: str
    description: str
    default_lr: float
    apply: Callable[..., Trainable]
    # trains adapters beside frozen base weights (peft): folded in to save, unloaded to release, and
    # the one kind that trains over offloaded weights (--max-memory); a new adapter mode sets it
    adapters: bool = False


MODES: Registry[ModeSpec] = Registry("fine-tuning mode")  # the built-ins register at the end of this file


def register_mode(spec: ModeSpec, *, overwrite: bool = False) -> ModeSpec:
    return MODES.add(spec.name, spec, overwrite=overwrite)


def get_mode(name: str) -> ModeSpec:
    return MODES.get(name)


Allowed = Callable[[str], bool] | None  # a fine-tuning protocol's test on parameter names


def matching(patterns) -> Callable[[str], bool]:
    """True for a parameter name that any of the fnmatch ``patterns`` matches."""
    import fnmatch

    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _select(model: nn.Module, mode: str, chosen: set[int], only: Allowed = None) -> Trainable:
    from moeguard.realign.offload import offloaded_names

    on_disk = sorted(n for n in offloaded_names(model) if id(model.get_parameter(n)) in chosen and (only is None or only(n)))
    if on_disk:   # before any flag changes: accelerate cannot update weights it offloaded
        raise MoeguardError(f"mode '{mode}' would train {len(on_disk)} tensors that are offloaded to disk (--max-memory), "
                            f"e.g. {on_disk[0]}; offloaded weights are read-only",
                            hint="use the lora mode (the audit's --recovery-mode lora): its adapters train in memory "
                                 "over offloaded weights; or raise --max-memory so the model fits")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    params = {}
    for n, p in model.named_parameters():
        take = id(p) in chosen and (only is None or only(n))
        p.requires_grad_(take)
        if take:
            params[n] = p
    if not params:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        why = " that the protocol authorizes" if only is not None else ""
        raise MoeguardError(f"mode '{mode}' finds no parameters{why} to train in {type(model).__name__}",
                            hint="use a mode the protocol allows" if only is not None else "use --mode full")
    return Trainable(model=model, base=model, mode=mode, params=params, _flags=flags)


def _full(model: nn.Module, *, only: Allowed = None, **_) -> Trainable:
    return _select(model, "full", {id(p) for p in model.parameters()}, only)


def _router(model: nn.Module, *, only: Allowed = None, **_) -> Trainable:
    adapter = MoEAdapter(model)
    return _select(model, "router", {id(p) for l in adapter.layers for p in l.router.parameters()}, only)


def _experts(model: nn.Module, *, only: Allowed = None, **_) -> Trainable:
    adapter = MoEAdapter(model)
    return _select(model, "experts", {id(p) for l in adapter.layers for p in l.experts.parameters()}, only)


# peft (tuners_utils._check_lora_target_modules_mamba) refuses LoRA on these leaf modules of these
# model types; moeguard leaves them out rather than fail
_PEFT_MAMBA_TYPES = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"}
_PEFT_MAMBA_REFUSED = {"out_proj", "conv1d"}


def lora_targets(model: nn.Module, only: Allowed = None) -> tuple[list[str], list[str]]:
    """(linear module names, fused expert parameter names) that LoRA adapts; with ``only``,
    those whose weights the protocol authorizes.

    Routers stay out: several families' routers are ``nn.Linear`` subclasses returning tuples,
    which peft's LoRA layer cannot wrap, and a router is ``router`` mode's business. DBRX's
    blocked [E*I, d] expert tensors stay out too: peft's parameter LoRA wraps their ``mlp``, and
    DBRX's experts read ``mlp.w1`` directly, which the wrapper does not have. So do the
    Mamba mixers' projections peft refuses to wrap in the model types it knows as Mamba-based."""
    adapter = MoEAdapter(model)
    # the router and any linear inside it (DBRX's router.layer, HunYuan's gate.wg)
    routers = {id(m) for l in adapter.layers for m in l.router.modules()}
    head = model.get_output_embeddings()
    ok = only or (lambda name: True)
    mamba = getattr(model.config, "model_type", None) in _PEFT_MAMBA_TYPES
    modules = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and id(m) not in routers and m is not head and ok(f"{n}.weight")
               and not (mamba and n.rsplit(".", 1)[-1] in _PEFT_MAMBA_REFUSED)]
    names = {id(p): n for n, p in model.named_parameters()}
    # named from the experts module, which peft matches as a suffix of the full name: "gate_up_proj", or
    # JetMoE's "input_linear.weight" (its last part alone would name every linear's weight)
    experts = sorted({n for l in adapter.layers for n, p in l.experts.named_parameters()
                      if p.dim() == 3 and ok(names[id(p)])})
    if only is not None:
        # a protocol may authorize some layers' experts: their full names, or peft's suffix match on the
        # short one adapted every layer's experts (an authorized "model.layers.0.mlp.experts.*" trained all)
        experts = sorted(names[id(p)] for l in adapter.layers for _, p in l.experts.named_parameters()
                         if p.dim() == 3 and ok(names[id(p)]))
    return modules, experts


def _lora(model: nn.Module, *, lora_r: int = 8, lora_alpha: int = 16, seed: int = 0, only: Allowed = None,
          **_) -> Trainable:
    from peft import LoraConfig, get_peft_model

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules, expert_params = lora_targets(model, only)
    if not modules and not expert_params:
        raise MoeguardError("LoRA finds no linear module or expert tensor that the protocol authorizes",
                            hint="use a mode the protocol allows")
    from moeguard.realign import offload

    torch.manual_seed(seed)  # peft draws lora_A at random: the same seed gives the same adapters
    # target_modules [] where the protocol authorizes expert tensors only: None makes peft fill in its default
    # targets for the model type (q_proj and v_proj for most), which would train what the protocol forbids
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=modules,
                        target_parameters=expert_params or None, bias="none")
    if not offload.offloaded(model):
        wrapped = get_peft_model(model, config)
        params = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
        return Trainable(model=wrapped, base=model, mode="lora", params=params, _flags=flags)
    # weights offloaded by accelerate (--max-memory): adapters in memory, the experts' weights read
    # in around peft's wrappers, every layer checkpointed (realign/offload.py says why)
    rebind = offload.parameter_bindings(model)
    undo, wrapped = [offload.checkpointed(model)], None
    try:
        with offload.weights_unplaced(model):
            wrapped = get_peft_model(model, config)
        offload.place_adapters(wrapped, offload.execution_device(model))
        undo.append(offload.expert_weights_in_place(wrapped))
    except BaseException:
        if wrapped is not None:
            wrapped.unload()
            rebind()
        while undo:
            undo.pop()()
        for n, p in model.named_parameters():   # peft froze the base weights
            p.requires_grad_(flags.get(n, p.requires_grad))
        raise
    params = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    return Trainable(model=wrapped, base=model, mode="lora", params=params, _flags=flags, _undo=undo,
                     _rebind=rebind)


register_mode(ModeSpec("full", "every parameter", 2e-4, _full))
register_mode(ModeSpec("lora", "peft LoRA on attention/dense linears and the fused expert tensors", 3e-3, _lora,
                       adapters=True))
register_mode(ModeSpec("router", "the routers only", 5e-3, _router))
register_mode(ModeSpec("experts", "the kept routed experts only", 2e-4, _experts))


def apply_mode(model: nn.Module, mode: str, **options) -> Trainable:
    return get_mode(mode).apply(model, **options)
