"""Figures of the `report` stage: matplotlib drawings of the tables in `stages.lib.report.data`.

Each `fig_*` function takes table rows and returns a matplotlib Figure; `svg_uri` turns it into
a self-contained `data:image/svg+xml` URI (glyphs as paths: no fonts, no scripts, no network),
byte-identical for the same data.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

plt.rcParams.update({
    "font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11, "xtick.labelsize": 10, "ytick.labelsize": 10,
    "legend.fontsize": 10, "figure.dpi": 100, "axes.spines.top": False, "axes.spines.right": False,
    "svg.fonttype": "path", "axes.grid": True, "grid.alpha": 0.3,
    "text.parse_math": False,  # a `$` in a label is a dollar: "Fix the a$^$c." must not crash mathtext
})
KEPT, REJECTED, OTHER = "#2b7bba", "#d95f02", "#7570b3"


def svg_uri(fig, name: str) -> str:
    """The figure as a base64 SVG data URI (closes the figure). `name` salts the SVG's ids."""
    buf = io.StringIO()
    with plt.rc_context({"svg.hashsalt": name}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue().encode()).decode()


def _bars_h(ax, labels, values, color, fmt="{:,}"):
    y = np.arange(len(labels))
    ax.barh(y, values, color=color)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.grid(axis="y", visible=False)
    for yi, v in zip(y, values):
        ax.annotate(fmt.format(v), (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=9)
    ax.set_xlim(0, max([1, *values]) * 1.15)


def _hist_axes(ax, rows, series, colors, labels, title, xlabel):
    edges = [r["bin_start"] for r in rows] + [rows[-1]["bin_end"]] if rows else [0, 1]
    for k, c, lab in zip(series, colors, labels):
        ax.stairs([r[k] for r in rows], edges, fill=True, alpha=0.55 if len(series) > 1 else 0.9, color=c, label=lab)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("instructions")
    if len(series) > 1:
        ax.legend(frameon=False)


# ---------------------------------------------------------------- data figures


def fig_verb_noun(rows: list[dict], n_instructions: int, n_pairs: int):
    """Nested pie: inner ring the top verbs, outer ring each verb's top direct-object nouns."""
    fig, ax = plt.subplots(figsize=(9, 9.4))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92)
    ax.set_title(f"Root verbs and their direct-object nouns\n{n_pairs:,} of {n_instructions:,} kept instructions "
                 f"have a verb-noun structure; top {len({r['verb'] for r in rows})} verbs shown")
    if not rows:
        ax.text(0.5, 0.5, "no verb-noun structure found", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
        return fig
    verbs = list(dict.fromkeys(r["verb"] for r in rows))
    cmap = plt.get_cmap("tab20")
    inner = [sum(r["count"] for r in rows if r["verb"] == v) for v in verbs]
    total = sum(inner)
    vcolor = {v: cmap(i % 20) for i, v in enumerate(verbs)}

    def labels(names, sizes, min_share):
        return [n if s / total >= min_share else "" for n, s in zip(names, sizes)]

    ax.pie(inner, radius=0.62, colors=[vcolor[v] for v in verbs], labels=labels(verbs, inner, 0.015),
           labeldistance=0.62, rotatelabels=True, startangle=90, counterclock=False,
           wedgeprops={"width": 0.34, "edgecolor": "white", "linewidth": 1}, textprops={"fontsize": 10})
    outer = [r["count"] for r in rows]
    ocolor = [tuple(0.55 * np.array(vcolor[r["verb"]][:3]) + 0.45) for r in rows]
    ax.pie(outer, radius=1.0, colors=ocolor, labels=labels([r["noun"] for r in rows], outer, 0.008),
           labeldistance=0.8, rotatelabels=True, startangle=90, counterclock=False,
           wedgeprops={"width": 0.38, "edgecolor": "white", "linewidth": 0.8}, textprops={"fontsize": 8.5})
    for t in ax.texts:
        t.set_horizontalalignment("center")
        t.set_verticalalignment("center")
    ax.set(aspect="equal", xlim=(-1.03, 1.03), ylim=(-1.03, 1.03))
    return fig


def fig_rouge_seeds(rows: list[dict], mean: float | None):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    extra = f" (mean {mean:.3f})" if mean is not None else ""
    _hist_axes(ax, rows, ["count"], [KEPT], ["kept"],
               f"Kept instructions: max ROUGE-L F1 against the seed tasks{extra}", "max ROUGE-L F1 with any seed task")
    return fig


def fig_rouge_threshold(rows: list[dict], threshold: float):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _hist_axes(ax, rows, ["kept", "too_similar", "near_duplicate"], [KEPT, REJECTED, OTHER],
               ["kept", "rejected: too similar", "rejected: near duplicate"],
               f"Filter scores around the ROUGE-L threshold ({threshold:g})",
               "max ROUGE-L F1 with the seeds and earlier kept instructions")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2)
    ax.annotate(f"threshold {threshold:g}", (threshold, 1), xycoords=("data", "axes fraction"), xytext=(4, -12),
                textcoords="offset points", fontsize=9)
    return fig


