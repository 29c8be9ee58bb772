"""A picture of a training run from its ``metrics.jsonl``: the training loss per logged step (left) and
the dev GMNER / MNER / EEG F1 per epoch (right), drawn with PIL (matplotlib is not a dependency).

``examples/train.py`` writes ``OUTPUT/metrics.png`` at the end of training; for a run in progress or an
old one: ``python examples/plot_metrics.py runs/x/metrics.jsonl [--output runs/x/metrics.png]``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from ..visualize import PALETTE, TYPE_COLORS
from .file_utils import utf8_lines

__all__ = [
    "LOSS_COLOR",
    "MARGIN",
    "PANEL",
    "TASK_COLORS",
    "plot_metrics",
    "read_metrics",
]


TASK_COLORS = {"gmner": TYPE_COLORS["PER"], "mner": TYPE_COLORS["LOC"], "eeg": TYPE_COLORS["ORG"]}
LOSS_COLOR = PALETTE[7]
PANEL = (520, 360)
MARGIN = (64, 40, 24, 52)  # left, top, right, bottom


def read_metrics(path: str) -> Dict[str, List[Tuple[float, float]]]:
    """``{"loss": [(step, loss)], "gmner" / "mner" / "eeg": [(epoch, f1)]}`` of a ``metrics.jsonl``; the
    last record of a step (or epoch) wins, so a log that holds a resumed run is drawn once."""
    loss: Dict[float, float] = {}
    scores: Dict[str, Dict[float, float]] = {task: {} for task in TASK_COLORS}
    for number, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number}: not valid JSON; is this a metrics.jsonl of examples/train.py?") from None
        if "loss" in record and "step" in record:
            loss[float(record["step"])] = float(record["loss"])
        if record.get("split") == "dev" and "scores" in record:
            for task in TASK_COLORS:
                if task in record["scores"]:
                    scores[task][float(record["epoch"]) + 1] = float(record["scores"][task]["f1"])
    return {"loss": sorted(loss.items()), **{task: sorted(points.items()) for task, points in scores.items()}}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _ticks(low: float, high: float, count: int = 5) -> List[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def _panel(title: str, x_label: str, series: Sequence[Tuple[str, Tuple[int, int, int], List[Tuple[float, float]]]],
           y_range: Optional[Tuple[float, float]] = None, percent: bool = False) -> Image.Image:
    image = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    left, top, right, bottom = MARGIN
    x0, y0, x1, y1 = left, top, PANEL[0] - right, PANEL[1] - bottom
    draw.text((left, 10), title, fill="black", font=font)
    points = [p for _, _, data in series for p in data]
    if not points:
        draw.text((x0 + 10, (y0 + y1) // 2), "no records yet", fill="gray", font=font)
        return image
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    x_low, x_high = min(xs), max(xs)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = y_range or (min(ys), max(ys))
    if y_high == y_low:
        y_low, y_high = y_low - 0.5, y_high + 0.5

    def to_pixel(x: float, y: float) -> Tuple[float, float]:
        return (x0 + (x - x_low) / (x_high - x_low) * (x1 - x0), y1 - (y - y_low) / (y_high - y_low) * (y1 - y0))

    for value in _ticks(y_low, y_high):
        _, y = to_pixel(x_low, value)
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{100 * value:.0f}" if percent else f"{value:.3g}", fill="black", font=small)
    integral = all(float(x).is_integer() for x in xs)
    x_ticks = list(range(int(min(xs)), int(max(xs)) + 1)) if integral and max(xs) - min(xs) <= 12 else _ticks(x_low, x_high)
    for value in x_ticks:
        x, _ = to_pixel(value, y_low)
        draw.line([(x, y1), (x, y1 + 4)], fill="black")
        draw.text((x - 8, y1 + 6), f"{value:.0f}", fill="black", font=small)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) // 2 - 20, PANEL[1] - 20), x_label, fill="black", font=small)
    legend_x = x0 + 8 + int(draw.textlength(title, font=font)) + 16
    # Earlier series are drawn wider, so that a later one with the same values (EEG = GMNER when every
    # type is right) leaves the earlier visible around it.
    widths = list(range(2 + 2 * (len(series) - 1), 1, -2)) or [2]
    for (name, color, data), width in zip(series, widths):
        pixels = [to_pixel(x, y) for x, y in data]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=width)
        radius = width // 2 + 2
        for x, y in pixels:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
        draw.rectangle([legend_x, 12, legend_x + 10, 22], fill=color)
        draw.text((legend_x + 14, 10), name, fill="black", font=small)
        legend_x += 24 + int(draw.textlength(name, font=small))
    return image


def plot_metrics(metrics_path: str, output: Optional[str] = None) -> str:
    """Draw ``metrics_path`` (a ``metrics.jsonl``) to ``output`` (default: ``metrics.png`` beside it); returns
    the PNG's path."""
    data = read_metrics(metrics_path)
    output = output or os.path.join(os.path.dirname(os.path.abspath(metrics_path)), "metrics.png")
    loss = _panel("training loss", "optimiser step", [("loss", LOSS_COLOR, data["loss"])])
    f1 = _panel("dev F1 (%)", "epoch", [(task.upper(), TASK_COLORS[task], data[task]) for task in TASK_COLORS],
                y_range=(0.0, 1.0), percent=True)
    canvas = Image.new("RGB", (2 * PANEL[0], PANEL[1]), "white")
    canvas.paste(loss, (0, 0))
    canvas.paste(f1, (PANEL[0], 0))
    canvas.save(output)
    return output
