"""A model trained in float32 from bf16 weights (harden, realign) is written as its source stores
them: an owner releases the bf16 checkpoint it hardened, not one twice its size, and an attacker's
re-aligned checkpoint is as large as the pruned one it came from."""

import json

import pytest
import torch

from moeguard.cli import main
from moeguard.io import read_header
from moeguard.models.safetensorsfiles import safetensors_files


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    """The embedded model stored in bf16, its config saying so; and a cut of it to 2 experts."""
    from moeguard.models.loading import load_model

    d = tmp_path_factory.mktemp("bf16")
    model, tok, _ = load_model(None)
    model.to(torch.bfloat16).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    assert _config_dtype(d / "model") == "bfloat16" and _stored(d / "model") == {"BF16"}
    plan = d / "plan.json"
    plan.write_text(json.dumps({"keep": {str(l): [0, 1] for l in range(4)}}))
    assert main(["prune", "--model", str(d / "model"), "--plan", str(plan), "--out", str(d / "keep2")]) == 0
    assert _stored(d / "keep2") == {"BF16"}
    return d


def _stored(folder) -> set[str]:
    return {v["dtype"] for f in safetensors_files(folder) for k, v in read_header(f).items() if k != "__metadata__"}


def _config_dtype(folder) -> str:
    config = json.loads((folder / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")


def test_harden_writes_the_source_s_dtype(bf16, tmp_path):
    out = tmp_path / "hardened"
    assert main(["harden", "--model", str(bf16 / "model"), "--method", "selective", "--steps", "2",
                 "--out", str(out)]) == 0
    assert _stored(out) == {"BF16"}            # it was F32: the run trains in float32
    assert _config_dtype(out) == "bfloat16"    # and loads as it is stored, not up-cast again
    from moeguard.pruning.apply import checkpoint_dtype
    from moeguard.models.loading import inspect

    assert checkpoint_dtype(inspect(str(out))[0]) == torch.bfloat16


def test_realign_writes_the_pruned_checkpoint_s_dtype(bf16, tmp_path):
    out = tmp_path / "realigned"
    assert main(["realign", "--model", str(bf16 / "keep2"), "--task", "arith-compare", "--budget", "8",
                 "--query-size", "8", "--min-steps", "5", "--epochs", "1", "--eval-limit", "16",
                 "--pool-size", "32", "--out", str(out)]) == 0
    assert _stored(out) == {"BF16"} and _config_dtype(out) == "bfloat16"
    from safetensors.torch import load_file

    before, after = load_file(str(bf16 / "keep2" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)   # it trained


def test_a_float32_source_is_written_as_before(tmp_path):
    """keep_source_dtypes leaves a run whose source is float32 as save_pretrained wrote it."""
    from moeguard.models.loading import load_model
    from moeguard.pruning.apply import keep_source_dtypes, weights_folder

    model, _, ref = load_model(None, with_tokenizer=False)
    model.save_pretrained(tmp_path / "out")
    before = (tmp_path / "out" / "config.json").read_text()
    assert keep_source_dtypes(tmp_path / "out", weights_folder(ref)) == []
    assert (tmp_path / "out" / "config.json").read_text() == before and _stored(tmp_path / "out") == {"F32"}
