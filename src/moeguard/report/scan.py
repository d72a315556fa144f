"""The expert scan as tables: ``scan.md`` beside ``scan.json``, the audit report's section and the
console summary all read the same rows."""

from __future__ import annotations

from typing import Any

TOP = 8   # suspects shown; scan.json holds every expert


def _fmt(x: float, spec: str = ".2f") -> str:
    return format(x, spec)


def suspect_rows(doc: dict[str, Any], top: int = TOP) -> list[dict[str, str]]:
    """The most suspicious experts first, with the evidence behind each score."""
    by = {f"{r['layer']}:{r['expert']}": r for r in doc["experts"]}
    rows = []
    for key in doc["ranking"][:top]:
        r = by[key]
        e = r["effect"]
        rows.append({"expert": key, "suspicion": _fmt(r["suspicion"]), "chain (nats)": _fmt(e["chain_score"]),
                     "start token": repr(e["start_token"]), "continuation": repr(e["continuation"]),
                     "flags": ", ".join(r["flags"]) or "-"})
    return rows


def flag_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    return [{"flag": f, "experts": ", ".join(keys) or "-", "count": str(len(keys))} for f, keys in doc["flagged"].items()]


def _md(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "_none_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", "\\n") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_markdown(doc: dict[str, Any]) -> str:
    s = doc["suspicion"]
    null = ("clean reference scans (" + str(s["reference_experts"]) + " experts)") if s["null"] == "references" \
        else "the expert's siblings in its layer (no reference scans given)"
    return "\n".join([
        f"# moeguard scan: {doc.get('model', '')}\n",
        f"Tasks: {', '.join(doc['tasks'])}. Suspicion: robust z of each expert's chain score against {null}; "
        f"the backdoor flag is raised above {s['threshold']:g}.\n",
        "## Most suspicious experts\n", _md(suspect_rows(doc)),
        "## Flags\n", _md(flag_rows(doc)),
        "How to read this: docs/scan.md.\n",
    ])
