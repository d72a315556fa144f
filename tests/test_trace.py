"""Trace: features invariant to the attacker's free rewrites, an exact test, derivatives found
with their kept experts, independent models not, and one-line errors for unusable input."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.loading import load_model
from moeguard.models.adapter import MoEAdapter
from moeguard.models.prune import prune_model
from moeguard.trace import evasion
from moeguard.trace.api import trace as run_trace
from moeguard.models.families import FAMILIES
from moeguard.trace.align import Frame, align, identity
from moeguard.trace.features import features, sketch_layer
from moeguard.trace.fingerprint import BUDGET, build, checkpoint_bytes
from moeguard.trace.stats import fisher, layer_test, product_tail
from moeguard.trace.weights import LayerWeights, from_model

KEEP = {0: [1, 4], 1: [0, 6], 2: [2, 3], 3: [5, 7]}


@pytest.fixture(scope="module")
def embedded():
    m, tok, _ = load_model(None)
    return m, tok


@pytest.fixture(scope="module")
def fp(embedded):
    m, tok = embedded
    return build(from_model(m, tok, name="embedded"), checkpoint_bytes=checkpoint_bytes(None), seed=0)


def weights(model, tok, name="suspect"):
    return from_model(model, tok, name=name)


def test_features_ignore_neuron_order_and_up_down_rescaling(embedded):
    from moeguard.trace.weights import f64

    m, tok = embedded
    view = weights(m, tok).layers[0]   # views of the model's float32 tensors: widened here, so the moves are exact
    layer = LayerWeights(index=0, router=view.router, gate=f64(view.gate), up=f64(view.up), down=f64(view.down))
    rng = np.random.default_rng(0)
    perm = rng.permutation(layer.gate.shape[1])
    c = rng.choice([-3.0, -0.5, 0.25, 2.0], size=layer.gate.shape[1])    # any nonzero scale, sign included
    moved = LayerWeights(index=0, router=layer.router, gate=layer.gate[:, perm], up=layer.up[:, perm] * c[perm, None],
                         down=layer.down[:, :, perm] / c[perm])
    H = np.arange(0, 128, 4)
    a, b = features(sketch_layer(layer, H, identity(128))), features(sketch_layer(moved, H, identity(128)))
    for k in ("a", "b", "v"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-8, atol=1e-10)


def test_evasions_keep_the_function_and_the_frame_is_recovered_exactly(embedded, fp):
    m, tok = embedded
    shuffled, orders = evasion.shuffle_experts(m, seed=1)
    assert any(o != sorted(o) for o in orders.values())
    assert torch.equal(shuffled.model.layers[0].mlp.experts.down_proj[0], m.model.layers[0].mlp.experts.down_proj[orders[0][0]])
    moved = evasion.permute_neurons(m, seed=3)
    assert not torch.equal(moved.model.layers[0].mlp.experts.down_proj, m.model.layers[0].mlp.experts.down_proj)
    hidden = evasion.permute_hidden(m, seed=2, flip_signs=True)   # same logits: checked inside
    old, new = m.get_input_embeddings().weight.detach(), hidden.get_input_embeddings().weight.detach()
    # ground truth from the weights themselves: suspect column c is +-owner column k
    truth = [next(c for c in range(128) if torch.equal(new[:, c].abs(), old[:, k].abs())) for k in range(128)]
    signs = [float(torch.sign(new[0, truth[k]] * old[0, k])) for k in range(128)]
    w = weights(hidden, tok)
    frame = align(fp.tensors["anchors"].astype(np.float64), fp.meta["anchor_tokens"], w)
    assert frame.cols.tolist() == truth and frame.signs.tolist() == signs and frame.flipped > 0


def test_layer_test_enumerates_every_injection_and_counts_ties_against_the_owner():
    rng = np.random.default_rng(0)
    s_a = np.eye(4)[:, :2]                     # view A picks owner experts 0 and 1
    s_b = rng.normal(size=(4, 2))
    r = layer_test(s_a, s_b, rng=rng)
    assert r["exact"] and r["N"] == 4 * 3 and r["sigma"] == [0, 1]
    brute = [s_b[i, 0] + s_b[j, 1] for i, j in itertools.permutations(range(4), 2)]
    assert r["p"] == sum(x >= s_b[0, 0] + s_b[1, 1] - 1e-12 for x in brute) / 12
    flat = layer_test(s_a, np.zeros((4, 2)), rng=rng)
    assert flat["p"] == 1.0                    # all tied: no evidence


def test_layer_p_values_are_uniform_when_the_views_are_independent():
    rng = np.random.default_rng(0)
    ps = np.array([layer_test(rng.normal(size=(6, 3)), rng.normal(size=(6, 3)), rng=rng)["p"] for _ in range(400)])
    for alpha in (0.05, 0.2, 0.5):   # P(p <= alpha) <= alpha, within binomial noise (4 sd)
        assert (ps <= alpha).mean() <= alpha + 4 * math.sqrt(alpha * (1 - alpha) / 400), alpha
    assert (ps <= 0.5).mean() >= 0.5 - 4 * math.sqrt(0.25 / 400)   # not trivially conservative either


def test_large_layers_use_monte_carlo_with_the_observed_choice_counted():
    rng = np.random.default_rng(1)
    s = np.zeros((12, 10))
    s[np.arange(10), np.arange(10)] = 1.0          # a perfect match: nothing in the null reaches it
    r = layer_test(s, s, rng=rng)
    assert not r["exact"] and r["N"] == 10_000 and r["p"] == 1 / 10_000


def test_product_tail_is_the_counted_probability_and_never_above_fisher():
    ps, grids = [0.3, 0.7, 0.2], [10, 10, 10]
    count = sum(1 for t in itertools.product(range(1, 11), repeat=3) if math.prod(t) / 1000 <= 0.042 + 1e-12)
    p, how = product_tail(ps, grids)
    assert how == "exact" and p == count / 1000 and p <= fisher(ps)
    assert product_tail([1 / 56] * 4, [56] * 4)[0] == pytest.approx(56.0 ** -4)


def test_the_size_the_budget_is_checked_against_is_the_tensors_stored(fp):
    from moeguard.trace.fingerprint import _size, choose

    tensors = sum(v.size for v in fp.tensors.values())
    T, d = fp.tensors["anchors"].shape
    m = len(fp.meta["H"])
    experts = [l["experts"] for l in fp.meta["layers"]]
    assert _size(T, d, m, experts) == 2 * tensors            # float16: two bytes a value, nothing counted twice
    # the largest m whose tensors fit: one more would not (the budget binds on the embedded model)
    budget = BUDGET * checkpoint_bytes(None)
    assert choose(d, experts, budget, vocab=10**6)[0] == m and _size(T, d, m + 1, experts) + 8192 > budget


def test_fingerprint_fits_one_percent_and_round_trips(fp, tmp_path):
    fp.save(tmp_path / "fp")
    size = sum(f.stat().st_size for f in (tmp_path / "fp").iterdir())
    assert size <= BUDGET * checkpoint_bytes(None), size
    back = type(fp).load(tmp_path / "fp")
    assert back.meta == json.loads(json.dumps(fp.meta)) and set(back.tensors) == set(fp.tensors)
    for k, v in fp.tensors.items():   # the values, to float16's precision (what save stores)
        np.testing.assert_allclose(back.tensors[k].astype(np.float64), v, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(v).max()),
                                   err_msg=k)


def test_a_pruned_shuffled_permuted_derivative_is_found_with_its_kept_experts(embedded, fp):
    m, tok = embedded
    pruned, _ = prune_model(m, KEEP)
    s, orders = evasion.shuffle_experts(pruned, seed=5)
    s = evasion.permute_neurons(s, seed=6)
    s = evasion.permute_hidden(s, seed=7, flip_signs=True)
    doc = run_trace(fp, weights(s, tok))
    assert doc["verdict"] == "derived" and doc["p_value"] <= 1e-4, doc["p_value"]
    assert {l["layer"]: l["kept"] for l in doc["layers"]} == KEEP
    for layer in doc["layers"]:   # each suspect expert named: the kept expert the shuffle put there
        li = layer["layer"]
        assert [e["original"] for e in layer["experts"]] == [KEEP[li][o] for o in orders[li]]
    assert doc["transformations"]["experts_reordered"]
    t = doc["transformations"]
    assert t["hidden_permuted"] and t["hidden_sign_flips"] > 0 and t["neurons_permuted"] and t["experts_dropped"]


def test_merged_experts_name_their_sources(embedded, fp):
    m, tok = embedded
    clusters = {l: [[0, 1], [2], [3, 4, 5], [6], [7]] for l in range(4)}
    merged, record = evasion.merge_experts(m, clusters)
    doc = run_trace(fp, weights(merged, tok))
    assert doc["verdict"] == "derived" and len(doc["layers"]) == 4   # the loop below checks each
    for layer in doc["layers"]:
        found = {e["expert"]: sorted(int(i) for i in e["merge"]["weights"]) for e in layer["experts"]
                 if e["label"] == "merged"}
        truth = {g["expert"]: sorted(g["from"]) for g in record["merges"][str(layer["layer"])] if len(g["from"]) > 1}
        assert found == truth


def test_detectability_counts_a_merged_model_s_experts_named_by_their_sources(embedded):
    """On the merge route the stolen model's merged experts are labelled merged, never kept: detectability
    counted only kept labels and read 12 of 20 where the trace named every merge's sources."""
    from moeguard.studies.merge_route import merged_from
    from moeguard.trace.api import detectability, fingerprint_in_memory

    m, tok = embedded
    clusters = {l: [[0, 1], [2], [3, 4, 5], [6], [7]] for l in range(4)}
    stolen = merged_from(m, {"clusters": {str(l): g for l, g in clusters.items()}, "weights": {}})
    keep = {l: sorted(g[0] for g in gs) for l, gs in clusters.items()}
    fp_ = fingerprint_in_memory(m, tok, key="embedded-merge-route")
    d = detectability(fp_, stolen, tok, keep, clusters=clusters)
    assert d["verdict"] == "derived" and (d["kept_total"], d["merged_total"]) == (20, 8)
    assert d["kept_identified"] == 20, d
    assert detectability(fp_, stolen, tok, keep)["kept_identified"] == 12   # counted as pruned: the merges missed
    from moeguard.report.auditrows import _identified

    assert _identified(d) == "identifying 20 of 20 experts (8 of them merges, each named by its sources)"
    # uneven weights (router-weighted gives a barely-routed member about 0): the members a trace can see
    weights = {l: [[1.0, 0.0], [1.0], [0.6, 0.4, 0.0], [1.0], [1.0]] for l in range(4)}
    stolen = merged_from(m, {"clusters": {str(l): g for l, g in clusters.items()},
                             "weights": {str(l): w for l, w in weights.items()}})
    d = detectability(fp_, stolen, tok, keep, clusters=clusters, weights=weights)
    assert (d["kept_identified"], d["kept_total"], d["merged_total"]) == (20, 20, 4), d


