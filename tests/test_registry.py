"""The one registry class behind methods, modes, defenses and families: lookups with "did you
mean", refused duplicates, lazy built-in loading, and the wrappers keeping their messages."""

from __future__ import annotations

import re
import sys

import pytest

from moeguard.errors import MoeguardError
from moeguard.registry import Registry


def test_lookup_and_listing():
    reg: Registry[int] = Registry("widget")
    reg.add("beta", 2)
    reg.add("alpha", 1)
    assert reg.get("alpha") == 1 and reg["beta"] == 2
    assert reg.names() == ["alpha", "beta"] and list(reg) == ["alpha", "beta"]
    assert reg.items() == [1, 2] and len(reg) == 2
    assert "alpha" in reg and "gamma" not in reg
    reg.remove("alpha")
    assert reg.names() == ["beta"]


def test_unknown_name_says_did_you_mean_and_the_hint():
    reg: Registry[int] = Registry("widget", hint="see `moeguard widgets`")
    for name in ("sprocket", "spindle", "gear"):
        reg.add(name, 0)
    with pytest.raises(MoeguardError) as err:
        reg.get("sprocet")
    assert err.value.message == "unknown widget 'sprocet'"
    assert err.value.hint == "did you mean sprocket? Known: gear, spindle, sprocket; see `moeguard widgets`"
    with pytest.raises(MoeguardError) as err:
        reg["zzz"]
    assert err.value.hint == "known: gear, spindle, sprocket; see `moeguard widgets`"


def test_duplicate_registration_is_refused_unless_asked():
    reg: Registry[object] = Registry("widget")
    first, second = object(), object()
    reg.add("a", first)
    assert reg.add("a", first) is first  # the same object again (a re-import) is harmless
    with pytest.raises(MoeguardError, match="widget 'a' is already registered") as err:
        reg.add("a", second)
    assert "overwrite=True" in err.value.hint
    assert reg.get("a") is first
    reg.add("a", second, overwrite=True)
    assert reg.get("a") is second


def test_decorator_registers_and_returns_the_item():
    reg: Registry = Registry("widget")

    @reg.register("f")
    def f():
        return 1

    assert reg.get("f") is f and f() == 1
    with pytest.raises(MoeguardError, match="already registered"):
        reg.register("f")(lambda: 2)


