"""Files of a trace, all derived from its JSON: trace.json, trace.md and the mapping plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeguard.io import write_json, write_text
from moeguard.report.plots import _plt


def p_text(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-300 else "< 1e-300"


def mapping_plot(doc: dict[str, Any], out: Path) -> Path:
    """One row per layer: suspect expert j drawn over the original expert it came from, coloured
    by its label (kept / merged / unmatched); merged experts point at every source."""
    plt = _plt()
    layers = doc["layers"]
    E = max(l["experts_original"] for l in layers)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * E, 0.9 + 0.7 * len(layers)), layout="constrained")
    colors = {"kept": "C2", "merged": "C1", "unmatched": "0.6"}
    for row, l in enumerate(layers):
        y = len(layers) - 1 - row
        ax.scatter(range(E), [y] * E, s=90, facecolors="none", edgecolors="0.75", lw=1)
        kept = set(l["kept"])
        for i in range(E):
            if i in kept:
                ax.scatter([i], [y], s=90, color=colors["kept"])
        for e in l["experts"]:
            sources = [int(i) for i in e["merge"]["weights"]] if e["label"] == "merged" else [e["original"]]
            for i in sources:
                ax.annotate(str(e["expert"]), (i, y), xytext=(0, 9), textcoords="offset points", ha="center",
                            fontsize=7, color=colors[e["label"]])
    ax.set_yticks(range(len(layers)), [f"layer {l['layer']}" for l in reversed(layers)])
    ax.set_xticks(range(E))
    ax.set_xlabel("original expert (filled: kept; numbers: the suspect's expert index)")
    ax.set_ylim(-0.6, len(layers) - 0.3)
    ax.set_title(f"trace: {doc['verdict']} (p = {p_text(doc['p_value'])})", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def markdown(doc: dict[str, Any]) -> str:
    t = doc["transformations"]
    q = t["quantization"]
    from moeguard.report.tables import md_code

    lines = [f"# Trace of {md_code(doc['suspect'])} against {md_code(doc['original'])}", "",
             f"**Verdict: {doc['verdict']}** (p = {p_text(doc['p_value'])}; derived when p <= {doc['alpha']}).", "",
             f"Test: {doc['test']} ({doc['combination']}). The null hypothesis is that the suspect's experts "
             "were initialized and trained independently of the original's.", "",
             "| layer | experts (original -> suspect) | p | kept original experts | merged |",
             "|---|---|---|---|---|"]
    for l in doc["layers"]:
        merged = [f"{e['expert']} <- {e['merge']['weights']}" for e in l["experts"] if e["label"] == "merged"]
        lines.append(f"| {l['layer']} | {l['experts_original']} -> {l['experts_suspect']} | {p_text(l['p'])} | "
                     f"{l['kept']} | {'; '.join(merged) or '-'} |")
    f = doc["frame"]
    lines += ["", "## Transformations detected", "",
              f"- experts dropped: {t['experts_dropped']}; re-ordered: {t['experts_reordered']}; "
              f"merged experts: {t['merged_experts']}",
              f"- hidden dimension permuted: {t['hidden_permuted']} ({t['hidden_sign_flips']} sign flips; "
              f"{f['anchors']} anchor tokens, median |cos| {f['median_abs_cosine']})",
              f"- neurons permuted inside experts: {t['neurons_permuted']}",
              f"- drift of kept experts (1 - similarity, median): {t['drift_median']}",
              f"- quantization: {'yes, about ' + str(q['bits']) + ' bits' if q['bits'] else ('as stored: ' + str(q['stored']) if q['stored'] else 'not detected')}",
              "", "## Per expert", "", "| layer | suspect expert | label | original | gate sim | up-down sim | margin |",
              "|---|---|---|---|---|---|---|"]
    for l in doc["layers"]:
        for e in l["experts"]:
            src = e["merge"]["weights"] if e["label"] == "merged" else e["original"]
            lines.append(f"| {l['layer']} | {e['expert']} | {e['label']} | {src} | {e['similarity']['gate']} | "
                         f"{e['similarity']['up_down']} | {e['margin']} |")
    return "\n".join(lines) + "\n"


def write_trace(doc: dict[str, Any], folder: Path) -> None:
    write_json(folder / "trace.json", doc)
    write_text(folder / "trace.md", markdown(doc))
    mapping_plot(doc, folder / "trace_mapping.png")


def summary_rows(doc: dict[str, Any]) -> list[list[str]]:
    return [[str(l["layer"]), f"{l['experts_original']} -> {l['experts_suspect']}", p_text(l["p"]),
             ", ".join(map(str, l["kept"])) or "-",
             str(sum(e["label"] == "merged" for e in l["experts"]))] for l in doc["layers"]]


__all__ = ["write_trace", "markdown", "mapping_plot", "summary_rows", "p_text"]