def test_a_checkpoint_written_by_moeguard_merge_is_traced_to_its_merging_record(fp, tmp_path, capsys):
    """The merge command's own record on disk (``moeguard_merging.json``) is the ground truth the
    trace of its checkpoint is checked against: which originals each merged expert came from."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"clusters": {str(l): [[1, 0], [2], [5, 3, 4], [6], [7]] for l in range(4)}}))
    assert main(["merge", "--plan", str(plan), "--method", "average", "--out", str(tmp_path / "suspect")]) == 0
    fp.save(tmp_path / "fp")
    assert main(["trace", "--original", str(tmp_path / "fp"), "--suspect", str(tmp_path / "suspect"),
                 "--out", str(tmp_path / "t")]) == 0
    assert "verdict: derived" in capsys.readouterr().out
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    record = json.loads((tmp_path / "suspect" / "moeguard_merging.json").read_text())
    assert len(doc["layers"]) == len(record["merges"]) == 4, doc["layers"]   # the loop below checks each
    for layer in doc["layers"]:
        found = {e["expert"]: sorted(int(i) for i in e["merge"]["weights"]) for e in layer["experts"]
                 if e["label"] == "merged"}
        truth = {g["expert"]: sorted(g["from"]) for g in record["merges"][str(layer["layer"])] if len(g["from"]) > 1}
        assert found == truth and len(truth) == 2, (layer["layer"], found, truth)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_independent_model_of_the_same_architecture_is_not_called_derived(embedded, fp, seed):
    m, tok = embedded
    torch.manual_seed(seed)
    other = type(m)(m.config).eval()   # same shapes and vocabulary, its own initialization
    doc = run_trace(fp, weights(other, tok))
    assert doc["verdict"] == "independent" and doc["p_value"] >= 0.01, doc["p_value"]


def test_cli_fingerprint_then_trace_writes_the_report(embedded, tmp_path, capsys):
    m, tok = embedded
    pruned, _ = prune_model(m, KEEP)
    pruned.save_pretrained(tmp_path / "suspect")
    tok.save_pretrained(tmp_path / "suspect")
    assert main(["fingerprint", "--out", str(tmp_path / "fp")]) == 0
    assert "% of the checkpoint" in capsys.readouterr().out
    assert main(["trace", "--original", str(tmp_path / "fp"), "--suspect", str(tmp_path / "suspect"),
                 "--out", str(tmp_path / "t")]) == 0
    assert "verdict: derived" in capsys.readouterr().out
    doc = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert doc["schema"] == "moeguard.trace/1" and {l["layer"]: l["kept"] for l in doc["layers"]} == KEEP
    run = doc["run"]                       # what was compared, with which seed, by which moeguard
    assert run["settings"] == {"original": str(tmp_path / "fp"), "original_is_fingerprint": True,
                               "suspect": str(tmp_path / "suspect"), "seed": 0}
    assert run["versions"]["torch"] == torch.__version__ and "git_commit" in run
    assert (tmp_path / "t" / "trace_mapping.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "Verdict: derived" in \
        (tmp_path / "t" / "trace.md").read_text()


def test_unusable_inputs_are_one_line_errors(embedded, fp, tmp_path, capsys):
    from moeguard.testing import tiny_model

    m, tok = embedded
    narrow = tiny_model("mixtral")
    narrow.save_pretrained(tmp_path / "narrow")
    tok.save_pretrained(tmp_path / "narrow")
    fp.save(tmp_path / "fp")
    capsys.readouterr()
    code = main(["trace", "--original", str(tmp_path / "fp"), "--suspect", str(tmp_path / "narrow")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines() == [
        "moeguard: error: the suspect's hidden size is 32, the original's 128: trace has not compared them, so this "
        "is no evidence either way Fix: trace compares models of the same width (a width-pruned copy is not traced yet)"]
    (tmp_path / "fp" / "fingerprint.safetensors").write_bytes(b"\x00" * 10)   # truncated
    code = main(["trace", "--original", str(tmp_path / "fp"), "--suspect", str(tmp_path / "narrow")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "cannot be read" in err and "truncated" in err, err
    # ... before the suspect is opened (a hub suspect is fetched whole there)
    import moeguard.trace.weights as trace_weights

    real = trace_weights.load

    def fetched(where, *a, **k):
        if where == "org/big-moe":
            raise AssertionError("the suspect was opened before the original was read")
        return real(where, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trace_weights, "load", fetched)
        assert main(["trace", "--original", str(tmp_path / "fp"), "--suspect", "org/big-moe"]) == 2
        assert "cannot be read" in capsys.readouterr().err
        # a local original without weights too: it is opened (no tensor read) first
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text((tmp_path / "narrow" / "config.json").read_text())
        assert main(["trace", "--original", str(tmp_path / "empty"), "--suspect", "org/big-moe"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "before the original" not in err and "safetensors" in err, err
    with pytest.raises(MoeguardError, match="anchor tokens"):
        w = weights(m, tok)
        run_trace(fp, type(w)(name="x", family=w.family, embed=w.embed, tokens=[""] * len(w.tokens), layers=w.layers))


def test_a_damaged_fingerprint_or_gguf_is_a_one_line_error(fp, tmp_path):
    from moeguard.trace.fingerprint import Fingerprint
    from moeguard.trace.gguf import load_gguf

    fp.save(tmp_path / "fp")
    meta = json.loads((tmp_path / "fp" / "fingerprint.json").read_text())
    del meta["H"]
    (tmp_path / "fp" / "fingerprint.json").write_text(json.dumps(meta))
    with pytest.raises(MoeguardError, match="no valid 'H'"):
        Fingerprint.load(tmp_path / "fp")
    with pytest.raises(MoeguardError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(MoeguardError, match="not a readable GGUF"):
        load_gguf(tmp_path / "bad.gguf")


@pytest.mark.parametrize("damage,needle", [
    (lambda meta, t: meta.update(layers=[1, 3, 5, 7]), "'layers' must list distinct"),
    (lambda meta, t: meta.update(anchor_tokens=[["x"]] + meta["anchor_tokens"][1:]), "'anchor_tokens' must be token strings"),
    (lambda meta, t: meta.update(H=meta["H"][:8]), "does not fit"),           # the tensors were built with more
    (lambda meta, t: t.update({"0.rows": t["0.rows"][:, :, :3]}), "0.rows has shape"),
])
def test_a_fingerprint_whose_parts_disagree_is_one_line(fp, tmp_path, damage, needle):
    from safetensors.numpy import load_file, save_file

    from moeguard.trace.fingerprint import Fingerprint

    fp.save(tmp_path / "fp")
    meta = json.loads((tmp_path / "fp" / "fingerprint.json").read_text())
    tensors = load_file(str(tmp_path / "fp" / "fingerprint.safetensors"))
    damage(meta, tensors)
    (tmp_path / "fp" / "fingerprint.json").write_text(json.dumps(meta))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp_path / "fp" / "fingerprint.safetensors"))
    with pytest.raises(MoeguardError, match=needle):
        Fingerprint.load(tmp_path / "fp")


def test_a_suspect_with_nan_weights_is_refused_not_given_a_p_value_of_zero(embedded, fp):
    import copy

    m, tok = embedded
    broken = copy.deepcopy(m)
    with torch.no_grad():
        next(p for n, p in broken.named_parameters() if "experts" in n).view(-1)[:7] = float("nan")
    with pytest.raises(MoeguardError, match="MoE layer 0 holds NaN or infinite weights"):
        run_trace(fp, weights(broken, tok))


def _reshaped(folder, tok, family: str, pick, shape) -> tuple[str, list[int]]:
    """A tiny ``family`` checkpoint saved in ``folder`` whose first tensor named as ``pick`` accepts
    has the header shape ``shape(old)``, the same bytes: (its key, its old shape)."""
    import struct

    from moeguard.testing import tiny_model

    tiny_model(family).save_pretrained(folder)
    tok.save_pretrained(folder)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8:8 + n])
    k = next(k for k in head if pick(k))
    old = head[k]["shape"]
    head[k]["shape"] = shape(old)
    raw = json.dumps(head).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return k, old


def test_a_streamed_suspect_whose_embedding_disagrees_with_its_config_is_one_line(embedded, tmp_path):
    from moeguard.trace import stream

    _, tok = embedded
    # a valid tensor, the wrong rank
    _reshaped(tmp_path, tok, "mixtral", lambda k: k == "model.embed_tokens.weight", lambda s: [s[0] * s[1]])
    with pytest.raises(MoeguardError, match=r"model.embed_tokens.weight has shape \[\d+\], expected \[vocab, \d+\]"):
        stream.StreamedCheckpoint.open(str(tmp_path))


def test_a_streamed_suspect_whose_fused_experts_have_the_wrong_rank_is_one_line(embedded, tmp_path):
    """gpt-oss's [E, d, 2I] gate_up read as [E * d, 2I] (the same bytes): its size was read before its
    rank was checked, an IndexError and a traceback."""
    from moeguard.trace import stream

    _, tok = embedded
    k, (E, d, two_i) = _reshaped(tmp_path, tok, "gpt_oss", lambda k: k.endswith("experts.gate_up_proj"),
                                 lambda s: [s[0] * s[1], s[2]])
    with pytest.raises(MoeguardError, match=rf"{re.escape(k)} has shape \[{E * d}, {two_i}\], expected 3 dimensions"):
        stream.StreamedCheckpoint.open(str(tmp_path))


@pytest.mark.parametrize("bad,needle", [
    ({"blk.0.ffn_down_exps.weight": (4, 16)}, r"blk.0.ffn_down_exps.weight has shape \[4, 16\], expected \[4, 8, 16\]"),
    ({"blk.0.ffn_gate_inp.weight": (3, 8)}, r"ffn_gate_inp.weight has shape \[3, 8\], expected \[4, 8\]"),
    ({"tokens": 40}, "lists 40 tokens for 32 embedding rows"),
])
def test_a_gguf_whose_shapes_disagree_is_one_line(tmp_path, bad, needle):
    from moeguard.trace.gguf import load_gguf

    shapes = {"token_embd.weight": (32, 8), "blk.0.attn_norm.weight": (8,), "blk.0.ffn_gate_inp.weight": (4, 8),
              "blk.0.ffn_gate_exps.weight": (4, 16, 8), "blk.0.ffn_up_exps.weight": (4, 16, 8),
              "blk.0.ffn_down_exps.weight": (4, 8, 16)}
    shapes.update({k: v for k, v in bad.items() if k != "tokens"})
    with pytest.raises(MoeguardError, match=needle):
        load_gguf(_gguf(tmp_path / "x.gguf", shapes, tokens=bad.get("tokens", 32)))


def _gguf(path, shapes, *, tokens=32, blocks=None, uint32=None, **fields):
    """A GGUF file of ones with these tensor shapes, token list, block count, uint16 fields
    (``split_count`` for ``split.count``) and uint32 fields named as given."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list([f"t{i}" for i in range(tokens)])
    if blocks is not None:
        w.add_block_count(blocks)
    for k, v in fields.items():
        w.add_uint16(k.replace("_", "."), v)
    for k, v in (uint32 or {}).items():
        w.add_uint32(k, v)
    for name, shape in shapes.items():
        w.add_tensor(name, np.ones(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_export_traces_to_its_source_and_says_how_it_was_quantized(embedded, fp, tmp_path):
    from moeguard.trace.gguf import export_gguf, load_gguf

    m, tok = embedded
    pruned, _ = prune_model(m, KEEP)
    export_gguf(pruned, tok, tmp_path / "s.gguf", qtype="Q4_0")
    doc = run_trace(fp, load_gguf(tmp_path / "s.gguf"))
    assert doc["p_value"] <= 1e-4 and {l["layer"]: l["kept"] for l in doc["layers"]} == KEEP
    q = doc["transformations"]["quantization"]
    assert q["stored"] == ["Q4_0"] and q["bits"] == 4
    # ~ is read as every other path is (--suspect=~/m.gguf: bash leaves it after '='): "does not exist" before
    from moeguard.trace.weights import locate

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path))
        assert locate("~/s.gguf").where == str(tmp_path / "s.gguf")


