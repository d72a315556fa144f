"""Routing-security figures, drawn from their JSON documents only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moeguard.report.plots import _plt


def hijack_heatmap(doc: dict[str, Any], out: Path) -> Path:
    """Layers x experts: held-out routing success of each expert's hijack prefix (``route-attack``),
    each cell annotated with the success and, below it, the expert's share without the prefix."""
    plt = _plt()
    layers = sorted({t["layer"] for t in doc["targets"]})
    experts = sorted({t["expert"] for t in doc["targets"]})
    grid = np.full((len(layers), len(experts)), np.nan)
    base = np.full_like(grid, np.nan)
    for t in doc["targets"]:
        i, j = layers.index(t["layer"]), experts.index(t["expert"])
        grid[i, j] = 100 * t["measured"]["success"]
        base[i, j] = 100 * t["measured"]["success_without_prefix"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(experts), 1.4 + 0.6 * len(layers)), layout="constrained")
    im = ax.imshow(grid, cmap="magma", vmin=0, vmax=100, aspect="auto")
    for i in range(len(layers)):
        for j in range(len(experts)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}\n({base[i, j]:.0f})", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 60 else "black")
    ax.set_xticks(range(len(experts)), [str(e) for e in experts])
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("target expert")
    ax.set_ylabel("layer")
    where = doc["config"].get("position", "prefix")   # documents from before the suffix mode are prefixes
    of = "input tokens" if where == "prefix" else "reply tokens"
    ax.set_title(f"routing hijack success, % of {of} (without the {where})\n{doc['model']}, task {doc['task']}, "
                 f"{where} {doc['config']['prefix_tokens']} tokens", fontsize=9,
                 parse_math=False)   # the model's path as written: "$" read as math failed the savefig
    fig.colorbar(im, ax=ax, label="% routed to the target")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
