"""The report's one optional dependency, matplotlib, imported lazily and checked before any work."""
from __future__ import annotations

INSTALL_HINT = "pip install dfqkern[report]"


def require_matplotlib():
    """The ``matplotlib`` module, or an ImportError naming the extra that installs it. The report draws
    with the object-oriented API (Figure + Agg canvas): no pyplot, no global backend switched."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 - the canvas the plots use
    except ImportError as e:
        raise ImportError(f"the report needs matplotlib: {INSTALL_HINT}") from e
    return matplotlib
