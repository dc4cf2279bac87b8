"""How the app shows its charts: every text in large type for a projector, and a camera button that
saves a chart at slide resolution."""

from __future__ import annotations

import plotly.graph_objects as go

from meansparse_core.charts import FONT_SIZE, PRESENTATION_FONT_SIZE

#: Size of a downloaded chart: 1600 x 900 at scale 2 is 3200 x 1800 pixels, sharp on a 4K projector.
SLIDE_WIDTH, SLIDE_HEIGHT, SLIDE_SCALE = 1600, 900, 2
EXPORT_FORMATS = ("png", "svg")


def in_large_type(figure: go.Figure, size: int = PRESENTATION_FONT_SIZE) -> go.Figure:
    """Every text of ``figure`` at ``size`` px, for a projector; margins made for ``FONT_SIZE`` grow with it.

    Each text is sized on its own: Streamlit's chart theme sets tick labels, axis titles and legends
    (12-14 px) in the figure's template, which outranks the layout-wide ``font_size``.
    """
    grow = size / FONT_SIZE
    margin = figure.layout.margin
    figure.update_layout(font_size=size, legend_font_size=size, title_font_size=size, hoverlabel_font_size=size,
                         margin_t=round((margin.t or 0) * grow), margin_b=round((margin.b or 0) * grow))
    figure.update_xaxes(tickfont_size=size, title_font_size=size)
    figure.update_yaxes(tickfont_size=size, title_font_size=size)
    return figure.update_annotations(font_size=size)  # subplot titles, shared axis titles, marker labels


def download_config(name: str, fmt: str = "png") -> dict:
    """Plotly config whose camera button saves the chart as ``fmt`` (png or svg) at slide resolution."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"Charts download as {' or '.join(EXPORT_FORMATS)}, not {fmt!r}.")
    return {"displaylogo": False, "toImageButtonOptions": {
        "format": fmt, "filename": name, "width": SLIDE_WIDTH, "height": SLIDE_HEIGHT, "scale": SLIDE_SCALE}}
