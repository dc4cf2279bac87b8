"""Every chart the app draws, as plain Plotly figures a notebook can show too.

One function, ``names_axis``, decides how layer and class names are plotted: as categories in the
order given (forward order for layers). Left to itself Plotly reads names such as ``3``, ``11`` or
digit classes ``0``-``9`` as numbers, then drops names like ``8.body.2`` and invents ticks for
layers that do not exist. Example::

    perturbation_chart(probes).show()
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .accuracy_table import wilson_interval
from .one_image import TopK
from .probes import Sample, TapProbe

CLEAN, ADVERSARIAL, WITH_MEANSPARSE, GOOD, BAD = "#1f77b4", "#d62728", "#ff7f0e", "#2e7d32", "#c62828"
FONT_SIZE = 15  # readable from the back of a lecture room
#: The presentation layout's type (px): every text of a chart, tick labels and legends included.
PRESENTATION_FONT_SIZE = 19
#: Legends sit at the figure's bottom edge: Plotly then makes room for them below the tick labels and
#: the axis title. Placed at a fraction of the plot's height (y=-0.3), a legend overlapped the axis
#: title once long layer names were drawn slanted (CIFAR-10 demo model, Layers page).
LEGEND_BELOW = dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0)
#: Of two lines that can coincide, the one drawn first is wider: it stays visible around the other.
UNDER, OVER = 5, 2


def names_axis(names: Sequence[str]) -> dict:
    """Axis settings that plot ``names`` as categories, in the order given (never as numbers)."""
    return dict(type="category", categoryorder="array", categoryarray=[str(n) for n in names])


def _style(figure: go.Figure, height: int, title: str | None = None) -> go.Figure:
    figure.update_layout(height=height, font_size=FONT_SIZE, title=title, legend=LEGEND_BELOW,
                         margin=dict(t=50 if title else 30, b=10, l=10, r=10))
    return figure


# --- Explore ---------------------------------------------------------------------------------


def panel_title(title: str) -> str:
    """A top-k panel's title on two lines, model then image ("MeanSparse<br>adversarial"): four panels
    side by side get about 200 px each at 1280x720 in the presentation layout's type, too narrow
    for "MeanSparse · adversarial" on one line (the last one was cut off at the figure's edge)."""
    return title.replace(" · ", "<br>")


#: The narrowest a top-k panel gets (px): four side by side in the presentation layout at 1280x720,
#: sidebar open (an 820-px main pane); two alphas compared give two panels to each half.
PANEL_WIDTH = 205


#: The longest class name a top-k axis shows whole (ImageNet's run to 30 characters); hovering shows it all.
NAME_CHARS = 16


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 1] + "…"


def _label_width(names: Sequence[str], size: int = PRESENTATION_FONT_SIZE) -> float:
    """About how many pixels the longest of ``names`` takes as a tick label in ``size``-px type."""
    return 0.6 * size * max((len(str(n)) for n in names), default=1) + 10


def top_k_chart(panels: Sequence[tuple[str, TopK]], true_class: str, width: int | None = None) -> go.Figure:
    """Side-by-side top-k bars (most probable on top), the true class in green, the others in red.

    Each panel's class names sit in the gap left of it: the gap fits the longest name in the
    presentation type, else "automobile" ran into the bars of the panel before it. ``width``: the
    narrowest the figure is drawn (px; default ``PANEL_WIDTH`` a panel): two panels across a whole
    page took a gap sized for two across half of it.
    """
    width = width or PANEL_WIDTH * len(panels)
    names = [_short(c) for _, top in panels for c in top.classes]
    # At least three characters' room: the "100%" and "0%" ticks of neighbours ran into each other (digits).
    # A fraction of the plot area, which is the figure less the first panel's names (left margin); Plotly
    # refuses gaps that leave the panels no width (over 1 / (panels - 1)).
    room = max(_label_width(names), 3 * PRESENTATION_FONT_SIZE)
    gap = min(0.45, 0.9 / max(len(panels) - 1, 1), room / (width - room))
    # Axes laid out by hand as make_subplots would (same domains, titles as paper annotations): the
    # figure is drawn on every slider move, and make_subplots with per-panel axis updates took most
    # of the time of a page run's charts.
    span = (1 - gap * (len(panels) - 1)) / len(panels)
    bars, axes, titles = [], {}, []
    for number, (title, top) in enumerate(panels):
        x, y, start = f"x{number + 1 if number else ''}", f"y{number + 1 if number else ''}", number * (span + gap)
        classes = list(top.classes)[::-1]
        bars.append(go.Bar(x=list(top.probabilities)[::-1], y=classes, orientation="h", showlegend=False,
                           marker_color=[GOOD if c == true_class else BAD for c in classes],
                           hovertemplate="%{y}: %{x:.1%}<extra></extra>", xaxis=x, yaxis=y))
        # Three ticks, whatever the type size: Plotly picked five for a narrow panel, then slanted them.
        axes[x.replace("x", "xaxis")] = dict(anchor=y, domain=[start, start + span], range=[0, 1], tickvals=[0, 0.5, 1],
                                             tickformat=".0%")
        # Every class named (left to itself Plotly names every other one in large type), long names cut.
        axes[y.replace("y", "yaxis")] = dict(anchor=x, domain=[0.0, 1.0], **names_axis(classes), tickmode="array",
                                             tickvals=classes, ticktext=[_short(c) for c in classes])
        titles.append(dict(text=panel_title(title), x=start + span / 2, y=1.0, xref="paper", yref="paper",
                           xanchor="center", yanchor="bottom", showarrow=False, font_size=16))
    figure = go.Figure(bars, dict(axes, annotations=titles))
    return _style(figure, 300).update_layout(margin_t=50)  # room for two-line titles


