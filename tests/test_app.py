"""The app driven headless with Streamlit's AppTest, on the offline default model (digits)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

TIMEOUT = 120


def start() -> AppTest:
    app = AppTest.from_file("../meansparse_app/app.py", default_timeout=TIMEOUT).run()
    assert not app.exception, app.exception
    return app


def chart(app: AppTest, key: str) -> dict:
    """The plotly figure a page drew under ``key``."""
    for element in app.get("plotly_chart"):
        if element.proto.id and key in element.proto.id:
            return json.loads(element.proto.spec)
    raise AssertionError(f"no chart {key!r}")


def texts(app: AppTest) -> str:
    return "\n".join(e.value for e in [*app.markdown, *app.caption, *app.info, *app.warning, *app.error])


def finish_jobs(app: AppTest) -> AppTest:
    """Wait for the session's heavy jobs (they run in the server's job queue), then rerun to show their results."""
    for kind in ("attack", "sweep", "calibration"):
        if f"job/{kind}" in app.session_state:
            assert app.session_state[f"job/{kind}"].wait(TIMEOUT), f"the {kind} job did not end"
    return app.run()


def check_clean(app: AppTest) -> None:
    assert not app.exception, app.exception
    assert not app.error, [e.value for e in app.error]


@pytest.fixture(scope="module")
def explore() -> AppTest:
    return start()


def test_opens_on_the_offline_model_with_statistics(explore):
    check_clean(explore)
    sidebar = "\n".join(c.value for c in explore.sidebar.caption)
    assert "digits-cnn" in sidebar and "shipped with the model" in sidebar
    assert "Run an attack to compare" in texts(explore)
    assert [m.value.endswith("%)") for m in explore.metric][:2] == [True, True]  # with its interval


def test_alpha_changes_the_sparsified_predictions_only():
    app = start()
    before = chart(app, "predictions")["data"]
    app.slider(key="alpha").set_value(1.5).run()
    check_clean(app)
    after = chart(app, "predictions")["data"]
    assert after[0]["x"] == before[0]["x"]  # the base model ignores alpha
    assert after[1]["x"] != before[1]["x"]
    assert "alpha 1.5" in texts(app)


def test_attack_adds_adversarial_predictions_and_a_verdict():
    app = start()
    app.button(key="FormSubmitter:attack-Attack").click().run()
    check_clean(app)
    assert len(chart(app, "predictions")["data"]) == 4
    assert "True class" in texts(app) and "Adversarial example: pgd eps 32/255" in texts(app)
    crafted = app.session_state["adversarial"].image.clone()
    app.slider(key="alpha").set_value(0.5).run()  # the adversarial example stays put
    assert app.session_state["adversarial"].image.equal(crafted)


def test_the_app_opens_on_an_image_its_default_attack_fools():
    """The first attack a class sees found nothing ("No adversarial example found") on the first gallery image."""
    app = start()
    app.button(key="FormSubmitter:attack-Attack").click().run()
    check_clean(app)
    crafted = app.session_state["adversarial"]
    assert crafted.choice.target == "base" and crafted.found
    assert "fools the base model" in texts(app) or "fools both models" in texts(app)
    assert "No adversarial example found" not in texts(app)


def test_one_click_finds_an_image_meansparse_rescues_and_one_it_breaks():
    app = start()
    app.slider(key="alpha").set_value(0.6).run()
    for button, word in (("find_rescued", "rescued"), ("find_broken", "broken")):
        app.button(key=button).click().run()
        check_clean(app)
        if "None of the" in texts(app):
            continue
        crafted, picked = app.session_state["adversarial"], app.session_state["picked"]
        assert crafted.for_key[1] == picked.key and f"live-set images {word} at alpha 0.6" in texts(app)
        verdict = "but not MeanSparse" if word == "rescued" else "fools MeanSparse"
        assert verdict in texts(app)


def test_the_rescue_buttons_use_the_live_set_of_the_chosen_placement(monkeypatch):
    """The buttons built their live set without the placement: under "released" a second one, a second
    PGD on the whole live set in the page's thread."""
    from meansparse_app.ui import loaders

    asked = []
    real = loaders.cached_live_set
    monkeypatch.setattr(loaders, "cached_live_set", lambda *args: asked.append(args[4:]) or real(*args))
    app = start()
    app.button(key="find_rescued").click().run()
    check_clean(app)
    assert asked and all(len(placement) == 1 for placement in asked), "every call names the placement"


