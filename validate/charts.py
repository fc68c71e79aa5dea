"""Headroom charts: one PNG per submodel, a bar of max |activation| per block against 65504.

Drawn with Pillow (matplotlib is not a dependency). A log scale, because the interesting
range runs from ~1 to ~1e6; a red line at the f16 maximum, red bars past it, amber bars
within a factor of 4 of it, so a person sees at a glance which block would overflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from validate.metrics import F16_MAX

ROW, LABEL_W, BAR_W, PAD = 16, 230, 520, 10
COLORS = {"over": (200, 30, 30), "near": (230, 150, 20), "ok": (60, 110, 180)}
NEAR = 4.0  # headroom below this is drawn amber


def bar_color(value: float) -> tuple[int, int, int]:
    if not math.isfinite(value) or value > F16_MAX:
        return COLORS["over"]
    return COLORS["near"] if value * NEAR > F16_MAX else COLORS["ok"]


def chart_size(n_blocks: int) -> tuple[int, int]:
    """(width, height) in pixels of a chart of `n_blocks` bars."""
    return LABEL_W + BAR_W + 2 * PAD + 90, 3 * ROW + PAD * 3 + n_blocks * ROW


def headroom_chart(title: str, maxima: Mapping[str, float], path: Path) -> Path:
    """Horizontal bars of `maxima` (block -> max |activation|) on a log axis, the f16 max marked."""
    from PIL import Image, ImageDraw, ImageFont

    finite = [v for v in maxima.values() if math.isfinite(v) and v > 0]
    lo = math.floor(math.log10(min(finite + [1.0]))) - 1
    hi = math.ceil(math.log10(max(finite + [F16_MAX * 10])))

    def x_of(value: float) -> int:
        v = hi if not math.isfinite(value) else math.log10(max(value, 10.0**lo))
        return LABEL_W + PAD + round((min(v, hi) - lo) / (hi - lo) * BAR_W)

    width, height = chart_size(len(maxima))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((PAD, PAD), title, fill="black", font=font)
    top = PAD * 2 + ROW
    for i, (block, value) in enumerate(maxima.items()):
        y = top + i * ROW
        draw.text((PAD, y + 2), block[-36:], fill="black", font=font)
        draw.rectangle([LABEL_W + PAD, y + 3, x_of(value), y + ROW - 3], fill=bar_color(value))
        draw.text((x_of(value) + 4, y + 2), "inf" if not math.isfinite(value) else f"{value:.3g}", fill="black", font=font)
    axis_y = top + len(maxima) * ROW + 2
    draw.line([LABEL_W + PAD, axis_y, LABEL_W + PAD + BAR_W, axis_y], fill="black")
    for exponent in range(lo, hi + 1):
        x = x_of(10.0**exponent)
        draw.line([x, axis_y, x, axis_y + 4], fill="black")
        draw.text((x - 10, axis_y + 6), f"1e{exponent}", fill="black", font=font)
    limit = x_of(F16_MAX)
    draw.line([limit, top - 4, limit, axis_y], fill=COLORS["over"], width=2)
    draw.text((limit + 3, top - ROW + 2), "f16 max 65504", fill=COLORS["over"], font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
