"""Named model shapes. The table lives in models/config.py beside the schema (no import circle); this name stays."""

from analogjax.models.config import PRESETS  # noqa: F401

__all__ = ["PRESETS"]
