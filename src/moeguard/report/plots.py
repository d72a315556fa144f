"""Plots drawn from results JSON only (so any saved run can be re-plotted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def importance_heatmaps(task: str, scores: dict[str, Any], out: Path) -> Path:
    """One panel per method: layers x experts, each layer scaled to [0, 1] (its least to most
    important expert) so that methods with different units sit side by side."""
    plt = _plt()
    methods = list(scores)
    cols = min(4, len(methods))
    rows = (len(methods) + cols - 1) // cols
    height = rows * (1.3 + 0.35 * max(3, _n_layers(scores)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1.2, height), squeeze=False, layout="constrained")
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, methods):
        s = scores[m]
        layers = [int(l) for l in s["scores"]]
        grid = np.array([[np.nan if v is None else v for v in s["scores"][str(l)]] for l in layers], dtype=float)
        lo, hi = np.nanmin(grid, axis=1, keepdims=True), np.nanmax(grid, axis=1, keepdims=True)
        scaled = (grid - lo) / np.where(hi > lo, hi - lo, 1.0)
        im = ax.imshow(scaled, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="importance within layer\n(0 = least, 1 = most)")
    fig.suptitle(f"Expert importance for '{task}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _n_layers(scores: dict[str, Any]) -> int:
    first = next(iter(scores.values()))
    return len(first["scores"])


def retention_curves(doc: dict[str, Any], task: str, out: Path) -> Path:
    """Retention vs experts kept per layer, one line per method, with the random-ranking band
    (mean +- std, and min..max dashed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rs = doc["random_summary"].get(task, {})
    if rs:
        ks = sorted(int(k) for k in rs)
        mean = np.array([rs[str(k)]["mean"] for k in ks], dtype=float)   # float: a null (not finite) is a gap
        std = np.array([rs[str(k)]["std"] for k in ks], dtype=float)
        ax.fill_between(ks, mean - std, mean + std, color="grey", alpha=0.25, label="random (mean ± std)")
        ax.plot(ks, [rs[str(k)]["min"] for k in ks], color="grey", ls=":", lw=1)
        ax.plot(ks, [rs[str(k)]["max"] for k in ks], color="grey", ls=":", lw=1, label="random (min, max)")
        ax.plot(ks, mean, color="grey", lw=1.5)
    for m in doc["settings"]["methods"]:
        ps = sorted((p["keep"], p["retention"]) for p in doc["points"]
                    if p["task"] == task and p["method"] == m and p["retention"] is not None)
        if ps:
            ax.plot(*zip(*ps), marker="o", ms=4, label=m)
    ax.axhline(100, color="black", lw=0.8, ls="--")
    full = doc["full"][task]
    ax.set_xlabel("experts kept per layer")
    ax.set_ylabel(f"retention of {full['metric']} (%)")
    ax.set_title(f"What survives pruning: {task}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def collateral_plot(doc: dict[str, Any], keep: int, out: Path) -> Path:
    """At one keep level: the pruned task's retention against the mean retention of the others."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = doc["settings"]["methods"]
    for i, m in enumerate(methods):
        pts = [p for p in doc["points"] if p["method"] == m and p["keep"] == keep and "collateral" in p]
        xs = [p["retention"] for p in pts]
        ys = [p.get("collateral_mean_retention") for p in pts]
        ax.scatter(xs, ys, label=m, s=30, marker="os^vDP*X"[i % 8])
    ax.axline((0, 0), (100, 100), color="grey", lw=0.8, ls="--")
    ax.set_xlabel("retention of the task the experts were chosen for (%)")
    ax.set_ylabel("mean retention of the other tasks (%)")
    ax.set_title(f"Targeted pruning and collateral damage, {keep} experts kept per layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
