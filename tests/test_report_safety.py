"""Report labels built from teacher or corpus text are safe: in DVC's plot page (dvc-render embeds the CSV values
inside `<script>` without escaping `</`), in matplotlib (`$...$` is not mathtext) and in the compare page's ids."""

from __future__ import annotations

import csv
from html.parser import HTMLParser

import pytest

from stages.lib.report import data as rd
from stages.lib.report.figures import svg_uri
from stages.lib.report.page import render_compare
from stages.report import SERIES, ReportParams, write_series
from tests.support.report_inputs import report_inputs

ATTACK = ["Check the list</script><svg/1 carefully before you send it to the manager.",
          "Summarize q)/onload=(alert)(1)// in two short sentences for a newsletter."]  # the review's two (M1)


class Tags(HTMLParser):
    """Every start tag with its attributes, as a browser's tokenizer sees them."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags_of(page: str) -> list[tuple[str, dict]]:
    p = Tags()
    p.feed(page)
    p.close()
    return p.tags


@pytest.fixture(scope="module")
def nlp():
    return rd.load_parser(ReportParams().parser)


def test_teacher_text_in_the_verb_noun_series_is_inert_in_dvc_plots_page(nlp, tmp_path):
    from dvc_render import VegaRenderer
    from dvc_render.html import render_html

    rows = rd.verb_noun_table(rd.verb_noun_pairs(ATTACK * 2 + ["Write a poem about the sea."], nlp), 10, 10)
    assert {(r["verb"], r["noun"]) for r in rows} == {("check", "other"), ("summarize", "other"), ("write", "poem")}
    tables = {name: [] for name in SERIES} | {"verb_noun": rows}
    write_series(tmp_path, tables, {})
    written = list(csv.DictReader((tmp_path / "verb_noun.csv").open(encoding="utf-8")))
    assert all(rd.PLAIN_LABEL.fullmatch(r[k]) for r in written for k in ("verb", "noun"))
    renderer = VegaRenderer(written, "metrics/report/verb_noun.csv", x="count", y="label")
    page = (tmp_path / "plots.html")
    render_html([renderer], page)
    assert {tag for tag, _ in tags_of(page.read_text())} <= {"html", "head", "body", "meta", "title", "style",
                                                            "script", "div"}
    assert not any(k.startswith("on") for _, attrs in tags_of(page.read_text()) for k in attrs)


@pytest.mark.parametrize("word, label", [("poem", "poem"), ("e-mail", "e-mail"), ("o'clock", "o'clock"),
                                         ("list</script><svg/1", "other"), ("a$^$c", "other"), ("a b", "other"),
                                         ("x" * 41, "other"), ("", "other")])
def test_plain_label(word, label):
    assert rd.plain_label(word) == label


@pytest.mark.parametrize("text", ["a$^$c", "a$}$c", r"x$\foo$y"])
def test_a_dollar_in_a_label_does_not_crash_the_figure(text):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_yticks([0], [text])
    ax.set_title(f"Fix the {text}.")
    assert svg_uri(fig, "t").startswith("data:image/svg+xml;base64,")


def test_the_compare_page_escapes_the_label_in_ids(nlp):
    label = 'x"><img src=x onerror=alert(1)>'  # a valid git branch or folder name (review L1)
    tables, summary, *_ = report_inputs(nlp)
    tags = tags_of(render_compare(label, "main", (tables, summary), None))
    assert not any(tag == "img" and "onerror" in attrs for tag, attrs in tags)
    ids = [attrs["id"] for _, attrs in tags if "id" in attrs]
    assert f"fig-verb_noun-{label}" in ids and "fig-verb_noun-main" not in ids
