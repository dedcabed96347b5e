"""Human-readable evaluation output: the console table, ``report.md`` and its two SVG figures (per-task success
bars, SR@1..5 curve with each published reference in its own colour and dash). SVG is written by hand, so reports
need no plotting library and no network assets; text is laid out with a generous width estimate (``text_width``)
so that labels stay inside the figure.

Usage::

    print(console_table(metrics))
    write_report(run_dir, results)      # results: the dict written to results.json
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from sim_eval.evaluation.metrics import EvalMetrics, TaskCount
from sim_eval.protocol.tasks import TASK_NAMES

# Published ABC->D results for context (protocol reference §10.1; 1000 chains unless noted, scene D).
PUBLISHED_ABC_D = (
    ("SuSIE", (0.870, 0.690, 0.490, 0.380, 0.260), 2.69),
    ("GHIL-Glue (SuSIE, K=8, ~400 chains)", (0.952, 0.885, 0.732, 0.625, 0.498), 3.69),
    ("Xiaomi-Robotics-0", (1.000, 0.983, 0.960, 0.926, 0.881), 4.75),
)


def console_table(metrics: EvalMetrics, title: str = "") -> str:
    """SR@1..5 and average length, then per-task success counts (attempted tasks only)."""
    sr = "  ".join(f"{100 * r:5.1f}" for r in metrics.success_rates)
    lines = [title] if title else []
    lines += [
        f"{'N':>5}  {'SR@1':>5}  {'SR@2':>5}  {'SR@3':>5}  {'SR@4':>5}  {'SR@5':>5}  {'avg len':>7}  {'95 % interval':>13}",
        f"{metrics.n_chains:>5}  {sr}  {metrics.avg_len:7.3f}  {metrics.avg_len_ci95[0]:6.2f}-{metrics.avg_len_ci95[1]:<6.2f}",
        "",
        f"{'task':<26} {'success':>8} {'rate':>6}",
    ]
    for task, count in metrics.per_task.items():
        if count.attempts:
            lines.append(f"{task:<26} {count.successes:>3}/{count.attempts:<4} {100 * count.rate:5.1f}%")
    if metrics.failure_reasons:
        lines += ["", "chains stopped by: " + ", ".join(f"{k} {v}" for k, v in metrics.failure_reasons.items())]
    return "\n".join(lines)


def per_task_svg(per_task: dict[str, TaskCount]) -> str:
    """Horizontal bars: success rate per attempted task, labelled with successes/attempts."""
    rows = [(t, per_task[t]) for t in TASK_NAMES if t in per_task and per_task[t].attempts]
    label_w, bar_w, row_h, top = 190, 360, 16, 24
    height = top + row_h * max(len(rows), 1) + 28
    out = [_svg_open(label_w + bar_w + 80, height),
           f'<text x="4" y="16" font-size="13" font-weight="bold">Per-task success (successes / attempts)</text>']
    for i, (task, count) in enumerate(rows):
        y = top + i * row_h
        w = bar_w * count.rate
        colour = "#2e7d32" if count.rate >= 0.9 else "#f9a825" if count.rate >= 0.6 else "#c62828"
        out.append(f'<text x="{label_w - 6}" y="{y + 12}" font-size="11" text-anchor="end">{escape(task)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 2}" width="{bar_w}" height="{row_h - 4}" fill="#eeeeee"/>')
        out.append(f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 4}" fill="{colour}"/>')
        out.append(f'<text x="{label_w + bar_w + 6}" y="{y + 12}" font-size="11">'
                   f'{count.successes}/{count.attempts}</text>')
    axis_y = top + row_h * max(len(rows), 1) + 4
    for frac in (0.0, 0.5, 1.0):
        x = label_w + bar_w * frac
        out.append(f'<text x="{x:.0f}" y="{axis_y + 12}" font-size="10" text-anchor="middle">{int(frac * 100)}%</text>')
    out.append("</svg>")
    return "\n".join(out)


# Reference curves: each its own colour and dash, so they can be told apart from each other and from this run.
REFERENCE_STYLES = (("#ef6c00", "6 3"), ("#6a1b9a", "2 2"), ("#2e7d32", "8 3 2 3"), ("#757575", "4 4"))
RUN_STYLE = ("#1565c0", None)
CHAR_EM = 0.6  # a generous average glyph width of sans-serif text, in em (no font metrics in a hand-written SVG)


def text_width(text: str, font_size: float) -> float:
    """Estimated rendered width of ``text`` in px (CHAR_EM per character: wider than most sans-serif text)."""
    return len(text) * font_size * CHAR_EM


def wrap_label(text: str, width_px: float, font_size: float, max_lines: int = 2) -> list[str]:
    """``text`` broken at spaces into at most ``max_lines`` lines of estimated width <= ``width_px``; a word too
    long for a line is cut, and text past the last line ends in "...". """
    per_line = max(int(width_px // (font_size * CHAR_EM)), 4)
    lines: list[str] = []
    for word in text.split():
        while len(word) > per_line:  # a word longer than a line: cut it
            lines.append(word[:per_line])
            word = word[per_line:]
        if lines and len(lines[-1]) + 1 + len(word) <= per_line:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        lines = lines[:max_lines - 1] + [(last[: per_line - 3] if len(last) > per_line - 3 else last) + "..."]
    return lines or [""]


def sr_curve_svg(success_rates: tuple[float, ...], label: str, references=PUBLISHED_ABC_D) -> str:
    """SR@1..5 as a line (this run, bold, solid) over published ABC->D curves (thin, each its own colour and dash,
    for context only), with a legend right of the plot whose labels wrap to stay inside the figure."""
    w, h, left, right, top, bottom = 560, 300, 48, 210, 28, 36
    pw, ph = w - left - right, h - top - bottom
    legend_x, legend_font = w - right + 12, 10
    label_x = legend_x + 22
    label_w = w - 6 - label_x

    def xy(i: int, rate: float) -> tuple[float, float]:
        return left + pw * i / 4, top + ph * (1 - rate)

    out = [_svg_open(w, h), '<text x="4" y="16" font-size="13" font-weight="bold">Success rate vs. chain length</text>']
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(0, frac)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#dddddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{int(frac * 100)}%</text>')
    for i in range(5):
        x, _ = xy(i, 0)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" font-size="10" text-anchor="middle">SR@{i + 1}</text>')
    curves = [(name, rates, *REFERENCE_STYLES[k % len(REFERENCE_STYLES)], 1.5)
              for k, (name, rates, _) in enumerate(references)]
    curves.append((label, success_rates, *RUN_STYLE, 3))
    ly = top + 4
    for name, rates, colour, dash, width in curves:
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, r) for i, r in enumerate(rates)))
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="{width}"{dash_attr}/>')
        for i, r in enumerate(rates):
            x, y = xy(i, r)
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{width + 1}" fill="{colour}"/>')
        out.append(f'<line x1="{legend_x}" y1="{ly}" x2="{legend_x + 18}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="{width}"{dash_attr}/>')
        for line in wrap_label(name, label_w, legend_font):
            out.append(f'<text x="{label_x}" y="{ly + 4}" font-size="{legend_font}">{escape(line)}</text>')
            ly += 13
        ly += 7
    out.append("</svg>")
    return "\n".join(out)


def _svg_open(width: int, height: int) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>')


def write_report(run_dir: Path, results: dict, metrics: EvalMetrics) -> Path:
    """Write ``report.md`` plus ``per_task.svg`` and ``sr_curve.svg`` into ``run_dir``; returns the report path."""
    run_dir = Path(run_dir)
    proto = results["protocol"]
    (run_dir / "per_task.svg").write_text(per_task_svg(metrics.per_task), encoding="utf-8")
    (run_dir / "sr_curve.svg").write_text(sr_curve_svg(metrics.success_rates, results["names"]["agent"]),
                                          encoding="utf-8")
    sr_cells = " | ".join(f"{100 * r:.1f}" for r in metrics.success_rates)
    lines = [
        f"# CALVIN evaluation: agent `{results['names']['agent']}` on env `{results['names']['env']}`",
        "",
    ]
    for warning in results.get("warnings", []):
        lines += [f"> **Warning:** {warning}", ""]
    lines += [
        f"- chains: {proto['chains']} ({metrics.n_chains} evaluated{'' if results['complete'] else ', INCOMPLETE'})",
        f"- mode: `{proto['mode']}`; EP_LEN {proto['ep_len']}; oracle `{proto['oracle']}`; seed {results['seeds']['base']}",
        f"- ghil {results['ghil_version']}, git commit `{results['git']['commit']}`"
        f"{' (uncommitted changes)' if results['git'].get('dirty') else ''}; config fingerprint "
        f"`{results['fingerprint']}`",
        "",
        "| N | SR@1 | SR@2 | SR@3 | SR@4 | SR@5 | Avg. Len. | 95 % interval |",
        "|---|---|---|---|---|---|---|---|",
        f"| {metrics.n_chains} | {sr_cells} | **{metrics.avg_len:.3f}** | "
        f"{metrics.avg_len_ci95[0]:.2f}-{metrics.avg_len_ci95[1]:.2f} |",
        "",
        "![SR curve](sr_curve.svg)",
        "",
        "Published ABC->D numbers for context (1000 chains unless noted; other agents, other inputs, "
        "not directly comparable to a scripted or privileged agent):",
        "",
        "| method | SR@1 | SR@2 | SR@3 | SR@4 | SR@5 | Avg. Len. |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rates, avg in PUBLISHED_ABC_D:
        lines.append(f"| {name} | " + " | ".join(f"{100 * r:.1f}" for r in rates) + f" | {avg:.2f} |")
    lines += ["", "## Per task", "", "![per-task success](per_task.svg)", "",
              "| task | successes | attempts | rate |", "|---|---|---|---|"]
    for task, count in metrics.per_task.items():
        if count.attempts:
            lines.append(f"| {task} | {count.successes} | {count.attempts} | {100 * count.rate:.1f}% |")
    hist = ", ".join(f"{k}: {n}" for k, n in enumerate(metrics.completed_histogram))
    lines += ["", "## Chains", "", f"- chains by number of completed subtasks: {hist}"]
    if metrics.failure_reasons:
        lines.append("- chains stopped by: " + ", ".join(f"{k} ({v})" for k, v in metrics.failure_reasons.items()))
    timing = results.get("timing") or {}
    if timing.get("chains_per_min"):
        lines.append(f"- speed (last session): {timing['chains_per_min']:.2f} chains/min with "
                     f"{timing['workers']} worker(s), {timing['n_chains_run']} chains in {timing['wall_s']:.0f} s")
    videos = results.get("videos", [])
    if videos:
        lines += ["", "## Videos", ""] + [f"- [{Path(v).name}]({v})" for v in videos]
    lines += ["", "Per-chain records: `chains.jsonl`; everything above and the full config: `results.json`.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
