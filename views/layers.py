"""Layers: inside the network, what MeanSparse clamps and how much of the perturbation survives."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from ui import panels, state
from meansparse_core.probes import Sample, TapProbe, probe

VIEWS = {
    "clean_before": ("clean, before", "#1f77b4", "solid"),
    "adv_before": ("adversarial, before", "#d62728", "solid"),
    "clean_after": ("clean, after", "#1f77b4", "dot"),
    "adv_after": ("adversarial, after", "#d62728", "dot"),
}


def layer_ui(current: state.Setup) -> tuple[str, int]:
    """The tap to look at, and one of its channels."""
    taps = current.sparse.taps
    left, right = st.columns([3, 1])
    tap = left.selectbox("Layer (the input of each activation, in forward order)", taps,
                         format_func=lambda t: f"{t.name} ({t.channels} channels)", key="layer")
    channel = right.number_input("Channel", 0, tap.channels - 1, 0, key=f"channel_{tap.name}")
    return tap.name, int(channel)


def histogram_figure(sample: Sample, centre: float, band: float, x_title: str) -> go.Figure:
    """Before (bars) and after (outlines) sparsification, clean and adversarial, over shared bins."""
    edges = sample.edges(bins=60)
    centres = (edges[:-1] + edges[1:]) / 2
    figure = make_subplots(rows=1, cols=2, subplot_titles=["before MeanSparse", "after MeanSparse"], shared_yaxes=True)
    for view, (name, colour, dash) in VIEWS.items():
        counts, _ = np.histogram(getattr(sample, view), edges)
        figure.add_trace(go.Scatter(x=centres, y=counts, name=name, mode="lines", line_shape="hvh",
                                    line=dict(color=colour, dash=dash)), row=1, col=1 if "before" in view else 2)
    for col in (1, 2):
        if band > 0:
            figure.add_vrect(x0=centre - band, x1=centre + band, fillcolor="grey", opacity=0.18, line_width=0,
                             row=1, col=col)
        figure.update_xaxes(title_text=x_title, row=1, col=col)
    figure.update_yaxes(type="log", title_text="count", row=1, col=1)
    figure.update_layout(height=320, margin=dict(t=30, b=10, l=10, r=10), legend=dict(orientation="h", y=-0.3))
    return figure


def histograms_ui(layer: TapProbe) -> None:
    st.subheader(f"Layer {layer.name}")
    st.caption(f"alpha {layer.alpha:g} here · {layer.fraction_clamped_clean:.1%} of the clean and "
               f"{layer.fraction_clamped_adv:.1%} of the adversarial values clamped · the grey band is "
               "mean ± alpha·σ, everything inside it becomes the mean.")
    left, right = st.columns(2)
    with left:
        st.markdown(f"**Channel {layer.channel}** (raw values; μ = {layer.channel_mean:.3g}, σ = {layer.channel_std:.3g})")
        st.plotly_chart(histogram_figure(layer.channel_values, layer.channel_mean, layer.alpha * layer.channel_std,
                                         "feature value"), key="channel_histogram")
    with right:
        st.markdown("**Whole layer**, standardised per channel: (x − μ_c) / σ_c")
        st.plotly_chart(histogram_figure(layer.standardized, 0.0, layer.alpha, "standard deviations from the mean"),
                        key="layer_histogram")


def depth_ui(probes: list[TapProbe]) -> None:
    names = [p.name for p in probes]
    left, right = st.columns(2)
    clamped = go.Figure([
        go.Bar(x=names, y=[p.fraction_clamped_clean for p in probes], name="clean", marker_color="#1f77b4"),
        go.Bar(x=names, y=[p.fraction_clamped_adv for p in probes], name="adversarial", marker_color="#d62728"),
    ])
    clamped.update_layout(title="Fraction of values clamped, per layer", yaxis_tickformat=".0%", height=320,
                          margin=dict(t=40, b=10), legend=dict(orientation="h", y=-0.3))
    left.plotly_chart(clamped, key="clamped")
    attenuation = go.Figure([
        go.Scatter(x=names, y=[p.attenuation_base for p in probes], name="without MeanSparse", mode="lines+markers",
                   line_color="#1f77b4"),
        go.Scatter(x=names, y=[p.attenuation_sparse for p in probes], name="with MeanSparse", mode="lines+markers",
                   line_color="#ff7f0e"),
    ])
    attenuation.update_layout(title="Perturbation across depth: ‖f(x+δ) − f(x)‖ / ‖f(x)‖", height=320,
                              margin=dict(t=40, b=10), legend=dict(orientation="h", y=-0.3))
    right.plotly_chart(attenuation, key="attenuation")
    st.caption("Left: how much of each layer the operator replaces by the mean. Right: the relative change the "
               "perturbation causes in each layer's features; where the orange line is below the blue one, "
               "MeanSparse has removed part of the perturbation by that depth.")


def main() -> None:
    current = state.setup()
    sparse = state.require_sparse(current)
    st.title("Layers")
    picked = state.picked_image(current)
    crafted = state.adversarial(current, picked) or state.craft(current, picked, state.default_attack(current))
    st.caption(f"Image: {picked.caption}. Adversarial example: {crafted.description} "
               "(pick the image and run other attacks on the Explore page).")
    name, channel = layer_ui(current)
    probes = probe(sparse.model, sparse.stats, picked.image[None].to(current.model.device),
                   crafted.image[None].to(current.model.device), current.alpha, current.layer_alphas,
                   channel={name: channel})
    histograms_ui(next(p for p in probes if p.name == name))
    depth_ui(probes)
    panels.accuracy_panel_ui(current)


main()
