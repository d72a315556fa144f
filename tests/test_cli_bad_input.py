"""The bad-input matrix: every command, with a missing required option, a wrong type and an
out-of-range value, gives one line on stderr, exit code 2, no traceback and writes nothing.
Then malformed JSON/YAML wherever a file is read (plan, scores, pruning record, config, protocol,
task, model config).

A new command must add its row: ``test_matrix_covers_every_command`` fails otherwise.
"""

import json

import pytest

from moeguard.cli import app, main

# command -> {"missing": args lacking a required option, "type": args with a wrongly typed value,
# "range": args with a value out of range}; "O" stands for a fresh output path. Each entry is
# (args, text the one-line message must contain). Commands with no required option, or no
# typed/ranged option, use an unknown option or an extra argument there: still a usage error.
MATRIX = {
    "info": {"missing": (["--model"], "requires an argument"), "type": (["--json", "3"], "unexpected extra argument"),
             "range": (["--model", "O"], "does not exist")},
    "families": {"missing": (["--model-types"], "requires an argument"), "type": (["--json", "x"], "unexpected extra argument"),
                 "range": (["--model-types", "mixtrl"], "does not know")},
    "tasks": {"missing": (["--jsn"], "No such option"), "type": (["--json", "x"], "unexpected extra argument"),
              "range": (["extra"], "unexpected extra argument")},
    "methods": {"missing": (["--jsn"], "No such option"), "type": (["--json", "x"], "unexpected extra argument"),
                "range": (["extra"], "unexpected extra argument")},
    "strategies": {"missing": (["--jsn"], "No such option"), "type": (["--json", "x"], "unexpected extra argument"),
                   "range": (["extra"], "unexpected extra argument")},
    "defenses": {"missing": (["--jsn"], "No such option"), "type": (["--json", "x"], "unexpected extra argument"),
                 "range": (["extra"], "unexpected extra argument")},
    "eval": {"missing": (["--tasks"], "requires an argument"), "type": (["--limit", "abc"], "--limit"),
             "range": (["--limit", "0"], "--limit")},
    "attribute": {"missing": (["--task", "arith-compare", "--out", "O"], "--method"),
                  "type": (["--task", "arith-compare", "--method", "gate", "--out", "O", "--samples", "x"], "--samples"),
                  "range": (["--task", "arith-compare", "--method", "gate", "--out", "O", "--samples", "0"], "--samples")},
    "prune": {"missing": (["--keep", "2"], "--out"), "type": (["--out", "O", "--keep", "q"], "--keep"),
              "range": (["--out", "O", "--scores", "S", "--keep", "0"], "--keep")},
    "merge": {"missing": (["--method", "average"], "--out"),
              "type": (["--out", "O", "--method", "average", "--keep", "x"], "--keep"),
              "range": (["--out", "O", "--method", "average", "--scores", "S", "--keep", "0"], "--keep")},
    "merge-methods": {"missing": (["--jsn"], "No such option"), "type": (["--json", "x"], "unexpected extra argument"),
                      "range": (["extra"], "unexpected extra argument")},
    "sweep": {"missing": (["--tasks", "arith-compare"], "--out"), "type": (["--out", "O", "--samples", "many"], "--samples"),
              "range": (["--out", "O", "--keep", "0,9"], "keep level 0")},
    "realign": {"missing": (["--task", "arith-compare", "--out", "O"], "--model"),
                "type": (["--model", "M", "--task", "arith-compare", "--out", "O", "--budget", "lots"], "--budget"),
                "range": (["--model", "M", "--task", "arith-compare", "--out", "O", "--budget", "0"], "--budget")},
    "recovery": {"missing": (["--task", "arith-compare", "--out", "O"], "--keep"),
                 "type": (["--task", "arith-compare", "--keep", "two", "--out", "O"], "--keep"),
                 "range": (["--task", "arith-compare", "--keep", "0", "--out", "O"], "--keep")},
    "attack": {"missing": (["--task", "arith-compare", "--keep", "2"], "--out"),
               "type": (["--task", "arith-compare", "--keep", "2", "--out", "O", "--seeds", "x"], "--seeds"),
               "range": (["--task", "arith-compare", "--keep", "2", "--out", "O", "--seeds", "0"], "--seeds")},
    "harden": {"missing": (["--method", "entangle"], "--out"), "type": (["--out", "O", "--steps", "x"], "--steps"),
               "range": (["--out", "O", "--steps", "0"], "--steps")},
    "defend-eval": {"missing": (["--out", "O"], "--hardened"),
                    "type": (["--hardened", "M", "--out", "O", "--budget", "x"], "--budget"),
                    "range": (["--hardened", "M", "--out", "O", "--budget", "0"], "--budget")},
    "audit": {"missing": (["--tasks", "arith-compare"], "--out"), "type": (["--out", "O", "--samples", "x"], "--samples"),
              "range": (["--out", "O", "--samples", "0"], "samples")},
    "fingerprint": {"missing": (["--seed", "1"], "--out"), "type": (["--out", "O", "--seed", "x"], "--seed"),
                    "range": (["--out", "O", "--seed", "-1"], "'--seed': Input should be greater than or equal to 0")},
    "trace": {"missing": (["--seed", "1"], "--suspect"), "type": (["--suspect", "S", "--seed", "x"], "--seed"),
              "range": (["--suspect", "S", "--seed", "-1"], "'--seed': Input should be greater than or equal to 0")},
    "route-attack": {"missing": (["--expert", "1"], "--out"), "type": (["--out", "O", "--expert", "x"], "--expert"),
                     "range": (["--out", "O", "--layer", "7", "--expert", "1"], "is not an MoE layer")},
    "monitor profile": {"missing": (["--limit", "10"], "--out"), "type": (["--out", "O", "--limit", "x"], "--limit"),
                        "range": (["--out", "O", "--limit", "2"], "--limit")},
    "monitor score": {"missing": (["--log", "O"], "--profile"),
                      "type": (["--profile", "O", "--log", "O", "--out", "O", "--alpha", "x"], "--alpha"),
                      "range": (["--profile", "O", "--log", "O", "--out", "O"], "does not exist")},
    "serve": {"missing": (["--port", "9"], "--profile"), "type": (["--profile", "O", "--port", "x"], "--port"),
              "range": (["--profile", "O", "--port", "0"], "--port")},
    "scan": {"missing": (["--seed", "1"], "--out"), "type": (["--out", "O", "--samples", "x"], "--samples"),
             "range": (["--out", "O", "--chain", "1"], "--chain is 1; expected at least 2")},
    "zoo train": {"missing": (["--out"], "requires an argument"), "type": (["--out", "O", "--steps", "x"], "--steps"),
                  "range": (["--out", "O", "--steps", "0"], "--steps")},
    "zoo suite": {"missing": (["--seed", "1"], "--out"), "type": (["--out", "O", "--seed", "x"], "--seed"),
                  "range": (["--out", "O", "--seed", "1", "extra"], "unexpected extra argument")},
}
CASES = [(cmd, kind) for cmd in MATRIX for kind in ("missing", "type", "range")]


