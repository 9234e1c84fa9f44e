"""Shared by every test module: attnc is imported first, before any test module imports Triton, so that
on a machine without a GPU it chooses Triton's interpreter for the whole session (`runtime/backend.py`),
whichever test file pytest collects first."""

import attnc  # noqa: F401  (imported for its effect: the backend choice)
