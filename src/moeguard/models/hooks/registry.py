"""The one place a hook is put on a live model, and taken off again.

:class:`Hooks` is llm-compressor's hooks mixin as a value: every forward hook, pre-hook and
forward patch moeguard installs is registered on one, and its ``close`` (a ``with`` block's exit,
or a ``finally``) removes them all in reverse order, whatever happened in between. Nothing outside
this module calls ``register_forward_hook`` and friends or assigns a module's forward; a test reads
the sources to keep it so. The hooks' functions stay with the code that needs them (the monitor's,
the defense's); only attaching and removing them lives here.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from moeguard.models.adapter import MoEAdapter

_ABSENT = object()


class Hooks(contextlib.AbstractContextManager):
    """A set of hooks and patches on live modules, removed together by :meth:`close`.

    Each method attaches one thing and returns nothing the caller must keep: removal is the set's.
    Patches nest (a forward patched twice is restored to the first patch, then to the original),
    and :meth:`close` undoes in reverse order, so the modules end as they began. A set is reusable:
    after ``close`` it is empty and can attach again."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def ensure_empty(self, owner: object) -> None:
        """For an object that enters its own set: entered twice, the inner exit would take the outer
        block's hooks off too. Refused (a programming error, not a user's)."""
        if self._undo:
            raise RuntimeError(f"{type(owner).__name__} is already entered: leave it before entering it again")

    # ---- PyTorch hooks ------------------------------------------------------------------
    def on_output(self, module: nn.Module, fn, *, with_kwargs: bool = False) -> None:
        """``fn(module, args, output)`` (``(module, args, kwargs, output)`` with ``with_kwargs``)
        after each forward of ``module``."""
        self._undo.append(module.register_forward_hook(fn, with_kwargs=with_kwargs).remove)

    def on_input(self, module: nn.Module, fn, *, with_kwargs: bool = False) -> None:
        """``fn(module, args)`` (``(module, args, kwargs)`` with ``with_kwargs``) before each
        forward of ``module``."""
        self._undo.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs).remove)

    # ---- patches ------------------------------------------------------------------------
    def replace_forward(self, module: nn.Module, fn, *, replaces: bool = False) -> None:
        """``fn`` as the module's forward until close (:func:`_set_forward` says where it goes)."""
        previous = _set_forward(module, fn, replaces=replaces)
        self._undo.append(lambda: _restore_forward(module, previous))

    def replace_method(self, module: nn.Module, name: str, fn) -> None:
        """``fn`` as the module's method ``name`` (not its forward; JetMoE's attention ``reduce``)
        until close: an instance attribute over the class's method, dropped again on close."""
        self.set_attribute(module, name, fn)

    def set_attribute(self, module: nn.Module, name: str, value) -> None:
        """``module.name = value`` until close. An attribute the instance did not hold itself (a
        class default) is deleted again rather than frozen at its old value; one stored elsewhere
        (a property, a parameter, a buffer) gets its old value back."""
        own = module.__dict__.get(name, _ABSENT)
        before = getattr(module, name, _ABSENT)
        setattr(module, name, value)
        if own is _ABSENT and name not in module.__dict__ and before is not _ABSENT:
            self._undo.append(lambda: setattr(module, name, before))
        else:
            self._undo.append(lambda: _restore_forward(module, (name, own)))

    def then(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at close, in order with the rest (a patch that restores itself)."""
        self._undo.append(fn)

    def close(self) -> None:
        """Remove everything, last attached first. Every undo runs even if one raises; the first
        error is raised after."""
        error = None
        while self._undo:
            try:
                self._undo.pop()()
            except BaseException as e:  # noqa: BLE001 -- the rest must still come off
                if error is None:
                    error = e
        if error is not None:
            raise error

    def __exit__(self, *exc) -> None:
        self.close()


def on_grad(tensor: torch.Tensor, fn) -> None:
    """``fn(grad)`` when the backward reaches ``tensor``. Not in a :class:`Hooks`: a tensor's hook
    lives and dies with the tensor (one forward's activations), so there is nothing to remove."""
    tensor.register_hook(fn)


def _set_forward(module: nn.Module, fn, *, replaces: bool = False) -> tuple[str, object]:
    """Install ``fn`` as the module's instance forward; return what was there, for
    :func:`_restore_forward` (patches nest).

    A wrapper (``fn`` calls the forward it wraps) goes outside accelerate's device hook, which
    accelerate keeps in the instance forward. A replacement (``replaces``: ``fn`` computes the
    output itself from the module's weights) goes inside it, where accelerate's hook calls
    ``_old_forward``: under CPU or disk offload the weights are in place only around that call."""
    subs = [sub for sub in module.modules() if sub is not module and hasattr(sub, "_hf_hook")] if replaces else []
    if subs:
        # hooks on submodules that hold weights (HunYuan's router.wg) run only when those are
        # called: the replacement reads them directly, so it puts them in place itself
        inner = fn

        def fn(*args, **kwargs):
            with contextlib.ExitStack() as stack:
                for sub in subs:
                    stack.enter_context(weights_in_place(sub, recurse=False))
                return inner(*args, **kwargs)
    if replaces and hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        previous = module.__dict__["_old_forward"]
        module._old_forward = fn
        return "_old_forward", previous
    previous = module.__dict__.get("forward", _ABSENT)
    module.forward = fn
    return "forward", previous


def place_inner_blocks(model: nn.Module, adapter: MoEAdapter | None = None) -> int:
    """Under accelerate's offload, a sparse block whose own weights its outer module reads (JetMoE's
    attention calls its experts' ``map`` and ``reduce``, never their forward, and ``reduce`` adds the
    block's bias) would find them on "meta": each such outer module's forward puts them in place for
    its duration (for the model's life). Returns how many were wrapped; 0 when nothing is offloaded."""
    adapter = adapter or MoEAdapter(model)
    wrapped = 0
    for layer in adapter.layers:
        if layer.outer is None or not hasattr(layer.block, "_hf_hook"):
            continue

        def forward(*args, _original=layer.outer.forward, _block=layer.block, **kwargs):
            with weights_in_place(_block, recurse=False):
                return _original(*args, **kwargs)
        _set_forward(layer.outer, forward)
        wrapped += 1
    return wrapped


def _restore_forward(module: nn.Module, previous: tuple[str, object]) -> None:
    attr, fn = previous
    if fn is _ABSENT:
        module.__dict__.pop(attr, None)  # back to the class's forward
    else:
        setattr(module, attr, fn)


@contextlib.contextmanager
def weights_in_place(module: nn.Module, *, recurse: bool = True) -> Iterator[None]:
    """The weights of ``module`` (and of its submodules, with ``recurse``) readable directly,
    outside a forward call. Under accelerate's CPU or disk offload they sit on "meta" except while
    their module runs; here its hooks put them in place on entry and take them out in ``finally``."""
    entered = []
    try:
        for sub in (module.modules() if recurse else [module]):
            hook = getattr(sub, "_hf_hook", None)
            if hook is not None:
                hook.pre_forward(sub)
                entered.append((sub, hook))
        yield
    finally:
        for sub, hook in reversed(entered):
            hook.post_forward(sub, None)