def test_the_attack_form_names_each_attacks_budget():
    """Square's budget was once labelled "Steps" with 10 (queries, and too few to find anything);
    AutoAttack offered a step count it does not use."""
    def budget():
        return next(n for n in app.main.number_input if n.label in ("Steps", "Queries"))
    app = start()
    app.selectbox(key="attack_name").set_value("square").run()
    assert budget().label == "Queries" and budget().value >= 100
    app.selectbox(key="attack_name").set_value("autoattack").run()
    assert budget().label == "Steps" and budget().proto.disabled


def test_an_attack_that_finds_nothing_says_so():
    app = start()
    app.number_input[0].set_value(0.0)  # eps 0: nothing to find
    app.button(key="FormSubmitter:attack-Attack").click().run()
    check_clean(app)
    assert any("No adversarial example found within 10 steps" in w.value for w in app.warning)


def test_picking_another_gallery_image():
    app = start()
    first = app.session_state["picked"].key
    app.button(key=[b.key for b in app.button if b.key and b.key.startswith("pick_")][3]).click().run()
    check_clean(app)
    assert app.session_state["picked"].key != first


def test_layers_page_updates_with_alpha():
    app = start()
    app.switch_page("views/layers.py").run()
    check_clean(app)
    for key in ("channel_histogram", "layer_histogram", "perturbation", "perturbation_split"):
        assert chart(app, key)["data"]
    taps = [t.name for t in app.selectbox(key="layer").options_values] if hasattr(app.selectbox(key="layer"),
                                                                               "options_values") else None
    replaced = chart(app, "fraction_replaced")
    assert replaced["layout"]["xaxis"]["type"] == "category"
    assert taps is None or replaced["layout"]["xaxis"]["categoryarray"] == taps
    app.slider(key="alpha").set_value(0.8).run()
    check_clean(app)
    after = chart(app, "fraction_replaced")["data"][0]["y"]
    assert all(a > b for b, a in zip(replaced["data"][0]["y"], after))
    configs = [json.loads(e.proto.config) for e in app.get("plotly_chart")]
    assert all(c["toImageButtonOptions"]["format"] == "png" for c in configs)
    app.selectbox(key="layer").select_index(2).run()
    check_clean(app)
    assert app.subheader[0].value == f"Layer {app.selectbox(key='layer').value.name}"


def test_accuracy_page_sweeps_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the result cache goes to ./.cache
    app = start()
    app.switch_page("views/accuracy.py").run()
    check_clean(app)
    number = {n.label: n for n in app.number_input}
    number["Test images (N)"].set_value(20)
    number["Steps"].set_value(3)
    next(t for t in app.text_input if t.label.startswith("Alphas")).set_value("0.1, 0.3")
    finish_jobs(app.button(key="FormSubmitter:sweep-Run").click().run())
    check_clean(app)
    table = app.dataframe[0].value
    assert list(table.index) == ["0", "0.1", "0.3"]
    assert {"clean", "robust (exact gradients)", "robust (BPDA)", "worst case"} <= set(table.columns)
    assert all("(" in cell and "%" in cell for cell in table.iloc[0])  # every accuracy with its interval
    assert "sweep_chart" in str([e.proto.id for e in app.get("plotly_chart")])
    assert "eps 32/255" in texts(app) and "best worst-case" in json.dumps(chart(app, "sweep_chart"))
    app.button(key="prepare_export").click().run()
    check_clean(app)
    assert app.session_state["export"][:2] == b"PK"  # a torch.save zip archive


def test_learn_page():
    app = start()
    app.switch_page("views/learn.py").run()
    check_clean(app)
    assert "gradient masking" in texts(app).lower()


def test_two_sessions_keep_their_own_alpha_and_results():
    first, second = start(), start()
    first.slider(key="alpha").set_value(0.0).run()
    second.slider(key="alpha").set_value(2.0).run()
    first.run()
    assert first.slider(key="alpha").value == 0.0
    assert chart(first, "predictions")["data"][0]["x"] == chart(first, "predictions")["data"][1]["x"]
    assert chart(second, "predictions")["data"][0]["x"] != chart(second, "predictions")["data"][1]["x"]


