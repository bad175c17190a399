"""The report of a study shaped like the demo's (7 methods x 2 setups, between subjects, 2-3 simulated raters
per condition): every table of the HTML is typeset in the PDF with every value, page 1 is the summary with
Table 5, and no significance claim goes beyond what an exact rater permutation test supports."""

import base64
import re
import zlib
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from analysis import figures, selectors, stats
from analysis.demo import demo_study_create
from analysis.report import (
    CAPTIONS,
    FIGURE_CAPTIONS,
    _example_stimuli,
    _fmt,
    report_build,
    report_html,
    report_pdf,
)

METHODS = ["c3lt", "cve", "ldce-cls", "rcsb", "scout", "semantic", "slc"]  # the demo's seven
# Large true differences (0.55 to 0.95): a rater-clustered GEE finds them with 2-3 raters per condition, an
# exact rater permutation test cannot (3 vs 3 raters: smallest two-sided p 2/20 = 0.1).
TRUTH = {(m, s): 0.55 + 0.4 * i / 6 for i, m in enumerate(METHODS) for s in ("random", "consistent")}


def demo_shaped_study():
    # 3 raters per condition (42); the demo's inattentive raters and one who quits leave 1-3 per condition.
    return demo_study_create(accuracy=TRUTH, raters_per_condition=3, n_pairs=3, pairs_per_rater=2, n_test=10,
                             n_learning=1)  # fmt: skip


def pdf_pages_text(pdf: bytes) -> list[str]:
    """The text each page of a reportlab PDF shows, in drawing order (its strings, unescaped)."""
    objects = {
        int(m.group(1)): m.group(2) for m in re.finditer(rb"(\d+) 0 obj\s*(.*?)endobj", pdf, flags=re.DOTALL)
    }

    def stream(body: bytes) -> bytes:
        data = re.search(rb"stream\r?\n(.*?)\r?\n?endstream", body, flags=re.DOTALL).group(1)
        if b"/ASCII85Decode" in body:
            data = base64.a85decode(data.strip().removesuffix(b"~>"))
        return zlib.decompress(data) if b"/FlateDecode" in body else data

    def strings(content: bytes) -> str:
        out = []
        for m in re.finditer(rb"\(((?:\\.|[^\\)])*)\)\s*Tj", content, flags=re.DOTALL):
            raw = re.sub(rb"\\([0-7]{3})", lambda o: bytes([int(o.group(1), 8)]), m.group(1))
            raw = re.sub(rb"\\(.)", rb"\1", raw)
            out.append(raw.decode("cp1252"))
        return "\n".join(out)

    kids = next(body for body in objects.values() if b"/Type /Pages" in body)
    order = [int(k) for k in re.findall(rb"(\d+) 0 R", re.search(rb"/Kids \[(.*?)\]", kids, re.S).group(1))]
    pages = []
    for number in order:
        contents = re.search(rb"/Contents (\d+) 0 R", objects[number]).group(1)
        pages.append(strings(stream(objects[int(contents)])))
    return pages


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.django_db
def test_every_table_of_the_html_is_in_the_pdf_with_every_value_and_page_one_is_the_summary():
    study = demo_shaped_study()
    report = report_build(study=study, n_boot=200, mixed=False)
    examples = _example_stimuli(study)  # the stimuli figure: one example per condition, both images
    assert len(examples) == 14 and all(q is not None and d is not None for _, q, d in examples)
    assert len(report.tables["comparisons"]) == 2 * 21 + 21  # GEE: 42 pairwise + 21 interaction contrasts
    pages = pdf_pages_text(report_pdf(report))
    everything = squeeze("".join(pages))
    html = report_html(report)
    for name, frame in report.tables.items():
        assert f'id="table-{name}"' in html
        assert squeeze(name.replace("_", " ")) in everything.lower(), f"table {name} missing from the PDF"
        assert squeeze(CAPTIONS[name]) in everything, f"caption of {name} cut or missing"
        for column in frame.columns if len(frame) else []:  # an empty table says "(no rows)", as the HTML
            assert squeeze(str(column).replace("_", " ")) in everything, (name, column)
        for row in frame.itertuples(index=False):
            for value in row:
                assert squeeze(_fmt(value)) in everything, f"{name}: {_fmt(value)!r} not in the PDF"
    for caption in FIGURE_CAPTIONS.values():
        assert squeeze(caption) in everything
    # Page 1: the summary (headline, plan, deviations, small-study warning) and all of Table 5.
    first = squeeze(pages[0])
    for text in (
        "Summary",
        report.meta["headline"],
        "Pre-registered analysis plan",
        "Small study",
        "Table 5",
    ):
        assert squeeze(text) in first, text
    for row in report.tables["table5"].itertuples(index=False):
        assert all(squeeze(_fmt(v)) in first for v in row), row
    assert not re.search(r"\bnan\b", pages[0]), "an undefined number printed as 'nan' on page 1"
    assert squeeze("c3lt / consistent: 1 rater, no power") in first  # the one-rater condition, in words
    html_small = html[html.index('id="small-study"') :]
    assert "1 rater, no power" in html_small and not re.search(r"\bnan\b", html_small[:3000])
    assert "page 1" in pages[0] and f"page {len(pages)}" in pages[-1]


