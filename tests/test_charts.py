"""Charts: every axis of layer or class names is categorical in forward order; histograms share a log axis."""

import numpy as np
import pytest
import torch

from meansparse_core.charts import (PANEL_WIDTH, PRESENTATION_FONT_SIZE, fraction_replaced_chart, histogram_chart,
                                    names_axis, perturbation_chart, perturbation_split_chart, sweep_chart, top_k_chart)
from meansparse_core.models import bundled_models, load_model
from meansparse_core.one_image import TopK
from meansparse_core.probes import Sample, probe
from meansparse_core.statistics_lookup import find_statistics
from meansparse_app.ui.chart_style import download_config, in_large_type


@pytest.fixture(scope="module", params=["cifar-resnet9", "digits-cnn"])
def demo_probes(request):
    spec = next(s for s in bundled_models() if s.name == request.param)
    model = load_model(spec).eval()
    stats = find_statistics(spec, model, spec.dataset).stats
    clean = torch.rand(1, *spec.input_size, generator=torch.Generator().manual_seed(0))
    return probe(model, stats, clean, (clean + 0.03).clamp(0, 1), alpha=0.5), [t.name for t in stats.tap_list]


def test_layer_charts_show_every_tap_name_as_a_category_in_forward_order(demo_probes):
    probes, names = demo_probes
    assert any(n.isdigit() for n in names)  # names Plotly would otherwise read as numbers
    for figure in (fraction_replaced_chart(probes), perturbation_chart(probes), perturbation_chart(probes, False),
                   perturbation_split_chart(probes)):
        axis = figure.layout.xaxis
        assert axis.type == "category" and list(axis.categoryarray) == names
        for trace in figure.data:
            assert list(trace.x) == names


def test_layer_chart_legends_sit_below_slanted_names_and_every_axis_has_a_title(demo_probes):
    """Seen on the CIFAR-10 demo model's Layers page: with slanted layer names the legend (placed at
    y=-0.3 of the plot) covered the x-axis title; the fraction chart's y axis had no title; the split
    chart's ran past its plot into the chart's title."""
    probes, _ = demo_probes
    rng = np.random.default_rng(0)
    histogram = histogram_chart(Sample(*(rng.normal(size=500) for _ in range(4))), 0.0, 0.5, "feature value")
    for figure in (fraction_replaced_chart(probes), perturbation_chart(probes), perturbation_chart(probes, False),
                   perturbation_split_chart(probes), histogram):
        legend = figure.layout.legend
        assert (legend.yref, legend.y, legend.yanchor) == ("container", 0, "bottom")  # Plotly makes room for it
        assert 0 < len(figure.layout.yaxis.title.text) <= 30  # about the plot's height of a 340-px chart
    assert histogram.layout.margin.b >= 80  # its shared x title is an annotation, which gets no room of its own


def test_lines_that_can_coincide_stay_visible(demo_probes):
    """Where MeanSparse changes little, "with" lay exactly on "without" and hid it (same for clean and
    adversarial histograms): the line drawn first is wider."""
    probes, _ = demo_probes
    without, with_meansparse = perturbation_chart(probes).data
    assert without.line.width > with_meansparse.line.width
    rng = np.random.default_rng(0)
    clean, adversarial = histogram_chart(Sample(*(rng.normal(size=50) for _ in range(4))), 0.0, 0.5, "x").data[:2]
    assert (clean.name, adversarial.name) == ("clean", "adversarial") and clean.line.width > adversarial.line.width


def test_cifar_tap_names_with_dots_are_kept():
    spec = next(s for s in bundled_models() if s.name == "cifar-resnet9")
    names = [t.name for t in find_statistics(spec, load_model(spec), "cifar10").stats.tap_list]
    assert {"8.body.2", "17.body.5"} <= set(names)
    assert names_axis(names)["categoryarray"] == names


def test_digit_classes_label_the_top_k_bars():
    digits = TopK(tuple("7194"), (0.6, 0.2, 0.1, 0.1))
    figure = top_k_chart([("base · clean", digits), ("MeanSparse · clean", digits)], true_class="7")
    for axis in (figure.layout.yaxis, figure.layout.yaxis2):
        assert axis.type == "category" and list(axis.categoryarray) == ["4", "9", "1", "7"]
    assert figure.data[0].marker.color[-1] == "#2e7d32"  # the true class, on top, in green


def test_top_k_titles_fit_four_panels_at_1280x720_in_presentation_type():
    """At 1280x720 with the sidebar open the main pane is about 820 px wide, about 200 px a panel; in
    the presentation type (20 px, about 10 px a character) a title line must stay within 20
    characters: "MeanSparse · adversarial" (24) on one line was cut off at the figure's edge."""
    top = TopK(("cat", "dog"), (0.6, 0.4))
    titles = ["base · clean", "MeanSparse · clean", "base · adversarial", "MeanSparse · adversarial"]  # Explore's
    figure = top_k_chart([(t, top) for t in titles], true_class="cat")
    shown = [a.text for a in figure.layout.annotations]
    assert [t.replace("<br>", " · ") for t in shown] == titles
    assert max(len(line) for t in shown for line in t.split("<br>")) <= 20
    assert figure.layout.margin.t >= 2 * 15 * 1.2  # two lines of type above the bars


