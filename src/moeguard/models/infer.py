"""A family spec for a model type that has none built in: read from the module tree, checked
against the model's own router.

Most MoE model types in transformers 5 share one skeleton (``docs/families.md``): a sparse block
per decoder layer holding a router (an [E, d] weight, maybe a selection bias) and fused experts
(``gate_up_proj`` [E, 2I, d], ``down_proj`` [E, d, I]). What differs is names, config keys and
the routing rule. :func:`infer_family` finds the names on the model built on the meta device,
then searches the routing rules moeguard knows for the one that reproduces the model's own
router *exactly*: the same choices and bit-identical weights, in float32 and in bfloat16, with
every routing switch of the config flipped (renormalization, scaling, groups) and a selection
bias that moves choices. The router is built alone at the config's real sizes (a router is one
[E, d] matrix), so nothing large is allocated.

A spec that passes is ``verified``; one whose structure was read but whose rule matched nothing,
or could not be run, is ``unverified`` with the reason; a model with no such structure is
``unsupported`` (or ``dense``).

Past 400 lines on purpose: the structure search and the rule verification share the found
structure, the config-key tables and the meta model; apart, each would import the other's privates.
"""

from __future__ import annotations

import copy
import inspect
import json
import itertools
import re
from dataclasses import dataclass, field, replace

from moeguard.models.adapter import _get_path, linear_bias
from moeguard.models.families import FAMILIES, FamilySpec, RoutingSpec, moe_config
from moeguard.models.loading import kept_in_fp32, keep_fp32_as_loaded

_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k", "num_experts_per_token", "moe_top_k",
               "top_k_experts")
_SCALING_KEYS = ("routed_scaling_factor", "router_scaling_factor", "route_scale", "moe_routed_scaling_factor")
_FINAL_NORMS = ("norm", "final_layernorm", "embedding_norm", "ln_f", "final_norm")
_TOKENS = 192   # router inputs per check: enough that a wrong rule differs on some token


@dataclass(frozen=True)
class Inference:
    """What moeguard concluded about a model type without a built-in spec."""

    model_type: str
    status: str                      # built-in | verified | unverified | unsupported | dense
    spec: FamilySpec | None = None
    reasons: tuple[str, ...] = ()
    checks: dict = field(default_factory=dict, compare=False)
    note: str = ""                   # how it was built, where that limits what commands can do

    def to_dict(self) -> dict:
        out = {"model_type": self.model_type, "status": self.status, "reasons": list(self.reasons)}
        if self.note:
            out["note"] = self.note
        if self.spec is not None:
            out["spec"] = spec_summary(self.spec)
        if self.checks:
            out["checks"] = self.checks
        return out


class _NotSkeleton(Exception):
    """The module tree is not the standard skeleton; the message says where it differs."""


