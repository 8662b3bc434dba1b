"""Figures of gradient geometry and samples (matplotlib, headless), in the style of Z-Magic Figs. 1-3."""
from __future__ import annotations

from typing import Dict, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_STYLE = {"none": ("0.5", ":"), "independent": ("tab:blue", "-"), "multi": ("tab:red", "-")}


def _style(label: str):
    """Colour by scheme; a ``trust`` variant (term-II trust region) keeps its scheme's colour, dash-dotted."""
    if label.startswith("dependent"):
        color, ls = ("tab:green", "-") if "(1->2)" in label else ("tab:olive", "--")
    else:
        color, ls = _STYLE.get(label.split(" ")[0], ("k", "-"))
    return (color, "-.") if label.endswith("trust") else (color, ls)


def plot_cosines(path, panels: Dict[str, Dict[str, tuple]]) -> None:
    """Fig. 1 style: mean per-step cosine vs t, one panel per setting, one line per scheme.

    ``panels[title][label] = (t, mean_cosine)``; NaN entries (unguided steps) are gaps.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for label, (t, cos) in curves.items():
            color, ls = _style(label)
            ax.plot(t, cos, color=color, ls=ls, label=label)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xlim(max(t), min(t))
        ax.set_xlabel("timestep t (sampling runs left to right)")
        ax.set_ylabel("cosine")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("independent: cos(g1, g2)    dependent / multi: cos(g_i, term II_ij)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_energy_curves(path, t, curves: Dict[str, np.ndarray], names: Sequence[str], title: str) -> None:
    """Fig. 3 style: each condition's energy at x0|t along the trajectory (median over samples)."""
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.4), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        for label, mean in curves.items():
            color, ls = _style(label)
            ax.plot(t, np.maximum(mean[:, i], 1e-3), color=color, ls=ls, label=label)
        ax.set_yscale("log")
        ax.set_xlim(max(t), min(t))
        ax.set_xlabel("timestep t")
        ax.set_title(f"{name}: energy at x0|t", fontsize=10)
    axes[0, 0].set_ylabel("median energy (log scale)")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scatter(path, samples: Dict[str, np.ndarray], exact: np.ndarray, prior: np.ndarray, title: str) -> None:
    """Each scheme's 2-D samples (color) over exact posterior samples (black) and the prior (gray)."""
    n = len(samples)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows), squeeze=False)
    lo = np.minimum(prior.min(0), exact.min(0)) - 0.3
    hi = np.maximum(prior.max(0), exact.max(0)) + 0.3
    for ax, (label, x) in zip(axes.flat, samples.items()):
        color, _ = _style(label)
        ax.scatter(prior[:, 0], prior[:, 1], s=2, c="0.85", label="prior")
        ax.scatter(exact[:, 0], exact[:, 1], s=3, c="k", alpha=0.5, label="exact posterior")
        ax.scatter(x[:, 0], x[:, 1], s=3, c=color, alpha=0.5, label=label)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_title(label, fontsize=9)
        ax.set_aspect("equal")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=6, loc="lower left", markerscale=3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_landscape(path, coords, energies, names: Sequence[str], arrows: Dict[str, tuple], title: str) -> None:
    """Fig. 2 style: energies over a 2-D plane through x_t, with guidance directions as arrows.

    ``energies`` is ``(num, num, n)`` indexed ``[a, b, condition]``; ``arrows[label] = (a, b)``.
    """
    panels = list(names) + ["sum"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.8), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], panels)):
        z = energies.sum(-1) if name == "sum" else energies[..., i]
        cs = ax.contourf(coords, coords, np.log1p(z - z.min()).T, levels=20, cmap="viridis")
        fig.colorbar(cs, ax=ax, shrink=0.8)
        for label, (a, b) in arrows.items():
            color, _ = _style(label)
            ax.annotate("", xy=(a, b), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="->", color=color if color != "0.5" else "w", lw=2))
            ax.plot([], [], color=color, label=label)
        ax.plot(0, 0, "w+", ms=10)
        ax.set_title(f"log(1 + {name} - min)", fontsize=9)
        ax.set_aspect("equal")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