def test_a_model_without_statistics_is_calibrated_from_the_sidebar(tmp_path, monkeypatch):
    from meansparse_app.ui import loaders
    import meansparse_core.statistics_lookup as statistics_lookup

    monkeypatch.chdir(tmp_path)  # statistics are cached under ./.cache
    monkeypatch.setattr(statistics_lookup, "bundled_statistics_path", lambda spec: None)
    loaders.cached_statistics.clear()
    loaders.cached_sparse.clear()
    try:
        app = start()
        assert "no MeanSparse statistics" in "\n".join(w.value for w in app.sidebar.warning)
        assert "calibrate them in the sidebar" in texts(app)
        app.sidebar.slider(key="calibration_n").set_value(300)
        finish_jobs(app.sidebar.button(key="calibrate").click().run())
        check_clean(app)
        assert "calibrated on 300 digits training images (cached)" in "\n".join(c.value for c in app.sidebar.caption)
        assert list((tmp_path / ".cache" / "stats").glob("*.pt"))
        assert chart(app, "predictions")["data"]
    finally:
        loaders.cached_statistics.clear()
        loaders.cached_sparse.clear()


def test_zoo_lists_models_and_says_where_missing_weights_go(tmp_path):
    app = start()
    app.sidebar.text_input(key="model_dir").set_value(str(tmp_path))
    app.sidebar.radio(key="model_source").set_value("RobustBench zoo").run()
    assert not app.exception, app.exception
    models = app.sidebar.selectbox(key="zoo_model")
    assert len(models.options) > 50 and models.value.key.startswith("robustbench/cifar10/Linf/")
    warning = "\n".join(w.value for w in app.warning)
    assert "not on this machine" in warning and str(tmp_path / "cifar10" / "Linf") in warning
    app.sidebar.text_input(key="zoo_search").set_value("MeanSparse").run()
    assert all("MeanSparse" in o for o in app.sidebar.selectbox(key="zoo_model").options)


def test_a_released_model_starts_at_its_published_alpha_and_its_base_has_the_layers_off(monkeypatch, released_digits):
    import torch

    from meansparse_core import attach
    from meansparse_core.statistics import embedded_statistics
    from meansparse_core.attack_choice import AttackChoice
    from meansparse_core.one_image import attack_image, top_k
    from meansparse_app.ui import loaders

    released = released_digits()
    monkeypatch.setattr(loaders, "load_model", lambda spec, model_dir=None, progress=None: released)
    for cached in (loaders.cached_model, loaders.cached_statistics, loaders.cached_sparse, loaders.cached_live_set):
        cached.clear()
    try:
        app = start()
        check_clean(app)
        sidebar = "\n".join(c.value for c in app.sidebar.caption)
        assert "published: 0.25" in sidebar and "own MeanSparse layers" in sidebar
        assert app.slider(key="alpha").value == 0.25
        picked = app.session_state["picked"]
        sparse = attach(released, embedded_statistics(released, picked.image[None]))
        with torch.no_grad():
            assert not torch.equal(released(picked.image[None]), sparse.base(picked.image[None]))
        base_shown = chart(app, "predictions")["data"][0]["x"][::-1]
        base = top_k(sparse.base, picked.image, [str(i) for i in range(10)])
        assert base_shown == pytest.approx(list(base.probabilities))
        app.radio[0].set_value("base")
        app.button(key="FormSubmitter:attack-Attack").click().run()
        check_clean(app)
        expected = attack_image(sparse, picked.image, picked.label, AttackChoice(eps=app.session_state["adversarial"].choice.eps, target="base"))
        assert torch.equal(app.session_state["adversarial"].image, expected)
    finally:
        for cached in (loaders.cached_model, loaders.cached_statistics, loaders.cached_sparse, loaders.cached_live_set):
            cached.clear()


# --- gallery, model loading, alpha controls, links, presentation layout, two alphas, tour -------


def pick_buttons(app: AppTest) -> dict[str, object]:
    return {b.key: b for b in app.button if b.key and b.key.startswith("pick_")}


