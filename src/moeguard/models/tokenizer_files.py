"""Tokenizer files that transformers 4.x and 5.x both load, and tokenize identically.

transformers 5 saves a plain ``tokenizers``-library tokenizer (the zoo's byte-level BPE, and any
checkpoint whose tokenizer has no model-specific class) as ``"tokenizer_class": "TokenizersBackend"``,
a name transformers 4.x does not have: ``AutoTokenizer.from_pretrained`` there fails with
``ValueError: Tokenizer class TokenizersBackend does not exist or is not currently imported.``
``PreTrainedTokenizerFast`` is the same class under the name both know (in 5.x it is an alias of
``TokenizersBackend``), reading the same ``tokenizer.json``.

Every tokenizer moeguard writes goes through :func:`save_tokenizer`; :func:`portable_tokenizer_config`
is the one place that says what is rewritten. In ``tokenizer.json`` the vocabulary, merges and token
ids are never touched; only the truncation and padding left over from the last call are cleared
(transformers sets both per call, so they are call state, not the tokenizer's; a serving stack that
reads ``tokenizer.json`` with the ``tokenizers`` library directly, TGI's router for one, would
otherwise cut every input at the last call's ``max_length``, 256 for the zoo). Tokenizer files that moeguard copies from a user's checkpoint (streaming surgery's side
files) stay as their owner wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_CONFIG = "tokenizer_config.json"

# transformers-5-only class names -> the name of the same class in both 4.x and 5.x
CLASS_NAMES = {"TokenizersBackend": "PreTrainedTokenizerFast"}

# written by transformers 5 but meaningless to a reader: which backend 5.x used (it defaults to
# "tokenizers" for PreTrainedTokenizerFast) and how *this* copy was loaded (local path, offline
# flag), which 5.24 leaks from from_pretrained into save_pretrained
DROPPED_KEYS = ("backend", "is_local", "local_files_only")


def portable_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a tokenizer_config.json's contents) in the form transformers 4.x and 5.x both load."""
    out = {k: v for k, v in config.items() if k not in DROPPED_KEYS}
    cls = out.get("tokenizer_class")
    if cls in CLASS_NAMES:
        out["tokenizer_class"] = CLASS_NAMES[cls]
    # 5.x writes the unnamed extra special tokens as a list under extra_special_tokens; 4.x reads that
    # key as a dict of *named* tokens (and fails on a list), while both read a list under
    # additional_special_tokens (5.x renames it to extra_special_tokens on load)
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list) and "additional_special_tokens" not in out:
        out["additional_special_tokens"] = out.pop("extra_special_tokens")
    return out


def make_portable(directory: str | Path) -> bool:
    """Rewrite ``directory/tokenizer_config.json`` in portable form; True if it changed."""
    path = Path(directory) / TOKENIZER_CONFIG
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    portable = portable_tokenizer_config(config)
    if portable == config:
        return False
    path.write_text(json.dumps(portable, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def clear_call_state(directory: str | Path) -> bool:
    """Set ``truncation`` and ``padding`` of ``directory/tokenizer.json`` to null; True if it changed."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("truncation") is None and data.get("padding") is None:
        return False
    data["truncation"] = data["padding"] = None
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def save_tokenizer(tokenizer, directory: str | Path) -> tuple[str, ...]:
    """``tokenizer.save_pretrained(directory)``, with files that transformers 4.x loads too and that
    carry no truncation or padding from the last call."""
    files = tokenizer.save_pretrained(directory)
    make_portable(directory)
    clear_call_state(directory)
    return files
