"""attnc's version (pyproject.toml reads it from here; part of every kernel's cache key)."""

__version__ = "0.1.0"
