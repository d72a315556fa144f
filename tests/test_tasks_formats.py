"""Input formats real data comes in: header-less CSV, byte-order marks, gzip, one sentence per line.

Every file here is built by the test in tmp_path, in the shape its public original has
(AG News' header-less CSV, GLUE MRPC's TSV with a byte-order mark, Penn Treebank's text).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import time
from pathlib import Path

import pytest

from moeguard.cli import main
from moeguard.errors import MoeguardError
from moeguard.tasks.base import SourceSpec, Task, TaskKind
from moeguard.tasks.formats import chunk_text
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import load_task_file
from moeguard.zoo.recipe import Recipe, few_blocks_warning, pack_blocks

BOM = "\ufeff"
AG_ROWS = [("3", "Wall St. Bears Claw Back Into the Black", "Short-sellers, Wall Street's dwindling band, are seeing green again."),
           ("4", "Space probe photographs a comet", "The probe sent back pictures of the comet's icy core, scientists said."),
           ("2", "Home team wins the final", "A late goal gave the home side the cup on Sunday, its first in a decade."),
           ("1", "Leaders meet for peace talks", "Two presidents met in Geneva to discuss a cease-fire, officials said.")]


def agnews_yaml(folder: Path, **source) -> Path:
    """An AG News task as examples/tasks/agnews-local.yaml writes it (header-less CSV, labels 1-4)."""
    spec = {"type": "local", "path": ".", "format": "csv", "columns": ["label", "title", "description"],
            "files": {"train": "train.csv", "test": "test.csv"}, **source}
    task = {"name": "agnews-mini", "kind": "classification", "source": spec, "splits": {"train": "train", "eval": "test"},
            "fields": {"input": "description", "label": "label"},
            "prompt": "Title: {title}\nDescription: {description}\nTopic:",
            "labels": {1: " world", 2: " sports", 3: " business", 4: " sci-tech"}, "max_length": 128}
    file = folder / "agnews.yaml"
    file.write_text(json.dumps(task), encoding="utf-8")  # JSON is YAML
    return file


def write_csv(path: Path, rows, *, repeat: int = 1) -> None:
    lines = ['"{}","{}","{}"'.format(*(c.replace('"', '""') for c in row)) for row in rows * repeat]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ header-less csv/tsv

def test_headerless_csv_with_columns_reads_the_first_row_as_data(tmp_path):
    write_csv(tmp_path / "train.csv", AG_ROWS)
    write_csv(tmp_path / "test.csv", AG_ROWS[:2])
    task = load_task_file(agnews_yaml(tmp_path))[0]
    assert task.source.columns == ("label", "title", "description")
    train = load_records(task, "train")
    assert [r["label"] for r in train] == ["3", "4", "2", "1"]  # the first row is a record, not a header
    assert train[0]["input"] == ("Title: Wall St. Bears Claw Back Into the Black\nDescription: Short-sellers, "
                                 "Wall Street's dwindling band, are seeing green again.\nTopic:")


def test_headerless_tsv_with_columns(tmp_path):
    (tmp_path / "test.tsv").write_text('good " film\t1\n\nbad\t0\n', encoding="utf-8")  # a blank line is skipped
    task = Task(name="t", kind=TaskKind.CLASSIFICATION, fields={"input": "sentence", "label": "label"},
                source=SourceSpec(type="local", path=str(tmp_path), format="tsv", files={"test": "test.tsv"},
                                  columns=("sentence", "label")),
                splits={"eval": "test"}, labels={0: " no", 1: " yes"})
    assert load_records(task, "eval") == [{"input": 'good " film', "label": "1"}, {"input": "bad", "label": "0"}]


def test_the_agnews_example_reads_the_original_csv_shape(tmp_path):

    example = Path(__file__).resolve().parents[1] / "examples" / "tasks" / "agnews-local.yaml"
    task = load_task_file(example)[0]
    task = dataclasses.replace(task, source=dataclasses.replace(task.source, path=str(tmp_path)))
    write_csv(tmp_path / "train.csv", AG_ROWS)
    write_csv(tmp_path / "test.csv", AG_ROWS)
    records = load_records(task, "eval")
    assert [task.labels[int(r["label"])] for r in records] == [" business", " sci-tech", " sports", " world"]
    assert records[0]["input"].startswith("Title: Wall St. Bears Claw Back Into the Black\nDescription: Short")


@pytest.mark.parametrize("line", ['"1","only a title"', '"1","a","b","surplus"'])
def test_row_of_the_wrong_width_names_file_and_line(tmp_path, line):
    write_csv(tmp_path / "train.csv", AG_ROWS)
    (tmp_path / "test.csv").write_text('"2","t","d"\n' + line + "\n", encoding="utf-8")
    task = load_task_file(agnews_yaml(tmp_path))[0]
    with pytest.raises(MoeguardError) as err:
        load_records(task, "eval")
    cells = line.count(",") + 1
    assert f"line 2 of '{tmp_path / 'test.csv'}' has {cells} cell(s)" in err.value.message
    assert "source.columns names 3 (label, title, description)" in err.value.message
    assert "one name per column" in err.value.hint


def test_columns_on_jsonl_is_refused(tmp_path):
    with pytest.raises(MoeguardError) as err:
        load_task_file(agnews_yaml(tmp_path, format="jsonl"))
    assert "sets source.columns for format 'jsonl'" in err.value.message
    assert "header-less csv/tsv" in err.value.hint
    # a format that only the extension gives is checked when the file is read
    (tmp_path / "test.jsonl").write_text('{"label": 1}\n')
    task = load_task_file(agnews_yaml(tmp_path, format=None, files={"test": "test.jsonl"}))[0]
    with pytest.raises(MoeguardError, match="source.columns is set, but data file .*test.jsonl' is read as jsonl"):
        load_records(task, "eval")


@pytest.mark.parametrize("columns, message, fix", [
    (["label", "title", "label"], "names ['label'] more than once", "give every column a distinct name"),
    (["label", "", "description"], "'' is not a name", "give every column a non-empty text name"),
    (["label", 2], "2 is not a name", "give every column a non-empty text name"),
    ([], "not a non-empty list of names", "write one name per column of the file"),
    ("label,title,description", "not a non-empty list of names", "write one name per column of the file"),
])
def test_bad_columns_are_refused(tmp_path, columns, message, fix):
    with pytest.raises(MoeguardError) as err:
        load_task_file(agnews_yaml(tmp_path, columns=columns))
    assert "agnews-mini" in err.value.message and message in err.value.message
    assert err.value.hint.startswith(fix), err.value.hint


def test_columns_on_a_hub_source_is_refused():
    with pytest.raises(MoeguardError, match="sets source.columns on a 'hub' source"):
        Task(name="h", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "text"},
             source=SourceSpec(type="hub", hub_name="x/y", columns=("text",)))


def test_without_columns_a_headerless_file_still_reads_its_first_row_as_the_header(tmp_path):
    write_csv(tmp_path / "train.csv", AG_ROWS)
    write_csv(tmp_path / "test.csv", AG_ROWS)
    task = load_task_file(agnews_yaml(tmp_path, columns=None))[0]
    with pytest.raises(MoeguardError) as err:
        load_records(task, "eval")
    assert "no column(s)" in err.value.message and "Wall St. Bears" in err.value.message


# ------------------------------------------------------------------ byte-order marks, gzip

MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
MRPC_ROWS = ["1\t702876\t702977\tAmrozi accused his brother .\tReferring to him , Amrozi accused his brother .\n",
             "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .\n"]


def mrpc_task(folder: Path, name: str = "dev.tsv") -> Task:
    return Task(name="mrpc-mini", kind=TaskKind.CLASSIFICATION, fields={"input": "#1 String", "label": "Quality"},
                source=SourceSpec(type="local", path=str(folder), format="tsv", files={"train": name, "test": name}),
                splits={"train": "train", "eval": "test"},
                prompt="Sentence 1: {#1 String}\nSentence 2: {#2 String}\nQuestion: Do both sentences mean the same "
                       "thing?\nAnswer:", labels={0: " no", 1: " yes"})


def test_tsv_with_a_byte_order_mark_keeps_its_first_column_name(tmp_path):
    # GLUE's msr_paraphrase TSVs start with EF BB BF: the first column read as '\ufeffQuality'
    (tmp_path / "dev.tsv").write_text(BOM + MRPC_HEADER + "".join(MRPC_ROWS), encoding="utf-8")
    records = load_records(mrpc_task(tmp_path), "eval")
    assert [r["label"] for r in records] == ["1", "0"]
    assert records[0]["input"].startswith("Sentence 1: Amrozi accused his brother .\n")


def test_gzipped_tsv_with_a_byte_order_mark(tmp_path):
    with gzip.open(tmp_path / "dev.tsv.gz", "wt", encoding="utf-8") as f:
        f.write(BOM + MRPC_HEADER + "".join(MRPC_ROWS))
    assert [r["label"] for r in load_records(mrpc_task(tmp_path, "dev.tsv.gz"), "eval")] == ["1", "0"]


@pytest.mark.parametrize("name", ["test.jsonl", "test.json", "test.jsonl.gz"])
def test_jsonl_with_a_byte_order_mark(tmp_path, name):
    text = BOM + '{"text": "first line"}\n{"text": "second"}\n'
    if name.endswith(".gz"):
        (tmp_path / name).write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        (tmp_path / name).write_text(text, encoding="utf-8")
    task = Task(name="j", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "text"}, splits={"eval": "test"},
                source=SourceSpec(type="local", path=str(tmp_path), files={"test": name}))
    assert load_records(task, "eval") == [{"text": "first line"}, {"text": "second"}]


def test_headerless_csv_with_a_byte_order_mark_keeps_its_first_label(tmp_path):
    write_csv(tmp_path / "train.csv", AG_ROWS)
    (tmp_path / "test.csv").write_text(BOM + '"3","t","d"\n', encoding="utf-8")
    assert load_records(load_task_file(agnews_yaml(tmp_path))[0], "eval")[0]["label"] == "3"


def test_txt_with_a_byte_order_mark(tmp_path):
    (tmp_path / "a.txt").write_text(BOM + "The first word.\n", encoding="utf-8")
    task = Task(name="t", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "text"}, splits={"eval": "train"},
                source=SourceSpec(type="local", path=str(tmp_path), files={"train": "a.txt"}))
    assert load_records(task, "eval") == [{"text": "The first word."}]


# ------------------------------------------------------------------ txt: one sentence per line

def ptb_lines(n: int, seed: int = 0) -> list[str]:
    """Penn-Treebank-shaped lines: lower case, ' N ' for numbers, '<unk>' for rare words,
    a leading and trailing space, no blank line anywhere. The grammar gives word order a
    model can learn (a unigram model cannot)."""
    rng = random.Random(seed)
    subj = ["the company", "the market", "the bank", "a spokesman", "the government", "investors", "the firm",
            "analysts", "the board", "the <unk> unit"]
    verb = ["said", "reported", "expects", "rose", "fell", "agreed", "plans", "declined"]
    obj = ["N N shares", "its earnings", "a $ N million loss", "the new contract", "N % in october",
           "the proposed merger", "higher interest rates", "the <unk> offer"]
    tail = ["", "yesterday", "last week", "in new york", "according to analysts", "after the close"]
    lines = []
    for _ in range(n):
        words = [rng.choice(subj), rng.choice(verb), rng.choice(obj), rng.choice(tail)]
        if rng.random() < 0.3:
            words += ["and", rng.choice(subj), rng.choice(verb), rng.choice(obj)]
        lines.append(" " + " ".join(w for w in words if w) + " ")
    return lines


def lm_task(folder: Path, files: dict, max_length: int = 64) -> Task:
    return Task(name="ptb-mini", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "text"}, max_length=max_length,
                source=SourceSpec(type="local", path=str(folder), format="txt", files=files),
                splits={"train": "train", "eval": "train"})


def test_one_sentence_per_line_becomes_many_records_cut_at_line_ends(tmp_path):
    lines = ptb_lines(400)
    (tmp_path / "ptb.train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = load_records(lm_task(tmp_path, {"train": "ptb.train.txt"}, max_length=64), "train")
    chunk = 64 * 4
    texts = [r["text"] for r in records]
    assert len(texts) > 40  # not one record for the whole file
    assert all(len(t) <= chunk for t in texts)
    assert sum(len(t) for t in texts) > 0.75 * chunk * len(texts)  # about chunk_chars each, not one line each
    # every record is whole lines: reading the records line by line gives back the corpus, in order
    assert [line.strip() for t in texts for line in t.split("\n")] == [line.strip() for line in lines]


def test_paragraphs_still_pack_and_long_ones_are_cut_at_line_ends():
    lines = [f"line {i} " + "x" * 10 for i in range(12)]  # 17 or 18 characters each
    text = "= Heading =\n\n" + "\n".join(lines) + "\n\nshort tail\n\nanother"
    chunks = chunk_text(text, 60)
    assert chunks[0].startswith("= Heading =\n\nline 0 ")  # the heading stays with the text under it
    assert all(len(c) <= 60 for c in chunks)
    assert chunks[-1].endswith("\n\nshort tail\n\nanother")  # the paragraphs after it pack as before
    assert [l for c in chunks for p in c.split("\n\n") for l in p.split("\n")] == \
        ["= Heading ="] + lines + ["short tail", "another"]


def test_a_single_line_longer_than_a_chunk_is_cut_at_whitespace():
    words = [f"w{i:03d}" for i in range(60)]  # 4 characters each
    chunks = chunk_text(" ".join(words), 50)
    assert all(len(c) <= 50 for c in chunks) and len(chunks) > 1
    assert " ".join(chunks).split() == words  # no word is cut
    assert chunk_text("y" * 120, 50) == ["y" * 50, "y" * 50, "y" * 20]  # one word longer than a chunk: cut
    # a heading keeps the text under it even when that text's first line is longer than the room left
    headed = chunk_text("= Heading =\n\n" + " ".join(words), 50)
    assert headed[0].startswith("= Heading =\n\nw000 w001") and all(len(c) <= 50 for c in headed)
    assert " ".join(headed).split()[3:] == words


# ------------------------------------------------------------------ training uses every window

def test_pack_blocks_gives_every_window_of_a_long_example():
    long = list(range(100, 121))  # 21 tokens, with the EOS 22
    blocks = pack_blocks([[1, 1], long, [2, 2, 2]], context=10, eos_id=0)
    # windows overlap by one token, so every token after the first is a target once
    assert blocks == [[1, 1, 0], long[:10], long[9:19], long[18:] + [0] + [2, 2, 2, 0]]
    targets = [t for b in blocks[1:] for t in b[1:]]
    assert targets[:21] == long[1:] + [0]
    # short examples pack exactly as before
    assert pack_blocks([[1] * 3, [2] * 3], context=10, eos_id=0) == [[1, 1, 1, 0, 2, 2, 2, 0]]
    # the shipped embedded model's recipe cut a long example to its first block
    assert pack_blocks([[1, 1], long, [2, 2, 2]], context=10, eos_id=0, long_examples="truncate") == \
        [[1, 1, 0], long[:10], [2, 2, 2, 0]]


def test_rebuilding_the_embedded_model_keeps_its_recipe(monkeypatch, tmp_path):
    """`zoo train` with no --tasks re-makes the shipped weights (first block of a long example);
    with --tasks it trains on every window."""
    from moeguard.cli import main
    from moeguard.zoo import train as zoo_train
    from moeguard.zoo.recipe import EMBEDDED_RECIPE

    seen = []
    monkeypatch.setattr(zoo_train, "train_embedded", lambda out, *, recipe, **kw: seen.append(recipe) or
                        {"specialization": {"mean": 0, "per_layer": [0], "top_experts": {"t": [1]}},
                         "specialization_at_init": {"mean": 0, "per_layer": [0]}, "parameters": 1,
                         "recipe": recipe.to_dict(), "train_seconds": 0, "loss_curve": [0]})
    assert main(["zoo", "train", "--out", str(tmp_path / "a"), "--steps", "7"]) == 0
    assert main(["zoo", "train", "--tasks", "arith-compare", "--out", str(tmp_path / "b")]) == 0
    assert seen[0].long_examples == "truncate" and seen[0].steps == 7
    assert seen[0] == dataclasses.replace(EMBEDDED_RECIPE, steps=7)
    assert seen[1].long_examples == "windows"
    with pytest.raises(ValueError, match="long_examples"):
        Recipe(long_examples="first")


def test_few_blocks_warning_names_the_cause(tmp_path):
    task = lm_task(tmp_path, {"train": "ptb.train.txt"}, max_length=256)
    recipe = Recipe(steps=1000, batch_size=16, context=256)
    note = few_blocks_warning(task, records=1, tokens=700, blocks=3, recipe=recipe)
    assert note.startswith("task 'ptb-mini' gives only 3 training block(s) of up to 256 tokens from 1 record(s)")
    assert "txt file is short enough to be a single record" in note and "add data" in note
    assert "short (about 5 tokens each)" in few_blocks_warning(task, records=100, tokens=500, blocks=2, recipe=recipe)
    assert few_blocks_warning(task, records=100, tokens=50_000, blocks=200, recipe=recipe) is None


def test_zoo_training_on_a_tiny_corpus_warns_and_records_it_in_the_card(tmp_path):
    from moeguard.zoo.train import train_embedded

    (tmp_path / "ptb.train.txt").write_text("\n".join(ptb_lines(6)) + "\n", encoding="utf-8")
    yaml = tmp_path / "tiny.yaml"
    yaml.write_text("name: ptb-tiny\nkind: language_modeling\nsource: {type: local, path: ., format: txt, "
                    "files: {train: ptb.train.txt}}\nsplits: {train: train, eval: train}\nfields: {text: text}\n")
    small = Recipe(steps=2, hidden_size=32, intermediate_size=32, num_layers=2, batch_size=4, context=64,
                   vocab_size=400)
    with pytest.warns(UserWarning, match="task 'ptb-tiny' gives only [0-9] training block") as caught:
        card = train_embedded(tmp_path / "m", recipe=small, tasks=[str(yaml)])
    assert card["warnings"] == [str(w.message) for w in caught if "ptb-tiny" in str(w.message)]
    saved = json.loads((tmp_path / "m" / "moeguard_card.json").read_text())
    assert saved["warnings"] == card["warnings"]
    assert "gives only" in (tmp_path / "m" / "README.md").read_text()


# ------------------------------------------------------------------ acceptance, through the CLI

def run(args, capsys):
    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_eval_on_a_headerless_csv(tmp_path, capsys):
    write_csv(tmp_path / "train.csv", AG_ROWS, repeat=5)
    write_csv(tmp_path / "test.csv", AG_ROWS, repeat=3)
    res = tmp_path / "res.json"
    code, out, err = run(["eval", "--tasks", str(agnews_yaml(tmp_path)), "--limit", "8", "--out", str(res)], capsys)
    assert code == 0, err
    assert "agnews-mini" in out and "results written to" in out
    result = json.loads(res.read_text())["tasks"]["agnews-mini"]
    assert result["n_samples"] == 8 and result["metric"] == "accuracy" and 0 <= result["score"] <= 100
    assert result["baseline"]["name"] == "majority_class"


def test_cli_eval_on_a_tsv_with_a_byte_order_mark(tmp_path, capsys):
    (tmp_path / "dev.tsv").write_text(BOM + MRPC_HEADER + "".join(MRPC_ROWS * 6), encoding="utf-8")
    (tmp_path / "mrpc.yaml").write_text(
        "name: mrpc-mini\nkind: classification\nsource: {type: local, path: ., format: tsv, "
        "files: {train: dev.tsv, validation: dev.tsv}}\nfields: {input: '#1 String', label: Quality}\n"
        "prompt: \"Sentence 1: {#1 String}\\nSentence 2: {#2 String}\\nAnswer:\"\nlabels: {0: ' no', 1: ' yes'}\n",
        encoding="utf-8")
    res = tmp_path / "res.json"
    code, out, err = run(["eval", "--tasks", str(tmp_path / "mrpc.yaml"), "--limit", "8", "--out", str(res)], capsys)
    assert code == 0, err
    assert "mrpc-mini" in out
    assert json.loads(res.read_text())["tasks"]["mrpc-mini"]["n_samples"] == 8


def test_cli_zoo_train_on_a_one_sentence_per_line_corpus_beats_the_unigram_baseline(tmp_path, capsys):
    """PTB-shaped text (no blank line) trains a zoo model that beats the unigram baseline."""
    (tmp_path / "ptb.train.txt").write_text("\n".join(ptb_lines(3000, seed=1)) + "\n", encoding="utf-8")
    (tmp_path / "ptb.valid.txt").write_text("\n".join(ptb_lines(300, seed=2)) + "\n", encoding="utf-8")
    yaml = tmp_path / "ptb-like.yaml"
    yaml.write_text("name: ptb-like\nkind: language_modeling\nsource: {type: local, path: ., format: txt, "
                    "files: {train: ptb.train.txt, validation: ptb.valid.txt}}\nfields: {text: text}\n"
                    "max_length: 256\n", encoding="utf-8")
    started = time.time()
    code, out, err = run(["zoo", "train", "--tasks", str(yaml), "--out", str(tmp_path / "m"), "--steps", "40"],
                         capsys)
    assert code == 0, err
    assert "written to" in out
    card = json.loads((tmp_path / "m" / "moeguard_card.json").read_text())
    # the summary table: per MoE layer the specialization before and after, and each task's top expert
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    spec, init = card["specialization"], card["specialization_at_init"]
    assert rows == [[str(i), f"{a:.3f}", f"{b:.3f}", f"ptb-like {spec['top_experts']['ptb-like'][i]}"]
                    for i, (a, b) in enumerate(zip(init["per_layer"], spec["per_layer"]))]
    assert f"for 40 steps (loss {card['loss_curve'][0]:.3f} -> {card['loss_curve'][-1]:.3f})" in " ".join(out.split())
    assert card["tasks"]["ptb-like"]["train_records"] > 100 and card["tasks"]["ptb-like"]["train_blocks"] > 16
    assert card["warnings"] == [] and "gives only" not in err  # enough data: no few-blocks warning
    res = tmp_path / "res.json"
    code, out, err = run(["eval", "--model", str(tmp_path / "m"), "--tasks", str(yaml), "--limit", "40",
                          "--out", str(res)], capsys)
    assert code == 0, err
    result = json.loads(res.read_text())["tasks"]["ptb-like"]
    print(f"ptb-like: perplexity {result['score']:.2f}, unigram {result['baseline']['score']:.2f}, "
          f"{time.time() - started:.0f} s")
    assert result["baseline"]["name"] == "unigram"
    assert result["score"] < 0.5 * result["baseline"]["score"]  # measured: 3.9 vs 39 (40 steps)


def _jsonl_task(folder: Path, name: str) -> Task:
    return Task(name="j", kind=TaskKind.CLASSIFICATION, fields={"input": "q", "label": "l"}, splits={"eval": "test"},
                labels={0: " no", 1: " yes"}, source=SourceSpec(type="local", path=str(folder), files={"test": name}))


def test_a_later_row_without_a_needed_key_names_its_row(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"q": "a", "l": 0}\n{"q": "b"}\n')
    with pytest.raises(MoeguardError, match=r"row 2 of split 'test' of task 'j' .* has no column\(s\) \['l'\]"):
        load_records(_jsonl_task(tmp_path, "t.jsonl"), "eval")
    assert len(load_records(_jsonl_task(tmp_path, "t.jsonl"), "eval", limit=1)) == 1   # the rows read are whole


def test_a_gzip_corrupt_in_the_middle_is_one_line(tmp_path):
    data = bytearray(gzip.compress(("".join(f'{{"q": "row {i}", "l": {i % 2}}}\n' for i in range(2000))).encode()))
    data[len(data) // 2:len(data) // 2 + 64] = b"\x00" * 64
    (tmp_path / "t.jsonl.gz").write_bytes(bytes(data))
    with pytest.raises(MoeguardError, match=r"could not read data file .*t\.jsonl\.gz"):
        load_records(_jsonl_task(tmp_path, "t.jsonl.gz"), "eval")


def test_a_csv_cell_longer_than_the_csv_modules_default_limit_is_read(tmp_path):
    long = "word " * 40_000                                     # 200 KB in one cell (a whole article)
    (tmp_path / "t.csv").write_text(f'q,l\n"{long}",1\n')
    task = dataclasses.replace(_jsonl_task(tmp_path, "t.csv"), source=SourceSpec(type="local", path=str(tmp_path),
                                                                                   files={"test": "t.csv"}))
    assert load_records(task, "eval")[0]["input"] == long.strip()


@pytest.mark.parametrize("splits, files, shared", [
    ({"train": "train", "eval": "test"}, {"train": "a.jsonl", "test": "b.jsonl"}, None),
    ({"train": "validation", "eval": "validation"}, {"validation": "v.jsonl"}, "train 'validation' and eval 'validation'"),
    ({"train": "train", "eval": "test"}, {"train": "d.jsonl", "test": "d.jsonl"}, "read 'd.jsonl'"),     # one file twice
    ({"train": "train[:95%]", "eval": "train[90%:]"}, {"train": "t.jsonl"}, "overlapping slices"),
    ({"train": "train[:90%]", "eval": "train[90%:]"}, {"train": "t.jsonl"}, None),
    ({"train": "train[:-200]", "eval": "train[-200:]"}, {"train": "t.jsonl"}, None),
    ({"train": "train[:-100]", "eval": "train[-200:]"}, {"train": "t.jsonl"}, "overlapping slices"),
    ({"train": "train[:90%]", "eval": "train[-200:]"}, {"train": "t.jsonl"}, "different units"),
    # from the start and from the end: rows 50-99 of a 150-row split are in both (the guard took a huge split)
    ({"train": "train[:100]", "eval": "train[-100:]"}, {"train": "t.jsonl"}, "overlap unless the split has enough rows"),
    ({"train": "train[:100]", "eval": "train[100:]"}, {"train": "t.jsonl"}, None),
])
def test_train_and_eval_on_the_same_records_is_found(splits, files, shared):
    from moeguard.tasks.loaders import shared_data

    task = Task(name="s", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "text"}, splits=splits,
                source=SourceSpec(type="local", path="d", files=files))
    why = shared_data(task)
    assert (why is None) if shared is None else (shared in why), why


def test_a_task_that_trains_on_its_eval_records_is_warned_about_at_the_edge(tmp_path, capsys):
    (tmp_path / "v.jsonl").write_text('{"text": "a b c"}\n' * 4)
    (tmp_path / "t.yaml").write_text(f"name: leaky\nkind: language_modeling\nsource: {{type: local, path: {tmp_path}, "
                                     "files: {validation: v.jsonl}}\nfields: {text: text}\n"
                                     "splits: {train: validation, eval: validation}\n")
    from moeguard.edge import resolve_tasks

    with pytest.warns(UserWarning, match="task 'leaky' trains and evaluates on the same records"):
        resolve_tasks([str(tmp_path / "t.yaml")])


def test_a_tasks_identity_changes_with_its_definition_and_its_data(tmp_path):
    """Resume keys (realign, studies) hold it: an edited verbalizer or data file is another run."""
    import os

    from moeguard.tasks.loaders import task_identity

    (tmp_path / "t.jsonl").write_text('{"q": "a", "l": 0}\n')
    task = _jsonl_task(tmp_path, "t.jsonl")
    first = task_identity(task)
    assert first == task_identity(_jsonl_task(tmp_path, "t.jsonl")) and first["files"]["eval"] is not None
    assert task_identity(dataclasses.replace(task, labels={0: " No", 1: " Yes"})) != first
    (tmp_path / "t.jsonl").write_text('{"q": "a", "l": 1}\n{"q": "b", "l": 0}\n')
    os.utime(tmp_path / "t.jsonl", ns=(1, 1))
    assert task_identity(task)["files"] != first["files"]
