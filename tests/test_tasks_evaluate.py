"""evaluate_task end to end on a tiny random Mixtral and a tokenizer trained in the test."""

from __future__ import annotations

import io
import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from moeguard.errors import MoeguardError  # noqa: E402
from moeguard.tasks import evaluate as E  # noqa: E402
from moeguard.tasks import metrics as M  # noqa: E402
from moeguard.tasks import tokens  # noqa: E402
from moeguard.tasks.base import SourceSpec, Task, TaskKind  # noqa: E402
from moeguard.tasks.kinds.summarization import first_line  # noqa: E402

CORPUS = [
    "Review: the movie was great and wonderful\nSentiment: positive",
    "Review: the film was bad and awful\nSentiment: negative",
    "Article: the cat sat on the mat. The dog ran in the park.\nSummary: the cat sat",
    "a positive story, a negative story, the cat and the dog",
] * 10


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>")


def make_model(tok, seed=0):
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


def bias_head(model, token_ids, value=25.0):
    """Replace lm_head by a copy with a bias, so the given tokens dominate every position."""
    old = model.lm_head
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.zero_()
        new.bias[list(token_ids)] = value
    model.lm_head = new
    return model


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def lm_task(path, max_length=16):
    return Task(name="lm", kind=TaskKind.LANGUAGE_MODELING, fields={"text": "text"}, max_length=max_length,
                source=SourceSpec(type="local", path=str(path), format="jsonl",
                                  files={"train": "train.jsonl", "test": "test.jsonl"}),
                splits={"train": "train", "eval": "test"})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


LM_TEXTS = ["the cat sat on the mat and the dog ran in the park, a long day for both of them",
            "great", "the film was bad", "a wonderful movie, a positive story about the cat and the dog in the park"]


@pytest.fixture
def lm_dir(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in CORPUS[:4]])
    write_jsonl(tmp_path / "test.jsonl", [{"text": t} for t in LM_TEXTS])
    return tmp_path


# ------------------------------------------------------------------ language modeling

def test_uniform_model_has_perplexity_equal_to_vocab_size(tok, lm_dir):
    model = make_model(tok)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits all zero: a uniform distribution
    result = E.evaluate_task(model, tok, lm_task(lm_dir), reference=len(tok) / 2)
    expected_tokens = sum(len(ids(tok, t)) for t in LM_TEXTS)  # BOS + text, all but BOS predicted
    assert result.n_tokens == expected_tokens
    assert result.metrics["perplexity"] == pytest.approx(len(tok), rel=1e-5)
    assert result.metrics["normalized_perplexity"] == pytest.approx(200.0, rel=1e-5)
    assert result.metric == "perplexity" and result.higher_is_better is False
    # The unigram baseline is fit on train tokens and scored on the very same eval tokens.
    train_tokens = [t for text in CORPUS[:4] for t in ids(tok, text)]
    eval_tokens = [t for text in LM_TEXTS for t in ids(tok, text)]
    base_ppl = M.perplexity(M.unigram_nll(train_tokens, eval_tokens, len(tok)), len(eval_tokens))
    assert result.baseline["name"] == "unigram"
    assert result.baseline["score"] == pytest.approx(base_ppl)
    assert result.baseline["score"] < len(tok)  # the corpus is far from uniform


def test_windows_and_padding_do_not_change_perplexity(tok, model, lm_dir):
    runs = [E.evaluate_task(model, tok, lm_task(lm_dir, max_length=m), batch_size=b, baseline=False)
            for m, b in ((8, 1), (8, 3), (64, 4))]
    assert runs[0].n_tokens == runs[1].n_tokens == runs[2].n_tokens == sum(len(ids(tok, t)) for t in LM_TEXTS)
    assert runs[0].score == pytest.approx(runs[1].score, rel=1e-5)  # same windows, other padding
    assert runs[0].score != pytest.approx(runs[2].score, rel=1e-3)  # shorter context: a different number
    assert runs[0].baseline is None


