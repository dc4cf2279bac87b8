"""Explore: one image, its adversarial version, and what the base and the sparsified model make of each."""

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from ui import heavy, panels, state, uploads
from meansparse_core.attacks import ATTACKS
from meansparse_core.workbench import LIMITS, AttackChoice, Comparison, amplified, compare


def image_ui(current: state.Setup) -> state.Picked:
    st.subheader("1 · Pick an image")
    panels.gallery_ui(current)
    uploads.upload_ui(current)
    return state.picked_image(current)


def attack_ui(current: state.Setup) -> AttackChoice | None:
    """The attack's settings; returns them when the Attack button is pressed."""
    st.subheader("2 · Attack it")
    # Outside the form: the budget's units and the step limit follow the attack as soon as it is picked.
    attack = st.selectbox("Attack", sorted(ATTACKS), index=sorted(ATTACKS).index("pgd"), key="attack_name")
    with st.form("attack"):
        columns = st.columns(3)
        l2 = attack == "pgd-l2"
        eps = columns[0].number_input("eps (L2 norm)" if l2 else "eps (/255)", 0.0, 10.0 if l2 else 64.0,
                                      0.5 if l2 else current.eps, 0.05 if l2 else 0.5)
        steps = columns[1].number_input("Queries" if attack == "square" else "Steps", 1, LIMITS.steps_for(attack), 10)
        seed = columns[2].number_input("Seed", 0, 2**31 - 1, 0)
        columns = st.columns(3)
        target = columns[0].radio("Attack which model", ["sparse", "base"], horizontal=True,
                                  format_func={"sparse": "MeanSparse (current alpha)", "base": "base"}.get)
        grad = columns[1].radio("Gradients through MeanSparse", ["exact", "straight-through"], horizontal=True,
                                help="straight-through is BPDA: the backward pass ignores the operator.")
        targeted = columns[2].checkbox("Targeted (random wrong class)")
        pressed = st.form_submit_button("Attack", type="primary")
    choice = AttackChoice(attack, float(eps), int(steps), target, grad, targeted, int(seed))
    return choice if pressed else None


def images_ui(picked: state.Picked, crafted: state.Crafted | None) -> None:
    columns = st.columns(3)
    columns[0].image(panels.to_display(picked.image, 192), caption=f"clean: {picked.caption}")
    if crafted is None:
        if not heavy.pending("attack"):
            columns[1].info("Press Attack to craft an adversarial example.")
        return
    perturbation, scale = amplified(crafted.image - picked.image)
    linf = float((crafted.image - picked.image).abs().max()) * 255
    columns[1].image(panels.to_display(perturbation, 192), caption=f"perturbation x{scale:.0f} (Linf {linf:.1f}/255)")
    columns[2].image(panels.to_display(crafted.image, 192), caption="adversarial")
    st.caption(f"Adversarial example: {crafted.description}. It stays fixed while alpha moves.")


def predictions_ui(comparison: Comparison) -> None:
    panels = [("base · clean", comparison.base_clean), ("MeanSparse · clean", comparison.sparse_clean),
              ("base · adversarial", comparison.base_adv), ("MeanSparse · adversarial", comparison.sparse_adv)]
    panels = [(title, top) for title, top in panels if top is not None]
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels], horizontal_spacing=0.08)
    for column, (_, top) in enumerate(panels, start=1):
        colours = ["#2e7d32" if c == comparison.label else "#c62828" for c in top.classes]
        figure.add_trace(go.Bar(x=list(top.probabilities)[::-1], y=list(top.classes)[::-1], orientation="h",
                                marker_color=colours[::-1], showlegend=False,
                                hovertemplate="%{y}: %{x:.1%}<extra></extra>"), row=1, col=column)
        figure.update_xaxes(range=[0, 1], tickformat=".0%", row=1, col=column)
    figure.update_layout(height=260, margin=dict(t=30, b=10, l=10, r=10))
    st.plotly_chart(figure, key="predictions")
    st.caption("Top-5 probabilities; green is the true class.")


def main() -> None:
    current = state.setup()
    sparse = state.require_sparse(current)
    st.title("Explore")
    st.markdown("Pick an image, attack it, then move **alpha** in the sidebar: the predictions below follow it, "
                "while the adversarial example stays the one you crafted.")
    picked = image_ui(current)
    choice = attack_ui(current)
    if choice is not None:
        state.craft(current, picked, choice)
    crafted = state.adversarial(current, picked)
    st.subheader("3 · See what each model says")
    heavy.status_ui("attack")
    images_ui(picked, crafted)
    comparison = compare(sparse, picked.image, crafted.image if crafted else None, picked.label, current.alpha,
                         current.spec.class_names, current.layer_alphas)
    st.markdown(f"**{comparison.verdict}**")
    predictions_ui(comparison)
    panels.accuracy_panel_ui(current)


main()
