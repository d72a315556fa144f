import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(2)


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
               "--threads", "2"]


@pytest.fixture(scope="session")
def audit_run(tmp_path_factory):
    from moeguard.cli import main

    out = tmp_path_factory.mktemp("audit") / "run"
    assert main(["audit", "--out", str(out), *SMALL_AUDIT]) == 0
    return out
