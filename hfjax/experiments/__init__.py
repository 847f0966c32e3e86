"""Data sets, models and losses for the hfjax experiments (kept apart from the library)."""