def exact_rater_permutation_p(per_rater, a, b) -> float:
    """Two-sided exact permutation p of mean(b) - mean(a) over the raters' accuracies of two cells."""
    ya, yb = per_rater[a], per_rater[b]
    pooled = np.array(ya + yb)
    observed = abs(np.mean(yb) - np.mean(ya))
    diffs = []
    for chosen in combinations(range(len(pooled)), len(yb)):
        mask = np.zeros(len(pooled), dtype=bool)
        mask[list(chosen)] = True
        diffs.append(abs(pooled[mask].mean() - pooled[~mask].mean()))
    return float(np.mean(np.array(diffs) >= observed - 1e-12))


@pytest.mark.django_db
def test_a_demo_shaped_report_claims_nothing_a_rater_permutation_test_does_not_support():
    study = demo_shaped_study()
    report = report_build(study=study, n_boot=200, mixed=False)
    primary = report.tables["primary"]
    # The rater permutation, computed here independently by enumeration, for every pairwise contrast.
    test = stats.analysed_test_rows(selectors.responses_frame(study=study))
    means = test.groupby(["method", "setup", "rater"])["correct"].mean()
    per_rater = {cell: means.loc[cell].tolist() for cell in {k[:2] for k in means.index}}
    assert {len(v) for v in per_rater.values()} <= {1, 2, 3} and len(per_rater) == 14
    alpha = report.meta["preregistration"]["alpha"]
    pairwise = primary[primary["kind"] == "pairwise"]
    assert len(pairwise) == 42
    for row in pairwise.itertuples():
        a, b = (row.method_a, row.setup), (row.method_b, row.setup)
        p = exact_rater_permutation_p(per_rater, a, b)
        assert row.p_permutation == pytest.approx(p, abs=1e-12) and row.exact, row.comparison
        assert row.p != row.p or (row.p >= p - 1e-12 and row.p_adjusted >= p - 1e-12)  # NaN: not computable
        assert not row.significant or p < alpha
    # Every primary p is at least its permutation p, so no primary claim outruns the permutation test; with
    # 1-3 raters per condition a pairwise permutation test reaches no p below 0.1: nothing is significant.
    assert (primary["p"].isna() | (primary["p"] >= primary["p_permutation"] - 1e-12)).all()
    assert not primary.loc[primary["p"].isna(), "significant"].any()
    assert pairwise["p_permutation"].min() >= 0.1 - 1e-12
    assert report.meta["significant_primary"] == [] and "not significant" in report.meta["headline"]
    # ...although the data hold the differences a stimuli-fixed, rater-clustered GEE reports as tiny p-values
    # (the complaint): the report keeps them, labelled secondary, with no verdict of significance.
    gee = report.tables["comparisons"]
    assert (gee["p_holm"] < 0.05).any()
    assert all(
        "significant" not in frame.columns for name, frame in report.tables.items() if name != "primary"
    )
    assert CAPTIONS["comparisons"].startswith("SECONDARY")
    assert len(report.tables["small_cells"]) == 14  # every condition flagged on page 1


def figure_tables(n_pairs: int = 3):
    """Accuracy per cell and per pair, and the learning gain, for the demo's 14 conditions."""
    rng = np.random.default_rng(0)
    cells = sorted(TRUTH)
    acc = pd.DataFrame(
        [{"method": m, "setup": s, "accuracy": p, "effective_low": p - 0.1, "effective_high": p + 0.08}
         for m, s in cells for p in [TRUTH[(m, s)]]]
    )  # fmt: skip
    by_pair = pd.DataFrame(
        [{"pair_label": f"class {i} vs class {i + 1}", "method": m, "setup": s,
          "accuracy": rng.uniform(0.4, 1)} for i in range(n_pairs) for m, s in cells]
    )  # fmt: skip
    gain = pd.DataFrame(
        [{"method": m, "setup": s, "pre_accuracy": 0.0, "test_accuracy": TRUTH[(m, s)]} for m, s in cells]
    )
    return acc, by_pair, gain


@pytest.mark.parametrize("which", ["accuracy", "pairs", "gain"])
def test_figure_legends_stay_off_the_data_and_intervals_are_named(which):
    import matplotlib.pyplot as plt

    acc, by_pair, gain = figure_tables()
    fig = {
        "accuracy": lambda: figures.accuracy_figure(acc),
        "pairs": lambda: figures.pair_figure(by_pair),
        "gain": lambda: figures.gain_figure(gain),
    }[which]()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    legends = [*fig.legends, *([ax.get_legend()] if ax.get_legend() else [])]
    assert len(legends) == 1
    box, data = legends[0].get_window_extent(renderer), ax.get_window_extent(renderer)
    assert not box.overlaps(data), (which, box, data)
    # Every legend entry is inside the figure (nothing cut at its edge).
    whole = fig.bbox
    assert whole.x0 <= box.x0 and box.x1 <= whole.x1 and whole.y0 <= box.y0 and box.y1 <= whole.y1
    # Markers at accuracy 0 or 1 are drawn whole: the accuracy axis runs past both ends.
    low, high = ax.get_xlim() if which == "pairs" else ax.get_ylim()
    assert low < 0.0 < 1.0 < high or (which == "accuracy" and low == 0.0 < 1.0 < high), (low, high)
    texts = " ".join(t.get_text() for t in fig.texts) + " " + ax.get_title()
    named = {"accuracy": "95% Wilson", "pairs": "no intervals", "gain": "don't know counts as wrong"}[which]
    assert named in texts
    plt.close(fig)
