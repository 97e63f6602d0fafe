"""Command-line tools: importing the authors' released weights (import_sourcevae.py)."""