def test_lm_nll_matches_a_direct_forward(tok, model, lm_dir):
    result = E.evaluate_task(model, tok, lm_task(lm_dir, max_length=64), baseline=False)
    nll = 0.0
    with torch.no_grad():
        for text in LM_TEXTS:
            x = torch.tensor([[tok.bos_token_id] + ids(tok, text)])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            nll -= logp.gather(-1, x[0, 1:, None]).sum().item()
    assert result.metrics["loss"] == pytest.approx(nll / result.n_tokens, rel=1e-5)


# ------------------------------------------------------------------ classification

def cls_task(path, **over):
    kw = dict(name="cls", kind=TaskKind.CLASSIFICATION, fields={"input": "sentence", "label": "label"},
              source=SourceSpec(type="local", path=str(path), format="tsv",
                                files={"train": "train.tsv", "test": "test.tsv"}),
              splits={"train": "train", "eval": "test"}, prompt="Review: {sentence}\nSentiment:",
              labels={0: " negative", 1: " positive"}, max_length=32)
    kw.update(over)
    return Task(**kw)


@pytest.fixture
def cls_dir(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nbad\t0\nawful\t0\ngreat\t1\n")
    (tmp_path / "test.tsv").write_text(
        "sentence\tlabel\nthe movie was great and wonderful\t1\nwonderful\t1\n"
        "the cat sat on the mat \" quote\t1\nthe film was bad and awful\t0\n")
    return tmp_path


# Every prediction is the preferred class, so the other class's F1 is 0. Gold: 3 positive, 1 negative.
# positive: precision 3/4, recall 1 -> F1 6/7, macro 100 * (6/7) / 2 = 42.857...;
# negative: precision 1/4, recall 1 -> F1 2/5, macro 100 * (2/5) / 2 = 20.
@pytest.mark.parametrize("preferred, expected_acc, expected_f1", [(" positive", 75.0, 42.857143),
                                                                   (" negative", 25.0, 20.0)])
def test_classifier_picks_the_label_the_model_is_made_to_prefer(tok, cls_dir, preferred, expected_acc, expected_f1):
    other = " negative" if preferred == " positive" else " positive"
    boosted = set(ids(tok, preferred)) - set(ids(tok, other))
    assert boosted, "verbalizers must differ in at least one token"
    model = bias_head(make_model(tok), boosted)
    model.train()
    result = E.evaluate_task(model, tok, cls_task(cls_dir), batch_size=3)
    assert model.training, "the caller's train/eval mode must be restored"
    assert result.metrics["accuracy"] == pytest.approx(expected_acc)
    assert result.metrics["macro_f1"] == pytest.approx(expected_f1)
    # the majority class of the train split (2 negative, 1 positive) is negative: the second case's numbers
    assert result.baseline["description"].startswith("always label ") and \
        result.baseline["description"].endswith("the most frequent in the train split (3 records)")
    assert result.baseline == {"name": "majority_class", "description": result.baseline["description"],
                               "metrics": {"accuracy": 25.0, "macro_f1": pytest.approx(20.0)},
                               "score": 25.0}


def test_loglikelihood_matches_a_direct_forward_and_ignores_batching(tok, model):
    requests = [("Review: great\nSentiment:", " positive"), ("Review: a much longer review of the film "
                "and the cat\nSentiment: ", "negative"), ("x", " the cat sat on the mat")]
    one = E.loglikelihoods(model, tok, requests, max_length=64, batch_size=1)
    three = E.loglikelihoods(model, tok, requests, max_length=64, batch_size=3)
    assert one == pytest.approx(three, abs=1e-4)
    # Trailing context whitespace moves into the continuation, as in lm-evaluation-harness.
    ctx = [tok.bos_token_id] + ids(tok, "Review: a much longer review of the film and the cat\nSentiment:")
    cont = ids(tok, " negative")
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
    direct = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert one[1] == pytest.approx(direct, abs=1e-4)


def test_requests_with_the_same_input_share_one_forward_and_keep_their_scores(tok, model):
    # single-token continuations of one context read the same input: one row, not one per label
    single = [t for t in ("the", "cat", "dog", "a", "story", "mat", "sat", "positive", "negative") if len(ids(tok, " " + t)) == 1][:3]
    assert len(single) == 3, "the test tokenizer needs single-token words"
    contexts = ["Review: great\nSentiment:", "Review: the film was bad\nSentiment:"]
    requests = [(c, " " + w) for c in contexts for w in single] + [(contexts[0], " the cat sat")]
    rows = []
    handle = model.register_forward_hook(lambda m, a, k, out: rows.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        shared = E.loglikelihoods(model, tok, requests, max_length=64, batch_size=16)
    finally:
        handle.remove()
    assert rows == [3]   # 2 contexts x 3 single-token labels in 2 rows, the multi-token one in its own
    alone = [E.loglikelihoods(model, tok, [r], max_length=64)[0] for r in requests]
    assert shared == pytest.approx(alone, abs=1e-5)
    assert len(set(shared[:3])) == 3   # each label still reads its own token's probability


def test_classification_is_the_same_for_any_batch_size(tok, model, cls_dir):
    a = E.evaluate_task(model, tok, cls_task(cls_dir), batch_size=1)
    b = E.evaluate_task(model, tok, cls_task(cls_dir), batch_size=4)
    assert a.metrics == b.metrics and a.n_samples == b.n_samples == 4


def test_overlong_context_is_cut_on_the_left(tok, model):
    long_ctx = ("the cat sat on the mat " * 30).rstrip()
    scored = E.loglikelihoods(model, tok, [(long_ctx, " positive")], max_length=12)
    ctx = [tok.bos_token_id] + ids(tok, long_ctx.rstrip())
    cont = ids(tok, " positive")
    kept = (ctx + cont)[-13:]  # max_length inputs plus the last target
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([kept[:-1]])).logits[0].float(), -1)
    direct = sum(logp[12 - len(cont) + i, t].item() for i, t in enumerate(cont))
    assert scored == [pytest.approx(direct, abs=1e-4)]