def test_the_picked_gallery_image_is_marked():
    app = start()
    [opening] = [b for b in pick_buttons(app).values() if b.label == "Picked"]  # the gallery shows the opening image
    assert opening.disabled and app.session_state["picked"].key == f"test/{opening.key[5:]}"
    fourth = next(key for i, key in enumerate(pick_buttons(app)) if i >= 3 and key != opening.key)
    app.button(key=fourth).click().run()
    check_clean(app)
    marked = [b.key for b in pick_buttons(app).values() if b.label == "Picked"]
    assert marked == [fourth] and app.session_state["picked"].key == f"test/{fourth[5:]}"


def test_a_zoo_model_without_weights_says_so_in_the_main_pane(tmp_path):
    app = start()
    app.sidebar.text_input(key="model_dir").set_value(str(tmp_path))
    app.sidebar.radio(key="model_source").set_value("RobustBench zoo").run()
    assert not app.exception, app.exception
    main = "\n".join(w.value for w in app.main.warning)
    assert "not on this machine" in main and str(tmp_path / "cifar10" / "Linf") in main
    assert "download_weights" in [b.key for b in app.main.button]


def test_a_failed_download_leaves_no_progress_bar(tmp_path, monkeypatch):
    import meansparse_app.ui.sidebar
    from meansparse_app import ui
    from meansparse_core.models import ModelUnavailable

    def failing_download(spec, model_dir, progress):
        progress(1, 10)
        raise ModelUnavailable("The download failed: no network. Put the file there by hand.")

    monkeypatch.setattr(ui.sidebar, "load_model", failing_download)
    app = start()
    app.sidebar.text_input(key="model_dir").set_value(str(tmp_path))
    app.sidebar.radio(key="model_source").set_value("RobustBench zoo").run()
    app.button(key="download_weights").click().run()
    assert not app.exception, app.exception
    assert "The download failed" in "\n".join(e.value for e in app.error)
    assert not app.get("progress")


def test_alpha_sits_above_the_predictions_in_a_fragment():
    app = start()
    assert [s.key for s in app.main.slider] == ["alpha"] and not app.sidebar.slider
    assert len(app._fragment_storage._fragments) == 1  # Explore's stage: slider moves rerun only it


def test_a_full_rerun_leaves_the_slider_where_the_browser_put_it():
    """A run that set the slider's value from the script makes the browser show that value when the run
    ends, undoing arrow keys pressed meanwhile; only the first run sets the default."""
    app = start()
    app.slider(key="alpha").set_value(0.4).run()
    app.run()
    assert app.slider(key="alpha").value == 0.4 and not app.slider(key="alpha").proto.set_value
    app.switch_page("views/learn.py").run()
    app.switch_page("views/explore.py").run()
    assert app.slider(key="alpha").value == 0.4  # kept over a page without the controls


def test_the_controls_fall_back_to_their_current_values():
    """A click during the run that first draws the controls (a page's first run) leaves the browser
    without their values: it then shows each widget's default, which was the slider's minimum and
    toggles off, so alpha jumped from 0.2 to 0 (seen in the B9 load test)."""
    app = start()
    assert list(app.slider(key="alpha").proto.default) == [0.2] and app.toggle(key="sparsify").proto.default
    app.slider(key="alpha").set_value(0.4).run()
    assert list(app.slider(key="alpha").proto.default) == [0.4]


def test_alpha_survives_a_page_switch_that_drops_the_widget_values():
    """In the browser a page switch drops the values of the widgets the old page drew (AppTest keeps
    them, and offers no way to drop them): alpha moved on Explore came back as 0.2 on Layers."""
    import streamlit as st
    from meansparse_app.ui import threshold

    app = start()
    app.slider(key="alpha").set_value(0.4).run()
    kept = app.session_state[threshold.KEPT]
    assert kept["alpha"] == 0.4  # recorded where Streamlit does not drop it
    st.session_state.update({threshold.KEPT: kept, "controls_page": "explore"})  # the session, outside a run
    threshold.fill_defaults("layers")  # the switch, with the slider's own value gone
    assert st.session_state["alpha"] == 0.4


def test_explore_charts_download_as_svg_too():
    app = start()
    app.radio(key="figure_format_choice").set_value("svg").run()
    check_clean(app)
    configs = [json.loads(e.proto.config) for e in app.get("plotly_chart")]
    assert configs and all(c["toImageButtonOptions"]["format"] == "svg" for c in configs)


