"""A tiny QPainter plot of the training loss (per step) and validation score (per epoch).

matplotlib is not a napari dependency, so the Train widget draws its own curves.
"""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

LOSS_COLOR = QColor("#4fa3ff")
VAL_COLOR = QColor("#ffb347")
AXIS_COLOR = QColor("#888888")


class LossPlot(QWidget):
    """Loss (left axis, auto-scaled) and validation F1 (right axis, 0..1) against steps."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.val_steps: list[int] = []
        self.val_scores: list[float] = []
        self.val_name = "validation F1"
        self.val_scored = True
        self.setToolTip(
            "Blue: training loss per step (lower is better; left axis). Orange: the "
            "validation score per epoch, object F1 at IoU 0.5 on objects never trained "
            "on (1 = every object found with the right outline; right axis)."
        )
        self.setMinimumHeight(140)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)

    def clear(self) -> None:
        self.val_name, self.val_scored = "validation F1", True
        self.steps.clear()
        self.losses.clear()
        self.val_steps.clear()
        self.val_scores.clear()
        self.update()

    def set_validation(self, name: str, scored: bool) -> None:
        """What the orange number is (e.g. "F1@0.5 on 12 held-out objects"), or why none."""
        self.val_name, self.val_scored = name, scored
        self.update()

    def add_loss(self, step: int, loss: float) -> None:
        if math.isfinite(loss):
            self.steps.append(step)
            self.losses.append(loss)

    def add_val(self, step: int, score: float | None) -> None:
        if score is not None and math.isfinite(score):
            self.val_steps.append(step)
            self.val_scores.append(score)

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt)
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        rect = QRectF(self.rect()).adjusted(36, 8, -32, -18)
        p.setPen(QPen(AXIS_COLOR, 1))
        p.drawRect(rect)
        font = p.font()
        font.setPointSizeF(max(7.0, font.pointSizeF() - 1))
        p.setFont(font)
        if not self.losses:
            p.drawText(rect, Qt.AlignCenter, "loss and validation score appear here")
            p.end()
            return
        n_max = max(self.steps[-1], self.val_steps[-1] if self.val_steps else 1, 1)
        lo, hi = min(self.losses), max(self.losses)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5

        def xy(step: float, value: float, vmin: float, vmax: float) -> QPointF:
            x = rect.left() + rect.width() * (step / n_max)
            y = rect.bottom() - rect.height() * ((value - vmin) / (vmax - vmin))
            return QPointF(x, y)

        # loss: at most one point per horizontal pixel (mean of the steps it covers)
        path = QPainterPath()
        bins = max(1, int(rect.width()))
        per = max(1, math.ceil(len(self.losses) / bins))
        for i in range(0, len(self.losses), per):
            chunk = self.losses[i : i + per]
            pt = xy(self.steps[min(i + per, len(self.steps)) - 1], sum(chunk) / len(chunk), lo, hi)
            path.moveTo(pt) if i == 0 else path.lineTo(pt)
        p.setPen(QPen(LOSS_COLOR, 1.5))
        p.drawPath(path)
        if self.val_scores:
            p.setPen(QPen(VAL_COLOR, 2))
            pts = [xy(s, v, 0.0, 1.0) for s, v in zip(self.val_steps, self.val_scores)]
            for a, b in zip(pts, pts[1:]):
                p.drawLine(a, b)
            p.setBrush(VAL_COLOR)
            for pt in pts:
                p.drawEllipse(pt, 2.5, 2.5)
        # axes labels
        p.setPen(LOSS_COLOR)
        p.drawText(QRectF(0, rect.top() - 4, 34, 14), Qt.AlignRight, f"{hi:.2g}")
        p.drawText(QRectF(0, rect.bottom() - 10, 34, 14), Qt.AlignRight, f"{lo:.2g}")
        p.setPen(VAL_COLOR)
        p.drawText(QRectF(rect.right() + 3, rect.top() - 4, 30, 14), Qt.AlignLeft, "1")
        p.drawText(QRectF(rect.right() + 3, rect.bottom() - 10, 30, 14), Qt.AlignLeft, "0")
        legend = f"loss {self.losses[-1]:.3f}"
        p.setPen(LOSS_COLOR)
        p.drawText(QRectF(rect.left() + 4, rect.top() + 2, rect.width(), 14), Qt.AlignLeft, legend)
        if self.val_scores or not self.val_scored:
            p.setPen(VAL_COLOR if self.val_scores else AXIS_COLOR)
            text = (
                f"{self.val_name}: {self.val_scores[-1]:.2f}" if self.val_scores else self.val_name
            )
            p.drawText(
                QRectF(rect.left(), rect.top() + 16, rect.width() - 4, 14), Qt.AlignRight, text
            )
        p.setPen(AXIS_COLOR)
        p.drawText(
            QRectF(rect.left(), rect.bottom() + 2, rect.width(), 14),
            Qt.AlignCenter,
            f"step {self.steps[-1]}",
        )
        p.end()
