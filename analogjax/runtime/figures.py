"""PNG figures of the reports (fidelity, transfer, pruning importance): matplotlib on its file-only backend, and one
way to save a figure.

matplotlib is imported on first use, not with this module: most commands draw nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: files only, never a display (a headless host, a CI runner, a worker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path) -> Path:
    """Lay out, write and close `fig` (closed: a report draws many figures and pyplot keeps open ones alive)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
