"""A model resolved once at the edge: reference, config, family and MoE shape, without weights.

Commands and the audit make one :class:`ModelHandle` from ``--model`` and pass it down; nothing
below inspects the checkpoint again. Its :meth:`ModelHandle.check_keep` is the one rule for
how many experts per layer a plan may keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeguard.errors import MoeguardError
from moeguard.models.families import FamilySpec
from moeguard.models.loading import ModelRef


def check_keep(keep: int, *, num_experts: int, family: FamilySpec, top_k: int, what: str = "keep level") -> int:
    """The one keep rule: from the family's minimum to one fewer than the layer's experts. Used by
    :meth:`ModelHandle.check_keep` and by code that holds a loaded model instead of a handle."""
    lo, hi = max(1, family.min_experts), num_experts - 1
    if isinstance(keep, bool) or not isinstance(keep, int) or not lo <= keep <= hi:
        raise MoeguardError(f"{what} {keep!r} is impossible for {num_experts} experts per layer "
                            f"({family.name}, top-{top_k})",
                            hint=f"keep from {lo} to {hi} experts per layer" if lo <= hi else
                            "this model has too few experts to prune")
    return keep


def require_tasks(family: FamilySpec, name: str) -> None:
    """Refuse an encoder-decoder in a command whose passes are decoder-only (merge, harden, scan,
    monitor, serve, route-attack; docs/families.md)."""
    if family.encoder_decoder:
        raise MoeguardError(f"{name} is a {family.name} encoder-decoder, and this command runs tasks through "
                            "causal-LM heads only (the seq2seq head runs info, eval, attribute, prune, sweep, "
                            "realign, recovery, trace and the audit so far)",
                            hint="run one of those on it")


def check_merge_route(family: FamilySpec, merge: bool, *, flag: str = "--route prune") -> None:
    """Merging averages expert tensors along their expert axis; a family with one module per
    expert (Switch) has none, so its merge route is refused before any work."""
    if merge and family.expert_layout == "modules":
        raise MoeguardError(f"the merge route averages fused expert tensors, and {family.name} keeps one module per "
                            "expert", hint=f"use the pruning route ({flag})")


@dataclass(frozen=True, kw_only=True)
class ModelHandle:
    ref: ModelRef
    config: Any
    family: FamilySpec
    info: dict[str, Any] = field(repr=False)   # the `moeguard info` facts (from the meta model)
    # where the weights go when loaded (--device-map, checked at the edge): None is the CPU
    device_map: str | None = None

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def placement(self) -> dict[str, Any]:
        """The run record's and resume keys' ``device_map`` entry, when one was given (absent: the CPU),
        with the kind of device a strategy (auto...) lands on here: a run on a GPU is not resumed on the CPU."""
        return self.placement_under(None)

    def placement_under(self, max_memory: int | None) -> dict[str, Any]:
        """:attr:`placement` for a load under ``max_memory`` bytes: without a device map that load is
        accelerate's ``auto`` (the visible GPUs first), which the record said was the CPU, and a capped run
        killed on a GPU resumed on a machine without one."""
        from moeguard.models.placement import capped_placement

        return capped_placement(self.device_map, max_memory)

    @property
    def arg(self) -> str | None:
        """What ``load_model`` and a job's runtime take: the path or hub id, None for the embedded model."""
        return None if self.ref.name == "embedded" else self.ref.name

    @property
    def experts_per_layer(self) -> list[int]:
        """Experts of each MoE layer, in layer order (a budget-pruned checkpoint's differ)."""
        return [int(v) for _, v in sorted(self.info["experts_per_layer"].items(), key=lambda kv: int(kv[0]))]

    def check_uniform(self, what: str, *, hint: str) -> None:
        """A one-line error, from the config, where the MoE layers keep different expert counts (a
        budget-pruned checkpoint) and ``what`` (the command's work) needs one count per layer."""
        counts = self.experts_per_layer
        if len(set(counts)) > 1:
            raise MoeguardError(f"{self.name}'s MoE layers have different expert counts {counts} (a budget-pruned "
                                f"checkpoint); {what} needs one count per layer", hint=hint)

    @property
    def num_experts(self) -> int:
        """The most experts any MoE layer has (pruned checkpoints may differ per layer)."""
        return max(int(v) for v in self.info["experts_per_layer"].values())

    @property
    def top_k(self) -> int:
        return int(self.info["top_k"])

    @property
    def num_layers(self) -> int:
        return len(self.info["experts_per_layer"])

    @property
    def min_keep(self) -> int:
        """Fewest experts per layer the family's router accepts (a plan may keep fewer than top-k:
        pruning lowers top-k to the experts left)."""
        return max(1, self.family.min_experts)

    def check_keep(self, keep: int, *, what: str = "keep level") -> int:
        """The one keep rule (:func:`check_keep`) for this model."""
        return check_keep(keep, num_experts=self.num_experts, family=self.family, top_k=self.top_k, what=what)

    def check_fits(self, tasks) -> None:
        """Each task cut to this model's positions as evaluation cuts it (``fit_to_model``), from the
        config: a summary whose generated tokens leave no room for the input is refused before the
        weights load, not after (its cut is said where the work runs)."""
        import types
        import warnings

        from moeguard.tasks.evaluate import fit_to_model

        with warnings.catch_warnings():   # the cut is warned where it happens
            warnings.simplefilter("ignore")
            for t in tasks:
                fit_to_model(t, types.SimpleNamespace(config=self.config))

    def default_keeps(self) -> list[int]:
        """N/4, N/2 and 3N/4 experts per layer, at least top-k (and the family's minimum)."""
        E, k_min = self.num_experts, max(self.min_keep, self.top_k)
        return sorted({max(k_min, E // 4), max(k_min, E // 2), max(k_min, 3 * E // 4)} - {E})

    def load(self, *, dtype=None, device_map=None, max_memory: int | None = None):
        """The model, its tokenizer and reference; ``device_map`` defaults to the handle's."""
        from moeguard.models.loading import load_model

        return load_model(self.arg, dtype=dtype, device_map=device_map if device_map is not None else self.device_map,
                          max_memory=max_memory)


def resolve_model(model: str | None, *, tasks: bool = True, device_map: str | None = None,
                  devices_here: bool = True) -> ModelHandle:
    """Inspect ``model`` (path, hub id or None for the embedded model) once: config, family and
    the checks that need no weights. ``tasks``: the command scores tasks on it, which an
    encoder-decoder cannot do yet (refused here, before any weights load). ``device_map``: where
    its weights go when loaded (checked here against the devices this machine has; with
    ``devices_here=False``, where jobs load the model on other machines, only its spelling)."""
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import inspect, meta_model
    from moeguard.models.placement import check_device_map

    device_map = check_device_map(device_map, on_this_machine=devices_here)
    ref, config, family = inspect(model)
    if tasks:
        require_tasks(family, ref.name)
    info = MoEAdapter(meta_model(config), family=family).describe()
    info.update(name=ref.name, path=str(ref.path) if ref.path else None, hub_id=ref.hub_id)
    return ModelHandle(ref=ref, config=config, family=family, info=info, device_map=device_map)
