"""Streamlit components of the app (outside `explorer/`, which never imports streamlit)."""
