"""Scan the standard library: what each ``.py`` file (read as text, parsed with :mod:`ast`,
never imported) contributes to the stdlib tasks."""

from __future__ import annotations

import ast
import copy
import hashlib
import io
import os
import re
import sysconfig
import tokenize
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeguard.zoo.suite.common import (CODE_MAX_CHARS, CODE_MIN_CHARS, MIN_PROSE, NAMING_MAX_CHARS, TOPIC_MAX_CHARS,
                                       TOPIC_MIN_CHARS, TOPIC_MIN_WORDS, TOPICS)
from moeguard.zoo.suite.text import doc_chunks, docstring_paragraphs, name_words, prose_score, truncate_words

# Folders never read: installed third-party code, compiled extensions, caches, and the
# test suites (distributions often strip them, and their docstrings are not prose).
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__", "lib-dynload", "test", "tests",
              "idle_test", "__phello__", "encodings", "ensurepip", "pydoc_data")
_SKIP_DIR_PREFIXES = ("config-",)
# Platform-specific generated files; reading them would make the data depend on the OS.
_SKIP_FILE_PREFIXES = ("_sysconfigdata",)


@dataclass
class FileItems:
    """What one stdlib source file contributes to each stdlib task."""

    rel: str
    module: str
    sha256: str
    docs: list[dict[str, Any]] = field(default_factory=list)
    code: list[dict[str, Any]] = field(default_factory=list)
    topic: list[dict[str, Any]] = field(default_factory=list)
    naming: list[dict[str, Any]] = field(default_factory=list)

    def demand(self) -> Counter:
        """How many records of each eval quota dimension the file holds."""
        c: Counter = Counter()
        c["stdlib-docs"] = len(self.docs)
        c["stdlib-code"] = len(self.code)
        c["code-naming"] = len(self.naming)
        for r in self.topic:
            c["docstring-topic:" + r["label"]] += 1
        return c


def default_stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the stdlib ``.py`` files in scope, sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith(_SKIP_DIR_PREFIXES))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith(_SKIP_FILE_PREFIXES):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def topic_of(rel: str) -> str | None:
    top = rel.split("/")[0].removesuffix(".py")
    for label, modules in TOPICS.items():
        if top in modules:
            return label
    return None


def _iter_defs(tree: ast.Module) -> list[tuple[str, ast.AST, bool]]:
    """(qualname, node, is_api_function) for the module, its classes and functions.

    Nested functions are walked for docstrings but are not API functions (their source is
    already part of the enclosing function's).
    """
    out: list[tuple[str, ast.AST, bool]] = [("<module>", tree, False)]

    def visit(body: list[ast.stmt], prefix: str, in_function: bool) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                q = prefix + node.name
                out.append((q, node, False))
                visit(node.body, q + ".", in_function)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                q = prefix + node.name
                out.append((q, node, not in_function))
                visit(node.body, q + ".<locals>.", True)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                # e.g. ``if sys.platform == 'win32': def ...``; ``try: ... except ImportError``
                for sub in ("body", "orelse", "finalbody"):
                    visit(getattr(node, sub, []) or [], prefix, in_function)
                for handler in getattr(node, "handlers", []) or []:
                    visit(handler.body, prefix, in_function)

    visit(tree.body, "", False)
    return out


