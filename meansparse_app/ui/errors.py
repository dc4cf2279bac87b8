"""Errors on the page: one readable sentence for what a user can cause, the log for everything else."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import streamlit as st

from meansparse_core.data import DataUnavailable
from meansparse_core.models import ModelUnavailable

log = logging.getLogger("meansparse_explorer")

#: Errors a user can cause; they are shown as one sentence. Anything else is a bug: logged in full.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, DataUnavailable, ModelUnavailable)


@contextmanager
def shown_errors() -> Iterator[None]:
    """Turn an exception into a readable message on the page instead of a traceback."""
    try:
        yield
    except USER_ERRORS as exc:
        st.error(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc))
    except Exception as exc:  # a bug: say so in one line, keep the details in the server log
        log.exception("unexpected error")
        st.error(f"Something went wrong ({exc.__class__.__name__}: {exc}). The server log has the details.")
