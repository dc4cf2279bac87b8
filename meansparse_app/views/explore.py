"""Explore: one image, its adversarial version, and what the base and the sparsified model make of each."""

import streamlit as st

from meansparse_app.ui import costs, heavy, layout, links, loaders, panels, state, threshold, uploads
from meansparse_core.attacks import ATTACKS
from meansparse_core.charts import PANEL_WIDTH, top_k_chart
from meansparse_core.attack_choice import AttackChoice, default_steps
from meansparse_core.limits import LIMITS
from meansparse_core.one_image import BasePredictions, Comparison, amplified, base_predictions, compare

#: Top-5 bars in the presentation layout: short enough that all four stay on a 720-pixel-high screen.
PRESENTATION_CHART_HEIGHT = 230
#: Pixels across the clean, perturbation and adversarial images (a whole multiple of the image's size);
#: smaller when two alphas are compared in the presentation layout, beside the verdicts, so that the
#: predictions of both stay on a 720-pixel-high screen.
IMAGE_SIZE, COMPACT_IMAGE_SIZE = 192, 160


def image_ui(current: state.Setup) -> state.Picked:
    st.subheader("1 · Pick an image")
    panels.gallery_ui(current)
    panels.photo_gallery_ui(current)
    uploads.upload_ui(current)
    turns_ui(current)
    return state.picked_image(current)


def turns_ui(current: state.Setup) -> None:
    """One click to an image MeanSparse rescues at this alpha, or one it breaks (from the live set)."""
    if current.test_set is None:
        return
    left, right = st.columns(2)
    rescued = left.button("Find an image MeanSparse rescues at this alpha", key="find_rescued")
    broken = right.button("Find an image MeanSparse breaks at this alpha", key="find_broken")
    if not (rescued or broken):
        return
    wanted = "rescued" if rescued else "broken"
    live = loaders.cached_live_set(current.model, current.data, current.data_root, current.eps, current.placement)
    positions = getattr(live.turns(current.sparse, current.alpha, current.layer_alphas), wanted)
    if not positions:
        st.info(f"None of the {len(live.labels)} live-set images is {wanted} at alpha {current.alpha:g} by "
                f"{live.attack} against the base model: try another alpha.")
        return
    shown = st.session_state.get("picked")
    keys = [f"test/{live.indices[p]}" for p in positions]
    # Each click shows the next one, so a lecturer can go through them.
    following = (keys.index(shown.key) + 1) % len(keys) if shown is not None and shown.key in keys else 0
    state.pick_live_item(current, live, positions[following])
    st.caption(f"{following + 1} of {len(positions)} live-set images {wanted} at alpha {current.alpha:g}.")


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
        steps = columns[1].number_input("Queries" if attack == "square" else "Steps", 1, LIMITS.steps_for(attack),
                                        default_steps(attack), disabled=attack in ("fgsm", "autoattack"),
                                        help="FGSM takes one step and AutoAttack its standard schedule: unused there.")
        seed = columns[2].number_input("Seed", 0, 2**31 - 1, 0)
        columns = st.columns(3)
        targets = ["sparse", "base"]
        target = columns[0].radio("Attack which model", targets, targets.index(state.default_attack(current).target),
                                  horizontal=True, format_func={"sparse": "MeanSparse (current alpha)", "base": "base"}.get,
                                  help="The base model first: the page opens on an image this attack fools, and "
                                       "MeanSparse's verdict on it shows what the operator does to a transferred attack.")
        grad = columns[1].radio("Gradients through MeanSparse", ["exact", "straight-through"], horizontal=True,
                                help="straight-through is BPDA: the backward pass ignores the operator.")
        targeted = columns[2].checkbox("Targeted (random wrong class)")
        pressed = st.form_submit_button("Attack", type="primary")
    costs.cost_ui(current, attack, int(steps))
    choice = AttackChoice(attack, float(eps), int(steps), target, grad, targeted, int(seed))
    return choice if pressed else None


