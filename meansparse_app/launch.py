"""``meansparse app [streamlit options]``: the installed app, from any folder, with the project's settings.

Streamlit reads ``.streamlit/config.toml`` beside the script it runs (script-level settings, Streamlit 1.46
and later), so the app's own settings travel with it; options given here go after them and win.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")


def command(options: list[str]) -> list[str]:
    """The ``streamlit run`` command line that serves the app with these extra Streamlit options."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), *options]


def main(options: list[str] | None = None) -> int:
    """Serve the app until interrupted; returns Streamlit's exit status."""
    try:
        return subprocess.call(command(sys.argv[1:] if options is None else options))
    except KeyboardInterrupt:  # Ctrl+C reaches Streamlit too, which shuts down cleanly
        return 0