# --- Layers ----------------------------------------------------------------------------------

HISTOGRAM_VIEWS = {  # name, colour, dash, panel, width (clean is drawn first, wider, under adversarial)
    "clean_before": ("clean", CLEAN, "solid", 1, 3.5),
    "adv_before": ("adversarial", ADVERSARIAL, "solid", 1, 1.5),
    "clean_after": ("clean", CLEAN, "dot", 2, 3.5),
    "adv_after": ("adversarial", ADVERSARIAL, "dot", 2, 1.5),
}

#: Below this many values per view a histogram says little; the chart says how many there are.
FEW_VALUES = 64


def _decade_ticks(top: float) -> tuple[list[float], list[str]]:
    """Tick positions at powers of ten up to ``top`` and their labels (1, 10, 100, 1k, ...)."""
    powers = [10.0 ** k for k in range(0, max(1, math.ceil(math.log10(max(top, 1.0)))) + 1)]
    return powers, [f"{p / 1000:g}k" if p >= 1000 else f"{p:g}" for p in powers]


def histogram_chart(sample: Sample, centre: float, band: float, x_title: str) -> go.Figure:
    """Before (left) and after (right) the operator, clean and adversarial, over shared bins, with the band.

    Both panels share one log count axis (same type and range) and one x title. When the sample is
    small (the last layers of one image have few positions per channel) the title says how small.
    """
    edges = sample.edges(bins=60)
    centres = (edges[:-1] + edges[1:]) / 2
    values = len(sample.clean_before)
    note = f" · only {values} values per curve" if values < FEW_VALUES else ""
    figure = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                           subplot_titles=["before MeanSparse", "after MeanSparse"], x_title=x_title + note)
    top = 1
    for view, (name, colour, dash, col, width) in HISTOGRAM_VIEWS.items():
        counts, _ = np.histogram(getattr(sample, view), edges)
        top = max(top, int(counts.max(initial=0)))
        figure.add_trace(go.Scatter(x=centres, y=counts, name=name, legendgroup=name, showlegend=col == 1,
                                    mode="lines", line_shape="hvh", line=dict(color=colour, dash=dash, width=width)),
                         row=1, col=col)
    if band > 0:
        for col in (1, 2):
            figure.add_vrect(x0=centre - band, x1=centre + band, fillcolor="grey", opacity=0.18, line_width=0,
                             row=1, col=col)
    ticks, labels = _decade_ticks(top)
    # type and range on both axes: ``shared_yaxes`` shares the range only, not the log type.
    figure.update_yaxes(type="log", range=[-0.1, math.log10(top) + 0.1], tickvals=ticks, ticktext=labels)
    figure.update_yaxes(title_text="count", row=1, col=1)
    # The shared x title is an annotation, which Plotly makes no room for: room below it for the legend.
    return _style(figure, 360).update_layout(margin_b=85)


def fraction_replaced_chart(probes: Sequence[TapProbe]) -> go.Figure:
    """Per layer, in forward order: the fraction of clean and adversarial values the operator replaced."""
    names = [p.name for p in probes]
    figure = go.Figure([
        go.Bar(x=names, y=[p.fraction_replaced_clean for p in probes], name="clean", marker_color=CLEAN),
        go.Bar(x=names, y=[p.fraction_replaced_adv for p in probes], name="adversarial", marker_color=ADVERSARIAL),
    ])
    figure.update_xaxes(**names_axis(names), title_text="layer (forward order)")
    figure.update_yaxes(tickformat=".0%", rangemode="tozero", title_text="of the layer's values")
    return _style(figure, 340, "Fraction of values replaced by the mean, per layer")


