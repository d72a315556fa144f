import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Under pytest-xdist (`make test` runs two workers on CI's two cores) each worker, and every process
# it starts, gets one thread: two 2-thread workers would oversubscribe the cores
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
THREADS = 1 if WORKER else 2
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _threads_restored():
    """A command that sets torch's threads for its run (audit --threads, a zoo recipe) leaves them
    set; the next test in this process gets THREADS again."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _reuse_ledger_cleared():
    """provenance's ledger of work reused from other versions is a command's (cli.main clears it); a
    test that reuses such work through the library would otherwise leave it to the next test's records."""
    from moeguard import provenance

    provenance.start_command()
    yield
    provenance.start_command()


@pytest.fixture
def token_batch():
    """Two rows, the second right-padded: padding must never count."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


# A small audit of the embedded model shared by the audit, report and browser tests: two
# tasks, two methods, two label budgets (about 25 s on two cores).
# ablation, the slowest method, is left out here (it has its own tests in test_attribution and
# test_sweep): four audits run this config, and CI has 10 minutes on 2 cores
SMALL_AUDIT = ["--tasks", "arith-compare,docstring-topic", "--methods", "frequency,gate",
               "--budgets", "8,16", "--recovery-seeds", "1", "--strategies", "random,orphan", "--random-seeds", "2",
               "--eval-limit", "32", "--recovery-eval-limit", "48", "--pool-size", "96", "--samples", "16",
               "--threads", str(THREADS)]


@pytest.fixture(scope="session")
def audit_run(tmp_path_factory):
    """The small audit, run once per test session: under xdist the first worker to need it runs it
    while the others wait on a lock, then read its folder (the tests only read it)."""
    from moeguard.cli import main

    if not WORKER:
        out = tmp_path_factory.mktemp("audit") / "run"
        assert main(["audit", "--out", str(out), *SMALL_AUDIT]) == 0
        return out
    import fcntl   # (POSIX; xdist workers only: a serial run never takes the lock)

    shared = tmp_path_factory.getbasetemp().parent      # every worker's basetemp is a folder of this one
    out = shared / "shared-audit" / "run"
    with open(shared / "shared-audit.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "results.json").is_file():
            out.parent.mkdir(exist_ok=True)
            assert main(["audit", "--out", str(out), *SMALL_AUDIT]) == 0
    return out


@pytest.fixture
def through_hook():
    """``run(monitor, model, tokenizer, records, client=None)``: each record's prompt sent through the
    model as one forward inside ``monitor.request`` (a ``RoutingMonitor``), as a server does; the
    hook's result of each request, read once the monitor has flushed (on leaving it)."""
    def run(mon, model, tokenizer, records, client=None):
        handles = []
        with mon:
            for r in records:
                with mon.request(client if client is not None else r["client"]) as res:
                    ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) \
                        + tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
                    model(input_ids=torch.tensor([ids]))
                handles.append(res)
        return [h.result for h in handles]
    return run


def sentencepiece_like(texts: list[str]):
    """A Llama-style BPE: the text's start gets '▁', spaces become '▁', no piece spans a newline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                               pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"],
                                                     initial_alphabet=["\n", "▁"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")


def qwen_like(texts: list[str]):
    """A Qwen2-style byte-level BPE: its split joins newlines to the punctuation before them (':\\n'),
    and there is no BOS token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture
def fake_ray_backend():
    """``make(submit, answer, asked=None, address=None)``: a RayBackend without Ray started, over a fake
    ``ray`` whose one 8-CPU node runs each task by ``submit(*args) -> ref`` and gets ``answer(ref)``;
    the options a task is declared with go into ``asked``."""
    import ray.exceptions

    from moeguard.studies.engine import RayBackend

    def make(submit, answer, *, asked: dict | None = None, address: str | None = None):
        class FakeRay:
            exceptions = ray.exceptions

            @staticmethod
            def nodes():
                return [{"Alive": True, "Resources": {"CPU": 8.0}}]

            @staticmethod
            def remote(**kw):
                (asked if asked is not None else {}).update(kw)
                return lambda fn: type("R", (), {"remote": staticmethod(submit)})

            @staticmethod
            def wait(refs, num_returns):
                return refs[:1], refs[1:]

            get = staticmethod(answer)

            @staticmethod
            def cancel(ref, force):
                pass

        backend = RayBackend.__new__(RayBackend)
        backend.ray, backend.gpus, backend.address, backend._started = FakeRay(), 0.0, address, False
        return backend
    return make