def images_ui(picked: state.Picked, crafted: state.Crafted | None, size: int, verdicts: list[str] = ()) -> None:
    """Clean, perturbation and adversarial images; ``verdicts`` in a fourth column beside them (compact)."""
    columns = st.columns([1, 1, 1, 1.7] if verdicts else 3)
    for verdict in verdicts:
        columns[-1].markdown(f"**{verdict}**")
    panels.pixel_image_ui(columns[0], picked.image, size, f"clean: {picked.caption}")
    if crafted is None:
        if not heavy.pending("attack"):
            columns[1].info("Press Attack to craft an adversarial example.")
        return
    perturbation, scale = amplified(crafted.image - picked.image)
    linf = float((crafted.image - picked.image).abs().max()) * 255
    panels.pixel_image_ui(columns[1], perturbation, size, f"perturbation x{scale:.0f} (Linf {linf:.1f}/255)")
    panels.pixel_image_ui(columns[2], crafted.image, size, "adversarial")
    st.caption(f"Adversarial example: {crafted.description}. It stays fixed while alpha moves.")
    if not crafted.found and layout.presenting():
        st.caption(f":orange[{crafted.choice.not_found()}]")  # one line: the predictions must stay on screen
    elif not crafted.found:
        st.warning(crafted.choice.not_found())


def predictions_ui(comparison: Comparison, key: str, with_base: bool = True) -> None:
    """The top-5 panels of one alpha: base and MeanSparse, or, two alphas compared, this alpha's only,
    named by it (both columns said "MeanSparse", and alpha 0 is the base model)."""
    sparse = "MeanSparse" if with_base else f"alpha {comparison.alpha:g}" + (" (base)" if comparison.alpha == 0 else "")
    tops = [("base", "clean", comparison.base_clean), (sparse, "clean", comparison.sparse_clean),
            ("base", "adversarial", comparison.base_adv), (sparse, "adversarial", comparison.sparse_adv)]
    shown = [(f"{model} · {image}", top) for model, image, top in tops
             if top is not None and (with_base or model == sparse)]
    figure = top_k_chart(shown, comparison.label, width=PANEL_WIDTH * (4 if with_base else 2))  # the column's width
    if layout.presenting():
        figure.update_layout(height=PRESENTATION_CHART_HEIGHT)
    panels.chart_ui(figure, key)


def comparisons_ui(comparisons: list[Comparison], verdicts: bool = True) -> None:
    """The top-5 panels at alpha, or, comparing, at each of the two alphas side by side; with the
    verdict above each unless ``verdicts`` is False (drawn beside the images)."""
    keys = ("predictions", "predictions_2")
    for column, comparison, key in zip(st.columns(len(comparisons)), comparisons, keys):
        if verdicts:
            column.markdown(f"**{comparison.verdict}**")
        with column:
            predictions_ui(comparison, key, with_base=len(comparisons) == 1)
    st.caption(f"Top-5 probabilities; green is {comparisons[0].reference}.")


@st.fragment
def stage_ui(current: state.Setup, picked: state.Picked, crafted: state.Crafted | None, base: BasePredictions) -> None:
    """Everything alpha changes, with the controls on top: a slider move reruns only this (with the same
    arguments: ``base``, the base model's predictions, are made once per image).

    Two alphas in the presentation layout: the verdicts beside smaller images (compact), else the
    predictions of both no longer fit a 1280x720 screen under the images.
    """
    current = threshold.threshold_ui(current)
    alphas = [current.alpha] if current.compare_alpha is None else [current.alpha, current.compare_alpha]
    comparisons = [compare(current.sparse, picked.image, crafted.image if crafted else None, picked.label, alpha,
                           current.spec.class_names, current.layer_alphas, base=base) for alpha in alphas]
    compact = layout.presenting() and len(alphas) > 1
    images_ui(picked, crafted, COMPACT_IMAGE_SIZE if compact else IMAGE_SIZE,
              [c.verdict for c in comparisons] if compact else [])
    comparisons_ui(comparisons, verdicts=not compact)
    panels.accuracy_panel_ui(current)
    panels.figure_format_ui()
    links.link_ui(current)


def main() -> None:
    current = state.setup()
    state.require_sparse(current)
    presenting = layout.presenting()
    if not presenting:
        st.title("Explore")
        st.markdown("Pick an image, attack it, then move **alpha**: the predictions follow it, while the "
                    "adversarial example stays the one you crafted.")
    first, second = st.container(), st.container()
    controls, stage = (second, first) if presenting else (first, second)  # presenting: what alpha changes on top
    with controls:
        picked = image_ui(current)
        choice = attack_ui(current)
        if choice is not None:
            state.craft(current, picked, choice)
    crafted = state.adversarial(current, picked)  # collects a finished queued attack, so before its status
    with stage:
        if not presenting:
            st.subheader("3 · See what each model says")
        heavy.status_ui("attack")
        adversarial = crafted.image if crafted else None
        stage_ui(current, picked, crafted,
                 base_predictions(current.sparse, picked.image, adversarial, current.spec.class_names))


main()