def perturbation_chart(probes: Sequence[TapProbe], relative: bool = True) -> go.Figure:
    """How much of the perturbation is left at each layer, without and with MeanSparse.

    ``relative``: over the base model's clean features (one denominator for both lines); else the
    absolute L2 norm.
    """
    names = [p.name for p in probes]
    sizes = [p.relative if relative else p.perturbation for p in probes]
    figure = go.Figure([
        go.Scatter(x=names, y=[s.base for s in sizes], name="without MeanSparse", mode="lines+markers",
                   line=dict(color=CLEAN, width=UNDER), marker_size=11),
        go.Scatter(x=names, y=[s.after for s in sizes], name="with MeanSparse (after the operator)",
                   mode="lines+markers", line=dict(color=WITH_MEANSPARSE, width=OVER), marker_size=6),
    ])
    figure.update_xaxes(**names_axis(names), title_text="layer (forward order)")
    figure.update_yaxes(rangemode="tozero", title_text="‖f(x+δ) − f(x)‖ / ‖f_base(x)‖" if relative
                        else "‖f(x+δ) − f(x)‖ (L2 norm)")
    return _style(figure, 360, "Perturbation left at each layer" + (" (relative)" if relative else " (absolute)"))


SPLIT = {"removed": ("removed: both inside the band", GOOD), "passed": ("passed: both outside", "#7f7f7f"),
         "created": ("created: one inside, one outside", BAD)}


def perturbation_split_chart(probes: Sequence[TapProbe]) -> go.Figure:
    """Per layer, the perturbation around the operator split into removed, passed and created
    (relative to the base model's clean features; after² = passed² + created²)."""
    names = [p.name for p in probes]
    figure = go.Figure([go.Bar(x=names, y=[getattr(p.relative, key) for p in probes], name=name, marker_color=colour)
                        for key, (name, colour) in SPLIT.items()])
    figure.update_xaxes(**names_axis(names), title_text="layer (forward order)")
    figure.update_yaxes(rangemode="tozero", title_text="‖part‖ / ‖f_base(x)‖")
    return _style(figure, 360, "What the operator did to the perturbation")


def same_y_range(figure: go.Figure, others: Sequence[go.Figure]) -> go.Figure:
    """``figure`` on a y range from 0 to the highest value in it or in ``others``: charts shown side by
    side (two alphas) compare only on one scale. Unchanged when there are no others."""
    if not others:
        return figure
    top = max((y for f in (figure, *others) for trace in f.data for y in trace.y if y is not None), default=0.0)
    return figure.update_yaxes(range=[0, 1.05 * top if top > 0 else 1])


# --- Accuracy --------------------------------------------------------------------------------


#: One colour per sweep column whatever columns a sweep has; the worst case light, under the attack it equals.
SWEEP_COLOURS = {"clean": CLEAN, "robust": ADVERSARIAL, "robust_bpda": "#9467bd", "robust_square": "#8c564b",
                 "worst": "#b0b0b0"}


def sweep_chart(rows: Sequence[dict], columns: dict[str, str], n: int, chosen: float,
                best: float | None) -> go.Figure:
    """Accuracy against alpha, one line per column (``{key: label}``), each point with its 95% Wilson
    interval over ``n`` images; the sidebar's alpha and the best alpha marked.

    The worst case is one of the attacks' figures at every alpha, so its line lies on one of theirs:
    it is drawn first and wider.
    """
    figure = go.Figure()
    for key in sorted(columns, key=lambda key: key != "worst"):
        points = [(r["alpha"], r[key]) for r in rows if r.get(key) is not None]
        low_high = [wilson_interval(round(value * n), n) for _, value in points]
        figure.add_trace(go.Scatter(
            x=[a for a, _ in points], y=[v for _, v in points], name=columns[key], mode="lines+markers",
            line=dict(width=UNDER if key == "worst" else OVER, color=SWEEP_COLOURS.get(key)),
            error_y=dict(type="data", symmetric=False, array=[hi - v for (_, v), (_, hi) in zip(points, low_high)],
                         arrayminus=[v - lo for (_, v), (lo, _) in zip(points, low_high)], thickness=1)))
    figure.add_vline(x=chosen, line_dash="dash", annotation_text=f"sidebar alpha {chosen:g}")
    if best is not None:
        figure.add_vline(x=best, line_dash="dot", line_color=GOOD, annotation_text=f"best worst-case {best:g}",
                         annotation_position="bottom right")
    figure.update_xaxes(title_text="alpha (0 = base model)")
    figure.update_yaxes(title_text="accuracy (95% Wilson interval)", tickformat=".0%")
    return _style(figure, 400)
