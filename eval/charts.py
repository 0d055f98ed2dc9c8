"""Inline SVG charts (grouped bars, lines) for the self-contained HTML report. No JavaScript:
hover text uses SVG <title> elements, which every browser shows natively."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#4263eb", "#f76707", "#0ca678", "#d6336c", "#7048e8", "#1098ad", "#f59f00", "#495057")
FONT = (
    "-apple-system,BlinkMacSystemFont,'Segoe UI',Roboto,'Helvetica Neue',Arial,"
    "'PingFang SC','Hiragino Sans GB','Microsoft YaHei','Noto Sans CJK SC',sans-serif"
)
INK, MUTED, GRID, AXIS = "#1f2430", "#667085", "#eaecf0", "#98a2b3"


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _f(x: float) -> str:
    """A coordinate, short."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def nice_step(span: float, target: int = 5) -> float:
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def nice_range(lo: float, hi: float, target: int = 5) -> tuple[float, float, float]:
    """(start, stop, step): round bounds covering [lo, hi] with about `target` steps."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        hi = lo + (abs(lo) or 1.0)
    step = nice_step(hi - lo, target)
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step, step


def _ticks(start: float, stop: float, step: float) -> list[float]:
    n = int(round((stop - start) / step))
    return [start + k * step for k in range(n + 1)]


def _tick_label(v: float, step: float) -> str:
    if step >= 1 or v == 0:
        return f"{v:,.0f}" if abs(v) >= 1000 or step >= 1 else f"{v:g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if step * 10**decimals % 1:  # 2.5, 0.25, ...
        decimals += 1
    return f"{v:.{decimals}f}"


def text_width(text: str, size: float = 11.0) -> float:
    """Rough rendered width: CJK and full-width characters are square, Latin about 0.58 em."""
    return sum(size * (1.0 if unicodedata.east_asian_width(ch) in "WF" else 0.58) for ch in text)


def wrap_label(text: str, max_width: float, size: float = 11.0) -> list[str]:
    """Greedy word wrap (character wrap for text without spaces, such as Chinese)."""
    units = text.split(" ") if " " in text else list(text)
    joiner = " " if " " in text else ""
    lines: list[str] = []
    cur = ""
    for unit in units:
        cand = f"{cur}{joiner}{unit}" if cur else unit
        if cur and text_width(cand, size) > max_width:
            lines.append(cur)
            cur = unit
        else:
            cur = cand
    if cur:
        lines.append(cur)
    return lines


@dataclass
class Series:
    name: str
    color: str
    values: Sequence[float | None]


def bar_chart(
    groups: Sequence[str],
    series: Sequence[Series],
    *,
    fmt: Callable[[float], str] = lambda v: f"{v:.2f}",
    y_max: float | None = None,
    ref_line: tuple[float, str] | None = None,
    width: int = 520,
    height: int = 270,
    aria: str = "bar chart",
) -> str:
    """A grouped bar chart: one group per entry of `groups`, one bar per series in each."""
    values = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    top = max([*values, ref_line[0] if ref_line else 0.0, 0.0])
    if y_max is not None:
        top = max(top, y_max)
    if top <= 0:
        top = 1.0
    _, y_top, step = nice_range(0.0, top, 5)
    ml, mr, mt = 46, 10, 22
    n_groups, n_series = max(1, len(groups)), max(1, len(series))
    gw = (width - ml - mr) / n_groups
    wrapped = [wrap_label(g, gw - 6) for g in groups]
    rotate = any(len(w) > 3 or text_width(max(w, key=text_width)) > gw for w in wrapped if w)
    if rotate:
        longest = max((text_width(g) for g in groups), default=0.0)
        mb = int(min(110, 24 + longest * 0.5))
    else:
        mb = 16 + 14 * max((len(w) for w in wrapped), default=1)
    if rotate and groups:  # room on the left for the first slanted label
        ml = max(ml, int(text_width(groups[0]) * 0.87 - gw / 2 + 8))
        gw = (width - ml - mr) / n_groups
    ph = height - mt - mb

    def y(v: float) -> float:
        return mt + ph - (v / y_top) * ph

    out = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(aria)}" '
        f'font-family="{FONT}" font-size="11">'
    ]
    for t in _ticks(0.0, y_top, step):
        yy = _f(y(t))
        out.append(
            f'<line x1="{ml}" x2="{width - mr}" y1="{yy}" y2="{yy}" stroke="{GRID}" '
            'stroke-width="1"/>'
        )
        out.append(
            f'<text x="{ml - 8}" y="{yy}" dy="0.32em" text-anchor="end" fill="{MUTED}">'
            f"{escape(_tick_label(t, step))}</text>"
        )
    bw = min(gw * (0.78 if n_series > 1 else 0.5) / n_series, 64.0)
    inner = bw * n_series
    for gi, group in enumerate(groups):
        gx = ml + gi * gw + (gw - inner) / 2
        for si, s in enumerate(series):
            v = s.values[gi] if gi < len(s.values) else None
            x = gx + si * bw + bw * 0.08
            w = bw * 0.84
            if v is None or not math.isfinite(v):
                out.append(
                    f'<text x="{_f(x + w / 2)}" y="{_f(mt + ph - 4)}" text-anchor="middle" '
                    f'fill="{AXIS}" font-size="10">n/a<title>{escape(s.name)} · '
                    f"{escape(group)}: not measured</title></text>"
                )
                continue
            top_y, base_y = y(max(v, 0.0)), y(0.0)
            h = max(base_y - top_y, 0.0 if v == 0 else 1.0)
            out.append(
                f'<rect class="bar" x="{_f(x)}" y="{_f(base_y - h)}" width="{_f(w)}" '
                f'height="{_f(h)}" rx="2" fill="{s.color}"><title>{escape(s.name)} · '
                f"{escape(group)}: {escape(fmt(v))}</title></rect>"
            )
            if w >= 16:
                size = 10 if w >= 26 else 9
                out.append(
                    f'<text x="{_f(x + w / 2)}" y="{_f(base_y - h - 4)}" text-anchor="middle" '
                    f'fill="{INK}" font-size="{size}">{escape(fmt(v))}</text>'
                )
        cx = ml + gi * gw + gw / 2
        if rotate:
            out.append(
                f'<text x="{_f(cx)}" y="{_f(mt + ph + 14)}" text-anchor="end" fill="{INK}" '
                f'transform="rotate(-30 {_f(cx)} {_f(mt + ph + 14)})">{escape(group)}</text>'
            )
        else:
            spans = "".join(
                f'<tspan x="{_f(cx)}" dy="{0 if k == 0 else 14}">{escape(line)}</tspan>'
                for k, line in enumerate(wrapped[gi])
            )
            out.append(
                f'<text x="{_f(cx)}" y="{_f(mt + ph + 18)}" text-anchor="middle" '
                f'fill="{INK}">{spans}</text>'
            )
    if ref_line is not None:
        ry = _f(y(ref_line[0]))
        out.append(
            f'<line x1="{ml}" x2="{width - mr}" y1="{ry}" y2="{ry}" stroke="{INK}" '
            'stroke-width="1" stroke-dasharray="4 3" opacity="0.6"/>'
        )
        out.append(
            f'<text x="{width - mr}" y="{_f(y(ref_line[0]) - 5)}" text-anchor="end" '
            f'fill="{MUTED}" font-size="10">{escape(ref_line[1])}</text>'
        )
    out.append(
        f'<line x1="{ml}" x2="{width - mr}" y1="{_f(y(0))}" y2="{_f(y(0))}" stroke="{AXIS}" '
        'stroke-width="1"/>'
    )
    out.append("</svg>")
    return "".join(out)


@dataclass
class Line:
    name: str
    color: str
    points: Sequence[tuple[float, float]]
    dashed: bool = False
    faint: bool = False
    markers: bool = False


def ema(points: Sequence[tuple[float, float]], alpha: float) -> list[tuple[float, float]]:
    out, value = [], None
    for x, v in points:
        value = v if value is None else alpha * v + (1 - alpha) * value
        out.append((x, value))
    return out


def line_chart(
    lines: Sequence[Line],
    *,
    x_label: str = "step",
    y_label: str = "",
    fmt: Callable[[float], str] = lambda v: f"{v:.3f}",
    width: int = 520,
    height: int = 270,
    aria: str = "line chart",
) -> str:
    pts = [p for line in lines for p in line.points]
    xs, ys = [p[0] for p in pts] or [0.0, 1.0], [p[1] for p in pts] or [0.0, 1.0]
    x0, x1, xstep = nice_range(min(xs), max(xs), 6)
    y0, y1, ystep = nice_range(min(ys), max(ys), 5)
    if min(ys) >= 0 and y0 < 0:
        y0 = 0.0
    ml, mr, mt, mb = 56, 16, 16, 42
    pw, ph = width - ml - mr, height - mt - mb

    def X(v: float) -> float:
        return ml + (v - x0) / (x1 - x0) * pw

    def Y(v: float) -> float:
        return mt + ph - (v - y0) / (y1 - y0) * ph

    out = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(aria)}" '
        f'font-family="{FONT}" font-size="11">'
    ]
    for t in _ticks(y0, y1, ystep):
        yy = _f(Y(t))
        out.append(
            f'<line x1="{ml}" x2="{width - mr}" y1="{yy}" y2="{yy}" stroke="{GRID}"/>'
            f'<text x="{ml - 8}" y="{yy}" dy="0.32em" text-anchor="end" fill="{MUTED}">'
            f"{escape(_tick_label(t, ystep))}</text>"
        )
    for t in _ticks(x0, x1, xstep):
        xx = _f(X(t))
        out.append(
            f'<line x1="{xx}" x2="{xx}" y1="{mt}" y2="{mt + ph}" stroke="{GRID}" '
            'stroke-dasharray="2 3"/>'
            f'<text x="{xx}" y="{mt + ph + 16}" text-anchor="middle" fill="{MUTED}">'
            f"{escape(_tick_label(t, xstep))}</text>"
        )
    out.append(
        f'<line x1="{ml}" x2="{width - mr}" y1="{mt + ph}" y2="{mt + ph}" stroke="{AXIS}"/>'
        f'<text x="{ml + pw / 2}" y="{height - 6}" text-anchor="middle" fill="{MUTED}">'
        f"{escape(x_label)}</text>"
    )
    if y_label:
        out.append(
            f'<text x="14" y="{_f(mt + ph / 2)}" text-anchor="middle" fill="{MUTED}" '
            f'transform="rotate(-90 14 {_f(mt + ph / 2)})">{escape(y_label)}</text>'
        )
    for line in lines:
        if not line.points:
            continue
        d = " ".join(f"{_f(X(x))},{_f(Y(v))}" for x, v in line.points)
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        opacity = "0.28" if line.faint else "1"
        width_px = "1.2" if line.faint else "2"
        out.append(
            f'<polyline class="series" points="{d}" fill="none" stroke="{line.color}" '
            f'stroke-width="{width_px}" stroke-linejoin="round" stroke-linecap="round" '
            f'opacity="{opacity}"{dash}><title>{escape(line.name)}</title></polyline>'
        )
        if line.markers or len(line.points) == 1:
            for x, v in line.points:
                out.append(
                    f'<circle cx="{_f(X(x))}" cy="{_f(Y(v))}" r="3" fill="#fff" '
                    f'stroke="{line.color}" stroke-width="1.5"><title>{escape(line.name)} · '
                    f"step {x:g}: {escape(fmt(v))}</title></circle>"
                )
    out.append("</svg>")
    return "".join(out)
