"""Streamlit pieces every page shares, one module per job.

loaders: cached models, statistics and data (per server, read-only) · sidebar: the sidebar and what it
sets up · state: what one session works with (setup, picked image, adversarial example) · panels: the
gallery, the accuracy figures, image helpers · uploads: an uploaded image · errors: readable errors.
"""
