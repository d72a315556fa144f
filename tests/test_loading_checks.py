"""What a checkpoint must be before its numbers are trusted: every weight the model needs present
(transformers would fill the rest at random), the files checked the files loaded, no code of the
checkpoint's run, and router settings the router can run. Each refusal is one line."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.loading import check_config, load_model, resolve
from moeguard.models.families import family_for_config
from moeguard.testing import tiny_config


@pytest.fixture
def embedded_copy(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(resolve(None).path, d)
    return d


def _one_line(capsys, *needles):
    # transformers' own loading progress bar may come before (a line of \r-joined updates)
    err = [l for l in capsys.readouterr().err.strip().splitlines() if "it/s]" not in l and l.strip()]
    assert len(err) == 1 and all(n in err[0] for n in needles), err


def test_a_checkpoint_missing_a_router_is_refused_not_filled_at_random(embedded_copy, capsys):
    f = embedded_copy / "model.safetensors"
    tensors = load_file(f)
    gone = next(k for k in tensors if k.startswith("model.layers.3.") and "gate" in k and "experts" not in k)
    del tensors[gone]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(MoeguardError, match=r"lacks 1 weights the model needs \(model\.layers\.3\.\S*gate\S*\): they would be random"):
        load_model(str(embedded_copy))
    assert main(["eval", "--model", str(embedded_copy), "--tasks", "arith-compare", "--limit", "4"]) == 2
    _one_line(capsys, "lacks 1 weights")


def test_weights_of_other_shapes_than_the_config_are_one_line(embedded_copy, capsys):
    """A pruner that left config.json at 8 experts while the weights hold fewer: transformers raises
    a RuntimeError deep in loading; it is the checkpoint's fault, said in one line."""
    from moeguard.models.prune import prune_model

    m, _, _ = load_model(None, with_tokenizer=False)
    small, _ = prune_model(m, {l.index: [0, 1, 2, 3] for l in MoEAdapter(m).layers})
    small.save_pretrained(embedded_copy)                      # 4 experts per layer...
    cfg = json.loads((embedded_copy / "config.json").read_text())
    cfg["num_local_experts"] = 8                              # ...a config that says 8
    (embedded_copy / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", "--model", str(embedded_copy), "--tasks", "arith-compare", "--limit", "4"]) == 2
    _one_line(capsys, "weights of other shapes than its config.json builds", "in the file", "fix config.json")


def test_the_single_file_transformers_reads_is_the_file_checked(embedded_copy):
    """A stale index beside model.safetensors: transformers reads the single file; so does the check."""
    (embedded_copy / "model.safetensors.index.json").write_text('{"weight_map": {"x": "gone.safetensors"}}')
    m, _, _ = load_model(str(embedded_copy), with_tokenizer=False)
    assert len(MoEAdapter(m).layers) == 4


def test_a_config_naming_another_weights_file_is_refused(embedded_copy, capsys):
    """transformers_weights would make transformers load that file (a .bin: unpickled) instead."""
    cfg = json.loads((embedded_copy / "config.json").read_text())
    cfg["transformers_weights"] = "adapter_model.bin"
    (embedded_copy / "config.json").write_text(json.dumps(cfg))
    assert main(["info", "--model", str(embedded_copy)]) == 2
    _one_line(capsys, "config transformers_weights names 'adapter_model.bin'", "remove transformers_weights")


def test_a_peft_adapter_beside_the_weights_is_refused_before_transformers_loads_it(embedded_copy, capsys, monkeypatch):
    """from_pretrained(use_safetensors=True) still loads an adapter_config.json's adapter, from
    adapter_model.bin (a pickle) where there is no safetensors one, merged into every number."""
    (embedded_copy / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    (embedded_copy / "adapter_model.bin").write_bytes(b"not read")
    assert main(["info", "--model", str(embedded_copy)]) == 2
    _one_line(capsys, f"{embedded_copy} holds a PEFT adapter (adapter_config.json) beside the model", "merge the adapter")
    with pytest.raises(MoeguardError, match="holds a PEFT adapter"):
        load_model(str(embedded_copy))
    # a hub repo's too: looked up as from_pretrained would
    import transformers.utils

    from moeguard.models import loading

    hub = loading.ModelRef("org/model", None, "org/model")
    assert loading._adapter_config(hub) is None          # offline, nothing cached: no adapter found, no error
    monkeypatch.setattr(transformers.utils, "find_adapter_config_file", lambda repo: f"/cache/{repo}/adapter_config.json")
    assert loading._adapter_config(hub) == "/cache/org/model/adapter_config.json"


def test_a_custom_code_model_type_is_refused_without_a_prompt(tmp_path, capsys, monkeypatch):
    d = tmp_path / "custom"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "x_moe", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    (d / "configuration_x.py").write_text("raise SystemExit('the checkpoint code ran')\n")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked whether to run the checkpoint's code"))
    assert main(["info", "--model", str(d)]) == 2
    _one_line(capsys, "cannot read the config of")


@pytest.mark.parametrize("keys, needle", [
    (dict(n_group=8), "do not split into 8 groups of at least 2"),             # top-2 within a group of 1
    (dict(n_group=3), "do not split into 3 groups"),
    (dict(n_group=None), "n_group is None"),
    (dict(n_group=2, topk_group=3), "topk_group is 3, more than its 2 groups"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=4), "more than the 2 experts its 1 chosen groups hold"),
])
def test_group_limited_routing_settings_no_router_can_run_are_refused(keys, needle):
    config = tiny_config("deepseek_v3", **keys)
    with pytest.raises(MoeguardError, match=needle):
        check_config(config, family_for_config(config), where="d")


def test_one_routing_group_limits_nothing():
    """GLM-4.5's and dots1's default: n_group 1 is not group-limited routing (budget plans allowed)."""
    config = tiny_config("glm4_moe", n_group=1, topk_group=1)
    family = family_for_config(config)
    check_config(config, family, where="d")
    assert not family.routing.groups_on(config) and family.routing.groups_on(tiny_config("glm4_moe"))


def test_a_layer_keeping_fewer_experts_than_top_k_routes_them_all():
    """A budget plan leaving one expert in a top-2 layer: that layer's top-k is 1, and the model's
    active parameters never exceed its total."""
    from moeguard.models.prune import prune_model

    m, _, _ = load_model(None, with_tokenizer=False)
    layers = MoEAdapter(m).layers
    small, _ = prune_model(m, {layers[0].index: [5], **{l.index: list(range(8)) for l in layers[1:]}})
    a = MoEAdapter(small)
    assert [l.top_k for l in a.layers] == [1, 2, 2, 2]
    info = a.describe()
    # per token: layer 0's one expert is active whole; layers 1-3 leave 6 of their 8 experts idle
    per_expert = 3 * m.config.hidden_size * m.config.intermediate_size   # w1, w2, w3 of one expert
    idle = info["parameters"]["total"] - info["parameters"]["active"]
    assert idle == 3 * 6 * per_expert, (info["parameters"], per_expert)


def test_a_safetensors_header_length_beyond_the_librarys_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A corrupt length read the whole shard (GBs) into memory as a 'header' before JSON failed."""
    import struct

    import moeguard.models.safetensorsfiles as L

    monkeypatch.setattr(L, "_MAX_HEADER", 64)
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 100) + b"{" + b" " * 99 + b"x" * 16)
    with pytest.raises(MoeguardError, match="header length 100 is over 64 bytes"):
        L.check_safetensors(f)