@pytest.mark.parametrize("family", sorted(FAMILIES.names()))
def test_streaming_reads_what_memory_holds_for_every_family(family, embedded, tmp_path, monkeypatch):
    """The shared family matrix for trace's reader: the on-disk names are each family's data
    (FamilySpec.disk_expert_tensors), so a wrong row shows up here as a wrong sketch."""
    from moeguard.io import ShardReader
    from moeguard.testing import tiny_model
    from moeguard.trace import stream

    _, tok = embedded
    m = tiny_model(family)
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    mem = from_model(m, tok, name="x")
    reads, real = [], ShardReader.read

    def spy(self, file, name, index=None):
        t = real(self, file, name, index)
        reads.append(t.numel())
        return t

    monkeypatch.setattr(ShardReader, "read", spy)
    monkeypatch.setattr(stream, "CHUNK", 5 * 4 * 32)  # 5 rows of 32: chunks straddle the gate/up boundary
    disk = stream.StreamedCheckpoint.open(str(tmp_path))
    assert (disk.hidden, disk.intermediate, disk.experts, disk.tokens) == \
        (mem.hidden, mem.intermediate, mem.experts, mem.tokens)
    rng = np.random.default_rng(0)
    d = mem.hidden
    frame = Frame(cols=rng.permutation(d), signs=rng.choice([-1.0, 1.0], d), cosine=np.ones(d), anchors=0)
    H = np.sort(rng.choice(d, 12, replace=False))
    for position in range(mem.num_layers):
        a, b = mem.sketch(position, H, frame), disk.sketch(position, H, frame)
        assert b.index == a.index
        for k in ("ka", "kb", "rows"):
            np.testing.assert_allclose(getattr(b, k), getattr(a, k), rtol=1e-10, atol=1e-12, err_msg=k)
        # float32 partial sums (_column_sums), far below the fingerprint's float16
        np.testing.assert_allclose(b.v, a.v, rtol=0, atol=1e-7 * np.abs(a.v).max())
    np.testing.assert_array_equal(disk.embed_rows([5, 1, 40]), mem.embed_rows([5, 1, 40]))
    np.testing.assert_allclose(disk.embed_norms(), mem.embed_norms(), rtol=1e-12)
    assert reads and max(reads) * 4 <= stream.CHUNK    # no read holds more than a chunk
    # (the quantization sample is one small read of 8192 values)
    np.testing.assert_array_equal(disk.quant_sample(), mem.quant_sample())   # gate rows, whatever the layout


