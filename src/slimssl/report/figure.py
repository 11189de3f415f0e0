"""A matplotlib Figure drawn on the Agg canvas (no pyplot: the caller's backend is left alone) that a notebook shows
as an image when it is a cell's value, with or without ``%matplotlib inline``. Imported only where matplotlib is."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


class ReportFigure(Figure):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        FigureCanvasAgg(self)

    def _repr_png_(self) -> bytes:  # IPython's hook; without it, a Figure not made by pyplot shows as its repr
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()
