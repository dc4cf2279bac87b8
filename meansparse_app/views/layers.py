"""Layers: inside the network, what MeanSparse replaces and how much of the perturbation is left."""

import streamlit as st

from meansparse_core.charts import (fraction_replaced_chart, histogram_chart, perturbation_chart,
                                    perturbation_split_chart, same_y_range)
from meansparse_core.probes import TapProbe, probe
from meansparse_app.ui import heavy, layout, links, panels, state, threshold


def layer_ui(current: state.Setup) -> tuple[str, int]:
    """The tap to look at, and one of its channels."""
    taps = current.sparse.taps
    left, right = st.columns([3, 1])
    tap = left.selectbox("Layer (the input of each activation, in forward order)", taps,
                         format_func=lambda t: f"{t.name} ({t.channels} channels)", key="layer")
    channel = right.number_input("Channel", 0, tap.channels - 1, 0, key=f"channel_{tap.name}")
    return tap.name, int(channel)


def histograms_ui(layer: TapProbe, key: str = "", narrow: bool = False) -> None:
    st.subheader(f"Layer {layer.name}")
    st.caption(f"alpha {layer.alpha:g} here · {layer.fraction_replaced_clean:.1%} of the clean and "
               f"{layer.fraction_replaced_adv:.1%} of the adversarial values replaced by the mean · the grey band "
               "is mean ± alpha·σ: every value inside it becomes the mean. Counts on a log scale.")
    left, right = layout.side_by_side(2, stacked=narrow)  # stacked: two alphas compared
    with left:
        st.markdown(f"**Channel {layer.channel}** (raw values; μ = {layer.channel_mean:.3g}, σ = {layer.channel_std:.3g})")
        panels.chart_ui(histogram_chart(layer.channel_values, layer.channel_mean, layer.alpha * layer.channel_std,
                                        "feature value"), f"channel_histogram{key}")
        if len(layer.channel_values.clean_before) < 64:
            st.caption(f"This channel has only {len(layer.channel_values.clean_before)} positions per image at this "
                       "depth, so its histogram is thin; the whole-layer view pools every channel.")
    with right:
        st.markdown("**Whole layer**, standardised per channel: (x − μ_c) / σ_c")
        panels.chart_ui(histogram_chart(layer.standardized, 0.0, layer.alpha, "standard deviations from the mean"),
                        f"layer_histogram{key}")


def depth_ui(probes: list[TapProbe], key: str = "", alongside: list[list[TapProbe]] = ()) -> None:
    """The charts across depth; ``alongside``: the probes at the other alpha shown next to these (one
    above the other then, on the same y range)."""
    def draw(build, name: str) -> None:
        panels.chart_ui(same_y_range(build(probes), [build(other) for other in alongside]), f"{name}{key}")
    left, right = layout.side_by_side(2, stacked=bool(alongside))
    with left:
        draw(fraction_replaced_chart, "fraction_replaced")
    with right:
        relative = st.toggle("Relative to the base model's clean features", True, key=f"perturbation_relative{key}")
        draw(lambda some: perturbation_chart(some, relative), "perturbation")
    draw(perturbation_split_chart, "perturbation_split")
    st.caption(
        "Top left: how much of each layer the operator replaces by the mean. Top right: the size of the "
        "perturbation's effect on each layer's features, ‖f(x+δ) − f(x)‖, without MeanSparse (blue, wider: it "
        "shows where the two lines meet) and after the operator with MeanSparse (orange); *relative* divides both by the same number, the norm of the base "
        "model's clean features at that layer. Below: the perturbation at the operator, split by where the clean "
        "and adversarial values lie. **Removed**: both inside the band, both become the mean. **Passed**: both "
        "outside, unchanged. **Created**: one inside and one outside, so one jumps to the mean: a change of at "
        "least alpha·σ however small the perturbation was. After the operator, what is left is passed and "
        "created together (their squares add up).")


@st.fragment
def stage_ui(current: state.Setup, picked: state.Picked, crafted: state.Crafted) -> None:
    """Everything alpha and the layer change, with their controls on top: moving them reruns only this."""
    current = threshold.threshold_ui(current)
    name, channel = layer_ui(current)
    sparse = current.sparse
    alphas = [current.alpha] if current.compare_alpha is None else [current.alpha, current.compare_alpha]
    at = [probe(sparse.wrapped, sparse.stats, picked.image[None].to(current.model.device),
                crafted.image[None].to(current.model.device), alpha, current.layer_alphas, channel={name: channel})
          for alpha in alphas]
    for column, probes, key in zip(layout.side_by_side(len(alphas)), at, ("", "_2")):  # two alphas
        with column:
            histograms_ui(next(p for p in probes if p.name == name), key, narrow=len(alphas) > 1)
            depth_ui(probes, key, alongside=[other for other in at if other is not probes])
    panels.figure_format_ui()
    panels.accuracy_panel_ui(current)
    links.link_ui(current)


def main() -> None:
    current = state.setup()
    state.require_sparse(current)
    st.title("Layers")
    picked = state.picked_image(current)
    crafted = state.adversarial(current, picked) or state.craft(current, picked, state.default_attack(current))
    if crafted is None:  # not quick on this model: it is crafted in the server's job queue
        heavy.status_ui("attack")
        st.stop()
    st.caption(f"Image: {picked.caption}. Adversarial example: {crafted.description} "
               "(pick the image and run other attacks on the Explore page).")
    stage_ui(current, picked, crafted)


main()
