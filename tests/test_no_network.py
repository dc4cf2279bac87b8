"""No network: every download gives up within its timeout with a sentence naming the file to provide,
never retries, and leaves the rest of the library and the app working.

The outside world is simulated: a name lookup that hangs (as on a laptop whose Wi-Fi is off), a
server that accepts the connection and never answers, and a refused connection.
"""

import socket
import time
from pathlib import Path

import pytest

import meansparse_core.data as data
import meansparse_core.models as models
from meansparse_core.data import DataUnavailable, download, load_dataset
from meansparse_core.models import ModelUnavailable, find_model, load_model

R18 = "robustbench/cifar10/Linf/Sehwag2021Proxy_R18"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hanging_name_lookup(monkeypatch):
    """Name lookups that never answer; the timeout cut to one second so that the tests stay quick."""
    calls = []

    def hang(*args, **kwargs):
        calls.append(args[0])
        time.sleep(60)

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 1)
    return calls


@pytest.fixture
def silent_server():
    """A port that accepts connections (the kernel's backlog) but never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def gives_up_in_time(call, error=DataUnavailable, match: str = "") -> bool:
    """True when ``call`` raises ``error`` long before the 60 s a hanging lookup would take.

    The one-second timeout gets a wide margin: the point is that nothing waits for the network,
    not how fast a loaded machine raises.
    """
    start = time.monotonic()
    with pytest.raises(error, match=match):
        call()
    return time.monotonic() - start < 10


def test_the_default_timeout_is_15_seconds_and_download_is_the_only_way_out():
    assert data.DOWNLOAD_TIMEOUT_S <= 15
    sources = [*ROOT.glob("meansparse_core/*.py"), ROOT / "meansparse_app" / "app.py", *ROOT.glob("meansparse_app/ui/*.py"), *ROOT.glob("meansparse_app/views/*.py")]
    openers = [p.name for p in sources if any(word in p.read_text() for word in ("urlopen(", "requests.", "http.client"))]
    assert openers == ["data.py"], "every network access must go through data.download"


def test_a_hanging_name_lookup_gives_up_within_the_timeout(tmp_path, hanging_name_lookup):
    dest = tmp_path / "cifar-10-python.tar.gz"
    assert gives_up_in_time(lambda: download("https://example.org/x.tar.gz", dest), match=str(dest))
    assert hanging_name_lookup == ["example.org"], "tried once, no retries"
    assert list(tmp_path.iterdir()) == [], "a failed download leaves no partial file"


def test_a_server_that_never_answers_gives_up_within_the_timeout(tmp_path, silent_server):
    dest = tmp_path / "x.pt"
    assert gives_up_in_time(lambda: download(silent_server + "/x.pt", dest, timeout=1), match="put that file at")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_connection_fails_at_once_naming_the_file(tmp_path):
    dest = tmp_path / "x.tar.gz"
    assert gives_up_in_time(lambda: download("http://127.0.0.1:9/x.tar.gz", dest, timeout=2), match=str(dest))
    assert list(tmp_path.iterdir()) == []


def test_missing_model_weights_name_the_file_to_provide(tmp_path, hanging_name_lookup):
    spec, expected = find_model(R18), tmp_path / "cifar10" / "Linf" / "Sehwag2021Proxy_R18.pt"
    assert gives_up_in_time(lambda: load_model(spec, model_dir=tmp_path), ModelUnavailable,
                            match=f"put the file at {expected}")


def test_missing_datasets_name_the_folder_to_provide(tmp_path, hanging_name_lookup):
    assert gives_up_in_time(lambda: load_dataset("cifar10", "test", root=tmp_path), match=str(tmp_path))
    with pytest.raises(DataUnavailable, match="ImageNet"):
        load_dataset("imagenet", "test", root=tmp_path)
    with pytest.raises(DataUnavailable, match=f"No cifar-10-batches-py in {tmp_path}"):
        load_dataset("cifar10", "test", root=tmp_path, fetch=False)


def test_the_offline_model_and_data_work_while_downloads_fail(hanging_name_lookup):
    model = load_model(find_model("bundled/digits-cnn"))
    images, labels = data.load_items(load_dataset("digits", "test"), range(20))
    assert (model(images).argmax(1) == labels).float().mean() > 0.8
    assert hanging_name_lookup == []


def test_the_app_reports_a_failed_download_and_keeps_working(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 1)
    monkeypatch.setattr(models, "GDRIVE_URL", "http://127.0.0.1:9/{}")  # refused at once
    app = AppTest.from_file("../meansparse_app/app.py", default_timeout=120).run()
    app.sidebar.text_input(key="model_dir").set_value(str(tmp_path))
    app.sidebar.radio(key="model_source").set_value("RobustBench zoo").run()
    app.main.button(key="download_weights").click().run()
    assert not app.exception, app.exception
    errors = "\n".join(e.value for e in app.error)
    assert "could not be downloaded: put the file at" in errors and str(tmp_path) in errors
    app.sidebar.radio(key="model_source").set_value("Demo models").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert "shipped with the model" in "\n".join(c.value for c in app.sidebar.caption)
