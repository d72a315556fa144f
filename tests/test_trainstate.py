"""The training state every trainer resumes from (moeguard/trainstate.py): what it keeps, how it
survives a crash, and what it refuses before touching a model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from moeguard import trainstate


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    return net, opt


def _saved(tmp_path, *, step: int):
    """A trained layer, its parameters, its optimizer, and its state saved at ``step`` in tmp_path/state."""
    net, opt = _trained()
    params = dict(net.named_parameters())
    state = tmp_path / "state"
    trainstate.save(state, tag="t", step=step, params=params, optimizer=opt)
    return net, opt, params, state


def test_a_restored_state_continues_exactly_as_the_run_it_was_saved_from(tmp_path):
    net, opt = _trained()
    pyrng = random.Random(5)
    pyrng.random()
    trainstate.save(tmp_path / "s", tag="t", step=7, params=dict(net.named_parameters()), optimizer=opt, pyrng=pyrng,
                    tensors={"shares": torch.arange(4.0)}, meta={"log": [{"step": 1}]})
    expect_py, expect_torch = pyrng.random(), torch.rand(3)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    expect = {n: p.detach().clone() for n, p in net.named_parameters()}

    other, other_opt = _trained(seed=1)            # another process: other weights, a fresh optimizer
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    state = trainstate.load(tmp_path / "s", tag="t", params=dict(other.named_parameters()))
    assert state.step == 7 and state.meta == {"log": [{"step": 1}]} and torch.equal(state.tensors["shares"], torch.arange(4.0))
    py = random.Random(0)
    torch.manual_seed(123)
    state.restore(dict(other.named_parameters()), other_opt, pyrng=py)
    assert py.random() == expect_py and torch.equal(torch.rand(3), expect_torch)
    other(torch.ones(1, 3)).sum().backward()
    other_opt.step()                               # AdamW's moments and step count came back too
    assert all(torch.equal(p, expect[n]) for n, p in other.named_parameters())


def test_a_state_survives_a_crash_between_its_two_renames_and_a_bad_one_changes_nothing(tmp_path):
    net, opt, params, state = _saved(tmp_path, step=3)
    saved = {n: p.detach().clone() for n, p in params.items()}
    state.rename(tmp_path / ".state.old")           # the crash: set aside, the new one not in place yet
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    got = trainstate.load(state, tag="t", params=params)
    assert got.step == 3
    got.restore(params, torch.optim.AdamW(net.parameters()))
    assert all(torch.equal(p, saved[n]) for n, p in params.items())
    # a foreign state (other shapes) is refused by load, which never writes into the model
    other = torch.nn.Linear(4, 2)
    assert trainstate.load(state, tag="t", params=dict(other.named_parameters())) is None
    # another run's state, and a torn one, are not trusted
    assert trainstate.load(state, tag="other run", params=params) is None
    trainstate.clear(state)
    assert not list(tmp_path.iterdir())


def test_torn_states_and_states_of_an_older_format_are_ignored(tmp_path):
    net, opt, params, state = _saved(tmp_path, step=2)
    assert trainstate.load(state, tag="t", params=params) is not None
    meta = json.loads((state / trainstate.META).read_text())
    # before one format served every trainer, fine-tuning wrote optim.<param>.<key>: that key order
    # read as this one's would restore moments into the wrong slots, so such a state starts over
    (state / trainstate.META).write_text(json.dumps({k: v for k, v in meta.items() if k != "format"}))
    assert trainstate.load(state, tag="t", params=params) is None
    (state / trainstate.META).write_text(json.dumps(meta))
    good = (state / trainstate.STATE).read_bytes()
    (state / trainstate.STATE).write_bytes(b"torn")
    assert trainstate.load(state, tag="t", params=params) is None
    (state / trainstate.STATE).write_bytes(good)
    assert trainstate.load(state, tag="t", params=params) is not None
    (state / trainstate.META).write_text("{not json")
    assert trainstate.load(state, tag="t", params=params) is None


def test_a_state_whose_optimizer_or_generator_does_not_fit_is_refused_before_anything_is_applied(tmp_path):
    from safetensors.torch import load_file, save_file

    net, opt, params, state = _saved(tmp_path, step=2)
    raw = load_file(str(state / trainstate.STATE))
    for key, bad in (("optim.exp_avg.weight", torch.zeros(5)), ("rng.torch", torch.zeros(3, dtype=torch.uint8))):
        save_file({**raw, key: bad}, str(state / trainstate.STATE))
        assert trainstate.load(state, tag="t", params=params) is None, key
    save_file(raw, str(state / trainstate.STATE))
    assert trainstate.load(state, tag="t", params=params) is not None
    # the current state lost a file (a crash mid-save on a filesystem that reorders): the set-aside one is used
    (tmp_path / ".state.old").mkdir()
    for f in (trainstate.STATE, trainstate.META):
        (tmp_path / ".state.old" / f).write_bytes((state / f).read_bytes())
    (state / trainstate.STATE).unlink()
    assert trainstate.load(state, tag="t", params=params).step == 2


def test_a_crash_while_replacing_a_broken_state_keeps_the_whole_one_set_aside(tmp_path, monkeypatch):
    net, opt, params, state = _saved(tmp_path, step=2)
    state.rename(tmp_path / ".state.old")              # the whole state, set aside
    state.mkdir()
    (state / trainstate.META).write_text("{}")          # and a broken one in its place
    real = trainstate.os.replace

    def crash(src, dst):
        if str(src).endswith(".tmp"):                   # the new state never reaches its place
            raise OSError("power loss")
        return real(src, dst)
    monkeypatch.setattr(trainstate.os, "replace", crash)
    with pytest.raises(OSError, match="power loss"):
        trainstate.save(state, tag="t", step=4, params=params, optimizer=opt)
    monkeypatch.setattr(trainstate.os, "replace", real)
    assert trainstate.load(state, tag="t", params=params).step == 2


def test_generators_of_a_gpu_run_that_cannot_be_restored_are_named_in_a_warning(tmp_path):
    from safetensors.torch import load_file, save_file

    net, opt, params, state = _saved(tmp_path, step=1)
    raw = load_file(str(state / trainstate.STATE))
    save_file({**raw, "rng.cuda.0": torch.zeros(16, dtype=torch.uint8)}, str(state / trainstate.STATE))
    got = trainstate.load(state, tag="t", params=params)
    if torch.cuda.is_available() and torch.cuda.device_count() == 1:
        pytest.skip("one CUDA device here: the generator is restored")
    with pytest.warns(UserWarning, match="saved with 1 CUDA generators"):
        got.restore(params, opt)
