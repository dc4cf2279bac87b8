"""Shared fixtures."""

import functools
import http.server
import threading

import pytest


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
