"""Resolve and load a model: the embedded default, a local directory, or a hub id.

Everything that can fail cheaply (path, config, family, weight files and their integrity) is
checked before weights are read. Weights are read only from safetensors.
"""

from __future__ import annotations

import os
import re
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeguard.config import is_decimal
from moeguard.errors import MoeguardError
from moeguard.models.families import FamilySpec, family_for_config, moe_config, unsupported_setting
from moeguard.models.placement import check_device_map, offload_settings
from moeguard.models.safetensorsfiles import check_safetensors, safetensors_files
from moeguard.models.upstream import repair

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent.parent / "zoo" / "embedded"


@dataclass(frozen=True)
class ModelRef:
    name: str            # what the user passed (or "embedded")
    path: Path | None    # local directory, or None for a hub id not yet downloaded
    hub_id: str | None

    @property
    def recorded(self) -> str:
        """How a record names this model so that it resolves from any folder (realign reads a pruned or
        merged checkpoint's source): a local checkpoint by its absolute path, a hub id or the embedded
        model by name. The name as typed ('ckpt') named another folder's model, or a hub id, elsewhere."""
        if self.name == "embedded" or self.hub_id is not None or self.path is None:
            return self.name
        return str(self.path)

    def answers_to(self, name: str) -> bool:
        """Whether ``name``, as another command recorded this model (as typed, ``recorded``, or the folder
        transformers loaded it from: a sweep's or an audit's scores), names this model."""
        if name in (self.name, self.recorded):
            return True
        if self.path is None or not name:
            return False
        try:
            return Path(name).expanduser().resolve() == Path(self.path).resolve()
        except (OSError, ValueError, RuntimeError):   # a name no path can be (a NUL byte, a symlink loop)
            return False


def resolve(ref: str | None) -> ModelRef:
    if ref in (None, "", "embedded"):
        if not (EMBEDDED_MODEL_DIR / "config.json").exists():
            raise MoeguardError(f"the embedded model is missing from {EMBEDDED_MODEL_DIR}",
                                hint="rebuild it with `moeguard zoo train` or reinstall moeguard")
        return ModelRef("embedded", EMBEDDED_MODEL_DIR, None)
    p = Path(ref).expanduser()
    try:
        there = p.exists()
    except OSError as e:   # EACCES on a folder above it: PermissionError, a traceback before
        raise MoeguardError(f"model path {ref} cannot be read ({e.strerror})", hint="check its permissions") from None
    if there:
        if not p.is_dir():   # said without an option's name: --model, --suspect, --original all come here
            raise MoeguardError(f"model path {ref} is a file, not a checkpoint directory",
                                hint="pass the checkpoint directory holding config.json")
        if not os.access(p, os.R_OK | os.X_OK):   # another user's 0700 folder: PermissionError further on
            raise MoeguardError(f"model path {ref} cannot be read (Permission denied)", hint="check its permissions")
        return ModelRef(ref, p.resolve(), None)
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:  # hub ids are exactly org/name
        raise MoeguardError(f"model path {ref} does not exist",
                            hint="pass an existing checkpoint directory or a hub id like org/name")
    if p.parent.is_dir():
        # a mistyped file in an existing folder, not a hub id: the hub would be asked (and retried) for nothing
        raise MoeguardError(f"model path {ref} does not exist (the folder {p.parent} does)",
                            hint="check the name; a hub id org/name is looked up only when no folder org is here")
    return ModelRef(ref, None, ref)