def function_source(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's source (decorators included), docstring removed, dedented.

    None when there is nothing but a docstring, or the docstring shares a line with code.
    """
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    end = node.end_lineno or node.lineno
    drop: tuple[int, int] | None = None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = body[0]
        if len(body) == 1:
            return None
        first, last = doc.lineno, doc.end_lineno or doc.lineno
        # ast column offsets count UTF-8 bytes
        before = lines[first - 1].encode("utf-8")[: doc.col_offset]
        after = lines[last - 1].encode("utf-8")[doc.end_col_offset or 0:]
        if before.strip() or after.strip():
            return None
        if body[1].lineno <= last:
            return None
        # blank lines around the docstring go with it
        while first - 1 > node.lineno and not lines[first - 2].strip():
            first -= 1
        while last + 1 < body[1].lineno and not lines[last].strip():
            last += 1
        drop = (first, last)
    indent = node.col_offset
    out: list[str] = []
    for number in range(start, end + 1):
        if drop and drop[0] <= number <= drop[1]:
            continue
        line = lines[number - 1].rstrip()
        if line[:indent].strip() == "":  # the def's own indentation (col_offset: ASCII whitespace)
            line = line[indent:]
        line = line.expandtabs(8)
        if not line.strip():
            if out and out[-1] == "":
                continue
            line = ""
        out.append(line)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) if out else None


_SELF_ATTR = re.compile(r"(?:\bself|\bcls|\bsuper\(\))\s*\.\s*$")


def _mask_name(code: str, name: str) -> str:
    """Replace the function's own name by ``_``: the definition, recursive calls (``name(``,
    ``self.name``, ``cls.name``, ``super().name``) and mentions in strings and comments.
    Attributes of other objects keep it (``self.fp.close()`` in ``close``): calling the
    same-named method of a wrapped object is how a name is recovered from code."""
    def repl(match: re.Match[str]) -> str:
        before = code[: match.start()]
        if before.rstrip().endswith(".") and not _SELF_ATTR.search(before):
            return match.group(0)
        return "_"

    return re.sub(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", repl, code)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def name_recoverable(masked_code: str, words: list[str]) -> bool:
    """Whether a content word (3+ letters) of the name still occurs in the masked code, as
    part of an identifier, string or comment (``self._payload`` for ``get_payload``)."""
    present = {w for ident in _IDENT.findall(masked_code) for w in name_words(ident)}
    return any(len(w) >= 3 and w in present for w in words)


def naming_ok(name: str) -> bool:
    if name.startswith("__") and name.endswith("__"):
        return False
    if name.lower().startswith("test"):
        return False
    words = name_words(name)
    if not words:
        return False
    if len(words) == 1 and len(words[0]) < 3:
        return False
    return True


def read_source(path: Path) -> tuple[bytes, str | None]:
    data = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data, data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return data, None


# What a file's bytes give, by (path, content hash): a second build in one process (another seed,
# a test) reads every file again for the fingerprint but parses none of them again
_SCANNED: dict[tuple[str, str], FileItems | None] = {}


def scan_file(root: Path, rel: str) -> FileItems | None:
    data, text = read_source(root / rel)
    key = (rel, hashlib.sha256(data).hexdigest())
    if key not in _SCANNED:
        _SCANNED[key] = _scan_text(rel, key[1], text)
    return copy.deepcopy(_SCANNED[key])   # callers may edit what they get


def _scan_text(rel: str, sha256: str, text: str | None) -> FileItems | None:
    item = FileItems(rel=rel, module=module_name(rel), sha256=sha256)
    if text is None:
        return None
    try:
        tree = ast.parse(text, filename=rel)
    except (SyntaxError, ValueError):
        return None
    lines = text.splitlines()
    topic = topic_of(rel)
    for qualname, node, is_function in _iter_defs(tree):
        doc = ast.get_docstring(node, clean=True) if not isinstance(node, ast.Module) or node.body else None
        where = f"{item.module}:{qualname}"
        if doc:
            paragraphs = docstring_paragraphs(doc)
            for i, chunk in enumerate(doc_chunks(paragraphs)):
                if prose_score(chunk) < MIN_PROSE:
                    continue
                item.docs.append({"text": chunk, "source": rel, "name": f"{where}#{i}"})
            if topic is not None:
                for i, para in enumerate(paragraphs):
                    if len(para) >= TOPIC_MIN_CHARS and len(para.split()) >= TOPIC_MIN_WORDS \
                            and prose_score(para) >= MIN_PROSE:
                        item.topic.append({"text": truncate_words(para, TOPIC_MAX_CHARS), "label": topic,
                                           "source": rel, "name": f"{where}#{i}"})
        if not is_function:
            continue
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        src = function_source(lines, node)
        if src is None:
            continue
        if CODE_MIN_CHARS <= len(src) <= CODE_MAX_CHARS:
            item.code.append({"text": src, "source": rel, "name": where})
        if naming_ok(node.name):
            masked = _mask_name(src, node.name)
            words = name_words(node.name)
            if CODE_MIN_CHARS <= len(masked) <= NAMING_MAX_CHARS and "def _(" in masked \
                    and name_recoverable(masked, words):
                item.naming.append({"code": masked, "target": " ".join(words),
                                    "function": node.name, "source": rel, "name": where})
    return item


def scan_stdlib(root: Path) -> tuple[list[FileItems], list[str], str]:
    """Scanned files, files that could not be parsed, and a fingerprint of all files in scope."""
    items, failed = [], []
    fingerprint = hashlib.sha256()
    for rel in stdlib_files(root):
        item = scan_file(root, rel)
        sha = item.sha256 if item else hashlib.sha256((root / rel).read_bytes()).hexdigest()
        fingerprint.update(f"{rel}\0{sha}\n".encode())
        if item is None:
            failed.append(rel)
        else:
            items.append(item)
    return items, failed, fingerprint.hexdigest()