def fig_selection(rows: list[dict], score: str, cut: float | None, policy: str):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _hist_axes(ax, rows, ["kept", "rejected"], [KEPT, REJECTED], ["kept", "rejected"],
               f"Selection by {score}: {policy}", f"{score} (bin start)")
    if cut is not None:
        ax.axvline(cut, color="black", linestyle="--", linewidth=1.2)
        ax.annotate(f"cut {cut:g}", (cut, 1), xycoords=("data", "axes fraction"), xytext=(4, -12),
                    textcoords="offset points", fontsize=9)
    return fig


def fig_lengths(tables: dict[str, list[dict]], share_with_input: float, n: int):
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    colors = {"instruction": KEPT, "input": OTHER, "output": REJECTED}
    for ax, (f, rows) in zip(axes, tables.items()):
        _hist_axes(ax, rows, ["count"], [colors.get(f, KEPT)], [f], f, f"{f} length (student tokens)")
    axes[1].set_title(f"input ({share_with_input:.0%} of examples have one)")
    fig.suptitle(f"Lengths of the {n:,} kept examples in student-tokenizer tokens", fontsize=13)
    fig.tight_layout()
    return fig


def fig_funnel(rows: list[dict]):
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.2))
    labels = [r["step"] if not r["dropped"] else f"{r['step']} (-{r['dropped']:,})" for r in rows]
    colors = [KEPT if r["step"] in ("generated", "kept") else REJECTED if r["dropped"] else "#bbbbbb" for r in rows]
    _bars_h(ax, labels, [r["left"] for r in rows], colors)
    ax.set_title("Filter funnel: rows left after each step (dropped in brackets)")
    ax.set_xlabel("rows")
    return fig


def fig_ingest(sources: list[dict], langs: list[dict], split: list[dict], mixture: str, top_languages: int = 10):
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    ax = axes[0]
    x = np.arange(len(sources))
    for k, (col, c) in enumerate([("read", "#bbbbbb"), ("clean", OTHER), ("in_mixture", KEPT)]):
        ax.bar(x + (k - 1) * 0.27, [s[col] for s in sources], width=0.27, color=c, label=col.replace("_", " "))
    ax.set_xticks(x, [s["source"] for s in sources])
    ax.set_title(f"Rows per source (mixture '{mixture}')")
    ax.set_xlabel("source")
    ax.set_ylabel("conversations")
    ax.set_ylim(0, max([1] + [s["read"] for s in sources]) * 1.3)
    ax.legend(frameon=False, ncols=3, loc="upper center")
    ax = axes[1]
    langs = langs[:top_languages]
    x = np.arange(len(langs))
    ax.bar(x, [r["kept"] for r in langs], color=KEPT, label="kept")
    ax.bar(x, [r["dropped"] for r in langs], bottom=[r["kept"] for r in langs], color=REJECTED, label="dropped")
    ax.set_xticks(x, [f"{r['language']}\n{r['share']:.0%}" for r in langs])
    ax.set_ylim(0, max([1] + [r["kept"] + r["dropped"] for r in langs]) * 1.2)
    ax.set_title(f"Languages (py3langid), top {len(langs)}")
    ax.set_xlabel("language")
    ax.set_ylabel("conversations")
    ax.legend(frameon=False)
    by = {r["item"]: r["value"] for r in split}
    counts = [r for r in split if r["item"] in ("split conversations", "truncated", "prompt too long")]
    _bars_h(axes[2], [r["item"] for r in counts], [r["value"] for r in counts], OTHER)
    axes[2].set_title(f"Tokenizing at max_seq_len: {by.get('tokens dropped', 0):,} tokens dropped\n"
                      f"of {by.get('conversations in', 0):,} conversations ({by.get('examples', 0):,} examples)",
                      fontsize=12)
    axes[2].set_xlabel("conversations")
    fig.tight_layout()
    return fig


