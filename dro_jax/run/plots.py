"""The run's pictures: the anchor space with the prompts' movements, the training curves, refusals per setting."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dro_jax.anchors.space import AnchorSpace, LinearProbe
from dro_jax.common.files import atomic_output
from dro_jax.dro.loss import LossWeights
from dro_jax.evaluation.rows import EvalRow
from dro_jax.inference.settings import NO_PROMPT

COLORS = {"none": "#7f7f7f", "default": "#1f77b4", "short": "#2ca02c", "mistral": "#ff7f0e", "DRO": "#d62728"}
EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def setting_color(setting: str, order: Sequence[str]) -> str:
    if setting in COLORS:
        return COLORS[setting]
    others = [s for s in order if s not in COLORS]
    return EXTRA_COLORS[others.index(setting) % len(EXTRA_COLORS)] if setting in others else "black"


def _save(figure, path: Path) -> Path:
    with atomic_output(path) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    _pyplot().close(figure)
    return path


def _boundary(axis, probe: LinearProbe, fixed: np.ndarray, xs: np.ndarray, style: str, label: str) -> None:
    """The probe's 50% line in the (z1, z2) plane, the other coordinates held at `fixed`."""
    w = probe.weight
    offset = probe.bias + float(fixed[2:] @ w[2:])
    if abs(w[1]) > 1e-12:
        axis.plot(xs, -(offset + w[0] * xs) / w[1], style, color="black", linewidth=1.4, label=label)
    elif abs(w[0]) > 1e-12:
        axis.axvline(-offset / w[0], linestyle=style, color="black", linewidth=1.4, label=label)