def load_config(ref: ModelRef):
    from transformers import AutoConfig

    if ref.path is not None and not (ref.path / "config.json").exists():
        raise MoeguardError(f"{ref.path} has no config.json", hint="pass a Hugging Face checkpoint directory")
    try:
        return AutoConfig.from_pretrained(str(ref.path or ref.hub_id), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001  OSError/ValueError, and huggingface_hub's strict-dataclass errors
        # (a field of the wrong type), which derive from Exception only
        # and a dtype that is no torch dtype ("bf16"): transformers reads it with getattr(torch, ...)
        dtype_typo = isinstance(e, AttributeError) and str(e).startswith("module 'torch' has no attribute")
        if dtype_typo:
            named = getattr(e, "name", None) or str(e).rsplit("'", 2)[-2]
            raise MoeguardError(f"the config of {ref.path or ref.hub_id} names dtype '{named}', which is no torch dtype",
                                hint="write bfloat16, float16 or float32 in its config.json (torch_dtype / dtype)"
                                if ref.path is not None else "tell the repository's owner; moeguard cannot load it") from None
        if not isinstance(e, (OSError, ValueError, TypeError)) and "StrictDataclass" not in type(e).__name__:
            raise
        where = ref.path or ref.hub_id
        if ref.path is None:
            from moeguard.models.hub import hub_failure

            known = hub_failure(e, ref.hub_id)
            if known is not None:
                raise MoeguardError(f"cannot read the config of {where}: {known.what}", hint=known.fix) from None
        first = " ".join(str(e).split()) or type(e).__name__
        hint = (f"fix {ref.path / 'config.json'}" if ref.path is not None
                else "check the id, or log in / go online for a hub id (`hf auth login`)")
        raise MoeguardError(f"cannot read the config of {where}: {first}", hint=hint) from None


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_layer_count(config, names: list[str], *, where: str) -> None:
    """A config that declares more decoder layers than its weights hold is refused before anything is
    built from it: a received checkpoint's num_hidden_layers of 10,000,000 built that many modules on
    "meta" (trace, info, prune: a hang, then out of memory) before the missing tensors were found.
    Weights named otherwise (DBRX's blocks, Switch's block) are not counted; extra layers in the
    weights (multi-token prediction) are the weights' own."""
    from moeguard.models.families import text_config

    layers = getattr(text_config(config), "num_hidden_layers", None)
    found = [int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))]
    if type(layers) is int and found and layers > max(found) + 1:
        raise MoeguardError(f"{where}: config.json declares {layers} layers, and its weights hold layers 0 to "
                            f"{max(found)}", hint="the config and the weights disagree: re-download the checkpoint, "
                                                  "or fix num_hidden_layers in config.json")


def inspect(ref_str: str | None) -> tuple[ModelRef, object, FamilySpec]:
    """Everything about a model except its weights: cheap, and fails early."""
    ref = resolve(ref_str)
    config = load_config(ref)
    family = family_for_config(config)
    check_config(config, family, where=str(ref.path or ref.hub_id))
    if ref.path is not None:
        names = [n for f in safetensors_files(ref.path) for n in check_safetensors(f)]
        check_layer_count(config, names, where=str(ref.path))
    # transformers loads a PEFT adapter found beside the weights (a folder's or a hub repo's), from
    # adapter_model.bin (a pickle) where there is no safetensors one, and merges it into every number
    if _adapter_config(ref) is not None:
        raise MoeguardError(f"{ref.path or ref.hub_id} holds a PEFT adapter (adapter_config.json) beside the model",
                            hint="merge the adapter into the weights and save them as safetensors "
                                 "(peft's merge_and_unload, then save_pretrained), or move the adapter's files out")
    return ref, config, family


def _adapter_config(ref: ModelRef) -> str | None:
    """The adapter config transformers' from_pretrained would find and load (None: none)."""
    if ref.path is not None:
        return str(ref.path / "adapter_config.json") if (ref.path / "adapter_config.json").is_file() else None
    try:   # a hub repo: the user's own hub access (or its cache offline), as from_pretrained would look
        from transformers.utils import find_adapter_config_file

        return find_adapter_config_file(ref.hub_id)
    except Exception:  # noqa: BLE001 -- could not look: from_pretrained's own look fails the same way
        return None


