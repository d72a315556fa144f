"""A checkpoint's identity includes its tokenizer (2026-12-07 review): an interrupted audit, scan or
study rerun after the tokenizer was fixed in place reused parts made with the old token ids."""

import json
import shutil

import pytest

from moeguard.errors import MoeguardError
from moeguard.models.identity import weights_digest, weights_identity
from moeguard.models.loading import resolve


def test_a_tokenizer_changed_in_place_changes_the_identity_and_the_digest(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(resolve(None).path, model)
    before, digest = weights_identity(str(model)), weights_digest(str(model))
    assert before["tokenizer"]
    config = model / "tokenizer_config.json"
    doc = json.loads(config.read_text())
    doc["add_bos_token"] = not doc.get("add_bos_token", False)
    config.write_text(json.dumps(doc))
    after = weights_identity(str(model))
    assert after["tokenizer"] != before["tokenizer"] and after["files"] == before["files"]
    assert weights_digest(str(model)) != digest


def test_a_profile_made_before_the_tokenizer_was_in_the_digest_still_matches_its_model():
    from moeguard.monitor.profile import Profile

    digest = weights_digest(None)
    old = {k: v for k, v in digest.items() if k != "tokenizer"}
    def profile(meta):   # check_model reads the metadata alone
        p = Profile.__new__(Profile)
        object.__setattr__(p, "meta", meta)
        return p
    profile({"model": "embedded", "weights": old}).check_model("embedded", digest)   # the rest agrees: accepted
    with pytest.raises(MoeguardError, match="the profile was made for other weights"):
        profile({"model": "embedded", "weights": {**digest, "tokenizer": "0" * 16}}).check_model("embedded", digest)


def test_a_profile_s_other_identity_fields_still_count_when_one_side_lacks_them():
    from moeguard.monitor.profile import Profile

    digest = weights_digest(None)
    p = Profile.__new__(Profile)
    object.__setattr__(p, "meta", {"model": "embedded", "weights": {**digest, "protocol": "ab" * 8}})
    with pytest.raises(MoeguardError, match="the profile was made for other weights"):
        p.check_model("embedded", digest)


def test_a_router_only_fine_tune_changes_the_digest_of_a_sampled_checkpoint(tmp_path, monkeypatch):
    """Over _WHOLE bytes a checkpoint is hashed by samples, and the digest (no times) missed a
    router-only fine-tune saved anywhere: a monitor profile of the original then accepted it. The
    routers are read whole; an expert's tensor is not what this reads."""
    import torch
    from safetensors.torch import load_file, save_file

    from moeguard.models import identity

    model = tmp_path / "m"
    shutil.copytree(resolve(None).path, model)
    monkeypatch.setattr(identity, "_WHOLE", 0)   # the embedded model as if it were large
    before = weights_digest(str(model))
    assert before["routers"]
    f = next(model.glob("*.safetensors"))
    tensors = load_file(f)
    routers = [k for k in tensors if k.split(".")[-2] == "gate"]
    experts = [k for k in tensors if ".experts." in k]
    assert routers and experts
    tensors[experts[0]] = tensors[experts[0]] + 1.0
    save_file(tensors, f, metadata={"format": "pt"})
    assert weights_digest(str(model))["routers"] == before["routers"]   # an expert is not a router
    tensors[routers[0]] = tensors[routers[0]] * torch.tensor(1.001, dtype=tensors[routers[0]].dtype)
    save_file(tensors, f, metadata={"format": "pt"})
    assert weights_digest(str(model))["routers"] != before["routers"]
    # a profile made before the routers were in the digest compares the rest
    from moeguard.monitor.profile import Profile

    p = Profile.__new__(Profile)
    object.__setattr__(p, "meta", {"model": "m", "weights": {k: v for k, v in before.items() if k != "routers"}})
    p.check_model("m", before)
    # one whose routers' digest alone differs says so (re-trained, or made before a bias joined the digest)
    object.__setattr__(p, "meta", {"model": "m", "weights": before})
    with pytest.raises(MoeguardError, match="the profile's routers differ from m's") as e:
        p.check_model("m", weights_digest(str(model)))
    assert e.value.hint == "profile this model again"


@pytest.mark.parametrize("bias", ["model.layers.3.feed_forward.expert_bias",              # LFM2-MoE, on the block
                                  "model.layers.3.mlp.gate.e_score_correction_bias",       # DeepSeek-V3
                                  "model.layers.3.mlp.moe_statics.e_score_correction_bias"])
def test_a_selection_bias_the_family_table_names_is_in_the_router_digest(bias, tmp_path):
    """LFM2's block-held expert_bias moves expert choices, and the router digest skipped it: a checkpoint
    whose only change was that bias kept the digest of the original."""
    import torch
    from safetensors.torch import save_file

    from moeguard.models.identity import router_digest

    f = tmp_path / "model.safetensors"
    digests = []
    for shift in (0.0, 0.5):
        save_file({bias: torch.zeros(8) + shift, "model.layers.3.feed_forward.experts.0.w1.weight": torch.ones(4, 4)}, f)
        digests.append(router_digest([f]))
    assert digests[0] is not None and digests[0] != digests[1], digests


def test_a_generation_config_changed_in_place_changes_the_identity_and_the_digest(tmp_path):
    """generation_config.json's end-of-output ids cut every generated summary (and ROUGE with it): fixed
    in place after a kill, resumed runs mixed scores made with both."""
    model = tmp_path / "m"
    shutil.copytree(resolve(None).path, model)
    before, digest = weights_identity(str(model)), weights_digest(str(model))
    assert before["generation"]
    doc = json.loads((model / "generation_config.json").read_text())
    doc["eos_token_id"] = [doc.get("eos_token_id"), 7]
    (model / "generation_config.json").write_text(json.dumps(doc))
    assert weights_identity(str(model))["generation"] != before["generation"]
    assert weights_digest(str(model)) != digest
    from moeguard.monitor.profile import Profile

    p = Profile.__new__(Profile)   # a profile made before the generation config was in the digest still matches
    object.__setattr__(p, "meta", {"model": "m", "weights": {k: v for k, v in digest.items() if k != "generation"}})
    p.check_model("m", digest)
