"""Accuracy: clean and robust accuracy on N test images for a range of alphas, and the export."""

from dataclasses import dataclass

import pandas as pd
import streamlit as st

from meansparse_app.ui import costs, heavy, links, panels, state, threshold
from meansparse_core.data import load_items, sample_indices
from meansparse_core.evaluation import EvalSettings, ResultCache
from meansparse_core.export import save_sparsified
from meansparse_core.charts import sweep_chart
from meansparse_core.jobs import Job
from meansparse_core.paths import cache_folder
from meansparse_core.accuracy_table import COLUMN_LABELS, accuracy_table, best_alpha, sweep_csv, with_interval
from meansparse_core.attack_choice import AttackChoice
from meansparse_core.limits import LIMITS, parse_alphas

ATTACKS = ["pgd", "fgsm", "apgd-ce", "apgd-dlr", "pgd-l2"]
RESULTS = ResultCache(cache_folder("results"))


@dataclass(frozen=True)
class SweepRequest:
    n: int
    settings: EvalSettings
    alphas: tuple[float, ...]
    opinions: tuple[str, ...]
    square_queries: int


def sweep_ui(current: state.Setup) -> SweepRequest | None:
    """The sweep's settings; returned when Run is pressed."""
    # Outside the form: the budget's units follow the attack as soon as it is picked.
    attack = st.selectbox("Attack", ATTACKS, key="sweep_attack")
    with st.form("sweep"):
        columns = st.columns(3)
        available = len(current.test_set)
        n = columns[0].number_input("Test images (N)", 10, min(LIMITS.items, available), min(200, available), 10)
        l2 = attack == "pgd-l2"
        eps = columns[1].number_input("eps (L2 norm)" if l2 else "eps (/255)", 0.0, 10.0 if l2 else 64.0,
                                      0.5 if l2 else current.eps, 0.05 if l2 else 0.5)
        steps = columns[2].number_input("Steps", 1, LIMITS.steps, 10)
        alphas = st.text_input("Alphas to sweep (alpha 0, the base model, is always included)",
                               "0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4")
        columns = st.columns(3)
        bpda = columns[0].checkbox("Also with BPDA (straight-through gradients)", True)
        square = columns[1].checkbox("Also with Square (no gradients)")
        queries = columns[2].number_input("Square queries", 100, LIMITS.square_queries, 1000, 100)
        pressed = st.form_submit_button("Run", type="primary")
    costs.sweep_cost_ui(current, attack, int(steps), images=int(n) * (alphas.count(",") + 2))  # alpha 0 included
    if not pressed:
        return None
    settings = EvalSettings(attack=attack, eps=float(eps), steps=int(steps), seed=0)
    opinions = tuple(o for o, on in (("bpda", bpda), ("square", square)) if on)
    return SweepRequest(int(n), settings, parse_alphas(alphas), opinions, int(queries))


def run_sweep(current: state.Setup, request: SweepRequest, job: Job) -> tuple[str, dict]:
    """Run (or read from the result cache) every evaluation, reporting progress to ``job``; (model id, sweep)."""
    indices = sample_indices(len(current.test_set), request.n, seed=0)
    images, labels = load_items(current.test_set, indices)
    device = current.model.device
    key = {"model": current.model_id, "stats": current.sparse.stats.fingerprint(), "data": current.data,
           "data_dir": current.data_root, "n": request.n}
    rows = accuracy_table(current.sparse, images.to(device), labels.to(device), request.settings, request.alphas,
                          request.opinions, request.square_queries,
                          progress=lambda done, total, what: job.report(
                              done, total, f"evaluation {min(int(done) + 1, total)} of {total}: {what}"),
                          cache=RESULTS, cache_key=key)
    s = request.settings
    attack = AttackChoice(s.attack, s.eps, s.steps).description
    if "square" in request.opinions:
        attack += f"; Square {AttackChoice('square', s.eps, request.square_queries).effort}"
    return current.model_id, {"rows": rows, "n": request.n, "attack": attack}


def results_ui(sweep: dict, chosen: float) -> None:
    rows, n = sweep["rows"], sweep["n"]
    suggested = best_alpha(rows)
    columns = {c: COLUMN_LABELS[c] for c in COLUMN_LABELS if c != "alpha" and c in rows[0]}
    table = pd.DataFrame([{"alpha": f"{r['alpha']:g}", **{label: with_interval(r[c], n) for c, label in columns.items()}}
                          for r in rows]).set_index("alpha")
    st.dataframe(table, key="sweep_table")
    panels.chart_ui(sweep_chart(rows, columns, n, chosen, suggested), "sweep_chart")
    st.caption(f"{sweep['attack']} on {n} test images; every accuracy with its 95% Wilson interval. Only images "
               "still classified correctly are attacked. *Worst case* is the lowest robust accuracy of the attacks "
               "run: if the exact-gradient line rises but the BPDA or Square line does not, the gain is gradient "
               "masking, not robustness. At alpha 0 MeanSparse is off, so BPDA is the plain attack there. Best "
               "worst-case: the alpha with the highest worst-case accuracy whose clean accuracy is within 1 point "
               "of the base model.")
    st.download_button("Download the sweep (CSV)", sweep_csv(rows, n), file_name="meansparse-sweep.csv",
                       mime="text/csv", key="download_sweep")
    panels.figure_format_ui()


def export_ui(current: state.Setup) -> None:
    st.subheader("Export")
    st.markdown(f"The sparsified model at the sidebar's alpha **{current.alpha:g}** (with its statistics and any "
                "per-layer alphas) as one file that `meansparse_core.export.load_sparsified` reads with "
                "`weights_only=True`.")
    if st.button("Prepare the file", key="prepare_export"):
        model = current.sparse.wrapped
        st.session_state["export"] = panels.bytes_of(lambda path: save_sparsified(
            path, model, current.sparse.stats, current.alpha, current.layer_alphas,
            architecture={"key": current.model.key}))
    if "export" in st.session_state:
        st.download_button("Download the sparsified model", st.session_state["export"],
                           file_name=f"{current.spec.name}-meansparse-{current.alpha:g}.pt", key="download_export")


def main() -> None:
    current = state.setup()
    state.require_sparse(current)
    st.title("Accuracy")
    current = threshold.threshold_ui(current)
    st.markdown("Clean and robust accuracy against alpha. The attack runs against MeanSparse itself at each "
                "alpha (adaptive), so each point costs one full attack on N images.")
    if current.test_set is None:
        st.info("This page needs labelled test data: see Data in the sidebar.")
        return
    request = sweep_ui(current)
    sweeps = st.session_state.setdefault("sweeps", {})
    if request is not None:
        heavy.submit("sweep", f"Accuracy sweep on {request.n} images", lambda job: run_sweep(current, request, job),
                     (*state.computation_key(current), request))
    finished = heavy.collect("sweep")
    if finished is not None:
        model_id, sweep = finished
        sweeps[model_id] = sweep
    heavy.status_ui("sweep")
    if current.model_id in sweeps:
        results_ui(sweeps[current.model_id], current.alpha)
    export_ui(current)
    links.link_ui(current)


main()