def _commands(group, prefix=()):
    """Every leaf command of the CLI, whatever typer/click version builds it."""
    import typer

    cmd = typer.main.get_command(group) if prefix == () else group
    for name, sub in getattr(cmd, "commands", {}).items():
        if getattr(sub, "commands", None):
            yield from _commands(sub, (*prefix, name))
        else:
            yield " ".join((*prefix, name))


def assert_one_line(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("moeguard: error:"), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]


def test_matrix_covers_every_command():
    assert sorted(_commands(app)) == sorted(MATRIX)


@pytest.mark.parametrize("cmd, kind", CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_bad_input_matrix(cmd, kind, capsys, tmp_path):
    args, needle = MATRIX[cmd][kind]
    out = tmp_path / "out"
    subs = {"O": str(out), "M": str(tmp_path / "model"), "S": str(tmp_path / "scores.json")}
    args = [subs.get(a, a) for a in args]
    capsys.readouterr()
    code = main([*cmd.split(), *args])
    err = capsys.readouterr().err
    assert_one_line(code, err, needle)
    assert not out.exists() and not list(tmp_path.glob(".out*")), "a failed command left output behind"


@pytest.mark.parametrize("argv, needle", [
    (["nosuch"], "No such command 'nosuch'"),
    ([], "missing command; commands: attack, attribute, audit"),
    (["zoo"], "missing command; commands: suite, train"),
    (["zoo", "nosuch"], "No such command"),
    (["eval", "--lmit", "3"], ("No such option", "--lmit")),  # click words it "option: --x" or "option '--x'"
])
def test_usage_errors(argv, needle, capsys):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert_one_line(code, err, *(needle if isinstance(needle, tuple) else (needle,)))
    assert f"(see `moeguard{' zoo' if argv[:1] == ['zoo'] else ''}" in err


def test_debug_raises_usage_errors(capsys):
    with pytest.raises(Exception) as info:
        main(["--debug", "eval", "--limit", "0"])
    assert type(info.value).__name__ == "BadParameter" and "--limit" in info.value.format_message()
    assert capsys.readouterr().err == ""  # the traceback instead of the line, not both
    code = main(["eval", "--limit", "0"])  # --debug does not stick to later calls: the one line again
    assert_one_line(code, capsys.readouterr().err, "--limit")


def test_help_is_not_an_error(capsys):
    assert main(["eval", "--help"]) == 0
    assert "--limit" in capsys.readouterr().out


# Malformed files wherever one is read: (command, file name, content, needle)
MALFORMED = [
    ("prune --out O --plan F", "plan.json", "{not json", "plan.json is not valid JSON"),
    ("prune --out O --plan F", "plan.json", '{"keep": "all"}', "plan.json has no 'keep' map"),
    ("prune --out O --scores F --keep 2", "scores.json", "[1, 2", "scores.json is not valid JSON"),
    ("prune --out O --scores F --keep 2", "scores.json", '{"scores": "high"}', "scores.json is not a moeguard scores file"),
    ("merge --out O --method average --plan F", "plan.json", "{not json", "plan.json is not valid JSON"),
    ("merge --out O --method average --plan F", "plan.json", '{"clusters": {"0": "all"}}', "not a list of expert clusters"),
    ("merge --out O --method hc-smoe --scores F --keep 2", "scores.json", '{"scores": "high"}', "scores.json is not a moeguard scores file"),
    ("merge --out O --method average --plan F", "plan.json", '{"clusters": null, "keep": {"0": [0]}}', "has neither a 'clusters' nor a 'keep' map"),
    ("audit --out O --config F", "audit.yaml", "tasks: [a, b\n", "not valid YAML"),
    ("audit --out O --config F", "audit.yaml", "- just\n- a list\n", "expected a mapping"),
    ("audit --out O --config F", "audit.yaml", "gpus_per_job: .nan\n", "gpus_per_job is nan; it must be a finite number"),
    # the defense stage's attack grid is checked with everything else, not after the other stages ran
    ("audit --out O --config F", "audit.yaml", "defense: entangle\ndefense_modes: [bogus]\n", "unknown fine-tuning mode 'bogus'"),
    ("audit --out O --config F", "audit.yaml", "defense: entangle\ndefense_lr_scales: [-1]\n", "use positive values"),
    ("audit --out O --config F", "audit.yaml", "seed: 99999999999\n", "set seed to 4294967295 or less"),
    ("eval --tasks F", "task.yaml", "name: x\nkind: [\n", "task.yaml' is not valid YAML at line 3"),
    ("eval --tasks F", "task.yaml", "just a string\n", "task.yaml' holds a str, not a mapping"),
    ("eval --tasks F", "task.yaml",   # a name is a file name in every output: this one wrote outside --out
     'name: ../../escaped\nkind: classification\nsource: {type: local, path: x.jsonl}\nfields: {input: t, label: l}\n',
     "task name '../../escaped' is not a plain name"),
    # task definitions of the wrong types or settings no kind can run: one line, before any data or model
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: [q, l]\nlabels: {0: \" no\", 1: \" yes\"}\n",
     "a list, not a mapping"),
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: q, label: l}\nlabels: [\" no\", \" yes\"]\n",
     "has labels"),
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: data/\nfields: {input: q, label: l}\nlabels: {0: \" no\", 1: \" yes\"}\n",
     "source 'data/', a str, not a mapping"),
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: q, label: l}\nlabels: {0: \" no\", 1: \" yes\"}\ngeneration: 64\n",
     "generation '64', a int, not a mapping"),
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: q, label: l}\nlabels: {0: \" no\", 1: \" yes\"}\nmax_length: 0\n",
     "max_length 0, expected a whole number of tokens, at least 2"),
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: q, label: l}\nlabels: {0: \" no\", 1: \" yes\"}\nmax_length: 1e3\n",
     "max_length '1e3', expected a whole number"),
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: q, label: l}\nlabels: {0: \" no\", 1: \" yes\"}\nmax_length: null\n",
     "max_length None"),
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: q, label: l}\nlabels: {0: \" no\", 1: \" yes\"}\nprompt: \"Q {q\\nA:\"\n",
     "prompt that is not a template"),
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: q, label: l}\nlabels: {yes: \" yes\", no: \" no\"}\n",
     "unquoted yes/no"),
    # a tie goes to the first label: accuracy was label 0's share, silently
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: q, label: l}\nlabels: {0: \" yes\", 1: \" yes\"}\n",
     "gives labels 0 and 1 the same verbalizer ' yes': the second could never be predicted"),
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: q, label: l}\nlabels: {0: 0, 1: 1}\n",
     "verbalizer 0 for label 0"),
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\nfields: {input: q, label: l}\nlabels: {0: \" no\", 1: \" yes\"}\nmetric: f1\n",
     "asks for metric 'f1'"),
    ("eval --tasks F", "task.yaml", "name: s\nkind: summarization\nsource: {type: local, path: d, format: jsonl}\nfields: {input: a, target: b}\nmax_length: 64\ngeneration: {max_new_tokens: 64}\n",
     "leaving 0 for the input"),
    ("realign --model E --task arith-compare --out O --protocol F", "protocol.json", "{oops", "protocol.json is not valid JSON"),
    ("realign --model E --task arith-compare --out O --protocol F", "protocol.json", '{"modes": 5}', "protocol.json is not a moeguard protocol"),
    ("scan --out O --references F", "scan.json", "{broken", "scan.json is not valid JSON"),
    ("monitor score --profile F --log F --out O", "profile.json", "[" * 100_000, "is not valid JSON (nested too deeply to read)"),
    ("eval --tasks F", "task.yaml", "name: t\nkind: classification\nsource: {type: local, path: d, format: jsonl}\n"
     "fields: {input: q, label: l}\nlabels: {0: \" no\", 1: \" yes\"}\nDATA:" + "[" * 100_000,
     "is not usable JSON (nested too deeply to read)"),
    ("scan --out O --references F", "scan.json", '{"schema": "moeguard.audit/1"}', "is not a scan"),
    ("scan --out O --references F", "scan.json",   # settings of the wrong type: AttributeError once
     '{"schema": "moeguard.scan/1", "experts": [], "suspicion": {"score": "chain"}, "settings": ["x"]}', "is not a scan"),
    ("info --model D", "config.json", "{broken", "config.json' is not a valid JSON file"),
    ("info --model D", "config.json", "CONFIG:moeguard_experts_per_layer=abc", "expected a map of layer index"),
    ("info --model D", "config.json", "CONFIG:moeguard_experts_per_layer={\"0\": true}", "expert counts outside"),
    ("info --model D", "model.safetensors.index.json", '{"weight_map": [1]}', "not a valid safetensors index"),
    ("info --model D", "model.safetensors.index.json", '{"weight_map": {"a": 5}}', "not a valid safetensors index"),
    ("info --model D", "model.safetensors.index.json", '{"weight_map": {"a": ""}}', "not a valid safetensors index"),
    ("info --model D", "model.safetensors.index.json", '[1]', "not a valid safetensors index"),
    ("realign --model D --task arith-compare --out O", "moeguard_pruning.json", "{broken", "moeguard_pruning.json is not valid JSON"),
    ("realign --model D --task arith-compare --out O", "moeguard_pruning.json", "[1]", "is not a pruning record"),
    ("realign --model D --task arith-compare --out O", "moeguard_pruning.json", '{"source": 5}', "is not a pruning record"),
    ("realign --model D --task arith-compare --out O", "moeguard_pruning.json", '{"original_num_experts": "x"}',
     "is not a pruning record"),
    ("recovery --task arith-compare --keep 2 --out O --sweep F", "sweep.json", "[1, 2]", "no 'faithfulness' map"),
    ("recovery --task arith-compare --keep 2 --out O --sweep F", "sweep.json", '{"faithfulness": []}', "no 'faithfulness' map"),
    ("recovery --task arith-compare --keep 2 --out O --sweep F", "sweep.json",
     '{"faithfulness": {"arith-compare": {"gate": {"auc": "high"}}}}', "no method AUCs"),
    ("recovery --task arith-compare --keep 2 --out O --sweep F", "sweep.json",    # another model's ranking
     '{"faithfulness": {"arith-compare": {"gate": {"auc": 0.9}}}, "run": {"settings": {"model": "org/other-moe"}}}',
     "the sweep ranks methods on model 'org/other-moe'; this study is on 'embedded'"),
]


