"""MeanSparse Explorer: the start page.

Until the model pages land, this page shows the operator itself on one synthetic channel: slide
alpha and watch values within alpha*sigma of the mean collapse onto the mean.
"""

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch

from meansparse_core import sparsify


@st.cache_data
def synthetic_channel(skew: float, n: int = 20_000) -> np.ndarray:
    """Pre-activation-like values of one channel: a skewed bell, fixed seed."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal(n) + skew * rng.exponential(1.0, n)).astype(np.float32)


def controls_ui() -> tuple[float, float]:
    alpha = st.slider("alpha (band half-width, in standard deviations)", 0.0, 2.0, 0.25, 0.01)
    skew = st.slider("skew of the synthetic channel", 0.0, 2.0, 0.5, 0.1)
    return alpha, skew


def histogram_ui(values: np.ndarray, sparse: np.ndarray, mean: float, band: float) -> None:
    fig = go.Figure()
    fig.add_histogram(x=values, name="before", opacity=0.55, nbinsx=120)
    fig.add_histogram(x=sparse, name="after MeanSparse", opacity=0.55, nbinsx=120)
    if band > 0:
        fig.add_vrect(x0=mean - band, x1=mean + band, fillcolor="gray", opacity=0.15, line_width=0)
    fig.update_layout(barmode="overlay", height=380, margin=dict(t=10, b=10), xaxis_title="feature value")
    st.plotly_chart(fig, use_container_width=True)


def main() -> None:
    st.set_page_config(page_title="MeanSparse Explorer", layout="wide")
    st.title("MeanSparse Explorer")
    st.markdown(
        "MeanSparse replaces every feature that lies within **alpha·σ** of its channel mean **μ** "
        "by μ itself, in front of each activation of an adversarially trained network. "
        "Below: one synthetic channel before and after the operator; the grey band is μ ± alpha·σ."
    )
    alpha, skew = controls_ui()
    values = synthetic_channel(skew)
    mean, std = float(values.mean()), float(values.std())
    column = torch.from_numpy(values)[:, None]  # (N, C=1)
    sparse = sparsify(column, torch.tensor([mean]), torch.tensor([std]), alpha).numpy()[:, 0]
    clamped = float(np.mean(sparse != values))
    st.metric("values clamped to the mean", f"{clamped:.1%}")
    histogram_ui(values, sparse, mean, alpha * std)


main()
