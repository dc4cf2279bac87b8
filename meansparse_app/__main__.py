"""``python -m meansparse_app [streamlit options]`` starts the app (as ``meansparse app`` does)."""

import sys

from meansparse_app.launch import main

sys.exit(main())