def test_alpha_and_the_layer_rerun_only_a_fragment_on_layers():
    app = start()
    app.switch_page("views/layers.py").run()
    check_clean(app)
    assert len(app._fragment_storage._fragments) == 1  # the probes, histograms and charts
    app.slider(key="alpha").set_value(0.7).run()
    check_clean(app)
    assert "alpha 0.7 here" in texts(app)


def test_the_view_is_written_into_the_link():
    app = start()
    app.slider(key="alpha").set_value(0.45).run()
    app.button(key=list(pick_buttons(app))[2]).click().run()
    app.button(key="FormSubmitter:attack-Attack").click().run()
    check_clean(app)
    params = app.query_params
    image = app.session_state["picked"].key.split("/")[1]
    assert {k: params[k] for k in ("page", "model", "alpha", "image", "attack", "seed", "target")} == {
        "page": "explore", "model": "bundled/digits-cnn", "alpha": "0.45", "image": image, "attack": "pgd",
        "seed": "0", "target": "base"}
    assert f"model=bundled/digits-cnn&data=digits&image={image}&alpha=0.45&attack=pgd" in app.code[0].value


def open_link(params: dict[str, str]) -> AppTest:
    app = AppTest.from_file("../meansparse_app/app.py", default_timeout=TIMEOUT)
    app.query_params.update(params)
    return app.run()


def test_opening_a_link_restores_page_alpha_image_and_attack():
    made = start()
    made.slider(key="alpha").set_value(0.6).run()
    made.button(key=next(key for key, b in list(pick_buttons(made).items())[5:] if not b.disabled)).click().run()
    made.button(key="FormSubmitter:attack-Attack").click().run()
    crafted = made.session_state["adversarial"].image
    opened = open_link({**made.query_params, "page": "layers"})
    check_clean(opened)
    assert opened.title[0].value == "Layers" and opened.slider(key="alpha").value == 0.6
    assert opened.session_state["picked"].key == made.session_state["picked"].key
    assert opened.session_state["adversarial"].image.equal(crafted)  # re-crafted with the same seed
    assert not opened.warning


def test_a_link_chooses_the_placement_and_the_link_keeps_it():
    app = open_link({"placement": "released"})
    assert app.sidebar.radio(key="placement").value == "released"
    assert app.query_params["placement"] == "released"  # the digits model has no such statistics: the page stops there
    app.sidebar.radio(key="placement").set_value("activations").run()
    assert "placement" not in app.query_params  # the default is not written


def test_a_hostile_link_gets_one_notice_and_the_rest_is_restored():
    app = open_link({"alpha": "nan", "image": "99999999", "page": "../../etc", "model": "bundled/none",
                     "layer_alphas": "<script>", "x": "1" * 5000})
    check_clean(app)
    notices = [w.value for w in app.main.warning]
    assert len(notices) == 1 and all(n in notices[0] for n in ("alpha", "image", "page", "model", "layer_alphas"))
    assert app.slider(key="alpha").value == 0.2 and app.title[0].value == "Explore"
    app.slider(key="alpha").set_value(0.3).run()
    assert not app.main.warning  # said once


def test_presentation_layout_puts_the_stage_first_and_is_in_the_link():
    app = open_link({"layout": "presentation"})
    check_clean(app)
    assert app.sidebar.toggle(key="presentation").value and not app.title
    from meansparse_core.charts import PRESENTATION_FONT_SIZE

    figure = chart(app, "predictions")["layout"]
    assert figure["font"]["size"] == figure["xaxis"]["tickfont"]["size"] == PRESENTATION_FONT_SIZE
    assert app.query_params["layout"] == "presentation"
    keys = [getattr(node, "key", None) for node in app.main]
    assert keys.index("alpha") < min(keys.index(k) for k in pick_buttons(app))  # the stage comes first


