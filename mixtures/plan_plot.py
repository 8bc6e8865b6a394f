"""The planner's figure: the token share of each leaf over training, as a stacked area over steps.

Shares come from `ResolvedSchedule.weights_matrix`, the rule the sampler draws by, at a bounded number of steps
(every step of a short run, evenly spaced ones plus each stage's first and last step of a long one), so a 4M-step
schedule plots as fast as a 300-step one. Stage boundaries are dashed lines labelled with the stage name; past 15 leaves the least drawn share one band.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from mixlab.mixtures.planner import MixturePlan

MAX_POINTS = 1200  # steps evaluated for the figure
MAX_BANDS = 15  # leaves with a band of their own; the others are summed into one "other" band


def plot_steps(plan: MixturePlan) -> list[int]:
    """The steps the figure evaluates: all of a short run; otherwise evenly spaced ones and each stage's ends."""
    total = plan.total_steps
    if total <= MAX_POINTS:
        return list(range(total))
    steps = {int(s) for s in np.linspace(0, total - 1, MAX_POINTS)}
    for stage in plan.stages:
        if stage.steps:
            steps.update({stage.start_step, stage.end_step - 1})
    return sorted(steps)


def plot_token_shares(plan: MixturePlan, path: Path) -> Path:
    """Write the stacked token shares of `plan` to `path` (PNG) and return the path."""
    steps = plot_steps(plan)
    names = list(plan.resolved.sources)
    full = np.vstack([plan.resolved.weights_matrix(step, step + 1) for step in steps]).T  # [leaf, point]
    # the leaves drawn most keep their own band; the rest share one, so the legend stays readable
    ranked = sorted(names, key=lambda n: (-plan.leaves[n].tokens_drawn if n in plan.leaves else 0.0, n))
    kept = sorted(ranked[:MAX_BANDS]) if len(names) > MAX_BANDS + 1 else sorted(names)
    rest = [n for n in names if n not in kept]
    leaves = kept + ([f"other ({len(rest)} leaves)"] if rest else [])
    shares = np.array([full[names.index(n)] for n in kept]
                      + ([full[[names.index(n) for n in rest]].sum(axis=0)] if rest else []))
    cmap = plt.get_cmap("tab10" if len(leaves) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.stackplot(steps, shares, labels=leaves, colors=[cmap(i % cmap.N) for i in range(len(leaves))],
                 step="post", alpha=0.9)
    for stage in plan.stages:
        if stage.index:
            ax.axvline(stage.start_step, color="black", ls="--", lw=0.9)
        # upright labels inside the axes: short stages side by side do not overwrite each other
        ax.text(stage.start_step, 0.98, f" {stage.name} (seq {stage.seq_len}) ", fontsize=7, rotation=90,
                va="top", ha="left", transform=ax.get_xaxis_transform(),
                bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1})
    ax.set_xlim(0, max(1, plan.total_steps - 1))
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"step (batch {plan.batch_size}; {plan.total_tokens:,d} tokens in all)")
    ax.set_ylabel("share of the step's tokens")
    ax.set_title("Token share per leaf over training")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
