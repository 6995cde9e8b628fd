r"""How the explanations move between epochs, and how stable the methods' faithfulness ranking is.

**Drift** of a method at epoch $e$: the Spearman rank correlation of each check image's
$|a_e|$ with its $|a_{e-1}|$ (pixels where both are 0 left out, as in `sanity`), averaged over
the images, with its bootstrap interval. A method's explanations **settled after epoch $k$**
when every drift measured after $k$ is at least the settle threshold (0.8 by default) and the
one at $k$ is not (or $k$ is the first epoch compared).

**Ranking**: each epoch the methods are ordered by faithfulness, the mean over the check images
of $\mathrm{AUC}_{\mathrm{ins}} - \mathrm{AUC}_{\mathrm{del}}$ (higher is better; both curves
of `faithfulness`). Its stability between consecutive epochs is Kendall's $\tau_b$ between the
two epochs' scores (Kendall 1938; 1: the same order, -1: reversed), with a bootstrap interval:
both epochs' scores are recomputed on the same resamples of the (fixed) check images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from exigo.analyses._bootstrap import Bootstrap, Interval, kendall_tau

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["faithfulness_score", "plot_drift", "ranking_stability", "settled_after"]


def settled_after(epochs: Sequence[int], drift: Tensor, threshold: float) -> int | None:
    """The epoch after which every method's maps stay within `threshold` of the previous ones.

    Args:
        epochs: the epochs at which drift was measured (each compared with the one before).
        drift: float tensor [E, M], Spearman of |maps| with the previous epoch's, per method
            (one column: the epoch of that method alone).
        threshold: the rank correlation that counts as unchanged.

    Returns:
        The epoch e such that every drift measured after e is at least `threshold` (and the
        one at e is not, or e is the first compared epoch), or None if the last drift is below
        the threshold or none was measured.
    """
    if drift.numel() == 0:
        return None
    stable = (drift >= threshold).all(dim=1).tolist()
    if not stable[-1]:
        return None
    first = len(stable) - 1
    while first > 0 and stable[first - 1]:
        first -= 1
    return epochs[first] - 1  # drift at epochs[first] compares it with the epoch before


def faithfulness_score(deletion_auc: Tensor, insertion_auc: Tensor) -> Tensor:
    """Per-image faithfulness of each method: insertion AUC minus deletion AUC.

    Args:
        deletion_auc: float tensor [M, N].
        insertion_auc: float tensor [M, N].

    Returns:
        Float tensor [M, N] in [-1, 1], higher is more faithful.
    """
    return insertion_auc - deletion_auc


def ranking_stability(previous: Tensor, current: Tensor, bootstrap: Bootstrap) -> Interval:
    """Kendall's tau_b between two epochs' mean scores of the same methods, with its interval.

    Args:
        previous: float tensor [M, N], per-image scores of the M methods at the earlier epoch.
        current: float tensor [M, N], the same images' scores now.
        bootstrap: the epoch's resamples of the N images.

    Returns:
        `Interval` of a single tau.
    """
    estimate = kendall_tau(previous.double().mean(dim=1), current.double().mean(dim=1))
    resampled = kendall_tau(bootstrap.means(previous), bootstrap.means(current))  # (B,)
    return bootstrap.interval_of(estimate, resampled)


def plot_drift(
    labels: Mapping[str, str],
    accuracy: Mapping[int, float],
    drift: Mapping[str, Sequence[tuple[int, float, float, float]]],
    settled: Mapping[str, int | None],
    threshold: float,
    ranks: Mapping[int, Mapping[str, int]],
    taus: Sequence[tuple[int, float, float, float]],
    title: str,
) -> Figure:
    """Drift per method against the held-out accuracy, and the faithfulness ranking per epoch.

    Args:
        labels: method key -> display name, in legend order.
        accuracy: epoch -> held-out accuracy (0-1).
        drift: method key -> `(epoch, mean, ci_low, ci_high)` rows.
        settled: method key -> the epoch after which its maps settled, or None.
        threshold: the settle threshold.
        ranks: epoch -> method key -> rank (1: most faithful).
        taus: `(epoch, tau, ci_low, ci_high)`: Kendall tau of the ranking with the epoch before.
        title: the figure's title.

    Returns:
        A matplotlib Figure with two panels.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 4.6))
    figure.subplots_adjust(left=0.05, right=0.87, bottom=0.14, top=0.86, wspace=0.42)
    drift_axes, rank_axes = figure.subplots(1, 2)
    accuracy_axes = drift_axes.twinx()
    epochs = sorted(accuracy)
    accuracy_axes.plot(
        epochs,
        [100 * accuracy[e] for e in epochs],
        color="0.55",
        linewidth=2.5,
        marker="o",
        alpha=0.5,
    )
    accuracy_axes.set_ylabel("held-out accuracy, % (grey line)", color="0.4")
    for index, (key, label) in enumerate(labels.items()):
        rows = drift.get(key, ())
        colour = f"C{index}"
        when = settled.get(key)
        note = f", settled after {when}" if when is not None else ""
        if rows:
            x = [row[0] for row in rows]
            drift_axes.plot(
                x, [row[1] for row in rows], marker="o", color=colour, label=f"{label}{note}"
            )
            drift_axes.fill_between(
                x, [row[2] for row in rows], [row[3] for row in rows], color=colour, alpha=0.15
            )
        if when is not None and rows:
            drift_axes.axvline(when + 0.5, color=colour, linestyle=":", linewidth=1)
    drift_axes.axhline(
        threshold, color="red", linestyle="--", linewidth=1, label=f"settle threshold {threshold:g}"
    )
    drift_axes.set_xlabel("epoch (drift: |map| Spearman with the epoch before)")
    drift_axes.set_ylabel("drift, mean over check images (95% CI band)")
    drift_axes.set_ylim(-0.05, 1.05)
    drift_axes.set_xlim(min(epochs, default=1) - 0.3, max(epochs, default=1) + 0.3)
    drift_axes.set_xticks(epochs)
    drift_axes.grid(alpha=0.3)
    if not any(drift.values()):
        drift_axes.text(
            0.5,
            0.5,
            "drift is measured from the second epoch",
            ha="center",
            transform=drift_axes.transAxes,
            color="0.4",
        )
    drift_axes.set_title("explanation drift against accuracy", fontsize=10)
    drift_axes.legend(fontsize=7, loc="lower right")

    rank_epochs = sorted(ranks)
    for index, (key, label) in enumerate(labels.items()):
        points = [(e, ranks[e][key]) for e in rank_epochs if key in ranks[e]]
        if points:
            rank_axes.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                color=f"C{index}",
                label=label,
            )
    count = max((len(r) for r in ranks.values()), default=1)
    rank_axes.set_ylim(count + 0.5, -0.2)
    rank_axes.set_yticks(range(1, count + 1))
    rank_axes.set_xticks(rank_epochs)
    rank_axes.set_xlim(min(rank_epochs, default=1) - 0.3, max(rank_epochs, default=1) + 0.3)
    rank_axes.set_xlabel("epoch")
    rank_axes.set_ylabel("rank (1: most faithful)")
    for epoch, tau, low, high in taus:
        rank_axes.annotate(
            f"τ {tau:.2f} [{low:.2f}, {high:.2f}]",
            (epoch - 0.5, 0.2),
            ha="center",
            va="center",
            fontsize=7,
            color="0.3",
        )
    rank_axes.grid(alpha=0.3)
    rank_axes.set_title(
        "ranking by insertion - deletion AUC; Kendall τ [95% CI] between epochs", fontsize=10
    )
    rank_axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.suptitle(title, fontsize=11)
    return figure