def test_presentation_two_alphas_put_the_verdicts_beside_the_images():
    """Side by side above each alpha's predictions, the verdicts (two lines each) and a wrapped
    "second alpha" label pushed the predictions below a 720-px screen (browser test for the pixels)."""
    app = finish_jobs(open_link({"layout": "presentation", "alpha2": "0", "attack": "pgd"}))
    check_clean(app)
    assert app.slider(key="alpha2").label == "second alpha"

    def verdicts(where) -> list[str]:
        return [m.value for m in where.markdown if m.value.startswith("**") and "alpha" in m.value]
    assert len(verdicts(app.main)) == 2 and any(len(verdicts(c)) == 2 for c in app.main.columns), verdicts(app.main)
    assert chart(app, "predictions_2")


def test_presentation_layers_charts_take_the_whole_width():
    """In large type, half-width charts overlapped their tick labels and legends."""
    app = open_link({"layout": "presentation", "page": "layers", "alpha2": "0"})
    check_clean(app)
    assert len(app.get("plotly_chart")) == 10
    assert not any(column.get("plotly_chart") for column in app.main.columns)


def test_two_alphas_side_by_side_on_explore():
    app = start()
    app.button(key="FormSubmitter:attack-Attack").click().run()
    app.slider(key="alpha").set_value(0.8).run()
    app.toggle(key="compare").set_value(True).run()
    check_clean(app)
    assert app.slider(key="alpha2").value == 0.0
    verdicts = [m.value for m in app.markdown if m.value.startswith("**") and "alpha" in m.value]
    assert len(verdicts) == 2 and "alpha 0.8" in verdicts[0] and "alpha 0:" in verdicts[1]
    left, right = chart(app, "predictions"), chart(app, "predictions_2")
    assert len(left["data"]) == len(right["data"]) == 2 and left["data"] != right["data"]
    titles = [[a["text"] for a in c["layout"]["annotations"]] for c in (left, right)]
    assert titles == [["alpha 0.8<br>clean", "alpha 0.8<br>adversarial"],
                      ["alpha 0 (base)<br>clean", "alpha 0 (base)<br>adversarial"]]  # not "MeanSparse" twice
    assert app.query_params["alpha2"] == "0"


def test_the_guided_tour_drives_the_pages():
    from meansparse_app.ui.tour import TOUR

    app = start()
    app.sidebar.button(key="tour_start").click().run()
    seen = []
    for index, step in enumerate(TOUR):
        check_clean(app)
        assert f"step {index + 1} of {len(TOUR)}" in texts(app)
        seen.append((app.title[0].value if app.title else "", app.session_state["alpha"],
                     "adversarial" in app.session_state))
        if step.last_layer:
            assert app.selectbox(key="layer").value.name == app.session_state["setup"].sparse.taps[-1].name
        app.button(key="tour_next").click().run()
    assert [s[0] for s in seen] == ["Explore"] * 4 + ["Layers", "Accuracy", "How MeanSparse works"]
    assert [s[1] for s in seen[:4]] == [0.2, 0.2, 0.0, 1.0] and seen[1][2]
    assert "Tour, step" not in texts(app)


def test_two_alphas_side_by_side_on_layers():
    app = start()
    app.switch_page("views/layers.py").run()
    app.slider(key="alpha").set_value(0.9).run()
    app.toggle(key="compare").set_value(True).run()
    check_clean(app)
    for key in ("channel_histogram", "layer_histogram", "fraction_replaced", "perturbation", "perturbation_split"):
        assert chart(app, key)["data"] and chart(app, f"{key}_2")["data"]
    assert chart(app, "fraction_replaced")["data"][0]["y"] != chart(app, "fraction_replaced_2")["data"][0]["y"]
    assert "alpha 0.9 here" in texts(app) and "alpha 0 here" in texts(app)
    for key in ("fraction_replaced", "perturbation", "perturbation_split"):  # one scale, or they mislead
        assert chart(app, key)["layout"]["yaxis"]["range"] == chart(app, f"{key}_2")["layout"]["yaxis"]["range"]
    # Each chart gets its alpha's whole column: side by side within it, titles overlapped and were cut off.
    assert set(chart_column_depths(app.main).values()) == {1}


def chart_column_depths(node, depth: int = 0) -> dict[str, int]:
    """For each chart under ``node``: how many columns it sits in."""
    depths = {}
    for child in getattr(node, "children", {}).values():
        inner = depth + (child.type == "column")
        if child.type == "plotly_chart":
            depths[child.proto.id] = inner
        depths.update(chart_column_depths(child, inner))
    return depths
