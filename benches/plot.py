#!/usr/bin/env python3
"""Latency against offered load, as a hand-written SVG (no plotting library).

    python3 benches/plot.py target/bench/sweep.csv benches/latency.svg

Reads the CSV that benches/compare.sh writes (offered_rps, p50_ms, p99_ms,
p999_ms, service_p99_ms, pct_of_max, ...) and draws p50 / p99 / p999 (from
the scheduled send time, open loop) on a log scale against the offered
rate, with the 5 ms p99 goal and the half-of-maximum rate marked.
"""

import csv
import math
import sys
from html import escape

W, H = 760, 460
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 40, 60
GOAL_MS = 5.0


def nice_step(span, target=6):
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "target/bench/sweep.csv"
    dst = sys.argv[2] if len(sys.argv) > 2 else "benches/latency.svg"
    rows = []
    with open(src) as f:
        for r in csv.DictReader(f):
            try:
                rows.append({k: float(v) for k, v in r.items() if v not in ("", "None")})
            except ValueError:
                continue
    rows = [r for r in rows if "offered_rps" in r]
    rows.sort(key=lambda r: r["offered_rps"])
    if not rows:
        sys.exit(f"{src}: no rows")

    series = [
        ("p50", "p50_ms", "#1f77b4", ""),
        ("p99", "p99_ms", "#d62728", ""),
        ("p999", "p999_ms", "#9467bd", ""),
        ("p99 service time", "service_p99_ms", "#ff7f0e", "5,4"),
    ]
    values = [r[k] for r in rows for _, k, _, _ in series if r.get(k, 0) > 0]
    lo = 10 ** math.floor(math.log10(min(values + [GOAL_MS])))
    hi = 10 ** math.ceil(math.log10(max(values + [GOAL_MS])))
    xmax_data = max(r["offered_rps"] for r in rows)
    xstep = nice_step(xmax_data)
    xmax = math.ceil(xmax_data / xstep) * xstep
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(v):
        return LEFT + v / xmax * pw

    def y(v):
        return TOP + ph - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">'
        "inletd, durability = fsync, single events, 64 connections, open loop</text>",
    ]
    # Grid and axes.
    decade = lo
    while decade <= hi * 1.0001:
        for m in (1, 2, 5):
            v = decade * m
            if v > hi * 1.0001:
                break
            major = m == 1
            out.append(
                f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                f'stroke="{"#ccc" if major else "#eee"}"/>'
            )
            label = f"{v:g}"
            out.append(
                f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end" '
                f'fill="{"#000" if major else "#777"}">{label}</text>'
            )
        decade *= 10
    v = 0.0
    while v <= xmax + 1e-9:
        out.append(f'<line x1="{x(v):.1f}" x2="{x(v):.1f}" y1="{TOP}" y2="{TOP + ph}" stroke="#eee"/>')
        out.append(f'<text x="{x(v):.1f}" y="{TOP + ph + 18}" text-anchor="middle">{v:,.0f}</text>')
        v += xstep
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#000"/>')
    out.append(
        f'<text x="{LEFT + pw / 2}" y="{H - 18}" text-anchor="middle">offered load (requests/s = events/s)</text>'
    )
    out.append(
        f'<text transform="translate(20 {TOP + ph / 2}) rotate(-90)" text-anchor="middle">'
        "latency from the scheduled send (ms, log scale)</text>"
    )
    # The goal and half of the maximum.
    out.append(
        f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(GOAL_MS):.1f}" y2="{y(GOAL_MS):.1f}" '
        'stroke="#2ca02c" stroke-dasharray="2,3" stroke-width="1.5"/>'
    )
    out.append(
        f'<text x="{LEFT + 6}" y="{y(GOAL_MS) - 5:.1f}" fill="#2ca02c">goal: p99 ≤ {GOAL_MS:g} ms at half the maximum</text>'
    )
    half = [r for r in rows if r.get("pct_of_max") == 50]
    if half:
        hx = x(half[0]["offered_rps"])
        out.append(
            f'<line x1="{hx:.1f}" x2="{hx:.1f}" y1="{TOP}" y2="{TOP + ph}" stroke="#2ca02c" stroke-dasharray="2,3"/>'
        )
    maxes = [r for r in rows if r.get("pct_of_max") == 100]
    if maxes:
        mx = x(maxes[0]["offered_rps"])
        out.append(f'<text x="{mx - 4:.1f}" y="{TOP + 14}" text-anchor="end" fill="#555">closed-loop max</text>')
    # Series.
    for i, (name, key, color, dash) in enumerate(series):
        pts = [(x(r["offered_rps"]), y(r[key])) for r in rows if r.get(key, 0) > 0]
        if not pts:
            continue
        d = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"{extra}/>')
        for px, py in pts:
            out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"/>')
        ly = TOP + 20 + i * 20
        lx = LEFT + pw + 15
        out.append(
            f'<line x1="{lx}" x2="{lx + 24}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{extra}/>'
        )
        out.append(f'<text x="{lx + 30}" y="{ly + 4}">{escape(name)}</text>')
    note_y = TOP + 20 + len(series) * 20 + 10
    for j, line in enumerate(
        ["service time: from the", "actual send (what a", "closed loop would show)"]
    ):
        out.append(f'<text x="{LEFT + pw + 15}" y="{note_y + j * 15}" fill="#777" font-size="11">{line}</text>')
    out.append("</svg>")
    with open(dst, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {dst} ({len(rows)} points)", file=sys.stderr)


if __name__ == "__main__":
    main()