def test_loader_is_imported_on_first_lookup_only(tmp_path, monkeypatch):
    reg: Registry[str] = Registry("plugin", loader="moeguard_test_plugins")
    (tmp_path / "moeguard_test_plugins.py").write_text(
        "import sys\n"
        "REG = sys.modules['__reg__']\n"
        "REG.add('builtin', 'from the loader')\n"
        "LOADS = getattr(sys, '_moeguard_loads', 0) + 1\n"
        "sys._moeguard_loads = LOADS\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "__reg__", reg)
    monkeypatch.delitem(sys.modules, "moeguard_test_plugins", raising=False)
    monkeypatch.setattr(sys, "_moeguard_loads", 0, raising=False)
    reg.add("mine", "added before any lookup")  # registering does not load the built-ins
    assert "moeguard_test_plugins" not in sys.modules
    assert reg.names() == ["builtin", "mine"]
    assert reg.get("builtin") == "from the loader" and "builtin" in reg and len(reg) == 2
    assert sys._moeguard_loads == 1
    monkeypatch.delitem(sys.modules, "moeguard_test_plugins")


def test_a_built_in_replaced_or_removed_before_any_lookup_stays_so(tmp_path, monkeypatch):
    """overwrite=True before the first lookup: the built-ins' later import refused the name (every lookup
    failed with "pass overwrite=True", which was passed), and a removed built-in came back."""
    (tmp_path / "moeguard_test_builtins.py").write_text(
        "import sys\nREG = sys.modules['__reg__']\nREG.add('average', 'built-in')\nREG.add('other', 'built-in')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for _ in range(2):
        reg: Registry[str] = Registry("merge method", loader="moeguard_test_builtins")
        monkeypatch.setitem(sys.modules, "__reg__", reg)
        monkeypatch.delitem(sys.modules, "moeguard_test_builtins", raising=False)
        if _ == 0:
            reg.add("average", "mine", overwrite=True)
            assert reg.get("average") == "mine" and reg.names() == ["average", "other"]
        else:
            reg.remove("other")
            assert reg.names() == ["average"] and "other" not in reg
    monkeypatch.delitem(sys.modules, "moeguard_test_builtins", raising=False)


def test_a_failing_loader_fails_every_lookup_not_just_the_first(tmp_path, monkeypatch):
    reg: Registry[str] = Registry("plugin", loader="moeguard_broken_plugins")
    (tmp_path / "moeguard_broken_plugins.py").write_text("raise RuntimeError('broken plugin file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="broken plugin file"):
            reg.get("anything")
    monkeypatch.delitem(sys.modules, "moeguard_broken_plugins", raising=False)


# --------------------------------------------------------------------------- the registries on it

def test_attribution_methods_keep_their_messages():
    from moeguard.attribution.base import METHODS, get_method, list_methods

    assert isinstance(METHODS, Registry)
    assert [m.name for m in list_methods()] == METHODS.names() == sorted(METHODS.names())
    assert get_method("gate").name == "gate"
    with pytest.raises(MoeguardError) as err:
        get_method("ablaton")
    assert err.value.message == "unknown attribution method 'ablaton'"
    assert err.value.hint.startswith("did you mean ablation, ablation-screened?")   # the closest first


def test_modes_keep_their_messages():
    from moeguard.realign.modes import MODES, get_mode

    assert MODES.names() == ["experts", "full", "lora", "router"]
    assert get_mode("lora").default_lr == 3e-3
    with pytest.raises(MoeguardError, match=re.escape("unknown fine-tuning mode 'loar'")) as err:
        get_mode("loar")
    assert "lora" in err.value.hint


def test_defenses_load_their_files_and_keep_their_messages():
    from moeguard.defense.harden import DEFENSES, get_defense

    assert DEFENSES.names() == ["entangle", "selective"]
    assert DEFENSES["selective"].protocol and not get_defense("entangle").protocol
    with pytest.raises(MoeguardError, match=re.escape("unknown hardening method 'entangel'")) as err:
        get_defense("entangel")
    assert err.value.hint.startswith("did you mean entangle?")


def test_families_and_their_config_lookup():
    from moeguard.models.families import FAMILIES, FamilySpec, family_for_config, get_family, register_family

    assert get_family("mixtral").model_types == ("mixtral",)
    with pytest.raises(MoeguardError, match="unknown model family 'mixtrl'"):
        get_family("mixtrl")
    with pytest.raises(MoeguardError, match="model family 'mixtral' is already registered"):
        register_family(FamilySpec(**{**get_family("mixtral").__dict__, "min_experts": 3}))
    assert FAMILIES.get("mixtral").min_experts == 1

    class Config:
        def __init__(self, model_type, **keys):
            self.model_type, self.keys = model_type, keys

        def to_dict(self):
            return {"model_type": self.model_type, **self.keys}

    assert family_for_config(Config("qwen3_moe")).name == "qwen3_moe"
    with pytest.raises(MoeguardError, match=r"model_type 'llama' is a dense \(non-MoE\) model; .*olmoe"):
        family_for_config(Config("llama"))
    assert family_for_config(Config("nllb-moe", num_experts=8)).name == "nllb_moe"   # its experts repaired
    with pytest.raises(MoeguardError, match="model_type 'longcat_flash' is an unsupported MoE family .*olmoe"):
        family_for_config(Config("longcat_flash", num_experts=8))


def test_on_disk_names_live_in_the_family_specs():
    from moeguard.models.families import FAMILIES, DiskLayout, get_family

    phi = get_family("phimoe").disk_layout()
    assert phi.block_names == ("mlp", "block_sparse_moe") and phi.router_modules == ("router", "gate")
    granite = get_family("granitemoe").disk_layout()
    assert granite.expert_modules == ("experts", "input_linear", "output_linear")
    assert get_family("qwen2_moe").disk_layout().shared_modules == ("shared_expert", "shared_expert_gate")
    assert get_family("gpt_oss").disk_layout().router_modules == ("router",)
    m = get_family("mixtral").disk_layout().per_expert.match("experts.3.w1.weight")
    assert m is not None and m.groups() == ("3", "w1.weight")
    # a checkpoint of unknown family: every family's names (what the streaming pruner used to hard-code)
    every = DiskLayout.union(f.disk_layout() for f in FAMILIES.items() if not f.encoder_decoder)
    # DBRX's ffn; JetMoE's attention experts, a second block of its layers
    assert set(every.block_names) == {"mlp", "block_sparse_moe", "feed_forward", "mixer", "ffn", "self_attention.experts"}
    # blocks of rows per expert ([E*I, d]) only where the family says so: the union stays strict
    assert get_family("dbrx").disk_layout().blocked and not every.blocked
    # routers, and selection biases saved beside them on the block (MiniMax-M2, LFM2, EXAONE, ERNIE)
    assert set(every.router_modules) == {"gate", "router", "e_score_correction_bias", "expert_bias", "moe_statics"}
    assert set(every.expert_modules) == {"experts", "input_linear", "output_linear"}
    assert set(every.shared_modules) == {"shared_expert", "shared_experts", "shared_expert_gate", "shared_mlp"}