# ------------------------------------------------------------------ summarization

def sum_task(path, **over):
    kw = dict(name="summ", kind=TaskKind.SUMMARIZATION, fields={"input": "source", "target": "target"},
              source=SourceSpec(type="local", path=str(path), format="jsonl",
                                files={"train": "train.jsonl", "test": "test.jsonl"}),
              splits={"train": "train", "eval": "test"}, prompt="Article: {source}\nSummary:",
              max_length=64, max_new_tokens=6)
    kw.update(over)
    return Task(**kw)


@pytest.fixture
def sum_dir(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"source": "x", "target": t} for t in ("a b", "a b c", "a b c d")])
    write_jsonl(tmp_path / "test.jsonl", [
        {"source": ["the cat sat on the mat.", "The dog ran."], "target": ["the cat sat", "a cat"]},
        {"source": "the dog ran in the park", "target": "the dog ran in the park"},
        {"source": "a wonderful movie", "target": "cat"}])
    return tmp_path


def test_summarization_scores_generations_and_lead_k(tok, sum_dir):
    cat = ids(tok, " cat")
    assert len(cat) == 1
    model = bias_head(make_model(tok), cat)  # greedy decoding now says " cat" every step
    result = E.evaluate_task(model, tok, sum_task(sum_dir), batch_size=2)
    expected = M.rouge(["cat cat cat cat cat cat"] * 3, [["the cat sat", "a cat"], "the dog ran in the park", "cat"])
    assert result.metrics == pytest.approx(expected)
    assert result.metric == "rougeL" and result.score == pytest.approx(expected["rougeL"])
    # Lead-k: k is the median train target length (3 words), taken from the source text.
    lead = M.rouge(["the cat sat", "the dog ran", "a wonderful movie"],
                   [["the cat sat", "a cat"], "the dog ran in the park", "cat"])
    assert result.baseline["name"] == "lead_3"
    assert result.baseline["metrics"] == pytest.approx(lead)


def test_generation_does_not_depend_on_batching(tok, model, sum_dir, monkeypatch):
    seen, real = [], M.rouge

    def spy(predictions, references):
        seen.append(list(predictions))
        return real(predictions, references)

    monkeypatch.setattr(M, "rouge", spy)
    for batch_size in (1, 3):  # 3 prompts of different lengths: left padding in one batch
        E.evaluate_task(model, tok, sum_task(sum_dir, max_new_tokens=8), batch_size=batch_size, baseline=False)
    assert seen[0] == seen[1]
    assert any(seen[0]), "the random model should generate some text for this check to mean anything"