def fig_spend(rows: list[dict]):
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    by = {r["item"]: r["value"] for r in rows}
    req = [r for r in rows if r["item"] in ("requests", "cache hits", "teacher calls", "failed")]
    _bars_h(axes[0], [r["item"] for r in req], [r["value"] for r in req], [KEPT, "#7fbf7f", REJECTED, "#aa3333"])
    axes[0].set_title("Teacher requests")
    axes[0].set_xlabel("requests")
    tok = [r for r in rows if r["item"].endswith("tokens")]
    _bars_h(axes[1], [r["item"] for r in tok], [r["value"] for r in tok], OTHER)
    axes[1].set_title(f"Tokens paid for: cost ${by.get('cost (USD)', 0):,.4f}")
    axes[1].set_xlabel("tokens (this run's teacher calls)")
    fig.tight_layout()
    return fig


def fig_training(series: dict[str, list], losses: dict[str, list], eval_m: dict):
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    for name, color in (("train", KEPT), ("validation", REJECTED)):
        if name in losses:
            s, v = zip(*losses[name]) if losses[name] else ((), ())
            ax.plot(s, v, marker="o" if len(s) < 40 else None, ms=3, color=color, label=f"{name} loss")
    for key, label, ls in (("val_loss", "validation loss (final student)", "--"),
                           ("base_val_loss", "validation loss (base)", ":")):
        if eval_m.get(key) is not None:
            ax.axhline(eval_m[key], color=REJECTED if key == "val_loss" else "gray", linestyle=ls, label=label)
    ax.set_title("Loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.legend(frameon=False, fontsize=9, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    for ax, names, title, ylabel in (
            (axes[1], [("tokens_per_s", "all tokens"), ("supervised_tokens_per_s", "supervised tokens")], "Throughput",
             "tokens / s"),
            (axes[2], [("padding_efficiency", "padding efficiency")], "Padding efficiency", "real tokens / slots")):
        for (key, label), color in zip(names, (KEPT, OTHER)):
            if series.get(key):
                s, v = zip(*series[key])
                ax.plot(s, v, color=color, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if len(names) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False)
    axes[2].set_ylim(0, 1.05)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _judge_label(r: dict) -> str:
    extra = [f"{name} {r[k]:.0%}" for k, name in (("position_flip_rate", "position flips"),
                                                  ("longer_wins_rate", "longer wins"), ("stop_rate", "stopped"))
             if isinstance(r.get(k), (int, float)) and np.isfinite(r[k])]
    return f"{r['eval_set']} (n={r['n']})" + ("\n" + ", ".join(extra) if extra else "")


def fig_judge(rows: list[dict]):
    fig, ax = plt.subplots(figsize=(9, 0.8 * len(rows) + 1.8))
    y = np.arange(len(rows))
    wr = np.array([r["win_rate"] for r in rows])
    err = np.array([[r["win_rate"] - r["low"] for r in rows], [r["high"] - r["win_rate"] for r in rows]])
    ax.barh(y, wr, xerr=err, color=KEPT, capsize=4)
    ax.set_yticks(y, [_judge_label(r) for r in rows])
    ax.axvline(50, color="gray", linestyle=":")
    for yi, r in zip(y, rows):
        ax.annotate(f"{r['win_rate']:.1f}% [{r['low']:.1f}, {r['high']:.1f}]", (r["high"], yi), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=9)
    ax.set_xlim(0, 115)
    ax.invert_yaxis()
    ax.set_title("Judge win rate of the student vs the reference (95% interval)\n"
                 "with the judge's position flips, wins of the longer answer, answers that stopped", fontsize=12)
    ax.set_xlabel("win rate (%)")
    return fig