def spec_summary(spec: FamilySpec) -> dict:
    """Every field of the spec, named as ``FamilySpec(...)`` and ``RoutingSpec(...)`` take them
    (what docs/families.md says to copy into a built-in spec)."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(spec)))   # tuples as lists: JSON's own shape


def infer_family(config) -> Inference:
    """The spec of ``config``'s model type: built in, or inferred and (maybe) verified. Cached
    per config (commands resolve a family several times)."""
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else \
        json.dumps(config.to_dict(), sort_keys=True, default=str)
    key = (getattr(config, "model_type", None), text)
    if key not in _CACHE:
        _CACHE[key] = _infer(config)
    return _CACHE[key]


_CACHE: dict[tuple, Inference] = {}

# Model types whose MoE design moeguard's abstractions do not model yet, each said precisely (the
# structure search could only give a generic reason); docs/families.md, "What the unsupported types need".
NOT_YET_MODELLED: dict[str, str] = {}


def _infer(config) -> Inference:
    from moeguard.models.families import _BY_MODEL_TYPE

    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return Inference(model_type, "built-in", _BY_MODEL_TYPE.get(model_type))
    known = NOT_YET_MODELLED.get(model_type)
    if known:
        return Inference(model_type, "unsupported", reasons=(known,))
    try:
        model = _meta(config)
    except Exception as e:   # no model class, or the config cannot build one
        return Inference(model_type, "unsupported", reasons=(f"transformers cannot build a model from this config "
                                                              f"({type(e).__name__}: {_first_line(e)})",))
    config = model.config   # a multimodal config may build its language model, which holds the text config
    if config.model_type in _BY_MODEL_TYPE:
        return Inference(model_type, "built-in", _BY_MODEL_TYPE.get(config.model_type),
                         reasons=(f"its language model is {config.model_type}",))
    # the keys live in the language model's config; a wrapper (image-text-to-text) keeps its own
    # model type, so the spec is found by the checkpoint's config
    text = moe_config(config)
    base = "" if _has_lm_class(config) and not getattr(config, "is_encoder_decoder", False) else (
        " (read from its base model: transformers has neither a causal-LM nor an image-text-to-text class for it; "
        "an encoder-decoder or a text sub-config)")
    try:
        found = _structure(model, text)
    except _NotSkeleton as e:
        status = "unsupported" if _looks_moe(model) else "dense"
        return Inference(model_type, status, reasons=(str(e) + base,))
    found.model_type = config.model_type
    try:
        spec, reasons, checks = _verify(text, found)
    except _NotSkeleton as e:
        return Inference(model_type, "unsupported", reasons=(str(e) + base,))
    note = ""
    if base:
        note = ("no class with an LM head in transformers (a text sub-config): the router is checked on its base "
                "model; commands take the checkpoint of the multimodal model it belongs to")
    elif text is not config:
        note = f"a multimodal wrapper ({type(model).__name__}): commands run text through it; its vision tower is idle"
    status = "verified" if not reasons else "unverified"
    return Inference(model_type, status, spec, tuple(reasons), checks, note)


def _has_lm_class(config) -> bool:
    from moeguard.errors import MoeguardError
    from moeguard.models.loading import model_class

    try:
        model_class(config)
        return True
    except MoeguardError:
        return False


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _meta(config):
    """The model on the meta device: the class commands load (a causal LM, or a multimodal
    wrapper's image-text-to-text model); else, for a text sub-config, its base model, enough to
    check the router."""
    import torch
    from transformers import AutoModel

    from moeguard.models.loading import model_class

    cls = model_class(config) if _has_lm_class(config) else AutoModel
    with torch.device("meta"):   # a copy: from_config sets dtype and implementations on the config it gets
        return cls.from_config(copy.deepcopy(config))


def _looks_moe(model) -> bool:
    return any(n.endswith((".experts", ".router", ".gate")) for n, _ in model.named_modules()) and any(
        "expert" in n for n, _ in model.named_modules())


# --------------------------------------------------------------------------- structure

@dataclass
class _Found:
    layers_path: str
    block: str
    router_attr: str
    router_weight_attr: str
    num_experts: int
    count_key: str
    top_k: int
    top_k_key: str
    shared: tuple[str, ...]
    bias_path: str | None          # selection bias, under the block
    bias_passed: bool              # the block passes the bias to the router's forward
    final_norm: str
    router: object                 # a meta router module (its class is rebuilt for the checks)
    layer_index: int
    bias_shape: tuple[int, ...] | None
    expert_layout: str = "gate_up"
    module_path: str = ""            # the block's full name, for the class's keep-in-float32 patterns
    keep_fp32: tuple[str, ...] = ()
    model_type: str = ""             # the checkpoint's (a wrapper's, not its text config's)


def _structure(model, config) -> _Found:
    import torch

    experts = []
    for name, m in model.named_modules():
        gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3:
            experts.append((name, m))
    if not experts:
        raise _NotSkeleton("no fused experts module (3-D gate_up_proj and down_proj) in the module tree")
    where = []
    for name, m in experts:
        hit = re.match(r"^(.*)\.(\d+)\.([^.]+)\.experts$", name)
        if hit is None:
            raise _NotSkeleton(f"experts at '{name}' are not '<layers>.<i>.<block>.experts' (one sparse block per "
                               "decoder layer)")
        where.append((hit.group(1), int(hit.group(2)), hit.group(3), m))
    paths, blocks = {w[0] for w in where}, {w[2] for w in where}
    if len(paths) != 1 or len(blocks) != 1:
        raise _NotSkeleton(f"experts sit under several layer lists or block names: {sorted(paths)} {sorted(blocks)}")
    layers_path, index, block_attr, ex = where[0]
    flags = {f: getattr(ex, f, d) for f, d in (("is_transposed", False), ("is_concatenated", True),
                                                 ("has_bias", False), ("has_gate", True),
                                                 ("has_post_expert_norm", False))}
    odd = {f: v for f, v in flags.items()
           if f != "is_transposed" and v != dict(is_concatenated=True, has_gate=True).get(f, False)}
    if odd:
        raise _NotSkeleton(f"experts layout {odd} is not gate_up [E, 2I, d] + down [E, d, I] (or transposed)")
    # (an experts class's own activation, _apply_gate, changes nothing here: moeguard runs experts
    # through their own forward and reads their weights, never re-implements them)
    E = int(ex.gate_up_proj.shape[0])
    layer = _get_path(model, layers_path)[index]
    block = getattr(layer, block_attr)
    hidden = int(config.get_text_config().hidden_size)
    gu, dn = tuple(ex.gate_up_proj.shape[1:]), tuple(ex.down_proj.shape[1:])
    # the layout from the shapes, the decorator's flag deciding when 2I == d makes both fit
    fits = {"gate_up": gu[1] == hidden and dn[0] == hidden, "gate_up_t": gu[0] == hidden and dn[1] == hidden}
    layouts = [k for k, ok in fits.items() if ok]
    if len(layouts) == 2:
        layouts = ["gate_up_t" if flags["is_transposed"] else "gate_up"]
    if not layouts:
        raise _NotSkeleton(f"experts of shapes gate_up {list(gu)}, down {list(dn)} fit neither [2I, d] + [d, I] "
                           f"nor [d, 2I] + [I, d] with d = {hidden}")
    # what from_pretrained(dtype=bf16) keeps in float32: the instance's strict list, merged from
    # its submodules at post_init (the plain list applies to fp16 only)
    keep = tuple(sorted(getattr(model, "_keep_in_fp32_modules_strict", None) or ()))
    router_attr, weight_attr = None, None
    for cname, child in block.named_children():
        if cname == "experts":
            continue
        for wname in ("weight",) + tuple(f"{g}.weight" for g, _ in child.named_children()):
            w = _get_path(child, wname, None)
            if isinstance(w, torch.Tensor) and tuple(w.shape) == (E, hidden):
                router_attr, weight_attr = cname, wname
                break
        if router_attr:
            break
    if router_attr is None:
        raise _NotSkeleton(f"no router with an [{E}, {hidden}] weight beside the experts in '{block_attr}'")
    router = getattr(block, router_attr)
    own_bias = linear_bias(router, weight_attr)
    shared = tuple(c for c, m in block.named_children()
                   if c not in ("experts", router_attr) and any(True for _ in m.parameters()))
    bias_path, bias_shape = None, None
    # in the router, nested or not; then the block's own tensors (its children are searched above)
    for prefix, mod, recurse in ((f"{router_attr}.", router, True), ("", block, False)):
        for tname, t in list(mod.named_parameters(recurse=recurse)) + list(mod.named_buffers(recurse=recurse)):
            if t is own_bias or tname.endswith("weight") or "bias" not in tname:
                continue
            if t.dim() and t.shape[-1] == E and all(s == 1 for s in t.shape[:-1]):
                bias_path, bias_shape = prefix + tname, tuple(t.shape)
                break
        if bias_path:
            break
    takes = [p for p in inspect.signature(router.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    bias_passed = len(takes) > 1
    if bias_passed and (bias_path is None or "." in bias_path):
        raise _NotSkeleton(f"the router takes {len(takes)} arguments, and moeguard finds no selection bias on the "
                           "block to pass it")
    d = config.to_dict()
    count_key = next((k for k in _COUNT_KEYS if d.get(k) == E), None)
    if count_key is None:
        raise _NotSkeleton(f"no config key ({', '.join(_COUNT_KEYS)}) holds the {E} experts")
    top_k = getattr(router, "top_k", None)
    top_k_key = next((k for k in _TOP_K_KEYS if isinstance(d.get(k), int) and (top_k is None or d[k] == top_k)), None)
    if top_k_key is None:
        raise _NotSkeleton(f"no config key ({', '.join(_TOP_K_KEYS)}) holds the router's top-k")
    base = layers_path.rpartition(".")[0]
    final = next((f"{base}.{n}" if base else n for n in _FINAL_NORMS if _get_path(model, f"{base}.{n}" if base else n, None)
                  is not None), None)
    if final is None:
        raise _NotSkeleton(f"no final norm ({', '.join(_FINAL_NORMS)}) after the decoder layers under '{base}'")
    return _Found(layers_path=layers_path, block=block_attr, router_attr=router_attr, router_weight_attr=weight_attr,
                  num_experts=E, count_key=count_key, top_k=int(d[top_k_key]), top_k_key=top_k_key, shared=shared,
                  bias_path=bias_path, bias_passed=bias_passed, final_norm=final, router=router, layer_index=index,
                  bias_shape=bias_shape, expert_layout=layouts[0],
                  module_path=f"{layers_path}.{index}.{block_attr}", keep_fp32=keep)


# --------------------------------------------------------------------------- verification

def _settings(config) -> dict:
    """The routing switches a config has, read as attributes (an attribute_map may alias them)."""
    keys = ("norm_topk_prob", "n_group", "topk_group", "topk_method", "moe_norm_min") + _SCALING_KEYS
    return {k: v for k in keys if (v := getattr(config, k, None)) is not None}


def _rules(config, found: _Found):
    """Every routing rule worth trying, simplest first."""
    d = _settings(config)
    renorms: list = [False, True] + (["norm_topk_prob"] if "norm_topk_prob" in d else [])
    scalings = [None] + [k for k in _SCALING_KEYS if isinstance(d.get(k), (int, float))]
    groupings = [(False, "top2_sum", None, "")]
    if "n_group" in d and "topk_group" in d:
        groupings += [(True, "top2_sum", None, ""), (True, "max", None, "")]
        if "topk_method" in d:
            groupings.append((True, "max", "topk_method", "group_limited_greedy"))
    biases = [None, found.bias_path] if found.bias_path else [None]
    mins = [None] + (["moe_norm_min"] if "moe_norm_min" in d else [])
    for score, select_on in (("softmax", "probs"), ("softmax", "logits"), ("sigmoid", "probs"), ("sigmoid", "logits")):
        for renorm, eps, rmin, scale, (grouped, gs, gkey, gmethod), bias, ordered in itertools.product(
                renorms, (0.0, 1e-20, 1e-6), mins, scalings, groupings, biases, (False, True)):
            if (renorm is False and (eps or rmin)) or (eps and rmin) or (ordered and not (bias or grouped)):
                continue
            if select_on == "logits" and (grouped or (score == "softmax" and (renorm is not False or bias or scale))):
                continue
            yield RoutingSpec(score=score, select_on=select_on, renormalize=renorm, renorm_eps=eps, renorm_min_key=rmin,
                              scaling_key=scale, grouped=grouped, group_score=gs, group_method_key=gkey,
                              group_method=gmethod, correction_bias=bias, sorted_choice=ordered)


_DTYPES = [dict(score_dtype=s, weights_dtype=w, logits_fp32=f)
           for f in (False, True) for s in ("float32", "logits") for w in ("logits", "float32", "input")]


def _variants(config, found: _Found) -> list:
    """The config as given, then configs that flip every routing switch it has, so a rule matches
    all of them: each scaling key its own value (the one the router reads is the one that
    matches), another top-k (so the top-k key is checked, and so is the order the k weights are
    summed in when renormalized), groups on and off."""
    d = _settings(config)
    flips = [{}]
    if "norm_topk_prob" in d:
        flips = [{"norm_topk_prob": True}, {"norm_topk_prob": False}]
    k_alt = 4 if found.top_k != 4 else 3
    out = [copy.deepcopy(config)]
    for flip in flips:
        extra = dict(flip)
        if found.num_experts >= 2 * k_alt:
            extra[found.top_k_key] = k_alt
        for n, k in enumerate(k for k in _SCALING_KEYS if isinstance(d.get(k), (int, float))):
            extra[k] = 2.5 + n
        if "n_group" in d and "topk_group" in d and found.num_experts % 2 == 0:
            extra.update(n_group=2, topk_group=1)
            if "topk_method" in d:
                out.append(_with(config, {**extra, "topk_method": "greedy"}))
                extra["topk_method"] = "group_limited_greedy"
        out.append(_with(config, extra))
    return out


def _with(config, changes: dict):
    c = copy.deepcopy(config)
    for k, v in changes.items():
        setattr(c, k, v)
        text = c.get_text_config()
        if text is not c:
            setattr(text, k, v)
    return c


def _build_router(config, found: _Found):
    import torch

    cls = type(found.router)
    with torch.device("cpu"):
        for args in ((config,), (config, found.layer_index)):
            try:
                return cls(*args).eval()
            except TypeError:
                continue
    raise RuntimeError(f"cannot build {cls.__name__} from the config alone")


@dataclass
class _Case:
    """One router built alone, its input and what it returns, in one dtype."""

    config: object
    router: object
    bias: object      # the selection-bias tensor it uses (its own, or the one the block passes)
    hidden: object
    weights: object = None
    index: object = None

    @property
    def router_weight(self):   # what routing.router_logits / route_module read of an MoE layer
        return _get_path(self.router, self._weight_attr)

    @property
    def router_bias(self):
        return linear_bias(self.router, self._weight_attr)

    _weight_attr: str = "weight"
    correction_bias: object = None


def _cases(config, found: _Found) -> dict:
    """{"fp32" | "bf16" | "bf16_cast": [_Case per config variant]}, each with the router's own output.
    "bf16" is a bf16 model as ``from_pretrained(dtype=bfloat16)`` loads it (the tensors the class
    keeps in float32 stay so); "bf16_cast" one cast whole with ``.to``, left out when the router
    itself cannot run that way (Inkling's wants its float32 weight)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    hidden = int(config.get_text_config().hidden_size)
    inner = found.bias_path.partition(".")[2] if found.bias_path and not found.bias_passed else None
    out: dict[str, list] = {"fp32": [], "bf16": [], "bf16_cast": []}
    for cfg in _variants(config, found):
        router = _build_router(cfg, found)
        with torch.no_grad():
            w = _get_path(router, found.router_weight_attr)
            w.copy_(torch.randn(w.shape, generator=gen) / hidden ** 0.5)   # logits of order 1
            bias = None
            if found.bias_path:
                bias = _get_path(router, inner) if inner else torch.zeros(found.bias_shape)
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.1)    # enough to move some choices
        h = torch.randn(_TOKENS, hidden, generator=gen)
        for kind in list(out):
            dtype = torch.float32 if kind == "fp32" else torch.bfloat16
            r = router if kind == "fp32" else copy.deepcopy(router).to(dtype)
            if kind == "bf16":
                keep_fp32_as_loaded(r, router, found.keep_fp32, prefix=f"{found.module_path}.{found.router_attr}.")
            held = kind == "bf16" and kept_in_fp32(f"{found.module_path}.{found.bias_path}", found.keep_fp32)
            b = None if bias is None else _get_path(r, inner) if inner else bias if held else bias.to(dtype)
            x = h.to(dtype)
            try:
                res = _call_router(r, x, b if found.bias_passed else None, found.bias_passed)
            except _NotSkeleton:
                raise
            except Exception:
                if kind != "bf16_cast":
                    raise
                out.pop("bf16_cast")
                continue
            out[kind].append(_Case(config=cfg, router=r, bias=b, hidden=x, weights=res[1], index=res[2],
                                   _weight_attr=found.router_weight_attr))
    return out


def _call_router(router, x, bias, passed: bool):
    """The router's (logits, weights, index) on [T, d] inputs (some routers want [1, T, d])."""
    import torch

    with torch.no_grad():
        try:
            res = router(x, bias) if passed else router(x)
        except ValueError:
            res = router(x[None], bias) if passed else router(x[None])
    if not isinstance(res, tuple) or len(res) != 3:
        raise _NotSkeleton(f"its router returns {len(res) if isinstance(res, tuple) else 1} value(s), not "
                           "(logits, weights, index)")
    return res


def _matches(spec: FamilySpec, cases: list[_Case], num_experts: int) -> bool:
    """Whether ``spec``'s rule gives every case's choices and bit-identical weights."""
    import torch

    from moeguard.models.routing import pruned_router_params, route_module, router_logits

    rule = spec.routing
    for c in cases:
        c.correction_bias = c.bias if rule.correction_bias else None
        params = pruned_router_params(spec, c.config.get_text_config(), list(range(num_experts)), num_experts)
        try:
            with torch.no_grad():
                w, i = route_module(c, router_logits(c, c.hidden, rule), rule, params, input_dtype=c.hidden.dtype)
        except Exception:   # a rule that does not apply to this router's shapes
            return False
        o1, o2 = c.index.argsort(-1), i.argsort(-1)
        if not (w.dtype == c.weights.dtype and torch.equal(c.index.gather(1, o1), i.gather(1, o2))
                and torch.equal(c.weights.gather(1, o1), w.gather(1, o2))):
            return False
    return True


def _verify(config, found: _Found) -> tuple[FamilySpec | None, list[str], dict]:
    rules = list(_rules(config, found))
    checks = {"rules": len(rules), "tokens": _TOKENS}
    try:
        cases = _cases(config, found)
    except _NotSkeleton:
        raise
    except Exception as e:   # no rule was checked: there is no spec to trust
        return None, [f"cannot run this model type's router alone ({type(e).__name__}: {_first_line(e)}); "
                      "there is no checked rule to trust"], checks
    checks["config_variants"] = len(cases["fp32"])
    checks["bf16"] = sorted(k for k in cases if k != "fp32")
    fp32_only = None
    for n, rule in enumerate(rules, 1):
        if not _matches(_spec(config, found, rule), cases["fp32"], found.num_experts):
            continue
        checks["rules_tried"] = n
        for dt in _DTYPES:
            spec = _spec(config, found, replace(rule, **dt))
            if all(_matches(spec, c, found.num_experts) for c in cases.values()):
                return spec, [], checks
        fp32_only = fp32_only or rule
    if fp32_only is not None:   # trustable: right in float32, off by rounding in bfloat16
        return _spec(config, found, fp32_only), ["a routing rule matches it in float32, but no dtype handling "
                                                 "moeguard knows reproduces it bit for bit in bfloat16"], checks
    return None, [f"none of the {len(rules)} routing rules moeguard knows reproduces its router; there is no "
                  "checked rule to trust"], checks


def _spec(config, found: _Found, rule: RoutingSpec) -> FamilySpec:
    from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN

    model_type = found.model_type or config.model_type
    disk = {}
    pattern = _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    like = FAMILIES.get(pattern) if pattern in FAMILIES.names() else None
    if like is not None:   # checkpoints saved in another family's public layout: its disk names
        disk = {k: getattr(like, k) for k in ("disk_block_attrs", "disk_router_attrs", "disk_expert_attrs",
                                              "disk_per_expert", "disk_expert_tensors", "disk_router_weight")}
    elif pattern is None:  # saved as held in memory: fused tensors under the block
        disk = {"disk_expert_tensors": ("experts.gate_up_proj", "experts.down_proj"),
                "disk_router_weight": found.router_weight_attr}
    d = config.to_dict()
    return FamilySpec(
        name=model_type, model_types=(model_type,), block_attrs=(found.block,), router_attr=found.router_attr,
        routing=rule, num_experts_key=found.count_key, top_k_key=found.top_k_key, shared_attrs=found.shared,
        layers_path=found.layers_path, final_norm_path=found.final_norm, router_weight_attr=found.router_weight_attr,
        expert_layout=found.expert_layout,
        min_experts=2 if rule.grouped and rule.group_score == "top2_sum" else 1,
        aux_loss_key="router_aux_loss_coef" if "router_aux_loss_coef" in d else None, **disk)