def test_long_prompt_is_fitted_by_cutting_the_source(tok):
    source = "the cat sat on the mat. " * 40
    rec = {"input": f"Article: {source}\nSummary:", "source_text": source}
    fitted = tokens.fit_prompt(tok, rec, max_length=40)
    assert len(fitted) <= 40 and fitted[0] == tok.bos_token_id
    text = tok.decode(fitted[1:])
    assert text.startswith("Article: the cat sat") and text.endswith("\nSummary:")


def test_generated_text_is_cut_at_the_first_newline():
    assert first_line("\n  the cat sat \nmore text") == "the cat sat"
    assert first_line("") == ""


# ------------------------------------------------------------------ suite, schema, errors

def test_suite_document_schema_and_progress(tok, model, lm_dir, cls_dir, tmp_path):
    from rich.console import Console
    from rich.progress import Progress

    progress = Progress(console=Console(file=io.StringIO()))
    lm, cls = lm_task(lm_dir), cls_task(cls_dir)
    doc = E.evaluate_suite(model, tok, [lm, cls], limit=2, batch_size=2, references={"lm": 50.0},
                           progress=progress, model_name="tiny-mixtral")
    json.dumps(doc, allow_nan=False)  # strict JSON
    assert doc["schema_version"] == 1 and doc["model"] == "tiny-mixtral"
    assert doc["settings"] == {"limit": 2, "batch_size": 2, "baseline": True}
    assert list(doc["tasks"]) == ["lm", "cls"]
    entry = doc["tasks"]["cls"]
    assert set(entry) == {"task", "kind", "metric", "score", "higher_is_better", "metrics", "n_samples", "split",
                          "n_tokens", "baseline", "elapsed_s"}
    assert entry["n_samples"] == 2 and entry["n_tokens"] is None and entry["kind"] == "classification"
    assert doc["tasks"]["lm"]["metrics"]["normalized_perplexity"] == pytest.approx(     # 100 * ppl / reference
        2 * doc["tasks"]["lm"]["metrics"]["perplexity"])
    assert [t.completed for t in progress.tasks] == [t.total for t in progress.tasks] and len(progress.tasks) == 2


def test_infinite_perplexity_becomes_null():
    result = E.TaskResult(task="t", kind="language_modeling", metric="perplexity", score=math.inf,
                          higher_is_better=False, metrics={"perplexity": math.inf}, n_samples=1, split="test")
    assert result.to_dict()["score"] is None and result.to_dict()["metrics"] == {"perplexity": None}


def test_user_errors(tok, model, lm_dir, cls_dir):
    with pytest.raises(MoeguardError, match="reference perplexity was given for classification"):
        E.evaluate_task(model, tok, cls_task(cls_dir), reference=10.0)
    with pytest.raises(MoeguardError, match="asks for metric 'bleu'"):
        E.evaluate_task(model, tok, cls_task(cls_dir, metric="bleu"))
    with pytest.raises(MoeguardError, match="no reference perplexity"):
        E.evaluate_task(model, tok, Task(**{**lm_task(lm_dir).__dict__, "metric": "normalized_perplexity"}))
    with pytest.raises(MoeguardError, match="not evaluated"):
        E.evaluate_suite(model, tok, [lm_task(lm_dir)], references={"wikitext": 1.0})
    with pytest.raises(MoeguardError, match="verbalizer '' for label 0, not non-empty text"):   # when the task is made
        E.evaluate_task(model, tok, cls_task(cls_dir, labels={0: "", 1: " positive"}))


