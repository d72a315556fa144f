"""Review of defense/: hardening examples keep their targets, offloaded weights are refused, the
objective's weights cannot be negative, task files are inputs, and an early interrupt says that
nothing was kept."""

from __future__ import annotations

import random

import pytest

from moeguard.cli import main
from moeguard.defense.harden import HardenConfig, _examples, config_for, harden
from moeguard.errors import MoeguardError
from moeguard.models.loading import load_model
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task


def _one_line(code: int, err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("moeguard: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_hardening_examples_keep_their_targets_within_the_context():
    """Cutting each sequence's end at the context dropped code-naming's long functions (their name,
    the target, comes last) and cut others mid-target."""
    _, tok, _ = load_model(None)
    task = get_task("code-naming")
    cfg = HardenConfig(context=64, records_per_task=200)
    ex = _examples(tok, task, cfg, random.Random(0))
    assert len(ex) == 200                           # none dropped (before: those longer than the context)
    recs = load_records(task, "train")
    random.Random(0).shuffle(recs)
    for e, r in zip(ex, recs[:200]):
        assert len(e.ids) <= 64
        target = [t for t in e.labels if t != -100]
        # the whole target, the record's name and the end of text, at the sequence's end
        assert tok.decode(target).strip().startswith(r["target"].strip()), (tok.decode(target), r["target"])
        assert e.labels[-1] != -100


def test_a_model_with_offloaded_weights_is_refused_before_training(monkeypatch):
    import moeguard.realign.offload as offload

    m, tok, _ = load_model(None)
    monkeypatch.setattr(offload, "offloaded", lambda model: True)
    with pytest.raises(MoeguardError, match="some of this model's are offloaded by accelerate"):
        harden(m, tok, config_for("entangle", steps=1))


@pytest.mark.parametrize("flag", ["--collapse", "--adversarial", "--balance"])
def test_a_negative_objective_weight_is_refused(tmp_path, capsys, flag):
    """It trained the model to be easier to prune, recorded as the defense."""
    capsys.readouterr()
    line = _one_line(main(["harden", flag, "-1", "--steps", "1", "--out", str(tmp_path / "h")]), capsys.readouterr().err)
    assert "-1" in line and flag.lstrip("-") in line.replace("-", ""), line
    with pytest.raises(MoeguardError, match="target is 0.0; it must be at least 1e-06"):
        HardenConfig(target=0.0)
    assert not (tmp_path / "h").exists()


def test_a_task_file_is_an_input_harden_will_not_replace(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    data = mine / "data"
    data.mkdir()
    for split in ("train", "eval"):
        (data / f"{split}.jsonl").write_text("".join('{"input": "Is %d greater than 3?", "label": %d}\n' % (i, int(i > 3))
                                                     for i in range(20)))
    (mine / "t.yaml").write_text("name: mine-cmp\nkind: classification\nsource: {type: local, path: data, format: jsonl}\n"
                                 "fields: {input: input, label: label}\nsplits: {train: train, eval: eval}\n"
                                 "labels: {0: ' no', 1: ' yes'}\nprompt: '{input} Answer:'\n")
    capsys.readouterr()
    line = _one_line(main(["harden", "--tasks", str(mine / "t.yaml"), "--steps", "1", "--out", str(mine), "--overwrite"]),
                     capsys.readouterr().err)
    assert "is (or holds) the input" in line and "t.yaml" in line, line
    assert (mine / "t.yaml").exists()


def test_an_interrupt_before_the_first_saved_state_says_nothing_was_kept(tmp_path, capsys, monkeypatch):
    import moeguard.defense.harden as H

    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(H, "harden", stop)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["harden", "--steps", "1", "--out", str(tmp_path / "h")])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "interrupted before the first saved training state" in err
    assert "run the same command again to resume" not in err and not list(tmp_path.iterdir())


def test_a_summary_that_generates_more_than_the_context_leaves_is_fitted_not_refused():
    """cnn-dailymail's preset generates 128 tokens; fitted to a context of 128 its task check failed."""
    import dataclasses

    _, tok, _ = load_model(None)
    long = dataclasses.replace(get_task("record-summary"), max_new_tokens=128)
    ex = _examples(tok, long, HardenConfig(context=128, records_per_task=20), random.Random(0))
    assert len(ex) == 20 and all(len(e.ids) <= 128 for e in ex)
