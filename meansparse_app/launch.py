"""``meansparse app [streamlit options]``: the installed app, from any folder, with the project's settings.

Streamlit reads ``.streamlit/config.toml`` beside the script it runs (script-level settings, Streamlit 1.46
and later), so the app's own settings travel with it; options given here go after them and win.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")


def command(options: list[str]) -> list[str]:
    """The ``streamlit run`` command line that serves the app with these extra Streamlit options."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), *options]


def main(options: list[str] | None = None) -> int:
    """Become the Streamlit server (same process, so Ctrl+C and a service manager's signals reach it)."""
    argv = command(sys.argv[1:] if options is None else options)
    if os.name == "posix":
        os.execv(argv[0], argv)
    return subprocess.call(argv)  # Windows has no exec that keeps the process: wait for the server instead