def test_summaries_are_greedy_whatever_the_checkpoints_generation_config_says():
    """generate() filled every field our config left None from the model's generation_config: a
    checkpoint's repetition penalty or no_repeat_ngram_size changed the summaries, and ROUGE."""
    from moeguard.models.loading import load_model
    from moeguard.tasks.registry import get_task

    model, tok, _ = load_model(None)
    task = get_task("record-summary")
    plain = E.evaluate_task(model, tok, task, limit=8, baseline=False)
    own = model.generation_config
    own.repetition_penalty, own.no_repeat_ngram_size, own.min_new_tokens = 50.0, 1, 6
    try:
        shaped = E.evaluate_task(model, tok, task, limit=8, baseline=False)
    finally:
        own.repetition_penalty, own.no_repeat_ngram_size, own.min_new_tokens = 1.0, 0, None
    assert shaped.metrics == plain.metrics
    assert model.generation_config is own     # the model's own config is back after each call


def test_a_max_length_past_the_models_positions_is_cut_to_them_with_a_warning():
    """wikitext's 512 on the embedded model's 256 positions ran windows past the trained positions,
    silently (rotary positions extrapolate)."""
    import dataclasses

    from moeguard.models.loading import load_model
    from moeguard.tasks.registry import get_task

    model, tok, _ = load_model(None)
    task = get_task("arith-compare")
    long = dataclasses.replace(task, max_length=1024)
    with pytest.warns(UserWarning, match="max_length 1024, and the model has 256 positions: its sequences are cut"):
        cut = E.evaluate_task(model, tok, long, limit=8, baseline=False)
    assert cut.metrics == E.evaluate_task(model, tok, task, limit=8, baseline=False).metrics


def test_the_encode_memo_holds_a_bounded_amount_of_text(monkeypatch):
    """It was bounded by entries alone: 100,000 articles of a summarization split held about 1 GB."""
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    monkeypatch.setattr(tokens, "_CACHE_CHARS", 2000)
    tok = Tok()
    for i in range(200):
        assert tokens.encode(tok, f"t{i} " + "w" * 12) == [len(str(i)) + 1, 12]
    memo = tokens._cache[tok]
    assert sum(map(len, memo)) <= 2000 and tokens._held[tok] == sum(map(len, memo))
    assert "t199 " + "w" * 12 in memo and "t0 " + "w" * 12 not in memo      # least recently used went first
    assert tokens.encode(tok, "x" * 25) == [25] and "x" * 25 not in memo      # longer than 1% of the cap


def test_greedy_generation_keeps_a_peft_models_base_config_out_too():
    """A LoRA-wrapped model generates through its base model, which reads its own config: the
    swap on the wrapper left the checkpoint's repetition penalty in place."""
    from transformers import GenerationConfig

    seen = []

    class Base:
        generation_config = GenerationConfig(repetition_penalty=5.0, eos_token_id=3)

        def generate(self, *, generation_config, **kw):
            seen.append((self.generation_config.repetition_penalty, self.generation_config.eos_token_id))
            return "out"

    class Wrapped:
        def __init__(self):
            self.base = Base()

        def get_base_model(self):
            return self.base

        def generate(self, **kw):
            return self.base.generate(**kw)

    model = Wrapped()
    own = model.base.generation_config
    assert tokens.greedy_generate(model, GenerationConfig(do_sample=False)) == "out"
    assert seen == [(None, 3)]                # no penalty (None: no processor), the model's eos kept
    assert model.base.generation_config is own


def test_a_baseline_is_fit_on_a_sample_of_a_split_larger_than_its_limit(tok, model, tmp_path):
    """A train split grouped by label (4 negatives, then 12 positives), with room for 4 records: the
    first 4 gave 'always negative' (25% on this eval set); a sample of the whole split is mostly
    positive. A split within the limit is read whole, in its order, as before."""
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "bad\t0\n" * 4 + "great\t1\n" * 12)
    (tmp_path / "test.tsv").write_text("sentence\tlabel\n" + "great\t1\n" * 3 + "bad\t0\n")
    r = E.evaluate_task(model, tok, cls_task(tmp_path), batch_size=4, baseline_limit=4)
    assert r.baseline["description"].startswith("always label '1'") and r.baseline["score"] == 75.0, r.baseline
    whole = E.evaluate_task(model, tok, cls_task(tmp_path), batch_size=4, baseline_limit=16)
    assert whole.baseline["score"] == 75.0 and whole.baseline["description"].endswith("(16 records)")
    # drawn once while the data is unchanged (a sweep fits the same baseline for every plan)
    from moeguard.tasks import loaders

    def again(*a, **k):
        raise AssertionError("the split was read and sampled again")

    real = loaders.sample_records
    loaders.sample_records = again
    try:
        assert E.evaluate_task(model, tok, cls_task(tmp_path), batch_size=4, baseline_limit=4).baseline == r.baseline
    finally:
        loaders.sample_records = real


