"""Streaming checkpoint surgery must write exactly what in-memory pruning + save_pretrained writes."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.families import FAMILIES
from moeguard.models.loading import model_class
from moeguard.models.prune import prune_model
from moeguard.pruning.checkpoint import INDEX_NAME, RECORD_NAME, plan_tensors, prune_checkpoint
from moeguard.tasks.tokens import both_stacks
from moeguard.testing import checkpoint_tensors, tiny_model

KEPT = [0, 2, 5, 7]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    """Temporary files and the resumable scratch folder (``.out.partial``): a refusal before any
    work leaves neither."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".partial")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per family: the tiny model, single-file and sharded checkpoints, its keep map."""
    cache = {}

    def get(fam: str):
        if fam not in cache:
            root = tmp_path_factory.mktemp(fam)
            model = tiny_model(fam)
            model.save_pretrained(root / "single")
            model.save_pretrained(root / "sharded", max_shard_size="40KB")
            keep = {l.index: KEPT for l in MoEAdapter(model).layers}
            cache[fam] = (model, root, keep)
        return cache[fam]

    return get


def _check_file_format(f: Path) -> None:
    """Header padded to 8 bytes and every tensor aligned to its dtype, as safetensors writes."""
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0
    assert header["__metadata__"]["format"] == "pt"
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}
    for k, v in header.items():
        if k != "__metadata__":
            assert (8 + n + v["data_offsets"][0]) % sizes[v["dtype"]] == 0, k


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_streaming_equals_in_memory(fam, saved):
    model, root, keep = saved(fam)
    record = prune_checkpoint(root / "single", root / "stream", keep)
    record_sh = prune_checkpoint(root / "sharded", root / "stream_sh", keep)
    pruned, mem_record = prune_model(model, keep)
    pruned.save_pretrained(root / "memory")

    expected = checkpoint_tensors(root / "memory")
    for out in ("stream", "stream_sh"):
        got = checkpoint_tensors(root / out)
        assert got.keys() == expected.keys()
        for k in expected:
            assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
        for f in (root / out).glob("*.safetensors"):
            _check_file_format(f)
    assert not (root / "stream" / INDEX_NAME).exists()

    for key in mem_record:
        assert record[key] == mem_record[key], key
    assert record["method"] == "streaming" and record["num_experts"] == 4
    assert record["bytes_out"] < record["bytes_in"]
    assert json.loads((root / "stream" / RECORD_NAME).read_text()) == record
    assert (root / "stream" / "generation_config.json").read_bytes() == (root / "single" / "generation_config.json").read_bytes()

    # sharded in, sharded out: same shard count, an index that covers every key
    in_shards = sorted(p.name for p in (root / "sharded").glob("*.safetensors"))
    assert len(in_shards) >= 3
    assert record_sh["shards"] == in_shards
    index = json.loads((root / "stream_sh" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(expected)
    assert all((root / "stream_sh" / f).exists() for f in index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    for k, f in index["weight_map"].items():
        with safe_open(root / "stream_sh" / f, framework="pt") as h:
            assert k in h.keys()

    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pruned(**both_stacks(pruned, ids)).logits
        for out in ("stream", "stream_sh"):
            loaded = model_class(pruned.config).from_pretrained(root / out).eval()
            assert MoEAdapter(loaded).num_experts == 4
            got = loaded(**both_stacks(loaded, ids)).logits
            if MoEAdapter(loaded).family.expert_layout == "modules":
                # one nn.Linear per expert on a few rows: memory-mapped weights take other BLAS paths than
                # in-memory copies of the same values (1e-6 apart; cloning them gives torch.equal)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(got, want)


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_bf16_checkpoint_keeps_dtype(fam, tmp_path):
    model = tiny_model(fam).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    keep = {l.index: KEPT for l in MoEAdapter(model).layers}
    prune_checkpoint(tmp_path / "src", tmp_path / "out", keep)
    prune_model(model, keep)[0].save_pretrained(tmp_path / "memory")
    got, want = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(tmp_path / "memory")
    assert got.keys() == want.keys()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    for f in (tmp_path / "out").glob("*.safetensors"):
        _check_file_format(f)


def test_reshard_by_size_and_progress(saved, tmp_path):
    from rich.progress import Progress

    _, root, keep = saved("mixtral")
    with Progress(disable=True) as progress:
        record = prune_checkpoint(root / "single", tmp_path / "small", keep, max_shard_bytes=30_000, progress=progress)
        task = progress.tasks[0]
        assert task.completed == task.total > 0
    assert len(record["shards"]) > 2
    index = json.loads((tmp_path / "small" / INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == record["shards"]
    # sharded source, one big shard out: a plain model.safetensors without index
    record = prune_checkpoint(root / "sharded", tmp_path / "one", keep, max_shard_bytes=10**9)
    assert record["shards"] == ["model.safetensors"] and not (tmp_path / "one" / INDEX_NAME).exists()
    assert checkpoint_tensors(tmp_path / "one").keys() == checkpoint_tensors(tmp_path / "small").keys()


@pytest.mark.skipif(not hasattr(__import__("os"), "copy_file_range"), reason="os.copy_file_range is Linux's")
def test_in_kernel_copy_and_its_fallback_write_the_same_bytes(saved, tmp_path, monkeypatch):
    """Plain row copies go through copy_file_range (no bytes through memory); where the kernel or
    filesystem refuses, the same tensors are written through memory, byte for byte alike."""
    import os

    _, root, keep = saved("qwen3_moe")          # per-expert keys and shared tensors
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a) or real(*a))
    prune_checkpoint(root / "sharded", tmp_path / "kernel", keep)
    assert len(calls) > 10
    attempts = []

    def refuse(*a):
        attempts.append(a)
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    prune_checkpoint(root / "sharded", tmp_path / "memory", keep)
    assert attempts                              # tried, refused, written through memory instead
    monkeypatch.delattr(os, "copy_file_range")   # a platform without it
    prune_checkpoint(root / "sharded", tmp_path / "none", keep)
    for out in ("kernel", "memory", "none"):
        files = sorted(p.name for p in (tmp_path / out).glob("*.safetensors"))
        assert files == sorted(p.name for p in (tmp_path / "kernel").glob("*.safetensors"))
        for f in files:
            assert (tmp_path / out / f).read_bytes() == (tmp_path / "kernel" / f).read_bytes(), (out, f)
            _check_file_format(tmp_path / out / f)


def test_pruning_a_pruned_checkpoint_keeps_provenance(saved, tmp_path):
    model, root, keep = saved("gpt_oss")
    first = prune_checkpoint(root / "single", tmp_path / "first", keep)
    second = prune_checkpoint(tmp_path / "first", tmp_path / "second", {l: [1, 3] for l in keep})
    assert second["previous_pruning"] == first and second["num_experts"] == 2
    # experts 1 and 3 of the first output are originals 2 and 7
    got = checkpoint_tensors(tmp_path / "second")["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(got, model.state_dict()["model.layers.0.mlp.experts.down_proj"][[2, 7]])
    assert MoEAdapter(AutoModelForCausalLM.from_pretrained(tmp_path / "second")).num_experts == 2


def test_source_untouched_and_side_files(saved, tmp_path):
    model, root, keep = saved("qwen2_moe")
    src = tmp_path / "src"
    shutil.copytree(root / "sharded", src)
    (src / "tokenizer.json").write_text('{"model": {}}')
    (src / "pytorch_model.bin").write_bytes(b"stale pickle")  # must not travel with pruned weights
    before = _digests(src)
    record = prune_checkpoint(src, tmp_path / "out", keep)
    assert _digests(src) == before
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": {}}'
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert record["skipped_files"] == ["pytorch_model.bin"]
    # qwen2's shared expert gate is [1, H] and sits in the block: copied, never sliced
    got = checkpoint_tensors(tmp_path / "out")
    gate = "model.layers.0.mlp.shared_expert_gate.weight"
    assert torch.equal(got[gate], model.state_dict()[gate])


@pytest.mark.parametrize("keep, match", [
    ({0: [0, 2, 5, 8], 1: [0, 1, 2, 3]}, r"experts \[8\] do not exist"),
    ({5: [0, 1]}, "not an MoE layer"),
])
def test_impossible_plans_write_nothing(saved, tmp_path, keep, match):
    _, root, _ = saved("mixtral")
    with pytest.raises(MoeguardError, match=match):
        prune_checkpoint(root / "sharded", tmp_path / "out", keep)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_existing_output_needs_overwrite(saved, tmp_path):
    _, root, keep = saved("mixtral")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(MoeguardError, match="already exists"):
        prune_checkpoint(root / "single", out, keep)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    prune_checkpoint(root / "single", out, keep, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()
    with pytest.raises(MoeguardError, match="overlaps the source"):
        prune_checkpoint(root / "single", root / "single", keep, overwrite=True)
    with pytest.raises(MoeguardError, match="overlaps the source"):
        prune_checkpoint(root / "single", root / "single" / "pruned", keep)


def test_truncated_shard_refused_before_output(saved, tmp_path):
    _, root, keep = saved("olmoe")
    src = tmp_path / "src"
    shutil.copytree(root / "sharded", src)
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(MoeguardError, match="truncated or corrupt"):
        prune_checkpoint(src, tmp_path / "out", keep)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_bad_sources(tmp_path, saved):
    _, root, keep = saved("mixtral")
    with pytest.raises(MoeguardError, match="not a directory"):
        prune_checkpoint(tmp_path / "nope", tmp_path / "out", keep)
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    shutil.copy(root / "single" / "config.json", pickles)
    (pickles / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(MoeguardError, match="only pickle weights"):
        prune_checkpoint(pickles, tmp_path / "out", keep)
    (pickles / "config.json").unlink()
    with pytest.raises(MoeguardError, match="no config.json"):
        prune_checkpoint(pickles, tmp_path / "out", keep)
    assert not (tmp_path / "out").exists()


def _header(**tensors):
    off, h = 0, {}
    for name, shape in tensors.items():
        n = 4 * int(torch.Size(shape).numel())
        h[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    return h


def _plan(header, keep=(0, 1)):
    f = Path("x.safetensors")
    return plan_tensors([f], {f: header}, layers_path="model.layers", experts={0: 4}, keep={0: list(keep)})


def test_layout_rules_on_headers():
    base = {"model.layers.0.mlp.gate.weight": (4, 8), "model.layers.0.mlp.experts.gate_up_proj": (4, 8, 6)}
    plan = {t.out_name: t for t in _plan(_header(**base, **{"model.layers.0.mlp.shared_experts.up_proj.weight": (4, 8)}), keep=(1, 3))}
    assert plan["model.layers.0.mlp.gate.weight"].shape == (2, 8)
    assert plan["model.layers.0.mlp.gate.weight"].runs == ((1, 2), (3, 4))
    # a shared expert whose dim 0 equals the expert count by chance is still copied whole
    assert plan["model.layers.0.mlp.shared_experts.up_proj.weight"].shape == (4, 8)
    per_expert = {f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight": (6, 8) for e in range(4)}
    names = [t.out_name for t in _plan(_header(**{"model.layers.0.block_sparse_moe.gate.weight": (4, 8)}, **per_expert), keep=(2, 3))]
    assert names == ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.block_sparse_moe.experts.0.w1.weight",
                     "model.layers.0.block_sparse_moe.experts.1.w1.weight"]
    with pytest.raises(MoeguardError, match="cannot tell whether"):
        _plan(_header(**base, **{"model.layers.0.mlp.expert_scale": (4,)}))
    with pytest.raises(MoeguardError, match="dim 0 should be"):
        _plan(_header(**{"model.layers.0.mlp.gate.weight": (8, 4), "model.layers.0.mlp.experts.down_proj": (4, 2, 2)}))
    with pytest.raises(MoeguardError, match="no router tensors"):
        _plan(_header(**{"model.layers.0.mlp.experts.down_proj": (4, 2, 2)}))
    with pytest.raises(MoeguardError, match=r"experts \[3\] have no w1.weight"):
        _plan(_header(**{"model.layers.0.block_sparse_moe.gate.weight": (4, 8)},
                      **{k: v for k, v in per_expert.items() if ".3." not in k}))


def test_pruning_a_merged_checkpoint_keeps_its_merge_record_on_both_paths(saved, tmp_path):
    """The merge record (which originals went into each merged expert: trace's ground truth) was
    neither copied nor embedded, so a pruned copy of a merged model no longer said where its
    experts came from."""
    from moeguard.models.loading import ModelRef
    from moeguard.pruning.apply import _in_memory
    from moeguard.pruning.merging.write import RECORD_NAME as MERGE_RECORD

    model, root, keep = saved("mixtral")
    merged = tmp_path / "merged"
    shutil.copytree(root / "single", merged)
    merge_doc = {"schema": "moeguard.merging/1", "keep": {str(l): KEPT for l in keep}, "note": "the merge's record"}
    (merged / MERGE_RECORD).write_text(json.dumps(merge_doc))
    import moeguard.zoo

    for f in ("tokenizer.json", "tokenizer_config.json"):   # the in-memory path loads a tokenizer to save it along
        shutil.copy2(Path(moeguard.zoo.__file__).parent / "embedded" / f, merged / f)
    streamed = prune_checkpoint(merged, tmp_path / "streamed", {l: [0, 1] for l in keep})
    assert streamed["previous_merging"] == merge_doc and "previous_pruning" not in streamed
    in_memory = _in_memory(ModelRef(str(merged), merged, None), {l: [0, 1] for l in keep}, tmp_path / "memory",
                           overwrite=False, extra={})
    assert in_memory["previous_merging"] == merge_doc
    assert json.loads((tmp_path / "memory" / RECORD_NAME).read_text())["previous_merging"] == merge_doc


def test_a_stale_index_beside_a_single_file_is_not_the_checkpoint(saved, tmp_path):
    """transformers reads model.safetensors before an index beside it; the index's shards are not
    there, and the surgery called the checkpoint corrupt."""
    model, root, keep = saved("mixtral")
    src = tmp_path / "src"
    shutil.copytree(root / "single", src)
    shutil.copy2(root / "sharded" / INDEX_NAME, src / INDEX_NAME)
    record = prune_checkpoint(src, tmp_path / "out", keep)
    assert record["shards"] == ["model.safetensors"] and not (tmp_path / "out" / INDEX_NAME).exists()
    assert torch.equal(checkpoint_tensors(tmp_path / "out")["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])


@pytest.mark.parametrize("fam", ["deepseek_v3", "glm4_moe", "mixtral"])
def test_in_memory_pruning_of_a_bf16_checkpoint_writes_the_streamed_files_dtypes(fam, tmp_path):
    """Loading a bf16 checkpoint up-casts what a family keeps in float32 (DeepSeek's and GLM's
    routers: _keep_in_fp32_modules_strict), and save_pretrained wrote those as F32 where streaming
    keeps BF16."""
    import moeguard.zoo
    from moeguard.models.loading import ModelRef
    from moeguard.pruning.apply import _in_memory

    if fam not in FAMILIES:
        pytest.skip(f"{fam} is not a family here")
    model = tiny_model(fam).to(torch.bfloat16)
    src = tmp_path / "src"
    model.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(Path(moeguard.zoo.__file__).parent / "embedded" / f, src / f)
    keep = {l.index: KEPT for l in MoEAdapter(model).layers}
    prune_checkpoint(src, tmp_path / "streamed", keep)
    _in_memory(ModelRef(str(src), src, None), keep, tmp_path / "memory", overwrite=False, extra={})
    got, want = checkpoint_tensors(tmp_path / "memory"), checkpoint_tensors(tmp_path / "streamed")
    assert got.keys() == want.keys()
    wrong = {k: (got[k].dtype, want[k].dtype) for k in want if got[k].dtype != want[k].dtype}
    assert not wrong, wrong
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_an_interrupted_surgery_resumes_with_the_shards_it_had_not_finished(saved, tmp_path, monkeypatch):
    """A killed run left a temporary folder and started again from byte 0 (a 90 GB checkpoint)."""
    import moeguard.pruning.checkpoint as C

    model, root, keep = saved("mixtral")
    whole = prune_checkpoint(root / "sharded", tmp_path / "whole", keep)
    calls, real = [], C.write_safetensors

    def killed(path, *a, **k):
        calls.append(path.name)
        if len(calls) == 3:   # killed half-way through a shard
            path.write_bytes(b"\0" * 64)
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(C, "write_safetensors", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(root / "sharded", tmp_path / "out", keep)
    partial = tmp_path / ".out.partial"
    assert not (tmp_path / "out").exists() and len(list(partial.glob("*.safetensors"))) == 2
    assert list(partial.glob(".*.part"))                       # the shard being written is not taken as finished
    # a "finished" shard a power loss cut short (renamed before its bytes reached the disk) is written again
    cut = sorted(partial.glob("*.safetensors"))[0]
    cut.write_bytes(cut.read_bytes()[:100])
    calls.clear()
    counted = lambda path, *a, **k: (calls.append(path.name), real(path, *a, **k))[1]  # noqa: E731
    monkeypatch.setattr(C, "write_safetensors", counted)
    # the killed run was another commit's: the record, made before the surgery, lists its kept shards
    from moeguard import provenance
    from moeguard.io import MADE_BY

    provenance.start_command()
    (partial / MADE_BY).write_text(json.dumps([{**provenance.maker(), "git_commit": "0" * 40}]))
    try:
        with pytest.warns(UserWarning, match=f"{partial} was kept by another version: commit 0000"):
            record = prune_checkpoint(root / "sharded", tmp_path / "out", keep, extra={"run": provenance.run_record({})})
    finally:
        provenance.start_command()
    assert [g["what"] for g in record["run"]["reused"]] == [[str(partial)]]
    assert json.loads((tmp_path / "out" / RECORD_NAME).read_text())["run"]["reused"] == record["run"]["reused"]
    assert len(calls) == len(whole["shards"]) - 1                # only the shards it had not (wholly) finished
    assert f".{cut.name}.part" in calls
    assert _digests(tmp_path / "out") == {**_digests(tmp_path / "whole"), RECORD_NAME: _digests(tmp_path / "out")[RECORD_NAME]}
    assert {k: v for k, v in record.items() if k not in ("source", "run")} == \
        {k: v for k, v in whole.items() if k != "source"}
    assert not partial.exists() and not list((tmp_path / "out").glob(".*"))
    # another plan does not reuse what an interrupted run of this one kept
    calls.clear()
    monkeypatch.setattr(C, "write_safetensors", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(root / "sharded", tmp_path / "other", keep)
    calls.clear()
    monkeypatch.setattr(C, "write_safetensors", counted)
    other = {l: [1, 3, 4, 6] for l in keep}
    prune_checkpoint(root / "sharded", tmp_path / "other", other)
    assert len(calls) == len(whole["shards"])


def test_pruning_a_budget_pruned_checkpoint_records_each_layers_own_count(saved, tmp_path):
    """Layer 0's count was taken as the source's: 'original_num_experts: 2' and layer 1's dropped
    experts computed over range(2)."""
    from moeguard.models.loading import meta_model
    from moeguard.pruning.plan import PrunePlan, check_plan

    model, root, keep = saved("mixtral")
    layers = sorted(keep)
    uneven = {l: ([0, 1] if l == layers[0] else [0, 1, 2, 3, 4, 5]) for l in layers}
    prune_checkpoint(root / "single", tmp_path / "budget", uneven)
    again = {l: [1] if l == layers[0] else [0, 5] for l in layers}
    record = prune_checkpoint(tmp_path / "budget", tmp_path / "again", again)
    assert record["original_num_experts"] == 6
    assert record["original_experts_per_layer"] == {str(l): len(v) for l, v in uneven.items()}
    plan = PrunePlan(keep=again, num_experts=2, rule="explicit")
    from moeguard.models.adapter import MoEAdapter
    from moeguard.models.loading import ModelRef, load_config

    check_plan(plan, MoEAdapter(meta_model(load_config(ModelRef(str(tmp_path / "budget"), tmp_path / "budget", None)))))
    dropped = plan.to_dict()["dropped"]
    assert dropped[str(layers[0])] == [0] and dropped[str(layers[1])] == [1, 2, 3, 4]


@pytest.mark.parametrize("fam, extra", [
    # DeepSeek-V3's multi-token-prediction layer sits past the decoder's (model.layers.61 on the real model)
    ("deepseek_v3", lambda n: {f"model.layers.{n}.mlp.experts.{e}.gate_proj.weight": torch.ones(4, 8) for e in range(8)}
     | {f"model.layers.{n}.mlp.gate.weight": torch.ones(8, 8), f"model.layers.{n}.enorm.weight": torch.ones(8)}),
    # qwen3_next's under mtp.* (the class's _keys_to_ignore_on_load_unexpected)
    ("qwen3_next", lambda n: {"mtp.fc.weight": torch.ones(8, 16), "mtp.layers.0.mlp.experts.0.up_proj.weight": torch.ones(4, 8)}),
])
def test_tensors_transformers_does_not_load_are_not_written_unpruned(fam, extra, saved, tmp_path):
    """They were copied whole: every expert of the MTP layer beside a config of K experts, and the
    in-memory path (through transformers, which drops them) never wrote them."""
    from safetensors.torch import load_file, save_file

    model, root, keep = saved(fam)
    src = tmp_path / "src"
    shutil.copytree(root / "single", src)
    tensors = load_file(src / "model.safetensors")
    added = extra(model.config.num_hidden_layers)
    save_file({**tensors, **added}, src / "model.safetensors", metadata={"format": "pt"})
    record = prune_checkpoint(src, tmp_path / "stream", keep)
    got = checkpoint_tensors(tmp_path / "stream")
    assert not set(added) & set(got)
    pruned, _ = prune_model(model, keep)
    pruned.save_pretrained(tmp_path / "memory")
    assert got.keys() == checkpoint_tensors(tmp_path / "memory").keys()     # both paths write the same tensors
    assert record["dropped_tensors"]["count"] == len(added) and "multi-token-prediction" in record["dropped_tensors"]["why"]
    assert "dropped_tensors" not in prune_checkpoint(root / "single", tmp_path / "plain", keep)


def test_a_bf16_checkpoint_whose_config_names_no_dtype_is_pruned_in_memory_as_bf16(tmp_path):
    """It was loaded in float32 (twice its size in RAM) and saved with a config saying float32 beside
    bf16 tensors (the casts back) where the streamed path kept the source's config."""
    import moeguard.zoo
    from moeguard.models.loading import ModelRef
    from moeguard.pruning.apply import _in_memory, checkpoint_dtype

    model = tiny_model("mixtral").to(torch.bfloat16)
    src = tmp_path / "src"
    model.save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(Path(moeguard.zoo.__file__).parent / "embedded" / f, src / f)
    ref = ModelRef(str(src), src, None)
    assert checkpoint_dtype(ref) == torch.bfloat16               # what the weights are stored in
    keep = {l.index: KEPT for l in MoEAdapter(model).layers}
    _in_memory(ref, keep, tmp_path / "memory", overwrite=False, extra={})
    assert json.loads((tmp_path / "memory" / "config.json").read_text()).get("dtype") == "bfloat16"
    assert {t.dtype for t in checkpoint_tensors(tmp_path / "memory").values()} == {torch.bfloat16}


def test_a_real_layer_a_class_ignore_pattern_names_is_still_written(saved, tmp_path, monkeypatch):
    """GLM's class lists 'model.layers.46' (GLM-4.5-Air's MTP layer), a real layer of the 92-layer
    GLM-4.5: transformers ignores only keys the model does not expect, and so must surgery."""
    model, root, keep = saved("deepseek_v3")
    cls = type(model)
    monkeypatch.setattr(cls, "_keys_to_ignore_on_load_unexpected", [r"model\.layers\.1.*"])
    record = prune_checkpoint(root / "single", tmp_path / "stream", keep)
    got = checkpoint_tensors(tmp_path / "stream")
    assert any(k.startswith("model.layers.1.") for k in got) and "dropped_tensors" not in record


@pytest.mark.parametrize("wrap", [lambda k: "language_model." + k,                                  # Llama-4's release
                                  lambda k: k.replace("model.", "model.language_model.", 1)])     # Qwen3.5-MoE's
def test_a_multimodal_release_s_language_model_layers_are_found_under_its_prefix(wrap, saved, tmp_path):
    """Llama-4 keeps its layers at language_model.model.layers, Qwen3.5-MoE at model.language_model.layers
    (transformers renames them when it loads): the surgery matched nothing, planned every tensor as a copy
    and stopped at "no router tensors of MoE layer N"."""
    from safetensors.torch import load_file, save_file

    model, root, keep = saved("mixtral")
    src = tmp_path / "src"
    shutil.copytree(root / "single", src)
    tensors = load_file(src / "model.safetensors")
    save_file({(wrap(k) if k.startswith("model.layers.") else k): v for k, v in tensors.items()},
              src / "model.safetensors", metadata={"format": "pt"})
    prune_checkpoint(src, tmp_path / "stream", keep)
    got = checkpoint_tensors(tmp_path / "stream")
    prune_checkpoint(root / "single", tmp_path / "plain", keep)   # the same surgery under the text model's names
    want = {(wrap(k) if k.startswith("model.layers.") else k): v for k, v in checkpoint_tensors(tmp_path / "plain").items()}
    assert got.keys() == want.keys() and any(".experts." in k for k in want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_a_partial_folder_of_other_settings_frees_no_space_and_leaves_no_stray_shard(saved, tmp_path, monkeypatch):
    """Its shards were subtracted from the space asked for, though the stamp check then deleted them (a
    90 GB job failing with ENOSPC partway); and one of the same settings but another shard plan (an upgrade
    that drops other tensors) had its old shards moved into the output beside the new ones."""
    import moeguard.pruning.checkpoint as C
    from moeguard.io import STAMP, partial_path

    model, root, keep = saved("mixtral")
    out = tmp_path / "o"
    partial = partial_path(out)
    partial.mkdir()
    shard = (root / "single" / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(shard)                     # a planned name, of another run
    (partial / "model-00001-of-00009.safetensors").write_bytes(b"stray")   # a name the plan no longer has
    (partial / STAMP).write_text(json.dumps({"another": "run"}))
    asked = []
    real = C.check_space
    monkeypatch.setattr(C, "check_space", lambda where, need: (asked.append(need), real(where, need))[1])
    prune_checkpoint(root / "single", out, keep)
    plain = tmp_path / "plain"
    prune_checkpoint(root / "single", plain, keep)
    assert asked[0] == asked[1] > 0                   # nothing subtracted for the other run's shard
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in plain.iterdir())
    # the same source, keep and sharding as before the shard plan was in the stamp: started over, not resumed
    from moeguard.models.identity import weights_identity

    out2 = tmp_path / "o2"
    partial = partial_path(out2)
    partial.mkdir()
    (partial / "model-00001-of-00009.safetensors").write_bytes(b"stray")
    (partial / STAMP).write_text(json.dumps({"source": weights_identity(str(root / "single")),
                                             "keep": {str(k): v for k, v in sorted(keep.items())}, "merge": None,
                                             "max_shard_bytes": None}, sort_keys=True, default=str))
    prune_checkpoint(root / "single", out2, keep)
    assert sorted(p.name for p in out2.iterdir()) == sorted(p.name for p in plain.iterdir())


UNEVEN = ([1, 3, 4, 6, 7], [0, 2, 5], [2, 3, 4, 5, 6, 7], [0, 6])


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_streaming_an_uneven_plan_writes_each_layers_own_experts(fam, saved):
    """A budget plan keeps another count (and other ids) in each layer: only a 24-item accuracy checked
    the streamed tensors of one; a surgery that sliced experts by position, not by kept id, in one
    layer would pass there."""
    model, root, _ = saved(fam)
    adapter = MoEAdapter(model)
    keep = {l.index: [e for e in UNEVEN[i % len(UNEVEN)] if e < l.num_experts] for i, l in enumerate(adapter.layers)}
    keep = {l: v if len(v) >= max(1, adapter.family.min_experts) else list(range(adapter.family.min_experts))
            for l, v in keep.items()}
    try:
        pruned, _ = prune_model(tiny_model(fam), keep)
    except MoeguardError as e:   # a family that keeps one count (group-limited routing, a module per expert): other ids
        assert "keep the same number of experts in every layer" in e.hint
        keep = {l.index: KEPT if i % 2 == 0 else [1, 3, 4, 6] for i, l in enumerate(adapter.layers)}
        pruned, _ = prune_model(tiny_model(fam), keep)
    out = root / "uneven_stream"
    prune_checkpoint(root / "sharded", out, keep)
    pruned.save_pretrained(root / "uneven_memory")
    expected, got = checkpoint_tensors(root / "uneven_memory"), checkpoint_tensors(out)
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
