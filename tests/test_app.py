"""The start page and the Learn page, driven headless with Streamlit's AppTest."""

from streamlit.testing.v1 import AppTest


def test_start_page_slider_changes_the_clamped_fraction():
    app = AppTest.from_file("../app.py").run(timeout=60)
    assert not app.exception
    at_default = app.metric[0].value
    app.slider[0].set_value(1.0).run()
    assert not app.exception
    at_one = app.metric[0].value
    app.slider[0].set_value(0.0).run()
    assert app.metric[0].value == "0.0%"
    assert float(at_one.rstrip("%")) > float(at_default.rstrip("%")) > 0


def test_learn_page_explains_bpda_and_square():
    page = AppTest.from_file("../pages/1_Learn.py").run(timeout=30)
    assert not page.exception
    text = " ".join(m.value for m in page.markdown)
    assert "BPDA" in text and "Square" in text and "68.94%" in text