def test_a_task_reporting_normalized_perplexity_is_refused_before_any_model_loads(tmp_path):
    from moeguard.edge import resolve_tasks
    from moeguard.errors import MoeguardError

    (tmp_path / "t.yaml").write_text(
        "name: lm-norm\nkind: language_modeling\nmetric: normalized_perplexity\n"
        "source: {type: local, path: ., format: txt, files: {test: t.txt}}\nsplits: {eval: test}\nfields: {text: text}\n")
    (tmp_path / "t.txt").write_text("some text to model\n" * 20)
    with pytest.raises(MoeguardError, match="normalized_perplexity, which needs a reference perplexity"):
        resolve_tasks([str(tmp_path / "t.yaml")])
    # a command that reads its data only (attribution, merge calibration) takes it
    assert resolve_tasks([str(tmp_path / "t.yaml")], scored=False)[0].name == "lm-norm"


def test_rouge_keeps_combining_marks_in_their_words():
    import unicodedata

    from moeguard.tasks.metrics import rouge, _split_words

    assert _split_words("हिन्दी résumé, of_x") == ["हिन्दी", "résumé", "of", "x"]
    # the same word in NFD and NFC is one word (NFD 'résumé' was 're sume': ROUGE 0 against the NFC one)
    nfd = unicodedata.normalize("NFD", "le résumé")
    assert rouge([nfd], [["le résumé"]])["rouge1"] == pytest.approx(100.0)
    # vowel signs are part of the word: two Hindi words that share only their consonants differ
    assert rouge(["किताब"], [["कातिब"]])["rouge1"] == 0.0
    # NFD kana: the voicing mark (in the CJK range) stays on its kana, one token as in NFC
    assert rouge([unicodedata.normalize("NFD", "がく")], [["がく"]])["rouge1"] == pytest.approx(100.0)


def test_a_summary_that_does_not_fit_the_models_positions_is_refused_before_the_weights_load(tmp_path, monkeypatch,
                                                                                              capsys):
    """Cut to the embedded model's 256 positions, a summary generating 250 tokens leaves 6 for the input:
    refused inside the work (after the load), as 'raise max_length', which the user had not set to 256."""
    from moeguard.cli import main
    from moeguard.models.handle import ModelHandle

    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src/moeguard/tasks/embedded/record-summary.yaml"
    text = src.read_text().replace("name: record-summary", "name: long-summary")
    text = text.replace("max_length: 256", "max_length: 1024").replace("max_new_tokens: 24", "max_new_tokens: 250")
    (tmp_path / "long.yaml").write_text(text)
    from moeguard.tasks import registry

    monkeypatch.setattr(ModelHandle, "load", lambda *a, **k: pytest.fail("the weights loaded"))
    registry.get_task("arith-compare")   # the built-ins in, then the file's task out again after (the suite's
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))   # default tasks are read from it)
    monkeypatch.setattr(registry, "_origins", dict(registry._origins))
    y = str(tmp_path / "long.yaml")
    for argv in (["eval", "--tasks", y], ["attribute", "--task", y, "--method", "frequency", "--out", str(tmp_path / "s.json")],
                 ["sweep", "--tasks", y, "--methods", "frequency", "--out", str(tmp_path / "sw")],
                 ["route-attack", "--task", y, "--layer", "0", "--expert", "0", "--out", str(tmp_path / "ra")]):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (argv, err)
        assert "task 'long-summary' is cut to the model's 256 positions (max_position_embeddings, below its max_length 1024)" in err
        assert "leaving 6 for the input" in err and "lower the task's generation.max_new_tokens" in err, err
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "sw").exists()
