"""Shared fixtures."""

import functools
import http.server
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch

#: The team's shared datasets folder, ../shared/datasets next to the checkout (or where
#: MEANSPARSE_SHARED_DATASETS points, for a clone elsewhere).
SHARED_DATASETS = Path(os.environ.get("MEANSPARSE_SHARED_DATASETS",
                                      Path(__file__).resolve().parents[2] / "shared" / "datasets"))
SHARED_CIFAR = SHARED_DATASETS / "cifar10-jpeg.tar.gz"


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where tests that take the `device` fixture run; with cuda, only those run (the "
                          "operator, placement, statistics and fused-kernel tests), the others are skipped")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == "cpu":
        return
    elsewhere = pytest.mark.skip(reason="runs on the CPU only; --device cuda runs the tests that take `device`")
    for item in items:
        if "device" not in getattr(item, "fixturenames", ()):
            item.add_marker(elsewhere)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device the test runs on: the CPU unless pytest was given ``--device cuda`` (skips where there is no CUDA)."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA device here")
    return torch.device(name)


@pytest.fixture(autouse=True, scope="session")
def never_the_users_cache_folder(tmp_path_factory) -> Iterator[None]:
    """Module- and session-scoped fixtures start before each test's own folder is set: theirs is this one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEANSPARSE_CACHE", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def own_cache_folder(tmp_path, monkeypatch) -> Path:
    """Each test writes its caches (statistics, results, uploads, kernels) under its own ``tmp_path/.cache``,
    never in the user's cache folder, and sees no other test's results."""
    folder = tmp_path / ".cache"
    monkeypatch.setenv("MEANSPARSE_CACHE", str(folder))
    return folder


@pytest.fixture(autouse=True)
def no_shared_work_between_tests():
    """A test's app sessions share computations with one another (meansparse_app.ui.heavy.shared_work), never with another test's."""
    yield
    heavy = sys.modules.get("meansparse_app.ui.heavy")
    if heavy is not None:
        heavy.shared_work.clear()


@pytest.fixture(autouse=True)
def no_background_work_after_a_test():
    """Background work a test started (an app page's live figures) ends with it: running on, it would build
    kernels in the next test's cache folder and call the operator in the middle of its counts."""
    yield
    from meansparse_core.jobs import stop_background_work

    stop_background_work()


@pytest.fixture(scope="session")
def shared_cifar10(tmp_path_factory) -> Path:
    """The shared CIFAR-10 JPEG archive, extracted once per test run (skips when it is not here)."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"{SHARED_CIFAR} is not here")
    from meansparse_core.data import extract

    return extract(SHARED_CIFAR, tmp_path_factory.mktemp("cifar")) / "cifar10-jpeg"


@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server over a fresh folder: exercises download code with no outside network.

    Yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def released_digits():
    """Builds the digits demo model with the authors' own MeanSparse layers (RobustBench's class) in front
    of its convolutional ReLUs, holding its statistics and a stored threshold (0.25 unless given): a
    small stand-in for an ``Amini2024MeanSparse_*`` model."""
    from torch import nn

    from meansparse_core import Statistics
    from meansparse_core.models import bundled_statistics_path, find_model, load_model
    from meansparse_core.robustbench_compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures.Meansparse_wrn_70_16 import MeanSparse

    def build(threshold: float = 0.25) -> nn.Module:
        spec = find_model("bundled/digits-cnn")
        model, stats = load_model(spec), Statistics.load(bundled_statistics_path(spec))
        for index, module in enumerate(list(model)):
            if isinstance(module, nn.ReLU) and isinstance(model[index - 1], nn.BatchNorm2d):
                tap = stats[str(index)]
                layer = MeanSparse(tap.tap.channels)
                layer.running_mean.copy_(tap.mean)
                layer.running_var.copy_(tap.std.square())
                layer.threshold.fill_(threshold)
                model[index] = nn.Sequential(layer, module)
        return model.eval()

    return build


def streamlit_config() -> dict:
    """The app server's settings, ``.streamlit/config.toml``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10, which pyproject.toml still supports
        import tomli as tomllib
    return tomllib.loads((Path(__file__).parents[1] / "meansparse_app" / ".streamlit" / "config.toml").read_text())
