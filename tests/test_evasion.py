"""route-attack against a monitor the attacker holds (``--evade``): the screen gives each request the
p-value ``monitor score`` gives it, the search ranks candidates by it first, and the command reports
what the monitor passes; bad settings are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.models.adapter import MoEAdapter
from moeguard.models.loading import load_model
from moeguard.monitor.hijack import HijackConfig, search
from moeguard.monitor.routertap import allowed_tokens
from moeguard.tasks.registry import get_task

FAST = dict(prefix_tokens=6, steps=12, candidates=32, topk=16, train_inputs=4, eval_inputs=8, eval_limit=16)


@pytest.fixture(scope="module")
def embedded():
    m, tok, _ = load_model(None)
    return m, tok, MoEAdapter(m)


@pytest.fixture(scope="module")
def profile(embedded):
    from moeguard.monitor.fit import build

    m, tok, _ = embedded
    prompts = {"cmp": [f"Is {i} greater than {3 * i % 17}?" for i in range(80)],
               "code": [f"def f{i}(x):\n    return x + {i}" for i in range(80)]}
    return build(m, tok, prompts, window=2, windows=20, seed=0, name="embedded")


def test_the_screen_gives_each_request_the_p_value_monitor_score_gives_it(embedded, profile):
    from moeguard.monitor.evasion import MonitorScreen
    from moeguard.monitor.score import score

    m, tok, adapter = embedded
    screen = MonitorScreen(profile=profile, model=m, tokenizer=tok, adapter=adapter, p_target=0.5)
    questions = [f"Is {i} greater than {3 * i % 17}?" for i in (81, 90, 95)]
    # a suffix's inputs end with the separator, encoded with it as the request is (hijack._inputs)
    inputs = [tok.encode(q + "\n", add_special_tokens=False) for q in questions]
    texts = [tok.encode(" the", add_special_tokens=False) * 3, [int(t) for t in np.arange(3000, 3006)]]
    prompts = [p for t in texts for p in screen.texts(t, inputs, "suffix")]
    assert prompts[0].startswith("Is 81 greater than 5?\n") and prompts[0].endswith(tok.decode(texts[0]))
    records = [{"id": str(i), "client": "c", "time": i, "prompt": p, "_t": float(i)} for i, p in enumerate(prompts)]
    scores, _, _, _ = score(m, tok, profile, records, window=2, alpha=0.2)
    p = screen.p_values(prompts)
    assert np.allclose(p, [s["p"] for s in scores])
    ev = screen.evasion(texts, inputs, "suffix")
    assert ev.shape == (2, 2) and np.allclose(ev[:, 0], (p.reshape(2, 3) >= 0.5).mean(1))
    assert np.allclose(ev[:, 1], np.minimum(1, p.reshape(2, 3) / 0.5).mean(1))
    # six arbitrary token ids after the question are as far out as the profile can say; the questions alone are not
    assert np.allclose(p[3:], profile.p_floor("request"))
    assert np.median(screen.p_values(questions)) > 2 * profile.p_floor("request")


class _EvenScreen:
    """A monitor that passes a text by the share of its token ids that are even."""

    def evasion(self, texts, inputs, position):
        even = np.array([[t % 2 == 0 for t in x] for x in texts], dtype=float)
        return np.stack([(even.mean(1) == 1).astype(float), even.mean(1)], axis=1)


def test_a_screened_search_ranks_candidates_by_evasion_first(embedded):
    m, tok, adapter = embedded
    task = get_task("arith-compare")
    allowed = allowed_tokens(tok, m.get_input_embeddings().weight.shape[0])
    cfg = HijackConfig(layer=0, expert=0, seed=0, evade_p=0.5, **FAST)
    plain = search(m, tok, adapter, task, cfg, allowed=allowed)
    screened = search(m, tok, adapter, task, cfg, allowed=allowed, screen=_EvenScreen())
    assert "train_evading" not in plain and "evading" not in plain["curve"][0]
    start = screened["curve"][0]["evasion_mean"]
    assert start < 1.0 and screened["train_evading"] == 1.0, screened["curve"]
    assert all(t % 2 == 0 for t in screened["prefix_ids"]) and not all(t % 2 == 0 for t in plain["prefix_ids"])
    assert screened["curve"][screened["best_step"]]["evading"] == 1.0


def test_the_two_orders_rank_evasion_or_the_hijack_first():
    from moeguard.monitor.evasion import rank

    hidden, loud = (1.0, 1.0), (0.0, 0.2)
    # evasion first: a hidden weak hijack beats a loud strong one
    assert rank("evasion", hidden, 0.3, 1.0) > rank("evasion", loud, 1.0, 0.1)
    # hijack first: up to the 90% bar routing wins; at the bar, the hidden one; beyond it, success breaks ties
    assert rank("hijack", loud, 0.8, 0.1) > rank("hijack", hidden, 0.3, 1.0)
    assert rank("hijack", hidden, 0.9, 1.0) > rank("hijack", loud, 1.0, 0.1)
    assert rank("hijack", hidden, 0.95, 1.0) > rank("hijack", hidden, 0.92, 0.5)
    # without a screen every text passes: both orders rank as the unscreened search did (success, then loss)
    for order in ("evasion", "hijack"):
        assert rank(order, (1.0, 1.0), 0.5, 2.0) > rank(order, (1.0, 1.0), 0.5, 3.0) > rank(order, (1.0, 1.0), 0.4, 0.1)


def test_route_attack_against_a_profile_reports_what_the_monitor_passes(embedded, profile, tmp_path, capsys):
    from moeguard.io import dumps

    P = tmp_path / "P.json"
    P.write_text(dumps(profile.to_dict()))
    out = tmp_path / "ra"
    args = ["route-attack", "--out", str(out), "--layer", "0", "--expert", "1", "--prefix-tokens", "3", "--steps", "2",
            "--candidates", "4", "--evade", str(P), "--evade-p", "0.25"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "monitor passes (p >= 0.25)" in text, text
    doc = json.loads((out / "route_attack.json").read_text())
    assert doc["config"]["evade_p"] == 0.25 and doc["summary"]["evasion"]["p_target"] == 0.25
    m = doc["targets"][0]["measured"]["monitor"]
    assert set(m) == {"p_target", "passing", "p_median", "passing_without", "p_median_without"}
    assert 0 <= m["passing"] <= 1 and 0 < m["p_median"] <= 1
    assert "train_evading" in doc["targets"][0] and "evading" in doc["targets"][0]["curve"][0]
    assert doc["run"]["settings"]["evade_profile"] and len(doc["run"]["settings"]["evade_profile"]) == 64
    t = doc["targets"][0]
    passing = t["measured"]["success"] >= 0.9 and m["passing"] >= 0.9
    assert doc["summary"]["evasion"]["hijacked_passing"] == ([[0, 1]] if passing else [])


def test_bad_evasion_settings_are_one_line_errors(profile, tmp_path, capsys):
    from moeguard.io import dumps
    from moeguard.monitor.routeattack import run

    P = tmp_path / "P.json"
    P.write_text(dumps(profile.to_dict()))
    base = ["route-attack", "--out", str(tmp_path / "x"), "--layer", "0", "--expert", "1"]
    (tmp_path / "dir").mkdir()   # a folder given as the profile
    for extra, needle in ((["--evade", str(P), "--evade-p", "0"], "--evade-p is 0.0"),
                          (["--evade", str(P), "--evade-p", "1.5"], "--evade-p is 1.5"),
                          (["--evade", str(tmp_path / "none.json")], f"routing profile {tmp_path / 'none.json'} does not exist"),
                          (["--evade-p", "0.5"], "--evade-p and --evade-order need the monitor's profile"),
                          (["--evade", str(P), "--evade-order", "stealth"], "evade order 'stealth' is not one of evasion, hijack"),
                          (["--evade", str(tmp_path / "dir")], "routing profile")):
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and needle in err, (extra, err)
    other = json.loads(P.read_text())
    other["model"] = "someone/else"   # a profile of another model (no weights digest: compared by name)
    other.pop("weights", None)
    (tmp_path / "Q.json").write_text(json.dumps(other))
    assert main([*base, "--evade", str(tmp_path / "Q.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "the profile was made for" in err, err
    other = json.loads(P.read_text())
    other["top_k"] = 3     # this model's name, other routing: refused from its config, before the model loads
    (tmp_path / "R.json").write_text(json.dumps(other))
    assert main([*base, "--evade", str(tmp_path / "R.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "the profile was made with top-3 routing, the model routes top-2" in err, err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))   # no partial folder either
    with pytest.raises(MoeguardError, match="evade_p is 1.5"):
        HijackConfig(layer=0, expert=0, evade_p=1.5).check()
    with pytest.raises(MoeguardError, match="an evasion target needs the monitor's profile"):
        run(None, get_task("arith-compare"), [(0, 1)], HijackConfig(layer=0, expert=1, evade_p=0.5), out=tmp_path / "y")
