"""PNG figures of the reports (fidelity, transfer, pruning importance): matplotlib on its file-only backend, and one
way to save a figure.

matplotlib is imported on first use, not with this module: most commands draw nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from etils import epath


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: files only, never a display (a headless host, a CI runner, a worker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | os.PathLike) -> Path | epath.Path:
    """Lay out, write and close `fig` (closed: a report draws many figures and pyplot keeps open ones alive). A
    gs:// or s3:// `path` is written as one object."""
    import io

    import matplotlib.pyplot as plt

    from analogjax.runtime import storage

    fig.tight_layout()
    if storage.is_remote(path):
        image = io.BytesIO()
        fig.savefig(image, dpi=100, format="png")
        storage.location(path).write_bytes(image.getvalue())
    else:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return storage.location(path) if storage.is_remote(path) else Path(path)