@pytest.mark.parametrize("cmd, name, content, needle", MALFORMED, ids=[f"{m[1]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_files(cmd, name, content, needle, capsys, tmp_path):
    from moeguard.models.loading import resolve

    d = tmp_path / "model"
    if name in ("config.json", "moeguard_pruning.json", "model.safetensors.index.json"):  # the embedded model, one bad file
        import shutil

        shutil.copytree(resolve(None).path, d)
        if content.startswith("CONFIG:"):   # the embedded config with one key set
            key, _, value = content[len("CONFIG:"):].partition("=")
            doc = json.loads((d / name).read_text())
            try:
                doc[key] = json.loads(value)
            except ValueError:
                doc[key] = value
            content = json.dumps(doc)
        (d / name).write_text(content)
        if name == "model.safetensors.index.json":   # a sharded checkpoint: transformers reads a single file first
            (d / "model.safetensors").unlink()
        f = d / name
    else:
        if "\nDATA:" in content:   # a task file and its data, d/validation.jsonl beside it
            content, data = content.split("\nDATA:", 1)
            (tmp_path / "d").mkdir()
            (tmp_path / "d" / "validation.jsonl").write_text(data + "\n")
        f = tmp_path / name
        f.write_text(content)
    out = tmp_path / "out"
    subs = {"O": str(out), "F": str(f), "D": str(d), "E": str(resolve(None).path)}
    capsys.readouterr()
    code = main([subs.get(a, a) for a in cmd.split()])
    assert_one_line(code, capsys.readouterr().err, needle)
    assert not out.exists()


def test_moeguard_warnings_are_one_line_and_others_keep_their_source():
    from moeguard.cli import _format_warning

    import moeguard.cli as cli

    mine = _format_warning("task 'x' gives only 3 training block(s)", UserWarning, cli.__file__, 10)
    assert mine == "moeguard: warning: task 'x' gives only 3 training block(s)\n"
    theirs = _format_warning("deprecated", FutureWarning, "/site-packages/transformers/x.py", 5, "")
    assert "transformers/x.py:5" in theirs and "FutureWarning" in theirs


def _leaves(group=None):
    """(name, click command) of every leaf command."""
    import typer

    cmd = typer.main.get_command(app) if group is None else group
    for name, sub in getattr(cmd, "commands", {}).items():
        if getattr(sub, "commands", None):
            yield from ((f"{name} {n}", c) for n, c in _leaves(sub))
        else:
            yield name, sub


def test_every_seed_is_bounded_before_any_work(capsys, tmp_path):
    from moeguard.config import SEED_MAX

    seeded = {name: p for name, c in _leaves() for p in c.params if "--seed" in getattr(p, "opts", [])}
    assert {"audit", "route-attack", "monitor profile", "harden", "recovery", "attack"} <= set(seeded), sorted(seeded)
    for name, p in seeded.items():
        # numpy refuses a negative seed and torch overflows past 2**64, both after a model has loaded
        bounds = p if hasattr(p, "min") else getattr(p, "type", None)    # typer's own option, or click's IntRange
        assert (getattr(bounds, "min", None), getattr(bounds, "max", None)) == (0, SEED_MAX), name
    out = tmp_path / "ra"
    for seed, needle in (("-1", "greater than or equal to 0"), (str(2**64), "less than or equal to 4294967295")):
        code = main(["route-attack", "--out", str(out), "--layer", "0", "--expert", "0", "--seed", seed])
        assert_one_line(code, capsys.readouterr().err, "--seed", needle)
        assert not out.exists() and not list(tmp_path.glob(".ra*")), "a refused seed left output behind"


@pytest.mark.parametrize("argv, needle", [
    (["scan", "--out", "{O}", "--threshold", "nan"], "--threshold is nan; expected a finite suspicion level"),
    (["attack", "--task", "arith-compare", "--keep", "2", "--out", "{O}", "--epochs", "inf"],   # OverflowError after the picks
     "epochs is (inf,); it must be a finite number"),
    (["attack", "--task", "arith-compare", "--keep", "2", "--out", "{O}", "--target", "nan"],   # wrote invalid JSON
     "target is nan; it must be a finite number"),
    (["harden", "--out", "{O}", "--lr", "-1"], "lr is -1.0; it must be at least 1e-12"),      # Adam refused it after the load
    (["harden", "--out", "{O}", "--lr", "nan"], "lr is nan; it must be a finite number"),      # read "should be at most 10"
    (["audit", "--out", "{O}", "--target", "nan"], "target is nan; it must be a finite number"),
    # the merged model re-aligned is the sweep's best at the recovery keep: silently another one without it
    (["audit", "--out", "{O}", "--route", "prune,merge", "--keeps", "4,6"],
     "the merge route is swept at --keeps [4, 6], and recovery re-aligns the merged model at 2 experts per layer"),
    (["audit", "--out", "{O}", "--harden-save-every", "5"],   # was accepted and ignored
     "harden_save_every 5 sets the hardening, and no --defense hardens in this audit"),
    (["harden", "--out", "{O}", "--save-every", "0"], "Invalid value for '--save-every'"),
    (["audit", "--out", "{O}", "--threads", "99999999999"], "'--threads': Input should be less than or equal to 4096"),                      # overflowed in a job
    (["monitor", "profile", "--out", "{O}", "--window", "1000000000000"],     # failed at the end, allocating 7 TiB
     "--window is 1000000000000; benign windows are drawn from at most 600 calibration requests"),
    (["scan", "--out", "{O}", "--threshold", "inf"], "--threshold is inf"),
    (["eval", "--tasks", "arith-compare", "--limit", "2", "--out", "{D}", "--overwrite"],   # failed at the rename, after the work
     "output d is a folder; this command writes a file"),
    (["fingerprint", "--out", "{F}", "--overwrite"], "output f.txt is a file; this command writes a folder"),
    # an output that is, or holds, an input: --overwrite's swap deleted it
    (["monitor", "score", "--profile", "{F}", "--log", "{F}", "--out", ".", "--overwrite"],
     "output '.' names no file or folder of its own"),   # held the input; any '.' failed at the rename, after the work
    (["harden", "--out", ".", "--overwrite"], "output '.' names no file or folder of its own"),
    (["merge", "--method", "average", "--keep", "4", "--out", "."], "output '.' names no file or folder of its own"),
    (["merge", "--method", "average", "--keep", "4", "--max-memory", "4MiB", "--out", "."],   # a traceback at the lock
     "output '.' names no file or folder of its own"),
    (["zoo", "suite", "--out", "d/..", "--overwrite"], "output 'd/..' names no file or folder of its own"),
    # an output inside an input folder changes it (a model's config.json replaced by scores or a plan)
    (["attribute", "--model", "{D}", "--task", "arith-compare", "--method", "gate", "--out", "{D}/config.json", "--overwrite"],
     "output d/config.json is inside the model folder d: writing it would change the model"),
    (["prune", "--model", "{D}", "--scores", "{F}", "--keep", "2", "--plan-only", "--out", "{D}/plan.json"],
     "output d/plan.json is inside the model folder d"),
    (["harden", "--model", "{D}", "--out", "{D}", "--overwrite"], "output d is (or holds) the input d"),
    (["route-attack", "--model", "{D}", "--out", "{D}", "--overwrite", "--expert", "1"], "output d is (or holds) the input d"),
    (["realign", "--model", "{D}", "--task", "arith-compare", "--original", "{F}", "--out", "{F}", "--overwrite"],
     "output f.txt is (or holds) the input f.txt"),                        # --original was deleted after training
    (["recovery", "--task", "arith-compare", "--keep", "2", "--sweep", "{F}", "--out", "{F}", "--overwrite"],
     "output f.txt is (or holds) the input f.txt"),
    (["scan", "--reference-models", "{D}", "--out", "{D}", "--overwrite"], "output d is (or holds) the input d"),
    (["defend-eval", "--hardened", "{D}", "--protocol", "{F}", "--out", "{F}", "--overwrite"],
     "output f.txt is (or holds) the input f.txt"),
    # a parent that is a file failed in mkstemp, after the work
    (["eval", "--tasks", "arith-compare", "--out", "{F}/x.json"], "output f.txt/x.json is inside f.txt, which is a file"),
    (["attribute", "--task", "arith-compare", "--method", "gate", "--out", "{F}/s.json"], "which is a file, not a folder"),
    (["merge", "--out", "{F}", "--overwrite", "--method", "average", "--scores", "S", "--keep", "2"],   # after the merge
     "output f.txt is a file; this command writes a folder"),
    # an empty list meant "the default" (the whole suite, every method, half the experts)
    (["eval", "--tasks", "", "--out", "{O}"], "--tasks '' names nothing"),
    (["sweep", "--tasks", "", "--out", "{O}"], "--tasks '' names nothing"),
    (["sweep", "--keep", " ", "--out", "{O}"], "--keep ' ' names nothing"),
    (["zoo", "train", "--tasks", "", "--out", "{O}"], "--tasks '' names nothing"),
    (["route-attack", "--task", "", "--expert", "1", "--out", "{O}"], "task ''"),
    # transformers applies a memory cap only to a placement strategy: the whole model went to the one device
    (["eval", "--tasks", "arith-compare", "--max-memory", "8GiB", "--device-map", "cpu", "--out", "{O}"],
     "--device-map cpu puts every layer on one device"),
    (["audit", "--max-memory", "8GiB", "--device-map", "cpu", "--out", "{O}"], "device_map cpu puts every layer on one device"),
    # GPUs for Ray tasks: ignored without Ray; without them a GPU map fails in every worker
    (["sweep", "--gpus-per-job", "1", "--out", "{O}"], "--gpus-per-job 1 reserves GPUs for Ray tasks"),
    (["audit", "--gpus-per-job", "0.5", "--out", "{O}"], "--gpus-per-job 0.5 reserves GPUs for Ray tasks"),
    (["attack", "--task", "arith-compare", "--keep", "2", "--gpus-per-job", "-1", "--out", "{O}"],
     "'--gpus-per-job': Input should be greater than or equal to 0"),
    # --overwrite without the optional --out it would apply to did nothing
    (["trace", "--suspect", "{D}", "--overwrite"], "--overwrite replaces an existing --out, and no --out was given"),
    # a repeat doubled the study's jobs, and the savings paired one strategy's seed with another's
    (["recovery", "--task", "arith-compare", "--keep", "2", "--out", "{O}", "--strategies", "random,orphan,random"],
     "--strategies 'random,orphan,random' names random more than once"),
    (["audit", "--out", "{O}", "--strategies", "random,orphan,random"], "setting 'strategies' names random more than once"),
    (["audit", "--out", "{O}", "--dtype", "int8"], "dtype 'int8' is a torch dtype moeguard cannot compute in"),
    (["audit", "--out", "{O}", "--dtype", "floaty"], "dtype 'floaty' is not a torch dtype"),
    (["eval", "--tasks", "arith-compare", "--overwrite"], "--overwrite replaces an existing --out, and no --out was given"),
    (["trace", "--suspect", "{F}"], "model path {F} is a file, not a checkpoint directory"),     # not "--model"
    (["trace", "--suspect", "{D}/MODEL.GGUF"], "GGUF file {D}/MODEL.GGUF does not exist"),     # the suffix in any case
    (["trace", "--suspect", "{D}/model"], "model path {D}/model does not exist (the folder {D} does)"),   # not a hub id
])
def test_values_that_parse_but_cannot_work(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                  # relative paths, as typed: "d/model" has the shape of a hub id
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")   # a model's folder, as far as an output inside it goes
    (tmp_path / "f.txt").write_text("x")
    paths = {"O": "out", "F": "f.txt", "D": "d"}
    capsys.readouterr()
    code = main([a.format(**paths) for a in argv])
    assert_one_line(code, capsys.readouterr().err, needle.format(**paths))
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_not_utf8_is_one_line(capsys, tmp_path):
    f = tmp_path / "audit.yaml"
    f.write_bytes("# r\u00e9sum\u00e9\nsamples: 2\n".encode("latin-1"))
    capsys.readouterr()
    code = main(["audit", "--out", str(tmp_path / "out"), "--config", str(f)])
    assert_one_line(code, capsys.readouterr().err, "is not UTF-8")
    assert not (tmp_path / "out").exists()


def _scores_doc(**change):
    from moeguard.attribution.base import SCHEMA

    doc = {"schema": SCHEMA, "method": "gate", "task": "arith-compare", "samples": 8, "num_experts": 8, "top_k": 2,
           "scores": {str(l): [float(e) for e in range(8)] for l in range(4)}}
    return json.dumps({**doc, **change})


KEEP2 = {str(l): [0, 1] for l in range(1, 4)}


@pytest.mark.parametrize("cmd, content, needle", [
    # a plan's experts are whole numbers: 0.9/1.7 became [0, 1], the string "01" too, 1e400 a traceback
    ("prune --out O --plan F", json.dumps({"keep": {"0": [0.9, 1.7], **KEEP2}}), "is not a list of expert indices"),
    ("prune --out O --plan F", json.dumps({"keep": {"0": "01", **KEEP2}}), "is not a list of expert indices"),
    ("prune --out O --plan F", '{"keep": {"0": [1e400, 1]}}', "is not a list of expert indices"),
    ("prune --out O --plan F", json.dumps({"keep": {"0": [0, 1], **KEEP2}, "num_experts": "eight"}), "num_experts is 'eight'"),
    ("merge --out O --method average --plan F", json.dumps({"clusters": {"0": [[0.5, 1]]}}), "is not a list of expert clusters"),
    # --plan-only writes only what a prune would accept
    ("prune --out O --plan F --plan-only", json.dumps({"keep": {"0": [-1, 1], **KEEP2}}), "is not a list of expert indices"),
    ("prune --out O --plan F --plan-only", json.dumps({"keep": {"9": [0, 1], "0": [0, 1], **KEEP2}}), "not an MoE layer"),
    ("prune --out O --scores F --keep 2", _scores_doc(subsets=[1]), "is malformed"),
    ("prune --out O --scores F --keep 2", _scores_doc(subsets={"2": {"0": [0, 1, 2, 3]}}), "subsets are not 2 distinct"),
    ("prune --out O --scores F --keep 2", _scores_doc(samples="many"), "is malformed"),
    ("prune --out O --scores F --keep 2", _scores_doc(method=None) .replace('"method": null, ', ""), "is malformed"),
    ("merge --out O --method average --scores F --keep 2",
     _scores_doc(scores={str(l): [None] * 8 for l in range(4)}), "NaN or infinite"),       # prune refused them, merge did not
    # another model's plan: its count was replaced by the model's, and its indices pruned other experts
    ("prune --out O --plan F", json.dumps({"keep": {"0": [0, 1], **KEEP2}, "original_num_experts": 64}),
     "was made for a model with 64 experts per layer; this model has 8"),
    ("prune --out O --plan F --plan-only", json.dumps({"keep": {"0": [0, 1], **KEEP2}, "num_experts": 16}),
     "was made for a model with 16 experts per layer"),
    ("merge --out O --method frequency-weighted --plan F", json.dumps({"keep": {"0": [0, 1], **KEEP2}, "num_experts": 64}),
     "was made for a model with 64 experts per layer"),
    # "0" and "00" are both layer 0: the last one won
    ("prune --out O --plan F", '{"keep": {"0": [0, 1], "00": [2, 3], "1": [0, 1], "2": [0, 1], "3": [0, 1]}}',
     "layer 0 is named twice"),
    ("merge --out O --method average --plan F",
     '{"clusters": {"0": [[0, 1], [2, 3], [4, 5], [6, 7]], "00": [[0, 1], [2, 3], [4, 5], [6, 7]]}}', "layer 0 is named twice"),
    # options that change nothing were recorded as if they had
    ("prune --out O --plan F --plan-only --in-memory", json.dumps({"keep": {"0": [0, 1], **KEEP2}}),
     "--plan-only writes only the plan"),
    ("merge --out O --method average --scores F --keep 2 --gate raw", _scores_doc(), "--gate raw changes only methods"),
    ("merge --out O --method average --plan F --task arith-compare",
     json.dumps({"clusters": {str(l): [[0, 1], [2, 3], [4, 5], [6, 7]] for l in range(4)},
                 "weights": {str(l): [[0.5, 0.5]] * 4 for l in range(4)}}), "--task calibrates merges that need data"),
])
def test_plans_and_scores_that_parse_but_do_not_say_what_they_seem(cmd, content, needle, capsys, tmp_path):
    f = tmp_path / "in.json"
    f.write_text(content)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main([{"O": str(out), "F": str(f)}.get(a, a) for a in cmd.split()])
    assert_one_line(code, capsys.readouterr().err, needle)
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["eval", "attribute", "sweep", "monitor profile", "harden", "route-attack", "zoo train"])
def test_an_output_that_is_a_task_file_or_its_data_is_refused(cmd, capsys, tmp_path):
    """--overwrite's swap deleted the task's YAML, or the folder holding its data."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"input": f"{i} > {i + 1}?", "label": i % 2} for i in range(40)]
    for split in ("train", "eval"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "mine.yaml"
    task.write_text("name: mine-" + cmd.replace(" ", "-") + "\nkind: classification\nsource: {type: local, path: data, format: jsonl}\n"
                    "fields: {input: input, label: label}\nsplits: {train: train, eval: eval}\n"
                    "labels: {0: ' no', 1: ' yes'}\nprompt: '{input} Answer:'\n")
    before = task.read_text()
    opt = {"attribute": "--task", "route-attack": "--task"}.get(cmd, "--tasks")
    extra = {"attribute": ["--method", "gate"], "route-attack": ["--expert", "1"]}.get(cmd, [])
    ran = 0
    # the task's YAML, its data folder, and a data file inside the folder (outputs may go beside the data, not
    # over it: --out data/eval.jsonl replaced the eval records with the results)
    for out, needle in ((task, "is (or holds) the input"), (tmp_path / "data", "is (or holds) the input"),
                        (data / "eval.jsonl", "is (or holds) the input")):
        if cmd in ("eval", "attribute", "monitor profile") and out.is_dir():
            continue   # they write a file: a folder --out is refused for its kind first (test above)
        if cmd in ("sweep", "harden", "route-attack", "zoo train") and not out.is_dir():
            continue   # they write a folder
        capsys.readouterr()
        code = main([*cmd.split(), opt, str(task), *extra, "--out", str(out), "--overwrite"])
        assert_one_line(code, capsys.readouterr().err, needle)
        ran += 1
    assert ran == (2 if cmd in ("eval", "attribute", "monitor profile") else 1), cmd
    assert task.read_text() == before and sorted(p.name for p in data.iterdir()) == ["eval.jsonl", "train.jsonl"]


def test_an_interrupt_names_the_progress_a_resumable_command_kept(capsys, tmp_path, monkeypatch):
    from moeguard.monitor import routeattack

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    real, searched = routeattack.search, []

    def second_interrupted(*a, **k):   # the first target is searched and kept, the second interrupted
        searched.append(1)
        if len(searched) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(routeattack, "search", second_interrupted)
    out = tmp_path / "ra"
    code = main(["route-attack", "--layer", "0", "--all", "--steps", "1", "--candidates", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130
    assert f"interrupted; the work done so far is kept in {tmp_path / '.ra.partial'}: run the same command again" in err
    assert (tmp_path / ".ra.partial").is_dir() and not out.exists()
    # one interrupted before its first kept step says nothing was written, and leaves no folder behind
    monkeypatch.setattr(routeattack, "search", interrupted)
    code = main(["route-attack", "--layer", "0", "--expert", "1", "--steps", "1", "--out", str(tmp_path / "rb")])
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "moeguard: interrupted; no output was written"
    assert not (tmp_path / ".rb.partial").exists() and (tmp_path / ".ra.partial").is_dir()
    # a command that keeps nothing says so (the partial above, from the earlier call, is not named)
    from moeguard.attribution import run as attribution_run

    monkeypatch.setattr(attribution_run, "make_context", interrupted)
    code = main(["attribute", "--task", "arith-compare", "--method", "gate", "--out", str(tmp_path / "s.json")])
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "moeguard: interrupted; no output was written"
    assert not (tmp_path / ".s.json.partial").exists()


def test_a_terminated_command_ends_as_an_interrupt_and_names_what_it_kept(tmp_path):
    """SIGTERM (timeout, a scheduler's limit, docker stop) exited without running a single finally:
    temporary outputs stayed and nothing said where the resumable work was."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ra"
    proc = subprocess.Popen([sys.executable, "-m", "moeguard.cli", "route-attack", "--layer", "0", "--all",
                             "--prefix-tokens", "3", "--steps", "2", "--candidates", "4", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / ".ra.partial").glob("target-*.json")):
        time.sleep(0.05)
    assert proc.poll() is None, "it ended before it could be terminated"
    assert list((tmp_path / ".ra.partial").glob("target-*.json")), "no target finished in 240 s: nothing to keep"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert f"interrupted; the work done so far is kept in {tmp_path / '.ra.partial'}" in err
    assert "Traceback" not in err and not out.exists()


def test_run_records_name_moeguards_own_commit_not_the_repository_around_its_install(tmp_path, monkeypatch):
    """Installed (not editable) into a virtual environment inside another repository, git answered
    with that repository's HEAD."""
    import subprocess

    import moeguard.provenance as P

    repo = tmp_path / "project"
    site = repo / ".venv" / "lib" / "python3.11" / "site-packages" / "moeguard"
    site.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=x", "-c", "user.email=x@y", "commit", "-q",
                    "--allow-empty", "-m", "theirs"], check=True)
    theirs = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    here = P.git_commit()
    assert here and here.split("-")[0] != theirs                        # from this checkout: its own commit
    monkeypatch.setattr(P, "__file__", str(site / "provenance.py"))
    assert P.git_commit() != theirs and (P.git_commit() or "").split("-")[0] != theirs


def test_outputs_that_are_links_are_refused_and_a_replaced_file_keeps_its_mode(tmp_path, capsys):
    import os
    import stat

    from moeguard.io import write_json

    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    capsys.readouterr()
    code = main(["eval", "--tasks", "arith-compare", "--limit", "2", "--out", str(link), "--overwrite"])
    assert_one_line(code, capsys.readouterr().err, "is a symbolic link (to", "pass the path it points to")
    assert link.is_symlink() and target.read_text() == "{}"
    os.chmod(target, 0o600)                               # a private file stays private when replaced
    write_json(target, {"a": 1})
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_huge_yaml_integer_for_a_float_setting_is_one_line(tmp_path, capsys):
    f = tmp_path / "audit.yaml"
    f.write_text("target: 1" + "0" * 400 + "\n")
    capsys.readouterr()
    code = main(["audit", "--out", str(tmp_path / "out"), "--config", str(f)])
    assert_one_line(code, capsys.readouterr().err, "setting 'target' is 1000")


def test_a_checkpoint_folder_this_user_cannot_read_is_one_line(tmp_path, capsys, monkeypatch):
    """Another user's 0700 folder passed resolve (its parent can be searched) and its config.json's
    exists() raised PermissionError: a traceback. (Root reads every folder: access is faked.)"""
    import os

    from moeguard.models import loading

    ckpt = tmp_path / "alice-ckpt"
    ckpt.mkdir()
    real = os.access
    monkeypatch.setattr(loading.os, "access", lambda p, mode: False if str(p) == str(ckpt) else real(p, mode))
    capsys.readouterr()
    assert_one_line(main(["info", "--model", str(ckpt)]), capsys.readouterr().err,
                    f"model path {ckpt} cannot be read (Permission denied)")


def test_a_hangup_ignored_when_the_command_started_stays_ignored():
    """`nohup moeguard audit ...` (SIGHUP ignored) was ended by the hangup at logout: the interrupt handler
    replaced the ignore the user had asked for."""
    import subprocess
    import sys

    code = ("import os, signal\n"
            "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
            "from moeguard.cli.app import _terminate_as_interrupt\n"
            "from moeguard.io import signals_held\n"
            "replaced = _terminate_as_interrupt()\n"
            "with signals_held():\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "os.kill(os.getpid(), signal.SIGHUP)\n"
            "print(signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, sorted(replaced) == [signal.SIGTERM])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["True", "True"], (done.stdout, done.stderr)


def test_a_path_the_system_cannot_look_up_is_one_line(tmp_path, capsys):
    """pathlib's is_symlink/exists/is_file raise past ENOENT (a name over 255 bytes; EACCES on a folder above it
    for a user other than root): a traceback for an --out or an input JSON file."""
    long = tmp_path / ("a" * 300 + ".json")
    capsys.readouterr()
    assert_one_line(main(["eval", "--tasks", "arith-compare", "--limit", "2", "--out", str(long)]),
                    capsys.readouterr().err, "cannot be looked at (File name too long)")
    assert_one_line(main(["prune", "--plan", str(long), "--out", str(tmp_path / "p")]), capsys.readouterr().err,
                    "cannot be looked at (File name too long)")
    # a NUL byte (a name from YAML or a library call; os.stat raises ValueError, which pathlib swallowed)
    from moeguard.errors import MoeguardError
    from moeguard.io import check_output, read_json

    for call in (lambda: check_output(tmp_path / "a\x00b", overwrite=False), lambda: read_json("a\x00b", what="plan", hint="")):
        with pytest.raises(MoeguardError, match="cannot be looked at \\(embedded null byte\\)"):
            call()


def test_zoo_train_takes_a_task_whatever_its_metric(tmp_path, capsys, monkeypatch):
    """Training reads a task's texts and never scores it: a metric no command computes (normalized_perplexity)
    was refused with a fix about scoring."""
    import moeguard.zoo.train as T

    data = tmp_path / "lm"
    data.mkdir()
    for split in ("train", "eval"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x"}) + "\n"
                                                     for i in range(40)))
    task = tmp_path / "lm.yaml"
    task.write_text("name: my-lm\nkind: language_modeling\nsource: {type: local, path: lm, format: jsonl, "
                    "files: {train: train.jsonl, validation: eval.jsonl}}\nfields: {text: text}\n"
                    "metric: normalized_perplexity\n")
    seen = []

    def stop(out, **kw):
        seen.append(kw["tasks"])
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "train_embedded", stop)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:   # stopped where training would start
        main(["zoo", "train", "--tasks", str(task), "--steps", "2", "--out", str(tmp_path / "z")])
    assert e.value.code == 130 and seen == [["my-lm"]] and "normalized_perplexity" not in capsys.readouterr().err


def test_a_physical_check_agrees_within_rounding_of_its_scores_size():
    """An absolute 1e-6 called switch_audit's stdlib-docs check a mismatch: perplexities 388.29615469 and
    388.29615576, 2.8e-9 apart relatively (float32 rounding), while the README said every check agreed."""
    from moeguard.studies.sweep import physical_check_agrees

    row = {"masked_score": 388.29615469, "physical_score": 388.29615576, "abs_diff": 1.0718788e-06,
           "params_physical": 10, "params_expected": 10}
    assert physical_check_agrees(row)
    assert not physical_check_agrees({**row, "physical_score": 388.31, "abs_diff": 0.0138})
    assert not physical_check_agrees({**row, "params_physical": 11})
    assert not physical_check_agrees({**row, "abs_diff": None})                       # not finite on one side
    small = {"masked_score": 0.5, "physical_score": 0.5000008, "abs_diff": 8e-7, "params_physical": 1, "params_expected": 1}
    assert physical_check_agrees(small) and not physical_check_agrees({**small, "physical_score": 0.50001,
                                                                       "abs_diff": 1e-5})