def load_tokenizer(where: str, *, hint: str = "the checkpoint directory needs tokenizer files (tokenizer.json)"):
    """``AutoTokenizer.from_pretrained(where)``, or a one-line error: a damaged tokenizer.json raises
    KeyError, TypeError or the tokenizers library's bare Exception, not only OSError/ValueError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 -- any failure to read the files is the user's input, one line
        if not Path(where).exists():   # a hub id: what the hub said (offline, gated, 429...), not "needs tokenizer files"
            from moeguard.models.hub import hub_failure

            known = hub_failure(e, where)
            if known is not None:
                raise MoeguardError(f"cannot load the tokenizer of {where}: {known.what}", hint=known.fix) from None
        first = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise MoeguardError(f"cannot load the tokenizer of {where}: {first}", hint=hint) from None


def check_config(config, family: FamilySpec, *, where: str) -> None:
    """Refuse a config no router can run before any weights are read: transformers builds such a
    model without complaint and fails deep inside the first forward (or silently routes wrong)."""
    from moeguard.models.prune import PER_LAYER_KEY

    fix = f"fix {where}/config.json"
    named = getattr(config, "transformers_weights", None)
    if named is not None:   # transformers would load that file instead of the ones checked (a .bin: unpickled)
        raise MoeguardError(f"{where}: config transformers_weights names {str(named)[:60]!r}; moeguard loads "
                            "model.safetensors or model.safetensors.index.json only, the files it checks",
                            hint=f"{fix}: remove transformers_weights (and save the weights as model.safetensors)")
    config = moe_config(config)   # a multimodal wrapper: its language model's keys; DBRX: its ffn_config
    count_key = family.config_key(family.num_experts_key)
    # a fixed rule (Switch's top-1) has no top-k key to check
    top_k_key = family.config_key(family.top_k_key) if family.top_k_key else "the router's fixed top-k"
    E = getattr(config, family.num_experts_key, None)
    k = getattr(config, family.top_k_key, None) if family.top_k_key else family.fixed_top_k
    if isinstance(k, (list, tuple)) and k:   # one value per layer (HunYuan's moe_topk): read where every layer agrees
        if len(set(map(str, k))) > 1:
            raise MoeguardError(f"{where}: config {top_k_key} gives its layers different top-k {list(k)}; moeguard routes "
                                "one top-k for every layer", hint="use a checkpoint whose layers share one top-k")
        layers = getattr(config, "num_hidden_layers", None)
        if isinstance(layers, int) and len(k) != layers:   # transformers indexes it by layer: an IndexError in the load
            raise MoeguardError(f"{where}: config {top_k_key} lists {len(k)} values for {layers} layers",
                                hint=f"{fix}: give {top_k_key} one value, or one per layer")
        k = k[0]
    checks = ((count_key, E), (top_k_key, k))
    if family.routing.capacity_key:
        checks += ((family.config_key(family.routing.capacity_key), getattr(config, family.routing.capacity_key, None)),)
    for key, value in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MoeguardError(f"{where}: config {key} is {value!r}, expected a positive integer", hint=fix)
    if k > E:
        raise MoeguardError(f"{where}: config {top_k_key} is {k}, more than its {E} experts per layer "
                            f"({count_key}); no router can pick {k} of {E}",
                            hint=f"{fix}: set {top_k_key} to at most {E}")
    if family.routing.group_rule_on(config):
        check_groups(config, family, E, k, where=where, fix=fix)
    unsupported = unsupported_setting(family, config)
    if unsupported:
        raise MoeguardError(f"{where}: {unsupported[0]}", hint=f"{fix}: {unsupported[1]}")
    per_layer = getattr(config, PER_LAYER_KEY, None) or {}
    if not isinstance(per_layer, dict):    # "abc" or [4, 4] failed in dict() with a traceback
        raise MoeguardError(f"{where}: config {family.config_key(PER_LAYER_KEY)} is {str(per_layer)[:40]!r}, expected "
                            f"a map of layer index -> expert count", hint=f"{fix}, or re-prune the model with moeguard prune")
    # a bool is an int to Python: true was read as one expert
    bad = {l: n for l, n in per_layer.items() if type(n) is not int or not 1 <= n <= E or not is_decimal(str(l))}
    if bad:
        raise MoeguardError(f"{where}: config {family.config_key(PER_LAYER_KEY)} gives layers {bad} expert counts outside 1..{E}",
                            hint=f"{fix}, or re-prune the model with moeguard prune")


def check_loaded(info: dict[str, Any], where: str) -> None:
    """A one-line error when the checkpoint lacks weights the model has: transformers initializes
    them at random with only a logged warning, and every number after would be of a partly random
    model. Keys the checkpoint has and the model does not are ignored by transformers; they are
    said (a config that describes less than the weights hold), not refused."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise MoeguardError(f"{where} lacks {len(missing)} weights the model needs ({', '.join(missing[:3])}"
                            f"{', ...' if len(missing) > 3 else ''}): they would be random",
                            hint="re-download or re-save the checkpoint; check that config.json is the weights' own")
    bad = sorted(info.get("mismatched_keys") or [], key=str)
    if bad:
        first = bad[0]
        said = (f"{first[0]}: {tuple(first[1])} in the file, {tuple(first[2])} by the config"
                if isinstance(first, (tuple, list)) and len(first) == 3 else str(first))
        raise MoeguardError(f"{where} holds {len(bad)} weights of other shapes than its config.json builds ({said})",
                            hint="fix config.json to match the weights (the expert count, sizes), or re-prune with "
                                 "moeguard prune")
    extra = sorted(info.get("unexpected_keys") or [])
    if extra:
        import warnings

        warnings.warn(f"{where}: {len(extra)} weights in the checkpoint are not part of the model and were ignored "
                      f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})", stacklevel=3)