def test_the_streamed_fingerprint_equals_the_in_memory_one(fp):
    from moeguard.trace import fingerprint

    disk = fingerprint(None, seed=0)
    assert disk.meta["H"] == fp.meta["H"] and disk.meta["anchor_tokens"] == fp.meta["anchor_tokens"]
    assert set(disk.tensors) == set(fp.tensors)
    for k, v in fp.tensors.items():
        tol = dict(rtol=0, atol=1e-7 * np.abs(v).max()) if k.endswith(".v") else dict(rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(disk.tensors[k], v, err_msg=k, **tol)


def test_a_budget_checkpoint_streams_with_its_per_layer_expert_counts(embedded, fp, tmp_path):
    from moeguard.trace.weights import load

    m, tok = embedded
    keep = {0: [1, 4, 6], 1: [3], 2: [2, 3], 3: [0, 5, 7]}
    pruned, _ = prune_model(m, keep)
    pruned.save_pretrained(tmp_path / "s")
    tok.save_pretrained(tmp_path / "s")
    w = load(str(tmp_path / "s"))
    assert w.source["streamed"] and w.experts == [3, 1, 2, 3]
    doc = run_trace(fp, w)
    assert doc["p_value"] <= 1e-4 and {l["layer"]: l["kept"] for l in doc["layers"]} == keep


def test_a_suspect_without_tokenizer_or_in_quantized_storage_is_refused_before_the_original_is_read(
        embedded, tmp_path, capsys, monkeypatch):
    import moeguard.trace as api
    from safetensors.torch import load_file, save_file

    m, tok = embedded
    m.save_pretrained(tmp_path / "s")
    monkeypatch.setattr(api, "fingerprint", lambda *a, **k: pytest.fail("the original was read"))
    capsys.readouterr()
    assert main(["trace", "--suspect", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot load the tokenizer" in err and "token strings" in err, err
    (tmp_path / "s" / "tokenizer.json").write_text('{"model": 5}')     # damaged: tokenizers raises a KeyError
    assert main(["trace", "--suspect", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot load the tokenizer" in err and "token strings" in err, err
    (tmp_path / "s" / "tokenizer.json").unlink()
    tok.save_pretrained(tmp_path / "s")
    sd = load_file(tmp_path / "s" / "model.safetensors")
    key = next(k for k in sd if "experts" in k)
    sd[key] = sd[key].to(torch.float8_e4m3fn)
    save_file(sd, tmp_path / "s" / "model.safetensors", metadata={"format": "pt"})
    assert main(["trace", "--suspect", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "stores quantized weights (F8_E4M3)" in err and "GGUF" in err, err


def test_a_study_on_a_model_too_small_to_fingerprint_records_why_instead_of_failing(embedded):
    """A recovery or attack study traces each re-aligned model; a model whose 1% budget holds no
    fingerprint (a 2-layer cut of a real model, a toy) used to end the whole audit there. Its
    runs now carry the reason, and the report says it was not traced."""
    from moeguard.report.auditrows import detect_text
    from moeguard.studies.common import detectability_of
    from moeguard.testing import tiny_model
    from moeguard.trace.api import tracer

    _, tok = embedded
    small = tiny_model("mixtral", vocab_size=len(tok))
    after = tracer(small, tok, {0: [0, 1], 1: [0, 1]}, key="too-small")(small)
    assert after["trace"] is None and "too small to fingerprint" in after["trace_skipped"]
    runs = [{"strategy": "random", "seed": 0, "points": [{"labels": 8, "retention": 50.0}], "after": after}]
    d = detectability_of(runs, score=lambda r: r["points"][-1]["retention"])
    assert d == {"skipped": after["trace_skipped"]}
    assert detect_text({"detectability": d}).startswith("Detectability: not traced (a fingerprint of this model")
    # a model that fits is traced as before
    m, _ = embedded
    traced = tracer(m, tok, {l: list(range(8)) for l in range(4)}, key="embedded-full")(m)["trace"]
    assert traced["verdict"] == "derived" and traced["kept_identified"] == traced["kept_total"] == 32


def test_the_in_memory_source_views_the_models_tensors_and_widens_an_expert_at_a_time(embedded):
    """from_model used to copy every expert into float64 (8 bytes a parameter: 13 GB at a
    128-expert OLMoE-width layer pair, which ended an audit's recovery at E = 128 out of memory);
    it now holds views of the model's own tensors, and the sketch is what it was, to the bit."""
    m, tok = embedded
    layer = MoEAdapter(m).layers[0]
    w = weights(m, tok).layers[0]
    assert w.gate.untyped_storage().data_ptr() == layer.experts.gate_up_proj.untyped_storage().data_ptr()
    rng = np.random.default_rng(1)
    frame = identity(128)
    H = np.sort(rng.choice(128, 16, replace=False))
    C = frame.cols[H]
    g = layer.experts.gate_up_proj.detach().double().numpy()[:, :w.gate.shape[1], :]   # the old whole-layer copy
    old = np.einsum("eim,ein->emn", g[:, :, C] * frame.signs[H], g[:, :, C] * frame.signs[H])
    sk = sketch_layer(w, H, frame)
    assert np.array_equal(sk.ka, old) and np.array_equal(sk.v, g.sum(axis=1)[:, frame.cols] * frame.signs)


def test_a_gguf_is_read_one_expert_at_a_time_and_float_storage_is_not_quantization(embedded, fp, tmp_path):
    """Review of trace/: the experts stay in the memory-mapped file until an expert is read (a whole
    MoE widened to float64 took ~15x the file), with the same trace as before; F16 storage is not
    reported as quantized."""
    from moeguard.trace.gguf import _Experts, export_gguf, load_gguf

    m, tok = embedded
    pruned, _ = prune_model(m, KEEP)
    export_gguf(pruned, tok, tmp_path / "h.gguf", qtype="F16")
    w = load_gguf(tmp_path / "h.gguf")
    assert isinstance(w.layers[0].gate, _Experts) and w.layers[0].gate.shape == (2, 256, 128)
    # the embedding stays as dequantized (not widened whole to float64); what trace reads of it is float64
    assert w.embed.dtype != np.float64 and w.embed_rows([3, 1]).dtype == np.float64
    doc = run_trace(fp, w)
    assert doc["p_value"] <= 1e-4 and {l["layer"]: l["kept"] for l in doc["layers"]} == KEEP
    assert doc["transformations"]["quantization"]["stored"] is None


def test_a_split_gguf_part_and_a_router_without_experts_are_one_line(tmp_path):
    from moeguard.trace.gguf import load_gguf

    def write(name, shapes, **fields):
        return _gguf(tmp_path / name, shapes, blocks=2, **fields)

    layer = {"blk.{i}.attn_norm.weight": (8,), "blk.{i}.ffn_gate_inp.weight": (4, 8),
             "blk.{i}.ffn_gate_exps.weight": (4, 16, 8), "blk.{i}.ffn_up_exps.weight": (4, 16, 8),
             "blk.{i}.ffn_down_exps.weight": (4, 8, 16)}
    full = {"token_embd.weight": (32, 8), **{k.format(i=i): v for i in (0, 1) for k, v in layer.items()}}
    with pytest.raises(MoeguardError, match="one part of a GGUF split into 2 files"):
        load_gguf(write("part.gguf", full, split_count=2))
    cut = {k: v for k, v in full.items() if not k.startswith("blk.1.ffn_") or "gate_inp" in k}
    with pytest.raises(MoeguardError, match="block 1 has a router \\(ffn_gate_inp\\) but no ffn_gate_exps"):
        load_gguf(write("cut.gguf", cut))


def test_nan_embeddings_are_one_line_for_a_suspect_and_an_original(embedded, fp):
    import copy

    m, tok = embedded
    broken = copy.deepcopy(m)
    with torch.no_grad():
        broken.get_input_embeddings().weight[:, 5] = float("nan")
    with pytest.raises(MoeguardError, match="the suspect's token embeddings hold NaN or infinite values"):
        run_trace(fp, weights(broken, tok))
    with pytest.raises(MoeguardError, match="token embeddings hold NaN or infinite values"):
        build(weights(broken, tok, name="nan"), checkpoint_bytes=checkpoint_bytes(None), seed=0)


def test_an_original_of_another_shape_is_refused_before_its_fingerprint_is_built(embedded, tmp_path, monkeypatch):
    import importlib

    from moeguard.trace import trace as trace_cmd

    F = importlib.import_module("moeguard.trace.fingerprint")   # the module, not the package's function

    m, tok = embedded
    narrow = tmp_path / "narrow"
    pruned, _ = prune_model(m, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3], 3: [0, 1, 2, 3]})
    pruned.save_pretrained(narrow)
    tok.save_pretrained(narrow)
    from moeguard.testing import tiny_model

    other = tmp_path / "other"
    tiny_model("mixtral").save_pretrained(other)   # hidden size 16: another architecture
    tok.save_pretrained(other)
    monkeypatch.setattr(F, "build", lambda *a, **k: pytest.fail("the original was fingerprinted first"))
    with pytest.raises(MoeguardError, match="hidden size"):
        trace_cmd(str(other), str(narrow))


def test_an_output_that_is_an_input_is_refused(fp, tmp_path, capsys):
    import hashlib

    fpdir = tmp_path / "fp"
    fp.save(fpdir, overwrite=False)
    digests = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(fpdir.iterdir())}  # noqa: E731
    before = digests()
    capsys.readouterr()
    code = main(["trace", "--original", str(fpdir), "--suspect", str(fpdir), "--out", str(fpdir), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "is (or holds) the input" in err and len(err.strip().splitlines()) == 1, err
    assert digests() == before and set(before) == {"fingerprint.json", "fingerprint.safetensors"}
    code = main(["fingerprint", "--model", str(tmp_path), "--out", str(tmp_path), "--overwrite"])
    assert code == 2 and "is (or holds) the input" in capsys.readouterr().err and digests() == before


def test_a_checkpoint_whose_config_says_it_is_quantized_is_refused_as_such(tmp_path):
    """llm-compressor's packed layout (weight_packed + weight_scale) reached 'no expert tensors ...
    re-download it'; a config with a quantization_config is refused for what it is."""
    import shutil

    from moeguard.models.loading import resolve
    from moeguard.trace import stream

    d = tmp_path / "q"
    shutil.copytree(resolve(None).path, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoeguardError, match="stores quantized weights") as e:
        stream.StreamedCheckpoint.open(str(d))
    assert "dequantize it first, or pass its GGUF export" in e.value.hint


@pytest.mark.parametrize("signs", [False, True])
def test_a_norm_gain_rescaled_with_flipped_signs_is_still_traced(embedded, fp, signs):
    """Review of trace/: a norm gain's sign per dimension is free (its readers' columns flip with
    it). Flipped, the views' rows and columns flipped with it and trace called the copy independent
    (p 0.85); the signs are now undone from the layer's mean view. A pruned, shuffled copy too."""
    m, tok = embedded
    s = evasion.rescale_norms(m, seed=3, signs=signs)           # same logits: checked inside
    doc = run_trace(fp, weights(s, tok))
    assert doc["verdict"] == "derived" and doc["p_value"] <= 1e-10 and len(doc["layers"]) == 4
    assert all(len(l["kept"]) == 8 for l in doc["layers"])
    flipped = [l["norm_signs_flipped"] for l in doc["layers"]]
    assert all(f > 0 for f in flipped) if signs else flipped == [0, 0, 0, 0]
    pruned, _ = prune_model(evasion.rescale_norms(m, seed=4, signs=True), KEEP)
    shuffled, _ = evasion.shuffle_experts(pruned, seed=5)
    doc = run_trace(fp, weights(shuffled, tok))
    assert doc["p_value"] <= 1e-4 and {l["layer"]: l["kept"] for l in doc["layers"]} == KEEP


def test_the_combined_p_value_keeps_its_log10_where_it_underflows():
    from moeguard.trace.stats import log10_product_tail

    ps, grids = [1e-4] * 94, [10_000] * 94
    p, how = product_tail(ps, grids)
    assert p == 0.0                                   # under float64's smallest value
    lp = log10_product_tail(ps, grids)
    assert lp == pytest.approx(-376.0)                # every layer at its grid's floor: one tuple of 10^376
    small, grid = [1 / 56] * 4, [56] * 4
    assert log10_product_tail(small, grid) == pytest.approx(math.log10(product_tail(small, grid)[0]))


def test_a_fingerprint_beyond_float16_is_refused_not_saved_as_inf(fp, tmp_path):
    import dataclasses

    big = dataclasses.replace(fp, tensors={**fp.tensors, "anchors": fp.tensors["anchors"] * 1e6})
    with pytest.raises(MoeguardError, match="beyond float16's range"):
        big.save(tmp_path / "fp", overwrite=False)
    assert not (tmp_path / "fp").exists()


def test_an_original_a_fingerprint_cannot_be_made_from_is_refused_before_it_is_loaded(tmp_path, monkeypatch):
    """A .gguf file as --original was loaded whole, then refused; it is refused before anything is
    opened, the suspect too (a hub suspect would be fetched whole first)."""
    import moeguard.trace.weights as W
    from moeguard.trace import trace

    real = W.load
    loaded = []
    monkeypatch.setattr(W, "load", lambda ref, *a, **k: (loaded.append(ref), real(ref, *a, **k))[1])
    from pathlib import Path

    from moeguard.errors import MoeguardError

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    suspect = str(Path(W.__file__).parents[1] / "zoo" / "embedded")
    with pytest.raises(MoeguardError, match="is a GGUF file; a fingerprint is made from the original's safetensors"):
        trace(str(gguf), suspect)
    assert loaded == []                 # neither the suspect nor the original was opened
    # a .gguf path that does not exist, shaped like a hub id (org/name), is not asked of the hub
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoeguardError, match="models/m.gguf is a GGUF file"):
        trace("models/m.gguf", suspect)
    assert loaded == []


def test_embedding_norms_are_float64_over_blocks_of_rows():
    """ModelWeights widens its embedding a block of rows at a time: the norms equal those of the whole
    embedding widened at once, across block boundaries too."""
    from moeguard.trace.weights import EMBED_BLOCK, ModelWeights

    embed = np.random.default_rng(0).standard_normal((2 * EMBED_BLOCK + 17, 8)).astype(np.float32)
    embed[EMBED_BLOCK + 5, 3] = 1e3     # an outsized value past the first block
    w = ModelWeights(name="x", family="f", embed=embed, tokens=[""] * len(embed), layers=[])
    whole = np.linalg.norm(embed.astype(np.float64), axis=0)
    assert w.embed_norms().dtype == np.float64
    np.testing.assert_allclose(w.embed_norms(), whole, rtol=1e-12)
    assert w.embed_norms().argmax() == 3
    assert np.array_equal(w.embed_rows([EMBED_BLOCK + 5]), embed[[EMBED_BLOCK + 5]].astype(np.float64))


def test_a_hub_suspect_is_fetched_then_streamed_never_loaded_whole(embedded, fp, tmp_path, monkeypatch, capsys):
    """A hub id as --suspect was loaded whole through transformers (the model's size in memory); its
    safetensors, config and tokenizer files are fetched into the cache and streamed, and the report
    names it by its id."""
    import huggingface_hub

    import moeguard.models.loading as loading
    from moeguard.models.hub import STREAMED_FILES
    from moeguard.trace.stream import StreamedCheckpoint

    m, tok = embedded
    snapshot = tmp_path / "cache" / "snapshots" / "abc123"
    pruned, _ = prune_model(m, KEEP)
    pruned.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    asked = []

    def fetch(repo_id, **kw):
        asked.append((repo_id, tuple(kw.get("allow_patterns") or ()), tuple(kw.get("ignore_patterns") or ())))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a hub suspect was loaded whole"))
    fp.save(tmp_path / "fp")
    capsys.readouterr()
    assert main(["trace", "--original", str(tmp_path / "fp"), "--suspect", "org/stolen", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # its config first (refusals it can decide come before the weights), then top-level weights, config and
    # tokenizer only: no pickles, no copies in subfolders or Mistral's consolidated file
    assert asked == [("org/stolen", ("config.json",), ("*/*", "consolidated*")),
                     ("org/stolen", ("*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken"), ("*/*", "consolidated*"))]
    assert STREAMED_FILES == asked[1][1]
    assert doc["suspect"] == "org/stolen" and doc["verdict"] == "derived"
    assert doc["suspect_snapshot"] == {"hub_id": "org/stolen", "revision": "abc123"}   # the commit traced
    assert {l["layer"]: l["kept"] for l in doc["layers"]} == KEEP
    from moeguard.trace.weights import load

    assert isinstance(load("org/stolen"), StreamedCheckpoint)


@pytest.mark.parametrize("config, needle", [
    ({"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8"}},
     "the suspect org/big stores quantized weights (quantization_config fp8), said by its config.json"),
    ({"model_type": "mixtral", "hidden_size": 4096}, "the suspect's hidden size is 4096, the original's 128"),
])
def test_a_hub_suspect_its_config_rules_out_is_refused_before_its_weights_are_fetched(fp, tmp_path, monkeypatch, capsys,
                                                                                       config, needle):
    """DeepSeek-V3's FP8 weights (690 GB) were fetched whole, then refused as quantized; another width too."""
    import huggingface_hub

    asked = []

    def fetch(repo_id, **kw):
        asked.append(tuple(kw.get("allow_patterns") or ()))
        if asked[-1] != ("config.json",):
            pytest.fail("the weights were fetched")
        (tmp_path / "snap").mkdir(exist_ok=True)
        (tmp_path / "snap" / "config.json").write_text(json.dumps(config))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    fp.save(tmp_path / "fp")
    capsys.readouterr()
    code = main(["trace", "--original", str(tmp_path / "fp"), "--suspect", "org/big"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert asked == [("config.json",)]


def test_a_hub_original_s_config_is_checked_before_a_hub_suspect_is_fetched(tmp_path, monkeypatch, capsys):
    """With both on the hub, the suspect's weights came whole before the original's config was read: a
    quantized original, or another width, was refused after the suspect's download."""
    import huggingface_hub

    configs = {"org/original": {"model_type": "mixtral", "hidden_size": 4096},
               "org/suspect": {"model_type": "mixtral", "hidden_size": 128}}
    asked = []

    def fetch(repo_id, **kw):
        asked.append((repo_id, tuple(kw.get("allow_patterns") or ())))
        if asked[-1][1] != ("config.json",):
            pytest.fail("weights were fetched")
        d = tmp_path / repo_id.replace("/", "-")
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(configs[repo_id]))
        return str(d)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    capsys.readouterr()
    code = main(["trace", "--original", "org/original", "--suspect", "org/suspect"])
    err = capsys.readouterr().err
    assert code == 2 and "the suspect's hidden size is 128, the original's 4096" in err, err
    assert asked == [("org/original", ("config.json",)), ("org/suspect", ("config.json",))]
    configs["org/original"]["quantization_config"] = {"quant_method": "fp8"}
    asked.clear()
    assert main(["trace", "--original", "org/original", "--suspect", "org/suspect"]) == 2
    assert "the original org/original stores quantized weights (quantization_config fp8)" in capsys.readouterr().err
    assert asked == [("org/original", ("config.json",))]


@pytest.mark.parametrize("failure, needle", [
    (OSError("We couldn't connect to 'https://huggingface.co'"), "cannot fetch org/gone from the Hugging Face hub"),
    ("no-weights", "org/gone holds no .safetensors weights"),
])
def test_a_hub_suspect_that_cannot_be_fetched_is_one_line(fp, tmp_path, monkeypatch, capsys, failure, needle):
    import huggingface_hub

    def fetch(repo_id, **kw):
        if isinstance(failure, Exception):
            raise failure
        (tmp_path / "snap").mkdir(exist_ok=True)
        (tmp_path / "snap" / "config.json").write_text("{}")
        return str(tmp_path / "snap")

    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)   # online (the suite runs offline): the plain refusal
    fp.save(tmp_path / "fp")
    capsys.readouterr()
    code = main(["trace", "--original", str(tmp_path / "fp"), "--suspect", "org/gone"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert "Fix:" in err and "cached snapshot" not in err


def test_a_hub_original_is_fingerprinted_from_its_fetched_snapshot(tmp_path, monkeypatch, capsys):
    """`fingerprint --model org/name` said "not downloaded" although the help offers hub ids: it is
    fetched like a hub suspect and named by its id."""
    import shutil

    import huggingface_hub

    from moeguard.models.loading import resolve

    snapshot = tmp_path / "snapshots" / "def456"
    shutil.copytree(resolve(None).path, snapshot)
    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: (fetched.append(repo_id), str(snapshot))[1])
    assert main(["fingerprint", "--model", "owner/released", "--out", str(tmp_path / "fp")]) == 0
    assert "fingerprint of owner/released (4 MoE layers" in capsys.readouterr().out
    meta = json.loads((tmp_path / "fp" / "fingerprint.json").read_text())
    assert meta["model"] == "owner/released" and meta["checkpoint_bytes"] == (snapshot / "model.safetensors").stat().st_size
    # its config (checked first), then made local once: its size and its weights read from one snapshot
    assert fetched == ["owner/released"] * 2
    assert meta["source"]["hub"] == {"hub_id": "owner/released", "revision": "def456"}   # the commit fingerprinted
    # as trace's original, made on the fly: fetched once too, and traced against a local derivative of itself
    fetched.clear()
    assert main(["trace", "--original", "owner/released", "--suspect", str(snapshot), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # its config, then its files: fetched once
    assert fetched == ["owner/released"] * 2 and doc["original"] == "owner/released" and doc["verdict"] == "derived"


def test_an_offline_partial_snapshot_is_named_as_such(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "snap"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code = main(["trace", "--suspect", "org/cached"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "the cached snapshot of org/cached holds no .safetensors weights, and HF_HUB_OFFLINE is set" in err
    assert "run once with network access" in err


@pytest.mark.parametrize(("shape", "said", "fix"), [
    (dict(hidden=64, layers=4, intermediate=16), "hidden size is 64, the original's 128", "a width-pruned copy"),
    (dict(hidden=128, layers=3, intermediate=16), "the suspect has 3 MoE layers, the original 4", "layers dropped"),
    (dict(hidden=128, layers=4, intermediate=8), "experts have 8 neurons, the original's 16", "neurons pruned"),
])
def test_a_suspect_of_another_shape_is_not_traced_and_nothing_is_concluded(shape, said, fix):
    """A copy narrowed or with layers dropped may still be cut from the original: the refusal must not
    read as a finding ("an unrelated architecture", before)."""
    from moeguard.trace.api import check_shape

    with pytest.raises(MoeguardError) as e:
        check_shape({"hidden": 128, "layers": [None] * 4, "intermediate": 16}, **shape)
    assert said in e.value.message and e.value.message.endswith("no evidence either way"), e.value.message
    assert fix in e.value.hint and "unrelated" not in str(e.value)


def test_the_report_names_the_combination_it_used(embedded, fp, monkeypatch):
    """Where the exact count runs past its budget, Fisher's bound combines the layers: the document's
    description said "the exact product-of-uniforms tail" all the same."""
    from moeguard.trace import stats

    m, tok = embedded
    pruned, _ = prune_model(m, KEEP)
    exact = run_trace(fp, weights(pruned, tok))
    assert exact["combination"] == "exact" and exact["test"].endswith("the exact product-of-uniforms tail")
    monkeypatch.setattr(stats, "COUNT_BUDGET", 0)
    bound = run_trace(fp, weights(pruned, tok))
    assert bound["combination"] == "fisher" and "Fisher's method" in bound["test"] and "exact product" not in bound["test"]
    assert bound["p_value"] >= exact["p_value"] and bound["verdict"] == exact["verdict"] == "derived"


def test_what_trace_reads_decides_quantized_not_a_buffer_beside_it(tmp_path):
    """An int64 buffer beside float weights was refused as "quantized"; experts in a dtype outside the
    list (int16, float4) reached a KeyError traceback in the column gather."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moeguard.models.loading import resolve
    from moeguard.trace import stream

    d = tmp_path / "c"
    shutil.copytree(resolve(None).path, d)
    sd = load_file(d / "model.safetensors")
    save_file({**sd, "model.position_ids": torch.arange(16, dtype=torch.int64)}, d / "model.safetensors",
              metadata={"format": "pt"})
    assert stream.StreamedCheckpoint.open(str(d)).layers      # opens: the buffer is not what trace reads
    key = next(k for k in sd if "experts" in k)
    save_file({**sd, key: sd[key].to(torch.int16)}, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoeguardError, match=r"stores quantized weights \(I16\)") as e:
        stream.StreamedCheckpoint.open(str(d))
    assert "dequantize it first" in e.value.hint


def _counting_sketches(monkeypatch, *, stop_at=None):
    """Record (side, position) of every layer streamed; raise KeyboardInterrupt at ``stop_at``."""
    from moeguard.trace.stream import StreamedCheckpoint

    real, calls = StreamedCheckpoint.sketch, []

    def sketch(self, position, H, frame):
        side = "suspect" if "suspect" in str(self.name) else "original"
        if (side, position) == stop_at:
            raise KeyboardInterrupt
        calls.append((side, position))
        return real(self, position, H, frame)

    monkeypatch.setattr(StreamedCheckpoint, "sketch", sketch)
    return calls


def _without_run(doc):
    return {k: v for k, v in doc.items() if k != "run"}


def test_an_interrupted_trace_resumes_from_the_layers_it_read(embedded, tmp_path, monkeypatch, capsys):
    m, tok = embedded
    for name, keep in (("suspect", KEEP), ("suspect_b", {0: [2, 5], 1: [1, 3], 2: [0, 7], 3: [4, 6]})):
        pruned, _ = prune_model(m, keep)
        pruned.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out, partial = tmp_path / "t", tmp_path / ".t.partial"
    with monkeypatch.context() as mp:
        calls = _counting_sketches(mp)
        assert main(["trace", "--suspect", str(tmp_path / "suspect"), "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "trace.json").read_text())
    assert calls == [("original", p) for p in range(4)] + [("suspect", p) for p in range(4)]
    capsys.readouterr()

    with monkeypatch.context() as mp:    # Ctrl-C while the suspect's third MoE layer is read
        _counting_sketches(mp, stop_at=("suspect", 2))
        assert main(["trace", "--suspect", str(tmp_path / "suspect"), "--out", str(out)]) == 130
    assert f"the work done so far is kept in {partial}: run the same command again to resume" in capsys.readouterr().err
    assert not out.exists() and partial.is_dir()
    with monkeypatch.context() as mp:    # the rerun reads only what the interrupt left unread
        calls = _counting_sketches(mp)
        assert main(["trace", "--suspect", str(tmp_path / "suspect"), "--out", str(out)]) == 0
    assert calls == [("suspect", 2), ("suspect", 3)]
    assert _without_run(json.loads((out / "trace.json").read_text())) == _without_run(whole)
    assert not partial.exists()          # the kept layers go once the report is written

    with monkeypatch.context() as mp:    # interrupted, then run against another suspect: its layers are its own
        _counting_sketches(mp, stop_at=("suspect", 3))
        assert main(["trace", "--suspect", str(tmp_path / "suspect"), "--out", str(tmp_path / "u")]) == 130
    with monkeypatch.context() as mp:
        calls = _counting_sketches(mp)
        assert main(["trace", "--suspect", str(tmp_path / "suspect_b"), "--out", str(tmp_path / "u")]) == 0
    assert calls == [("suspect", p) for p in range(4)]     # the original's layers are still the original's
    doc = json.loads((tmp_path / "u" / "trace.json").read_text())
    assert {l["layer"]: l["kept"] for l in doc["layers"]} == {0: [2, 5], 1: [1, 3], 2: [0, 7], 3: [4, 6]}
    with monkeypatch.context() as mp:    # without --out nothing is kept, nothing is read back
        calls = _counting_sketches(mp)
        capsys.readouterr()
        assert main(["trace", "--suspect", str(tmp_path / "suspect"), "--json"]) == 0
    assert len(calls) == 8 and not list(tmp_path.glob(".*.partial"))
    out, err = capsys.readouterr()
    assert json.loads(out)["verdict"] and "tracing MoE layers" in err   # --json: the bar on stderr, stdout the JSON


def test_an_interrupted_fingerprint_resumes_and_writes_the_same_bytes(tmp_path, monkeypatch, capsys):
    from moeguard.trace.fingerprint import digest

    assert main(["fingerprint", "--out", str(tmp_path / "whole")]) == 0
    with monkeypatch.context() as mp:
        _counting_sketches(mp, stop_at=("original", 1))
        assert main(["fingerprint", "--out", str(tmp_path / "fp")]) == 130
    assert f"kept in {tmp_path / '.fp.partial'}" in capsys.readouterr().err
    with monkeypatch.context() as mp:
        calls = _counting_sketches(mp)
        assert main(["fingerprint", "--out", str(tmp_path / "fp")]) == 0
    assert calls == [("original", 1), ("original", 2), ("original", 3)]
    assert digest(tmp_path / "fp") == digest(tmp_path / "whole") and not (tmp_path / ".fp.partial").exists()
    with monkeypatch.context() as mp:    # another seed reads every layer again, in its own frame
        _counting_sketches(mp, stop_at=("original", 2))
        assert main(["fingerprint", "--out", str(tmp_path / "s1"), "--seed", "1"]) == 130
    with monkeypatch.context() as mp:
        calls = _counting_sketches(mp)
        assert main(["fingerprint", "--out", str(tmp_path / "s1"), "--seed", "2"]) == 0
    assert calls == [("original", p) for p in range(4)]


def test_a_gguf_suspects_identity_follows_its_bytes(tmp_path):
    from moeguard.trace.resume import source_identity

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(64))
    first = source_identity(str(f))
    assert first["files"][0][:2] == ["m.gguf", 68]
    f.write_bytes(b"GGUF" + bytes(63) + b"\x01")     # same size, other bytes
    assert source_identity(str(f))["files"][0][3] != first["files"][0][3]


def test_a_kept_sketch_cut_short_is_read_again_not_a_traceback(tmp_path):
    """A power loss after the rename can leave a kept .npz empty or cut: np.load raised on every rerun."""
    from moeguard.kept import kept_arrays

    for damaged in (b"", b"PK\x03\x04 cut short"):
        (tmp_path / ".s.npz").write_bytes(damaged)
        got = kept_arrays(tmp_path, "s", lambda: {"a": np.arange(3.0)})
        assert got["a"].tolist() == [0.0, 1.0, 2.0]
        assert kept_arrays(tmp_path, "s", lambda: pytest.fail("computed again"))["a"].tolist() == [0.0, 1.0, 2.0]


def test_a_trace_resumed_after_an_upgrade_reads_every_layer_again(embedded, tmp_path, monkeypatch, capsys):
    """The kept sketches were keyed by moeguard's version string, the same at every commit: a trace
    interrupted, upgraded and resumed mixed layers sketched by two versions of the code."""
    import moeguard.provenance as provenance

    m, tok = embedded
    pruned, _ = prune_model(m, KEEP)
    pruned.save_pretrained(tmp_path / "suspect")
    tok.save_pretrained(tmp_path / "suspect")
    args = ["trace", "--suspect", str(tmp_path / "suspect"), "--out", str(tmp_path / "t")]
    monkeypatch.setattr(provenance, "git_commit", lambda: "a" * 40)
    with monkeypatch.context() as mp:
        _counting_sketches(mp, stop_at=("suspect", 2))
        assert main(args) == 130
    monkeypatch.setattr(provenance, "git_commit", lambda: "b" * 40)     # the code changed since
    with monkeypatch.context() as mp:
        calls = _counting_sketches(mp)
        assert main(args) == 0
    assert calls == [("original", p) for p in range(4)] + [("suspect", p) for p in range(4)]


def test_a_library_caller_s_original_under_home_is_read_as_its_fingerprint(embedded, tmp_path, monkeypatch):
    """'~/fp' was not expanded: the fingerprint folder was taken for a checkpoint and refused as
    having no config.json."""
    from moeguard.trace import trace

    m, tok = embedded
    pruned, _ = prune_model(m, KEEP)
    pruned.save_pretrained(tmp_path / "suspect")
    tok.save_pretrained(tmp_path / "suspect")
    assert main(["fingerprint", "--out", str(tmp_path / "fp")]) == 0
    monkeypatch.setenv("HOME", str(tmp_path))
    doc = trace("~/fp", str(tmp_path / "suspect"))
    assert {l["layer"]: l["kept"] for l in doc["layers"]} == KEEP


def _gguf_fields(path, shapes, *, blocks, uint32=None):
    """_gguf with a block count and uint32 fields named as given (``{"llama.nextn_predict_layers": 1}``)."""
    return _gguf(path, shapes, blocks=blocks, uint32=uint32)


_LAYER_SHAPES = {"blk.{i}.attn_norm.weight": (8,), "blk.{i}.ffn_gate_inp.weight": (4, 8),
                 "blk.{i}.ffn_gate_exps.weight": (4, 16, 8), "blk.{i}.ffn_up_exps.weight": (4, 16, 8),
                 "blk.{i}.ffn_down_exps.weight": (4, 8, 16)}


def _blocks(*indices):
    return {"token_embd.weight": (32, 8), **{k.format(i=i): v for i in indices for k, v in _LAYER_SHAPES.items()}}


def test_a_gguf_s_multi_token_prediction_block_is_not_a_decoder_layer(tmp_path):
    """GLM-4.5 in llama.cpp's GGUF: block_count counts the NextN block, written as the last blk.N with a
    router and experts: read as one more MoE layer, an exact copy was refused as "layers dropped"."""
    from moeguard.trace.gguf import load_gguf

    shapes = {**_blocks(0, 1, 2), "blk.2.nextn.eh_proj.weight": (8, 16)}
    w = load_gguf(_gguf_fields(tmp_path / "glm.gguf", shapes, blocks=3, uint32={"llama.nextn_predict_layers": 1}))
    assert [l.index for l in w.layers] == [0, 1]
    # the NextN tensors alone say so too (a converter that did not write the field)
    w = load_gguf(_gguf_fields(tmp_path / "glm2.gguf", shapes, blocks=3))
    assert [l.index for l in w.layers] == [0, 1]


def test_a_gguf_of_one_tensor_per_expert_is_read(tmp_path):
    """llama.cpp's layout before stacked expert tensors (2024; TheBloke's Mixtral GGUFs): it was refused
    as "incomplete or split, download it again", which could not help."""
    from moeguard.trace.gguf import load_gguf

    shapes = {"token_embd.weight": (32, 8)}
    for i in (0, 1):
        shapes.update({f"blk.{i}.attn_norm.weight": (8,), f"blk.{i}.ffn_gate_inp.weight": (4, 8)})
        for e in range(4):
            shapes.update({f"blk.{i}.ffn_gate.{e}.weight": (16, 8), f"blk.{i}.ffn_up.{e}.weight": (16, 8),
                           f"blk.{i}.ffn_down.{e}.weight": (8, 16)})
    w = load_gguf(_gguf_fields(tmp_path / "old.gguf", shapes, blocks=2))
    assert [l.index for l in w.layers] == [0, 1]
    assert w.layers[0].gate.shape == (4, 16, 8) and w.layers[1].down.shape == (4, 8, 16)
    assert w.layers[0].up[3].shape == (16, 8) and w.layers[0].up[3].sum() == 16 * 8


def test_a_damaged_gguf_block_count_or_expert_tensor_is_one_line_and_quick(tmp_path):
    import time

    from moeguard.trace.gguf import load_gguf

    started = time.perf_counter()   # 2^32 - 1 blocks looped for an hour before anything was checked
    w = load_gguf(_gguf_fields(tmp_path / "huge.gguf", _blocks(0, 1), blocks=2**32 - 1))
    assert [l.index for l in w.layers] == [0, 1] and time.perf_counter() - started < 10
    with pytest.raises(MoeguardError, match=r"says it has 1 blocks \(llama.block_count\), and its tensors name 2"):
        load_gguf(_gguf_fields(tmp_path / "short.gguf", _blocks(0, 1), blocks=1))
    zero = {**_blocks(0), "blk.0.ffn_gate_exps.weight": (0, 16, 8)}   # an IndexError at data[0]
    with pytest.raises(MoeguardError, match=r"blk.0.ffn_gate_exps.weight has shape \[0, 16, 8\], expected"):
        load_gguf(_gguf_fields(tmp_path / "zero.gguf", zero, blocks=1))


def test_a_crafted_gguf_s_names_and_per_expert_shapes_are_one_line_and_quick(tmp_path):
    """A suspect's GGUF is the adversary's file: a tensor named blk.4294967294.* looped over every
    number up to it, 'blk.².*' was an int() ValueError, and one expert of another shape (only expert 0's
    was checked) broadcast into the sketch or failed inside it."""
    import time

    from moeguard.trace.gguf import load_gguf

    started = time.perf_counter()
    far = {**_blocks(0, 1), "blk.4294967294.attn_norm.weight": (8,)}
    w = load_gguf(_gguf_fields(tmp_path / "far.gguf", far, blocks=2**32 - 1))
    assert [l.index for l in w.layers] == [0, 1] and time.perf_counter() - started < 10
    w = load_gguf(_gguf_fields(tmp_path / "sup.gguf", {**_blocks(0, 1), "blk.².attn_norm.weight": (8,)}, blocks=2))
    assert [l.index for l in w.layers] == [0, 1]
    shapes = {"token_embd.weight": (32, 8), "blk.0.attn_norm.weight": (8,), "blk.0.ffn_gate_inp.weight": (4, 8)}
    for e in range(4):
        shapes.update({f"blk.0.ffn_gate.{e}.weight": (16, 8), f"blk.0.ffn_up.{e}.weight": (1 if e == 2 else 16, 8),
                       f"blk.0.ffn_down.{e}.weight": (8, 16)})
    with pytest.raises(MoeguardError, match=r"blk.0.ffn_up.2.weight has shape \[1, 8\], expert 0 of "
                                            r"blk.0.ffn_up.\*.weight \[16, 8\]"):
        load_gguf(_gguf_fields(tmp_path / "odd.gguf", shapes, blocks=1))
    no_up = {k: v for k, v in shapes.items() if ".ffn_up." not in k}
    with pytest.raises(MoeguardError, match=r"blk.0.ffn_up.\*.weight has shape \[0\], expected \[4, 16, 8\]"):
        load_gguf(_gguf_fields(tmp_path / "noup.gguf", no_up, blocks=1))


def test_a_fingerprint_made_on_the_fly_traces_as_the_same_fingerprint_saved(embedded, tmp_path, capsys):
    """On the fly it was float64 and saved it is float16: similarities differed in the third decimal and p
    could move where the null ties, so a result from the checkpoint could not be reproduced from the
    published fingerprint."""
    from moeguard.models.loading import resolve

    m, tok = embedded
    pruned, _ = prune_model(m, KEEP)
    pruned.save_pretrained(tmp_path / "suspect")
    tok.save_pretrained(tmp_path / "suspect")
    original = str(resolve(None).path)
    assert main(["fingerprint", "--model", original, "--out", str(tmp_path / "fp")]) == 0
    docs = []
    for given in (original, str(tmp_path / "fp")):
        capsys.readouterr()
        assert main(["trace", "--original", given, "--suspect", str(tmp_path / "suspect"), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        docs.append({k: v for k, v in doc.items() if k not in ("run", "original", "seconds")})
    assert docs[0] == docs[1]
