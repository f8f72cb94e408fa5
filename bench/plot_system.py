"""Plot bench/system.py reports: voice-to-voice p50 (solid) and p95 (dashed) vs concurrent sessions, one color per
pacing mode, with the targets (1 session: p50 350 ms; 64: p50 450 / p95 800 ms; 128: p50 600 ms).

    .venv/bin/python bench/plot_system.py bench/out/system.json [more.json ...] --out bench/out/system.png

Several reports (e.g. one GPU call per mode) go on one plot; rows of the same mode and session count from a later
report replace an earlier one's, unless the reports carry a "label" (then each label's rows are series of their own).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Sessions -> target in ms, per percentile (the targets for the whole server on one GPU machine).
TARGETS: dict[str, dict[int, float]] = {"p50": {1: 350, 64: 450, 128: 600}, "p95": {64: 800}}


def plot(reports: list[dict[str, Any]], path: Path) -> bool:
    """Write the plot to `path`; False (and a message) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on the bench machines
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return False
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for report in reports:
        for row in report["results"]:
            # A report's "label" (e.g. "before" / "after") makes its own series instead of replacing rows.
            series = f"{report['label']} {row['mode']}" if report.get("label") else row["mode"]
            rows[(series, row["sessions"])] = row
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, mode in enumerate(dict.fromkeys(m for m, _ in rows)):
        mine = sorted((r for (m, _), r in rows.items() if m == mode), key=lambda r: r["sessions"])
        color = colors[i % len(colors)]
        for key, style in (("p50", "-"), ("p95", "--")):
            points = [(r["sessions"], r[f"voice_to_voice_{key}_ms"]) for r in mine
                      if r.get(f"voice_to_voice_{key}_ms") is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, marker="o", color=color, label=f"{mode} {key}")
    # Targets as short bars at their own session counts only: a line between them would invent targets at 8, 32.
    for key, color in (("p50", "black"), ("p95", "firebrick")):
        xs, ys = zip(*sorted(TARGETS[key].items()), strict=True)
        ax.plot(xs, ys, linestyle="none", marker="_", markersize=24, markeredgewidth=2.5, color=color,
                label=f"target {key}")
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{key} ≤ {y:g}", (x, y), textcoords="offset points", xytext=(14, -3), fontsize=7,
                        color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # from ~400 ms at one session to seconds under overload: both ends stay readable
    ax.yaxis.set_major_formatter(ScalarFormatter())
    low, high = ax.get_ylim()  # within one decade the minor ticks are the only labels; beyond it they crowd
    ax.yaxis.set_minor_formatter(ScalarFormatter() if high / low < 10 else NullFormatter())
    sessions = sorted({n for _, n in rows} | {n for t in TARGETS.values() for n in t})
    ax.set_xticks(sessions, [str(n) for n in sessions])
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("voice to voice (ms)")
    machine = "; ".join(dict.fromkeys(f"{r['machine']}{', ' + r['gpu'] if r.get('gpu') else ''}" for r in reports))
    ax.set_title(f"bench/system.py: {machine}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}", file=sys.stderr)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", help="bench/system.py JSON reports")
    ap.add_argument("--out", default="bench/out/system.png")
    args = ap.parse_args()
    plot([json.loads(Path(p).read_text()) for p in args.reports], Path(args.out))


if __name__ == "__main__":
    main()