def check_groups(config, family: FamilySpec, E: int, k: int, *, where: str, fix: str) -> None:
    """Group-limited routing's own rules (DeepSeek-V2/V3's routers): transformers builds any
    config and fails in the first forward (a view or a top-2 within a group), or, with more experts
    to pick than the chosen groups hold, routes to masked-out experts without a word."""
    r = family.routing
    n_key, g_key = family.config_key(r.n_group_key), family.config_key(r.topk_group_key)
    n, g = getattr(config, r.n_group_key, None), getattr(config, r.topk_group_key, None)
    for key, value in ((n_key, n), (g_key, g)):
        if type(value) is not int or value < 1:
            raise MoeguardError(f"{where}: config {key} is {value!r}, expected a positive integer", hint=fix)
    least = 2 if r.group_score == "top2_sum" else 1        # V3 scores a group by its two best experts
    if E % n or E // n < least:
        raise MoeguardError(f"{where}: config {n_key} is {n}; {E} experts per layer do not split into {n} groups of "
                            f"at least {least} experts", hint=f"{fix}: set {n_key} to a divisor of {E} leaving "
                                                              f"{least}+ experts per group")
    if g > n:
        raise MoeguardError(f"{where}: config {g_key} is {g}, more than its {n} groups ({n_key})",
                            hint=f"{fix}: set {g_key} to at most {n}")
    if k > g * (E // n):
        raise MoeguardError(f"{where}: config {family.config_key(family.top_k_key)} is {k}, more than the {g * (E // n)} "
                            f"experts its {g} chosen groups hold ({E // n} each): the router would pick masked-out experts",
                            hint=f"{fix}: raise {g_key} or lower {family.config_key(family.top_k_key)}")


def load_model(ref_str: str | None = None, *, dtype=None, device_map=None, with_tokenizer: bool = True,
               max_memory: int | None = None, offload_folder: str | Path | None = None):
    """Return ``(model, tokenizer_or_None, ModelRef)`` with the model in eval mode.

    ``max_memory`` (bytes) caps the host memory the weights take: accelerate places whole decoder
    layers in memory up to the cap and the rest on disk (``offload_folder``, by default a
    temporary folder removed with the model), loading each offloaded layer only while it runs.
    GPUs, where present, keep their own memory. See :func:`offload_settings`.
    """
    import torch

    from moeguard.models.loadfailure import no_conversion
    from moeguard.models.prune import resized_construction

    if isinstance(device_map, str):   # a library caller's too: a device this machine lacks, before any work
        device_map = check_device_map(device_map, what="device_map")
    ref, config, _ = inspect(ref_str)
    where = str(ref.path or ref.hub_id)
    cls = model_class(config)   # before the tokenizer and the weights: a type with no LM class fails here
    tokenizer = None
    if with_tokenizer:  # before the weights: a missing tokenizer should not cost a full load
        tokenizer = load_tokenizer(where)
    offload, made_folder = {}, None
    if max_memory is not None:   # after the tokenizer: a failed load leaves no temporary folder behind
        offload, made_folder = offload_settings(max_memory, device_map=device_map, folder=offload_folder)
        device_map = offload.pop("device_map")
    try:
        # no_conversion: a hub repo of pickle weights only is refused, as a local folder of them is
        with resized_construction(config), no_conversion():  # budget-pruned checkpoints: per-layer counts
            model, info = cls.from_pretrained(where, use_safetensors=True, dtype=dtype or torch.float32,
                                              device_map=device_map, trust_remote_code=False,
                                              # mismatched tensors are reported (and refused below, naming
                                              # them) rather than raised as "look at the above report"
                                              ignore_mismatched_sizes=True, output_loading_info=True, **offload)
        check_loaded(info, where)
    except BaseException as e:
        if made_folder is not None:
            shutil.rmtree(made_folder, ignore_errors=True)
        # the checkpoint's own faults: unreadable or missing files (OSError, ValueError), weights of
        # other shapes than its config says (RuntimeError: a pruner that did not update the config),
        # a corrupt file (safetensors' own error type)
        if not isinstance(e, (OSError, ValueError, RuntimeError)) and type(e).__name__ != "SafetensorError":
            raise
        if isinstance(e, MoeguardError):
            raise
        from moeguard.models.loadfailure import explain

        raise explain(e, ref, where, float32=(dtype or torch.float32) == torch.float32) from None
    if made_folder is not None:   # the offloaded weights live as long as the model
        weakref.finalize(model, shutil.rmtree, made_folder, True)
    repair(model)   # transformers' modules that do not compute their model (models/upstream.py)
    if device_map is not None:   # JetMoE's attention reads its experts' bias outside their forward
        from moeguard.models.hooks import place_inner_blocks

        place_inner_blocks(model)
    _return_freed_memory()
    return model.eval(), tokenizer, ref


def release_memory() -> None:
    """Free what dropped models held: a full collection (accelerate's hooks hold a dispatched model in
    reference cycles, so ``del`` alone kept its tensors on the GPUs) and the CUDA cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _return_freed_memory() -> None:
    """Hand the heap that loading freed back to the system (glibc's ``malloc_trim``). Converting a
    bf16 checkpoint to float32 and fusing per-expert tensors leaves the freed copies in the
    allocator, where they count in RSS: 1.9 GiB of a synthetic two-layer Qwen3-30B-A3B (9.27 ->
    7.34 GiB, weights 6.96). Elsewhere (macOS, musl) nothing happens."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def kept_in_fp32(name: str, patterns) -> bool:
    """Whether ``from_pretrained(dtype=bfloat16)`` keeps the tensor ``name`` in float32: it names
    one of the model's ``_keep_in_fp32_modules_strict`` patterns."""
    return any(k in name for k in patterns)


def keep_fp32_as_loaded(module, original, patterns, *, prefix: str = "") -> None:
    """Put back in float32, from ``original``, the tensors of ``module`` (a copy cast to a lower
    precision) that loading in that precision keeps in float32; ``prefix`` is the module's name
    in its model, for the patterns."""
    import torch

    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point() and kept_in_fp32(prefix + name, patterns):
                t.data = _get_module_tensor(original, name).detach().to(torch.float32).clone()


def _get_module_tensor(module, name: str):
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def model_class(config, *, concrete: bool = False):
    """The transformers auto class moeguard builds ``config``'s model with (``concrete``: the
    model class it picks): the causal LM, else the image-text-to-text model, else the seq2seq LM. A multimodal wrapper
    (Qwen3-VL-MoE, GLM-4.5V, Kimi-K2.5...) has an LM head and a forward that takes text alone, so
    every text task, attribution and re-alignment runs through it unchanged; its vision tower is
    loaded and never called."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING)

    # an encoder-decoder (Switch Transformers) through its seq2seq LM head
    for auto, mapping in ((AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING),
                          (AutoModelForImageTextToText, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING),
                          (AutoModelForSeq2SeqLM, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING)):
        try:
            cls = mapping[type(config)]
        except KeyError:
            continue
        return cls if concrete else auto
    model_type = getattr(config, "model_type", type(config).__name__)
    raise MoeguardError(f"model_type '{model_type}' has neither a causal-LM nor an image-text-to-text class in the "
                        "installed transformers: moeguard needs a model with an LM head",
                        hint="pass the checkpoint of the full model (a text sub-config is loaded through its wrapper)")


def meta_model(config):
    """The model's module tree on the meta device: shapes without memory, for `info`."""
    import torch

    from moeguard.models.prune import resize_layers

    try:
        with torch.device("meta"):
            model = model_class(config).from_config(config)
    except (ZeroDivisionError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        # a value transformers' own constructor cannot use (decoder_sparse_step 0: a modulo by zero)
        raise MoeguardError(f"cannot build {getattr(config, 'model_type', 'the model')} from its config "
                            f"({type(e).__name__}: {str(e)[:100]})", hint="fix config.json") from None
    resize_layers(model)
    return model
