"""What the hub said, in one line (2026-12-07 review): a model's config, weights or streamed
snapshot that failed to come from the hub read 'check your access' whatever the cause."""

import errno
from types import SimpleNamespace

import pytest

from moeguard.errors import MoeguardError
from moeguard.models.hub import hub_failure


def _http(cls, code: int):
    return cls(f"{code} error", response=SimpleNamespace(headers={}, request=None, status_code=code))


def _errors():
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    return [
        (_http(GatedRepoError, 403), "it is gated", "accept its terms on huggingface.co/org/m"),
        (_http(RepositoryNotFoundError, 404), "does not exist on the hub, or it is private", "check the id"),
        (_http(RevisionNotFoundError, 404), "the revision asked for does not exist", "check the revision"),
        (_http(HfHubHTTPError, 429), "limiting this machine's requests (HTTP 429)", "wait a few minutes"),
        (_http(HfHubHTTPError, 502), "a server error (HTTP 502)", "retry later"),
        (_http(HfHubHTTPError, 401), "refused access (HTTP 401)", "log in"),
        (OfflineModeIsEnabled("offline"), "offline mode is on", "hf download org/m --local-dir DIR"),
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full", "set HF_HOME"),
        (ConnectionError("Failed to resolve 'huggingface.co'"), "could not be reached", "check this machine's network"),
    ]


@pytest.mark.parametrize("i", range(len(_errors())))   # every case, a tenth added included
def test_each_hub_failure_is_said_with_its_fix_through_the_errors_it_was_raised_as(i):
    exc, what, fix = _errors()[i]
    for raised in (exc, _wrapped(exc)):   # transformers re-raises as OSError(...) from the hub's error
        got = hub_failure(raised, "org/m")
        assert got is not None and what in got[0] and fix in got[1], got
    assert hub_failure(KeyError("x"), "org/m") is None


def _wrapped(exc):
    try:
        try:
            raise exc
        except Exception as e:
            raise OSError("org/m is not a local folder and is not a valid model identifier") from e
    except OSError as outer:
        return outer


def test_a_hub_model_s_config_and_snapshot_failures_name_the_cause(monkeypatch):
    import huggingface_hub
    import transformers
    from huggingface_hub.errors import GatedRepoError

    from moeguard.models.hub import download_for_streaming
    from moeguard.models.loading import ModelRef, load_config

    def gated(*a, **k):
        raise _wrapped(_http(GatedRepoError, 403))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", gated)
    with pytest.raises(MoeguardError, match="cannot read the config of org/m: it is gated") as e:
        load_config(ModelRef("org/m", None, "org/m"))
    assert "hf auth login" in e.value.hint
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(MoeguardError, match="cannot fetch org/m from the Hugging Face hub: it is gated"):
        download_for_streaming("org/m")


def test_a_hub_repo_of_pickle_weights_is_refused_not_converted_by_the_hub_s_bot(monkeypatch):
    """With use_safetensors=True and none on the hub, transformers asked the safetensors-convert Space to
    unpickle the .bin and open a PR on the repo, then loaded any open PR of the bot's title."""
    import os

    from moeguard.models import loading

    config = loading.load_config(loading.resolve(None))
    seen = []

    class Fake:
        @staticmethod
        def from_pretrained(where, **kw):
            seen.append((where, os.environ.get("DISABLE_SAFETENSORS_CONVERSION"), kw["use_safetensors"]))
            raise OSError("org/m does not appear to have a file named model.safetensors or model.safetensors.index.json "
                          "and thus cannot be loaded with `safetensors`. Please do not set `use_safetensors=True`.")

    monkeypatch.setattr(loading, "inspect", lambda ref: (loading.ModelRef("org/m", None, "org/m"), config, None))
    monkeypatch.setattr(loading, "model_class", lambda config: Fake)
    monkeypatch.setenv("DISABLE_SAFETENSORS_CONVERSION", "0")   # the user's own setting: put back after
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(MoeguardError, match="org/m has no model.safetensors or model.safetensors.index.json on the "
                                            "hub .* moeguard loads safetensors only") as e:
        loading.load_model("org/m", with_tokenizer=False)
    assert seen == [("org/m", "1", True)] and "do not set" not in str(e.value)
    assert os.environ["DISABLE_SAFETENSORS_CONVERSION"] == "0"
    # offline, weights missing from the cache read the same: said as offline, with the download to run
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MoeguardError, match="cannot load weights of org/m: .*offline mode is on") as e:
        loading.load_model("org/m", with_tokenizer=False)
    assert "hf download org/m --local-dir DIR" in e.value.hint


def test_a_hub_tokenizer_that_fails_says_what_the_hub_said(monkeypatch):
    import transformers
    from huggingface_hub.errors import GatedRepoError

    from moeguard.models.loading import load_tokenizer

    def gated(*a, **k):
        raise _wrapped(_http(GatedRepoError, 403))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", gated)
    with pytest.raises(MoeguardError, match="cannot load the tokenizer of org/m: it is gated") as e:
        load_tokenizer("org/m")
    assert "tokenizer.json" not in e.value.hint


def test_weights_that_spill_to_disk_without_a_folder_name_the_flag_that_gives_one(monkeypatch):
    """accelerate's ValueError, cut at 300 characters, lost its 'provide an offload_folder' and got the hint to
    check the checkpoint files."""
    from moeguard.models import loading

    class Fake:
        @staticmethod
        def from_pretrained(where, **kw):
            raise ValueError("The current `device_map` had weights offloaded to the disk, which needed to be re-saved. "
                             + "x" * 300 + " Please provide an `offload_folder` for them.")

    monkeypatch.setattr(loading, "model_class", lambda config: Fake)
    with pytest.raises(MoeguardError, match="do not fit the GPUs and memory, and the rest would go to disk") as e:
        loading.load_model(None, with_tokenizer=False)
    assert "--max-memory" in e.value.hint
