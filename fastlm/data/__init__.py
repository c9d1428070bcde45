"""Data pipeline (filled by the data issue)."""
