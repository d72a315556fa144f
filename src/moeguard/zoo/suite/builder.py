"""Build the *embedded suite*: six small tasks made only from what every install has offline.

Sources are the running interpreter's standard-library ``.py`` files, read as text and parsed
with :mod:`ast` (nothing is imported), plus records generated with a seeded
:class:`random.Random`. The build is deterministic: sorted file walks, string-seeded RNGs,
no set or dict iteration order in the output, gzip with ``mtime=0`` and no timestamps, so a
rebuild with the same Python version and seed is byte-identical to the shipped data.

Tasks (see ``moeguard/tasks/embedded/README.md``, next to the shipped data):

- ``stdlib-docs`` (language modeling): English prose from docstrings.
- ``stdlib-code`` (language modeling): function source with docstrings removed.
- ``docstring-topic`` (classification): which stdlib area a docstring paragraph comes from.
- ``arith-compare`` (classification, generated): "Is 482 greater than 428?" yes/no.
- ``code-naming`` (summarization): a function's name (as words) from its body.
- ``record-summary`` (summarization, generated): the key fact of a short record.

Every stdlib source file is assigned to one split for *all* stdlib tasks, so no function or
docstring is in the train split of one task and the eval split of another.

Rebuild with ``moeguard zoo suite --out DIR --seed 0`` or
``python -m moeguard.zoo.suite --out DIR --seed 0 [--python-stdlib PATH]``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import sys
import zlib
from pathlib import Path
from typing import Any

from moeguard.errors import MoeguardError
from moeguard.zoo.suite.common import (CODE_MAX_CHARS, CODE_MIN_CHARS, DOC_MAX_CHARS, DOC_MIN_CHARS, FORMAT_VERSION,
                                       GENERATED_NOTE, NAMING_PER_NAME, PSF_NOTE, SPLITS, TOPICS)
from moeguard.zoo.suite.generated import build_arith_compare, build_record_summary
from moeguard.zoo.suite.stdlib_scan import default_stdlib, module_name, scan_stdlib
from moeguard.zoo.suite.stdlib_tasks import assign_files, select_stdlib_task


def _write_jsonl_gz(path: Path, records: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    """Write records as gzip-compressed JSON Lines; returns (uncompressed, compressed) bytes.

    No file name and ``mtime=0`` in the gzip header, so the bytes depend only on the records
    (and on the zlib library, recorded in the manifest).
    """
    raw = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return raw, data


TASK_NOTES = {
    "stdlib-docs": ("language_modeling", "English prose from module, class and function docstrings "
                    f"(doctest examples removed, whitespace-normalized, packed into {DOC_MIN_CHARS}-"
                    f"{DOC_MAX_CHARS} character chunks at paragraph/sentence boundaries). " + PSF_NOTE),
    "stdlib-code": ("language_modeling", "Source of stdlib functions and methods (decorators kept, "
                    f"docstring removed, dedented, {CODE_MIN_CHARS}-{CODE_MAX_CHARS} characters). " + PSF_NOTE),
    "docstring-topic": ("classification", "Docstring paragraphs labelled with the stdlib area of their "
                        "module: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in TOPICS.items())
                        + ". Balanced by downsampling. " + PSF_NOTE),
    "arith-compare": ("classification", "Generated 'Is A greater than B?' questions about 2-3 digit "
                      "numbers: 60% with the same digit count (hard negatives sharing a prefix), 40% a "
                      "2-digit against a 3-digit number; balanced yes/no within both kinds. "
                      + GENERATED_NOTE),
    "code-naming": ("summarization", "Extreme code summarization (Allamanis et al. 2016): stdlib "
                    "function source with its name replaced by '_' (definition, recursive calls, "
                    "self/cls/super() attributes, strings, comments), docstring removed; target is "
                    "the name split into lower-case words. "
                    "Dunder, test* and short one-word names dropped, and names none of whose words "
                    "(3+ letters) is left in the masked code (not recoverable); at most "
                    f"{NAMING_PER_NAME} functions per name and split. " + PSF_NOTE),
    "record-summary": ("summarization", "Generated weather/rainfall/score records; the summary names "
                       "the maximum reading in a fixed sentence with the label and unit rewritten. "
                       + GENERATED_NOTE),
}
TASKS = tuple(TASK_NOTES)


def check_stdlib(python_stdlib: str | os.PathLike[str] | None) -> Path:
    """The standard-library folder to read (default: this interpreter's), refused in one line
    unless it holds ``os.py``."""
    root = Path(python_stdlib) if python_stdlib is not None else default_stdlib()
    if not (root / "os.py").is_file():
        raise MoeguardError(f"{root} does not look like a Python standard library (no os.py in it)",
                            hint="pass --python-stdlib with the folder holding os.py, e.g. /usr/lib/python3.11")
    return root


def build_suite(out_dir: str | os.PathLike[str], *, seed: int = 0,
                python_stdlib: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Build every task into ``out_dir/<task>/<split>.jsonl.gz`` and write ``MANIFEST.json``.

    Returns the manifest. ``python_stdlib`` is the folder of the standard library to read
    (default: the running interpreter's).
    """
    out = Path(out_dir)
    root = check_stdlib(python_stdlib)
    items, failed, fingerprint = scan_stdlib(root)
    assignment = assign_files(items, seed)

    per_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    stdlib_attr = {"stdlib-docs": "docs", "stdlib-code": "code", "docstring-topic": "topic",
                   "code-naming": "naming"}
    for task, attr in stdlib_attr.items():
        by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        for it in items:
            by_split[assignment[it.rel]].extend(getattr(it, attr))
        per_task[task] = select_stdlib_task(task, by_split, seed)
    per_task["arith-compare"] = build_arith_compare(seed)
    per_task["record-summary"] = build_record_summary(seed)

    used_files = sorted({r["source"] for t in stdlib_attr for s in SPLITS for r in per_task[t][s]})
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "python": {
            "version": platform.python_version() if python_stdlib is None else "unknown (custom stdlib path)",
            "implementation": platform.python_implementation(),
            "platform": f"{sys.platform}-{platform.machine()}",
            "stdlib_files_in_scope": len(items) + len(failed),
            "stdlib_sha256": fingerprint,
            "unparsed_files": failed,
        },
        "zlib_version": zlib.ZLIB_RUNTIME_VERSION,
        "license": {"stdlib-derived": "PSF-2.0 (Python Software Foundation License)",
                    "generated": "Apache-2.0 (moeguard)"},
        "stdlib_modules": [module_name(rel) for rel in used_files],
        "split_of_file": {rel: assignment[rel] for rel in used_files},
        "tasks": {},
    }
    for task in TASKS:
        kind, note = TASK_NOTES[task]
        files = {}
        for split in SPLITS:
            records = per_task[task][split]
            raw, data = _write_jsonl_gz(out / task / f"{split}.jsonl.gz", records)
            files[split] = {"file": f"{task}/{split}.jsonl.gz", "records": len(records),
                            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                            "content_sha256": hashlib.sha256(raw).hexdigest()}
        manifest["tasks"][task] = {"kind": kind, "provenance": note, "splits": files}
    text = json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    (out / "MANIFEST.json").write_text(text, encoding="utf-8")
    return manifest
