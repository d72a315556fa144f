"""Bad input: one line on stderr, exit code 2, no traceback, nothing written."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moeguard.cli import main
from moeguard.testing import tiny_model


def run(args, capsys):
    capsys.readouterr()  # drop what test set-up printed
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_clean_error(code, err, *needles):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("moeguard: error:")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def supported_model_types() -> list[str]:
    """The config model_types moeguard reads, from the family registry (not a list kept here)."""
    from moeguard.models.families import FAMILIES, get_family

    types = [t for name in FAMILIES.names() for t in get_family(name).model_types]
    assert types, "no family is registered"
    return types


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    tiny_model("mixtral").save_pretrained(d)
    return d


def test_missing_path(capsys, tmp_path):
    code, _, err = run(["info", "--model", str(tmp_path / "nope")], capsys)
    assert_clean_error(code, err, "does not exist")


def test_dense_model_is_refused_with_supported_families(capsys, tmp_path):
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    code, _, err = run(["info", "--model", str(tmp_path)], capsys)
    assert_clean_error(code, err, "dense", *supported_model_types())  # every supported family is named


def test_unsupported_moe_family(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "longcat_flash", "num_experts": 8}))
    code, _, err = run(["info", "--model", str(tmp_path)], capsys)
    assert_clean_error(code, err, "unsupported MoE family", "no config key", "granitemoe", "nllb-moe")


@pytest.mark.parametrize("change, needles", [
    ({"num_experts_per_tok": 9}, ["num_experts_per_tok is 9", "more than its 8 experts", "at most 8"]),
    ({"num_experts_per_tok": 0}, ["num_experts_per_tok is 0", "positive integer"]),
    ({"num_local_experts": "eight"}, ["num_local_experts", "expected int", "fix "]),
    ({"moeguard_experts_per_layer": {"0": 12}}, ["outside 1..8"]),
])
def test_invalid_expert_config_is_refused_before_weights(capsys, tmp_path, mixtral_dir, change, needles):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(mixtral_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    (d / "model.safetensors").write_bytes(b"not read")  # would fail as corrupt if weights were looked at first
    code, _, err = run(["info", "--model", str(d)], capsys)
    assert_clean_error(code, err, *needles)


def test_missing_tokenizer_is_refused_before_weights(capsys, tmp_path, mixtral_dir, monkeypatch):
    import transformers

    loaded = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))
    code, _, err = run(["eval", "--model", str(mixtral_dir), "--tasks", "arith-compare", "--limit", "1"], capsys)
    assert_clean_error(code, err, "cannot load the tokenizer")
    assert not loaded, "weights were loaded before the tokenizer was checked"


def test_unknown_task_suggests_names(capsys):
    code, _, err = run(["eval", "--tasks", "stdlib-doc"], capsys)
    assert_clean_error(code, err, "stdlib-docs")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(capsys, tmp_path, mixtral_dir, damage):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(mixtral_dir, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    code, _, err = run(["info", "--model", str(d)], capsys)
    assert_clean_error(code, err, "not a valid safetensors file")


@pytest.mark.parametrize("edit,needle", [
    (lambda h: list(h), "header is a JSON list"),
    (lambda h: {k: ({kk: vv for kk, vv in v.items() if kk != "shape"} if k != "__metadata__" else v) for k, v in h.items()},
     "lacks dtype, shape or data_offsets"),
    (lambda h: {k: ({**v, "dtype": "F16"} if k != "__metadata__" and v["dtype"] == "F32" else v) for k, v in h.items()},
     "bytes, its F16 shape"),                     # the dtype changed, the offsets not: a reader would misread
    (lambda h: {k: ({**v, "shape": [-1]} if k != "__metadata__" else v) for k, v in h.items()}, "expected a list of sizes"),
    (lambda h: {k: ({**v, "dtype": "Q9"} if k != "__metadata__" else v) for k, v in h.items()}, "unknown dtype 'Q9'"),
    (lambda h: {k: ({**v, "dtype": ["F32"]} if k != "__metadata__" else v) for k, v in h.items()},   # was a TypeError
     "unknown dtype ['F32']"),
])
def test_a_safetensors_header_that_lies_is_one_line(capsys, tmp_path, mixtral_dir, edit, needle):
    import shutil
    import struct

    d = tmp_path / "m"
    shutil.copytree(mixtral_dir, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    head = json.dumps(edit(json.loads(data[8:8 + n]))).encode()
    f.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n:])
    code, _, err = run(["info", "--model", str(d)], capsys)
    assert_clean_error(code, err, "not a valid safetensors file", needle)


def test_pickle_only_checkpoint_is_refused(capsys, tmp_path, mixtral_dir):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(mixtral_dir, d)
    (d / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    code, _, err = run(["info", "--model", str(d)], capsys)
    assert_clean_error(code, err, "safetensors only")


def test_empty_dataset(capsys, tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "eval.jsonl").write_text("")
    (tmp_path / "t.yaml").write_text(
        "name: empty-lm\nkind: language_modeling\nsource: {type: local, path: ., format: jsonl, "
        "files: {train: train.jsonl, validation: eval.jsonl}}\nfields: {text: text}\n")
    out = tmp_path / "res.json"
    code, _, err = run(["eval", "--tasks", str(tmp_path / "t.yaml"), "--out", str(out)], capsys)
    assert_clean_error(code, err, "empty")
    assert not out.exists()


def test_existing_output_is_kept_without_overwrite(capsys, tmp_path):
    out = tmp_path / "res.json"
    out.write_text("precious")
    code, _, err = run(["eval", "--out", str(out), "--limit", "2"], capsys)
    assert_clean_error(code, err, "already exists", "--overwrite")
    assert out.read_text() == "precious"


def test_debug_shows_the_traceback(tmp_path):
    from moeguard.errors import MoeguardError

    with pytest.raises(MoeguardError, match="does not exist") as info:
        main(["--debug", "info", "--model", str(tmp_path / "nope")])
    assert str(tmp_path / "nope") in str(info.value)


def test_tasks_lists_embedded_suite_and_presets(capsys):
    code, out, _ = run(["tasks", "--json"], capsys)
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    kinds = {rows[n]["kind"] for n in rows if rows[n]["source"].startswith("package:")}
    assert kinds == {"language_modeling", "classification", "summarization"}
    assert rows["glue-sst2"]["metric"] == "accuracy" and rows["wikitext-103"]["metric"] == "perplexity"


def test_a_sub_config_key_is_named_where_config_json_nests_it(capsys, tmp_path):
    """DBRX keeps its MoE keys in ffn_config: a bad top-k is refused before the weights, naming
    the key as the user finds it in config.json."""
    d = tmp_path / "dbrx"
    tiny_model("dbrx").save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["ffn_config"]["moe_top_k"] = 9
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"not read")
    code, _, err = run(["info", "--model", str(d)], capsys)
    assert_clean_error(code, err, "ffn_config.moe_top_k is 9", "(ffn_config.moe_num_experts)", "at most 8")


def test_a_config_transformers_cannot_build_is_one_line(capsys, tmp_path):
    m = tiny_model("qwen2_moe")
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["decoder_sparse_step"] = 0                     # a modulo by zero inside transformers' constructor
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(["info", "--model", str(tmp_path)], capsys)
    assert_clean_error(code, err, "cannot build qwen2_moe from its config", "ZeroDivisionError")
