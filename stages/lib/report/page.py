"""The `report` stage's HTML: figures drawn from the series tables, example tables, the compare page.

Everything here reads only tables and the summary (as `stages.report.read_series` returns them),
so a page can be drawn again for any revision whose `metrics/report` files are in git.
"""

from __future__ import annotations

import html

from stages.lib.report import data as rd


def figures(tables: dict, summary: dict) -> list[tuple[str, str, str | None, str]]:
    """(name, section title, SVG data URI or None, caption or note) per figure, from tables alone."""
    from stages.lib.report import figures as rf

    t, s = tables, summary
    training = {k: [(r["step"], r[k]) for r in t["training"] if r.get(k) is not None]
                for k in (t["training"][0] if t["training"] else {}) if k != "step"}
    out = [
        ("verb_noun", "Instructions: verbs and nouns",
         rf.fig_verb_noun(t["verb_noun"], s["kept"], s["verb_noun_pairs"]),
         "Root verb of each kept instruction and its direct-object noun (spaCy dependency parse)."),
        ("rouge_seeds", "Novelty against the seeds", rf.fig_rouge_seeds(t["rouge_seeds"], s["rouge_seeds_mean"]),
         "Each kept instruction's highest ROUGE-L F1 with any seed task (as self-instruct's Figure 3)."),
        ("rouge_threshold", "Novelty filter around its threshold",
         rf.fig_rouge_threshold(t["rouge_threshold"], s["rouge_threshold"]),
         "The filter's score: max ROUGE-L with the seeds and every earlier kept instruction; bins are (a, b]."),
        *([("selection", "Selection", rf.fig_selection(t["selection"], s["select_score"], s["select_cut"],
                                                         s["select_policy"]),
             "From metrics/select.json: the deciding score of every row the policy scored; dashed: the cut.")]
          if t.get("selection") else []),
        ("lengths", "Lengths",
         rf.fig_lengths({f: t[f"lengths_{f}"] for f in rd.LENGTH_FIELDS}, s["share_with_input"], s["kept"]),
         "Kept examples; the input histogram counts those with an input."),
        ("funnel", "Filter funnel", rf.fig_funnel(t["funnel"]),
         "From metrics/filter.json: unparsed teacher items, then each rule, novelty and near duplicates."),
        ("ingest", "Ingest and tokenizing", rf.fig_ingest(t["ingest_sources"], t["languages"], t["splitting"],
                                                           s["mixture"]),
         "From metrics/ingest.json, the conversations' language ID and metrics/tokenize.json."),
        ("spend", "Teacher spend", rf.fig_spend(t["spend"]),
         "From metrics/generate.json: cache hits cost nothing; tokens and cost count this run's calls."),
    ]
    if training:
        out.append(("training", "Training and evaluation",
                    rf.fig_training(training, rd.loss_series(training), s),
                    "dvclive series of the train stage; dashed: final validation loss from metrics/eval.json."))
    else:
        out.append(("training", "Training and evaluation", None, "No training metrics in this run."))
    if t["judge"]:
        smoke = (" SMOKE TEST ONLY: the judge is the embedded model, whose verdicts follow the position shown; "
                 "these win rates only show that the machinery runs." if s.get("judge_smoke_test_only") else "")
        caption = "Pairwise judge (metrics/eval.json): win rate +- 1.96 standard errors; dotted: 50%, a tie."
        out.append(("judge", "Win rate", rf.fig_judge(t["judge"]), caption + smoke))
    else:
        out.append(("judge", "Win rate", None, "No judge evaluation in this run."))
    return [(name, title, rf.svg_uri(fig, name) if fig is not None else None, caption)
            for name, title, fig, caption in out]


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption,.note{color:#555;font-size:.95em}
table{border-collapse:collapse;font-size:.85em;width:100%}td,th{border:1px solid #ddd;padding:4px;vertical-align:top;
text-align:left}th{background:#f4f4f4}td{max-width:420px;overflow-wrap:break-word;white-space:pre-wrap}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:1.5em}"""


def _figure_html(name: str, uri: str | None, caption: str, title: str) -> str:
    if uri is None:
        return f'<p class="note" id="note-{html.escape(name)}">{html.escape(caption)}</p>'
    return (f'<figure class="figure" id="fig-{html.escape(name)}"><img src="{uri}" alt="{html.escape(title)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table_html(rows: list[dict], cls: str, max_chars: int = 400) -> str:
    if not rows:
        return f'<p class="note">No {cls} examples.</p>'
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)

    def cell(v):
        v = "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
        return html.escape(v if len(v) <= max_chars else v[:max_chars] + " ...")

    body = "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in cols) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def page(title: str, sections: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(sections)
            + "\n</body></html>\n")


def render(tables: dict, summary: dict, kept_samples: list[dict], rejected_samples: list[dict]) -> str:
    sections = []
    for name, title, uri, caption in figures(tables, summary):
        sections.append(f"<h2>{html.escape(title)}</h2>" + _figure_html(name, uri, caption, title))
    sections.append(f"<h2>{len(kept_samples)} random kept examples</h2>" + _table_html(kept_samples, "kept"))
    sections.append(f"<h2>{len(rejected_samples)} random rejected examples</h2>"
                    + _table_html(rejected_samples, "rejected"))
    return page(f"stillhouse data report: {summary['kept']:,} kept, {summary['rejected']:,} rejected", sections)


def render_compare(a: str, b: str, sa: tuple | None, sb: tuple | None) -> str:
    figs = [dict((f[0], f) for f in figures(*s)) if s else {} for s in (sa, sb)]
    sections = []
    for name in dict.fromkeys(list(figs[0]) + list(figs[1])):
        cols = []
        for label, fs in zip((a, b), figs):
            f = fs.get(name)
            body = (_figure_html(f"{name}-{label}", f[2], f[3], f[1]) if f
                    else '<p class="note">not in this revision</p>')
            cols.append(f"<div><h3>{html.escape(label)}</h3>{body}</div>")
        title = (figs[0].get(name) or figs[1].get(name))[1]
        sections.append(f'<h2>{html.escape(title)}</h2><div class="cols">{"".join(cols)}</div>')
    return page(f"stillhouse data report: {a} vs {b}", sections)
