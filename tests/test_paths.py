"""Where the library writes by default: the user's cache folder, chosen the way XDG says, never the working folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

from meansparse_core import paths

ROOT = Path(__file__).resolve().parents[1]


def test_the_cache_folder_follows_meansparse_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MEANSPARSE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("MEANSPARSE_CACHE")
    assert paths.cache_root() == tmp_path / "xdg" / "meansparse"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # the XDG specification: ignore a relative value
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "meansparse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert paths.cache_folder("stats") == tmp_path / "home" / ".cache" / "meansparse" / "stats"


def test_data_and_models_default_inside_the_cache_folder_and_keep_their_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("MEANSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEANSPARSE_DATA", raising=False)
    monkeypatch.delenv("MEANSPARSE_MODELS", raising=False)
    assert (paths.data_root(), paths.models_root()) == (tmp_path / "cache" / "data", tmp_path / "cache" / "models")
    monkeypatch.setenv("MEANSPARSE_DATA", str(tmp_path / "datasets"))
    monkeypatch.setenv("MEANSPARSE_MODELS", str(tmp_path / "weights"))
    assert (paths.data_root(), paths.models_root()) == (tmp_path / "datasets", tmp_path / "weights")


def test_calibrate_and_evaluate_write_nothing_into_the_working_folder(tmp_path):
    """Statistics, results and the C kernel land in the cache folder; the folder the command ran in stays empty."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEANSPARSE_CACHE": str(cache), "MEANSPARSE_DATA": str(tmp_path / "data")}
    for command in (["calibrate", "--model", "bundled/digits-cnn", "--n", "64"],
                    ["evaluate", "--model", "bundled/digits-cnn", "--n", "20", "--attack", "fgsm", "--eps", "32", "--json"]):
        done = subprocess.run([sys.executable, "-m", "meansparse_core", *command], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["n"] == 20
    assert list(work.iterdir()) == []
    assert list((cache / "stats").glob("*.pt")) and list((cache / "results").iterdir())
