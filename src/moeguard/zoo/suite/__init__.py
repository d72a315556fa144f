"""The embedded suite's generator: six small tasks built from this interpreter's standard library
and seeded generated records.

The runtime reads the built data shipped in ``moeguard/tasks/embedded/`` (:data:`EMBEDDED_DIR`);
nothing here runs unless the suite is rebuilt, with ``moeguard zoo suite --out DIR`` or
``python -m moeguard.zoo.suite --out DIR [--seed S] [--python-stdlib PATH]``.

Modules: ``common`` (splits, sizes, topics, record order), ``text`` (docstring and name
helpers, ROUGE-L / Lead-k baselines), ``stdlib_scan`` and ``stdlib_tasks`` (the four stdlib
tasks), ``generated`` (arith-compare, record-summary), ``builder`` (files and manifest).
"""

from pathlib import Path

from moeguard.zoo.suite.builder import TASK_NOTES, TASKS, build_suite
from moeguard.zoo.suite.common import (CODE_MAX_CHARS, CODE_MIN_CHARS, DOC_MAX_CHARS, DOC_MIN_CHARS, EVAL_SIZE,
                                       EVAL_SPLITS, FORMAT_VERSION, NAMING_MAX_CHARS, NAMING_PER_NAME, SPLITS,
                                       TOPIC_VERBALIZERS, TOPICS, TRAIN_CAP)
from moeguard.zoo.suite.generated import build_arith_compare, build_record_summary
from moeguard.zoo.suite.stdlib_scan import (_mask_name, function_source, name_recoverable, naming_ok, scan_file,
                                            scan_stdlib, stdlib_files)
from moeguard.zoo.suite.stdlib_tasks import assign_files, select_stdlib_task
from moeguard.zoo.suite.text import doc_chunks, docstring_paragraphs, lead_k, name_words, prose_score, rouge_l_f1

# Where the built suite ships: its task YAML files and data/ (what ``build_suite(seed=0)`` wrote).
EMBEDDED_DIR = Path(__file__).resolve().parents[2] / "tasks" / "embedded"

__all__ = [
    "CODE_MAX_CHARS", "CODE_MIN_CHARS", "DOC_MAX_CHARS", "DOC_MIN_CHARS", "EMBEDDED_DIR", "EVAL_SIZE", "EVAL_SPLITS",
    "FORMAT_VERSION", "NAMING_MAX_CHARS", "NAMING_PER_NAME", "SPLITS", "TASKS", "TASK_NOTES", "TOPICS",
    "TOPIC_VERBALIZERS", "TRAIN_CAP", "_mask_name", "assign_files", "build_arith_compare", "build_record_summary",
    "build_suite", "doc_chunks", "docstring_paragraphs", "function_source", "lead_k", "name_recoverable",
    "name_words", "naming_ok", "prose_score", "rouge_l_f1", "scan_file", "scan_stdlib", "select_stdlib_task",
    "stdlib_files",
]