def anchor_space_plot(
    path: Path,
    anchors: AnchorSpace,
    anchor_coords: np.ndarray,
    anchor_settings: Sequence[str],
    anchor_harmless: np.ndarray,
    held_out: dict[tuple[str, str], np.ndarray],
    title: str,
) -> Path:
    """Anchor queries per setting (o harmless, x harmful), both probe boundaries, and arrows from the
    held-out queries' mean without a prompt to their mean under each prompt."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    figure, axis = plt.subplots(figsize=(8.5, 7))
    order = list(dict.fromkeys(list(anchor_settings) + [s for s, _ in held_out]))
    settings = np.asarray(anchor_settings)
    for setting in dict.fromkeys(anchor_settings):
        for harmless, marker, kind in ((0, "x", "harmful"), (1, "o", "harmless")):
            points = anchor_coords[(settings == setting) & (anchor_harmless == harmless)]
            axis.scatter(points[:, 0], points[:, 1], s=14, marker=marker, alpha=0.35, color=setting_color(setting, order),
                         facecolors="none" if marker == "o" else None, label=f"{setting}, {kind}")
    everything = np.concatenate([anchor_coords] + list(held_out.values()))
    low, high = everything[:, 0].min(), everything[:, 0].max()
    margin = 0.05 * (high - low)
    xs = np.linspace(low - margin, high + margin, 50)
    fixed = everything.mean(axis=0)
    y_low, y_high = everything[:, 1].min(), everything[:, 1].max()
    _boundary(axis, anchors.refusal, fixed, xs, "-", "refusal boundary (50%)")
    _boundary(axis, anchors.harmfulness, fixed, xs, "--", "harmfulness boundary (50%)")
    arrows = {}
    for (setting, dataset), points in held_out.items():
        base = held_out.get((NO_PROMPT, dataset))
        if setting == NO_PROMPT or base is None:
            continue
        start, end = base.mean(axis=0)[:2], points.mean(axis=0)[:2]
        width = 2.4 if setting == "DRO" else 1.6
        axis.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=setting_color(setting, order), linewidth=width))
        arrows[setting] = Line2D([], [], color=setting_color(setting, order), linewidth=width, marker=">", markevery=[-1],
                                 label=f"arrow: {setting} (held-out means, from no prompt)")
    for dataset in dict.fromkeys(d for _, d in held_out):
        base = held_out.get((NO_PROMPT, dataset))
        if base is not None:
            centre = base.mean(axis=0)
            axis.plot(*centre[:2], marker="*", markersize=13, color="black")
            axis.annotate(f"held-out {dataset}, no prompt", centre[:2], textcoords="offset points", xytext=(6, 6), fontsize=8)
    pad = 0.05 * (y_high - y_low)
    axis.set_xlim(low - margin, high + margin)
    axis.set_ylim(y_low - pad, y_high + pad)
    explained = anchors.metadata.get("report", {}).get("explained_variance_ratio")
    axis.set_xlabel("PC 1" + (f" ({explained[0]:.0%} of variance)" if explained else ""))
    axis.set_ylabel("PC 2" + (f" ({explained[1]:.0%} of variance)" if explained else ""))
    axis.set_title(title)
    handles, _ = axis.get_legend_handles_labels()
    axis.legend(handles=handles + list(arrows.values()), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    axis.grid(alpha=0.2)
    return _save(figure, path)


def loss_plot(path: Path, metrics: Sequence[dict], terms: Sequence[str], title: str) -> Path:
    """The named metrics over training steps, one panel each (their scales differ); "loss" is the total."""
    plt = _pyplot()
    terms = [t for t in terms if metrics and t in metrics[0]]
    columns = min(4, max(len(terms), 1))
    rows = max(1, -(-len(terms) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for unused in axes.flat[len(terms):]:
        unused.remove()
    steps = [m["step"] for m in metrics]
    for axis, term in zip(axes.flat, terms):
        axis.plot(steps, [m[term] for m in metrics], color="#d62728" if term == "loss" else "#1f77b4")
        axis.set_title("total loss" if term == "loss" else f"{term} term" if term in LossWeights.terms() else term.replace("_", " "))
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def refusal_plot(path: Path, rows: Sequence[EvalRow], title: str) -> Path:
    """Per setting, four panels: the decline judge's counts (queries declined, with the replies that only
    apologise stacked above them, hatched), the mean refusal log-odds, and beside them the reply quality: reply
    drift over the first 8 tokens (bars) and the whole reply (dots), and the share of degenerate responses."""
    plt = _pyplot()
    settings = list(dict.fromkeys(r.setting for r in rows))
    by_key = {(r.setting, r.dataset): r for r in rows}
    figure, axes = plt.subplots(2, 2, figsize=(max(9.0, 1.1 * len(settings) + 4), 7.2))
    (declines, log_odds), (drift, broken) = axes
    positions = np.arange(len(settings))
    width = 0.38
    sets = (("harmful", "#d62728"), ("harmless", "#1f77b4"))

    def values(dataset: str, value) -> np.ndarray:
        found = [by_key.get((s, dataset)) for s in settings]
        return np.array([np.nan if row is None or value(row) is None else value(row) for row in found], float)

    for shift, (dataset, color) in zip((-width / 2, width / 2), sets):
        declined = values(dataset, lambda r: None if r.queries_any_decline is None else r.queries_any_decline / r.num_queries)
        apologies = values(dataset, lambda r: None if r.apology_responses is None else r.apology_responses / r.num_responses)
        drawn = declines.bar(positions + shift, declined, width, color=color)
        declines.bar_label(drawn, [f"{round(h * by_key[(s, dataset)].num_queries)}" if np.isfinite(h) else "" for s, h in zip(settings, declined)],
                           fontsize=7, padding=1, label_type="center", color="white")
        declines.bar(positions + shift, apologies, width, bottom=np.nan_to_num(declined), color=color, alpha=0.35, hatch="//", edgecolor=color)
        log_odds.bar(positions + shift, values(dataset, lambda r: r.mean_refusal_log_odds), width, color=color)
        drift.bar(positions + shift, values(dataset, lambda r: r.reply_drift_opening), width, color=color)
        drift.plot(positions + shift, values(dataset, lambda r: r.reply_drift), "o", color="black", markersize=4)
        degenerate = values(dataset, lambda r: None if r.degenerate_responses is None else r.degenerate_responses / r.num_responses)
        drawn = broken.bar(positions + shift, degenerate, width, color=color)
        broken.bar_label(drawn, [f"{by_key[(s, dataset)].degenerate_responses}" if np.isfinite(h) else "" for s, h in zip(settings, degenerate)],
                         fontsize=7, padding=1)
    declines.set_title("declined (solid) and apology only (hatched)", fontsize=10)
    declines.set_ylabel("share of queries / replies")
    declines.set_ylim(0, 1.15)
    log_odds.set_title("mean refusal log-odds", fontsize=10)
    drift.set_title("reply drift: first 8 tokens (bars), whole reply (dots)", fontsize=10)
    drift.set_ylabel("nats per token (lower is better)")
    broken.set_title("degenerate responses (loop or shout)", fontsize=10)
    broken.set_ylabel("share of responses")
    broken.set_ylim(0, 1.15)
    for axis in axes.flat:
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(positions, settings)
        axis.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for _, color in sets]
    figure.legend(handles, ["harmful queries (declines wanted)", "harmless queries (declines unwanted)"], loc="upper center", ncol=2,
                  bbox_to_anchor=(0.5, 0.955), fontsize=9)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(figure, path)


def movement_plot(path: Path, panels: dict[str, Sequence], title: str) -> Path:
    """Per panel, one arrow per (setting, set) from no prompt to the mean shift: x along the harmfulness
    direction, y along the refusal direction (down = towards refusal)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for axis, (name, rows) in zip(axes[0], panels.items()):
        order = list(dict.fromkeys(r.setting for r in rows))
        extent = max([abs(v) for r in rows for v in (r.refusal_shift, r.harmfulness_shift)] + [1e-3]) * 1.25
        for row in rows:
            if row.setting == NO_PROMPT:
                continue
            harmful = row.dataset.startswith("harmful")
            color = setting_color(row.setting, order)
            axis.annotate("", xy=(row.harmfulness_shift, row.refusal_shift), xytext=(0, 0),
                          arrowprops=dict(arrowstyle="-|>", color=color, linewidth=2, linestyle="-" if harmful else "--"))
            axis.plot(row.harmfulness_shift, row.refusal_shift, "x" if harmful else "o", color=color,
                      label=f"{row.setting}, {row.dataset}", markerfacecolor="none")
        axis.axhline(0, color="black", linewidth=0.6)
        axis.axvline(0, color="black", linewidth=0.6)
        axis.set_xlim(-extent, extent)
        axis.set_ylim(-extent, extent)
        axis.set_xlabel("shift along the harmfulness direction (right: looks more harmless)")
        axis.set_ylabel("shift along the refusal direction (down: towards refusal)")
        axis.set_title(name)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.2)
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def tradeoff_plot(
    path: Path, points: dict[str, Sequence[tuple[float, float, float]]], references: dict[str, tuple[float, float, float]], title: str
) -> Path:
    """Harmful declines against what they cost on the harmless set, as (harmless reply drift over the first 8
    tokens, harmful queries declined %, harmless queries declined %) per seed: declines against the drift (left)
    and against the false declines (right). One small marker per seed and a large one at the mean for each
    variant; the human prompts and no prompt as squares."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    labels = ("harmless reply drift, first 8 tokens, nats/token (lower is better)", "harmless queries declined, % (lower is better)")
    for panel, (axis, column, label) in enumerate(zip(axes, (0, 2), labels)):
        for name, point in references.items():
            axis.plot(point[column], point[1], "s", color=COLORS.get(name, "#7f7f7f"), markersize=8, alpha=0.8)
            if panel == 0:  # on the right the human prompts share one corner: their names would overlap
                axis.annotate(name, (point[column], point[1]), textcoords="offset points", xytext=(5, -10), fontsize=8, color="#555555")
        for number, (name, seeds) in enumerate(points.items()):
            color = plt.cm.tab10(number % 10)
            xs, ys = np.array([p[column] for p in seeds], float), np.array([p[1] for p in seeds], float)
            axis.scatter(xs, ys, s=18, color=color, alpha=0.5)
            axis.plot(np.nanmean(xs), np.nanmean(ys), "o", color=color, markersize=10, label=name)
        if panel == 0:
            axis.axvline(1.0, color="black", linestyle=":", linewidth=1, label="drift target (1.0, first 8 tokens)")
            axis.set_ylabel("harmful queries declined, % (higher is better)")
        axis.axhline(30, color="black", linestyle="--", linewidth=0.8)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)
