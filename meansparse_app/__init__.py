"""MeanSparse Explorer's Streamlit app: ``app.py`` (the entry point), its pages in ``views/`` and the
widgets and cached loaders they share in ``ui/``. Start it with ``meansparse app`` (or ``python -m
meansparse_app``); its Streamlit settings are ``.streamlit/config.toml`` beside ``app.py``."""
