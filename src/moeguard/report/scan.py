"""The expert scan as tables: ``scan.md`` beside ``scan.json``, the audit report's section and the
console summary all read the same rows."""

from __future__ import annotations

from typing import Any

from moeguard.report.tables import md_cell, md_table

TOP = 8   # suspects shown; scan.json holds every expert


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)   # null: a number that was not finite (io.json_safe)


def suspect_rows(doc: dict[str, Any], top: int = TOP) -> list[dict[str, str]]:
    """The most suspicious experts first, with the evidence behind each score."""
    by = {f"{r['layer']}:{r['expert']}": r for r in doc["experts"]}
    rows = []
    for key in doc["ranking"][:top]:
        r = by[key]
        e = r["effect"]
        rows.append({"expert": key, "suspicion": _fmt(r["suspicion"]), "score (nats)": _fmt(e["score"]),
                     "start token": repr(e["start_token"]), "continuation": repr(e["continuation"]),
                     "flags": ", ".join(r["flags"]) or "-"})
    return rows


def flag_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    return [{"flag": f, "experts": ", ".join(keys) or "-", "count": str(len(keys))} for f, keys in doc["flagged"].items()]


# the scanned model's own text (a suspect checkpoint's): code spans in Markdown, never markup
UNTRUSTED = ("start token", "continuation")


def _md(rows: list[dict[str, str]]) -> str:
    return md_table(rows, code=UNTRUSTED)


def _null_text(s: dict[str, Any]) -> str:
    null = ("clean reference scans (" + str(s["reference_experts"]) + " experts)") if s["null"] == "references" \
        else "the expert's siblings in its layer (no reference scans given)"
    what = ("chain score, each step counted only as far as the clean reference models ("
            + ", ".join(s.get("reference_models") or []) + ") are surprised by it,") \
        if s["score"] == "unexplained" else "chain score"
    return (f"Suspicion: robust z of each expert's {what} against {null}; "
            f"the backdoor flag is raised above {s['threshold']:g}.")


def scan_text(audit_doc: dict[str, Any]) -> str:
    """The audit report's lead line for its scan section."""
    d = audit_doc["scan"]
    suspects = d["flagged"].get("backdoor-suspect") or []
    verdict = (f"Backdoor suspects: {', '.join(suspects)}." if suspects else "No expert is over the backdoor threshold.")
    return f"{verdict} {_null_text(d['suspicion'])} Every expert: {d['file']}; how to read it: docs/scan.md."


def render_markdown(doc: dict[str, Any]) -> str:
    return "\n".join([
        f"# moeguard scan: {md_cell(doc.get('model', ''))}\n",
        f"Tasks: {', '.join(doc['tasks'])}. {_null_text(doc['suspicion'])}\n",
        "## Most suspicious experts\n", _md(suspect_rows(doc)),
        "## Flags\n", _md(flag_rows(doc)),
        "How to read this: docs/scan.md.\n",
    ])
