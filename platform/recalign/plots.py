"""Figures written as PNG files to run storage (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from recalign import io


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, uri: str, dpi: int = 110) -> None:
    """Write `fig` as a PNG to `uri` (any run-storage filesystem, atomically) and close it."""
    import io as _io

    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    io.write_bytes(buffer.getvalue(), uri)