@pytest.mark.parametrize("values", [2000, 9])
def test_histogram_panels_share_one_log_axis_and_one_x_title(values):
    rng = np.random.default_rng(0)
    sample = Sample(*(rng.normal(size=values) for _ in range(4)))
    figure = histogram_chart(sample, 0.0, 0.5, "standard deviations")
    y1, y2 = figure.layout.yaxis, figure.layout.yaxis2
    assert y1.type == y2.type == "log" and y2.matches == "y" and tuple(y1.range) == tuple(y2.range)
    assert all(np.log10(v) == round(np.log10(v)) for v in y1.tickvals)  # decades only
    x_titles = [a.text for a in figure.layout.annotations if "standard deviations" in a.text]
    assert len(x_titles) == 1 and not figure.layout.xaxis.title.text and not figure.layout.xaxis2.title.text
    assert ("only 9 values" in x_titles[0]) == (values == 9)


def test_sweep_chart_draws_wilson_intervals_and_both_alphas():
    rows = [{"alpha": 0.0, "clean": 0.7, "robust": 0.4, "worst": 0.4},
            {"alpha": 0.2, "clean": 0.69, "robust": 0.45, "worst": 0.38}]
    figure = sweep_chart(rows, {"clean": "clean", "worst": "worst case"}, n=200, chosen=0.2, best=0.0)
    worst, clean = figure.data  # the worst case lies on an attack's line: drawn first, and wider
    assert worst.name == "worst case" and worst.line.width > clean.line.width
    assert list(clean.x) == [0.0, 0.2] and 0.05 < clean.error_y.array[0] + clean.error_y.arrayminus[0] < 0.15
    assert len(figure.layout.shapes) == 2


def test_downloads_are_slide_sized_png_or_svg():
    for fmt in ("png", "svg"):
        options = download_config("sweep", fmt)["toImageButtonOptions"]
        assert options["format"] == fmt and options["width"] * options["scale"] >= 1920
    with pytest.raises(ValueError):
        download_config("sweep", "gif")


def test_large_type_sizes_every_text_streamlit_theme_would_size_itself():
    """Streamlit's chart theme puts 12-14 px tick labels, axis titles and legends in the template: the
    layout-wide font size alone left them there in the presentation layout."""
    probes_figure = histogram_chart(Sample(*(np.arange(100.0) for _ in range(4))), 0.0, 0.5, "feature value")
    top = TopK(("automobile", "cat"), (0.6, 0.4))
    for figure in (probes_figure, top_k_chart([("base · clean", top), ("MeanSparse · clean", top)], "cat")):
        in_large_type(figure)
        layout = figure.layout
        axes = [layout[name] for name in layout if name.startswith(("xaxis", "yaxis"))]
        assert all(a.tickfont.size == PRESENTATION_FONT_SIZE and a.title.font.size == PRESENTATION_FONT_SIZE
                   for a in axes)
        assert layout.legend.font.size == layout.font.size == PRESENTATION_FONT_SIZE
        assert all(a.font.size == PRESENTATION_FONT_SIZE for a in layout.annotations)


def test_top_k_gaps_fit_long_class_names_and_every_class_is_named():
    """In large type "automobile" ran into the bars of the panel before it, and Plotly named only
    every other class."""
    top = TopK(("automobile", "cat", "dog", "ship", "truck"), (0.5, 0.2, 0.1, 0.1, 0.1))
    for count in (4, 2):  # one alpha; two alphas compared (half the width each)
        figure = top_k_chart([(f"panel {i}", top) for i in range(count)], "cat")
        plot_area = PANEL_WIDTH * count - 0.55 * PRESENTATION_FONT_SIZE * len("automobile")  # less the left labels
        gap_px = (figure.layout.xaxis2.domain[0] - figure.layout.xaxis.domain[1]) * plot_area
        assert gap_px >= 0.55 * PRESENTATION_FONT_SIZE * len("automobile")
        assert figure.layout.yaxis.tickvals == top.classes[::-1] and figure.layout.xaxis.tickvals == (0, 0.5, 1)
    digits = TopK(tuple("5938"), (0.7, 0.1, 0.1, 0.1))
    figure = top_k_chart([(f"panel {i}", digits) for i in range(2)], "5")  # "100%" and the next "0%" apart
    assert (figure.layout.xaxis2.domain[0] - figure.layout.xaxis.domain[1]) * PANEL_WIDTH * 2 >= 3 * PRESENTATION_FONT_SIZE


def test_top_k_panels_take_imagenet_class_names():
    """ImageNet's longest names (30 characters) asked Plotly for a gap wider than four panels allow: the
    attack on an uploaded photo ended in an error."""
    top = TopK(("American Staffordshire terrier", "tabby", "Egyptian cat"), (0.5, 0.3, 0.2))
    figure = top_k_chart([(f"panel {i}", top) for i in range(4)], "tabby")
    shown = figure.layout.yaxis.ticktext
    assert shown[-1] == "American Staffo…" and "tabby" in shown and figure.layout.yaxis.tickvals[-1] == top.classes[0]


def test_two_top_k_panels_across_the_page_get_a_gap_for_their_width():
    """Before an attack Explore shows two panels across the width four use later: their gap was sized as
    if they had half of it (45% of the plot)."""
    top = TopK(("automobile", "cat"), (0.6, 0.4))
    half, whole = (top_k_chart([("a", top), ("b", top)], "cat", width=w) for w in (2 * PANEL_WIDTH, 4 * PANEL_WIDTH))
    gap = [f.layout.xaxis2.domain[0] - f.layout.xaxis.domain[1] for f in (half, whole)]
    assert gap[1] < gap[0] / 2
