"""The reproduction report, generated from the results database only.

``write_report(store, out_dir)`` writes ``report.md``, ``report.html`` and ``plots/*.png``: one table
row per claim, scale and data mode (paper figure, ours and baseline as mean ± std over the stored
seeds, verdict, seeds, runtime), the checks behind each verdict, a plot per declared curve, image
grids a claim stored (``info["images"]``: reconstructions, saliency maps), and the latest benchmark ratios.
"""
from __future__ import annotations

import datetime as _dt
import html
import math
from pathlib import Path
from typing import Sequence

from .claims import CLAIMS, load_claims
from .results import ResultStore
from .suite import Summary, summarize

_SCALE_ORDER = {"smoke": 0, "quick": 1, "full": 2}


def _ms(mu: float, sd: float) -> str:
    return "nan" if not math.isfinite(mu) else f"{mu:.4g} ± {sd:.2g}"


def collect(store: ResultStore, scales: Sequence[str] | None = None) -> list[Summary]:
    """Summaries of every stored (claim, scale, data mode) at the claim's current protocol version."""
    load_claims()
    out = []
    for slug, version, scale, mode in store.groups():
        if slug not in CLAIMS or (scales and scale not in scales):
            continue
        claim = CLAIMS.get(slug)
        if version != claim.version:
            continue
        runs = list(store.latest_per_seed(slug, version, scale, mode).values())
        if runs:
            out.append(summarize(claim, runs, scale, mode))
    out.sort(key=lambda s: (s.claim.slug, _SCALE_ORDER.get(s.scale, 9), s.data_mode))
    return out


def _plot(summary: Summary, curve: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    per_arm: dict[str, list[list[float]]] = {}
    for r in summary.runs:
        for arm, ys in r.curves.get(curve, {}).items():
            if ys:
                per_arm.setdefault(arm, []).append([float(y) for y in ys])
    if not per_arm:
        return False
    axes = (summary.runs[0].info.get("curve_axes") or {}).get(curve, {})
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for arm, seqs in sorted(per_arm.items()):
        n = min(len(s) for s in seqs)
        a = np.array([s[:n] for s in seqs], dtype=float)
        mu = np.nanmean(a, 0)
        given = axes.get("x")
        x = np.asarray(given[:n], dtype=float) if given is not None and len(given) >= n else np.arange(1, n + 1)
        lw = 2.2 if arm == summary.claim.primary.ours else 1.4
        ax.plot(x, mu, label=arm, lw=lw)
        if len(seqs) > 1:
            sd = np.nanstd(a, 0)
            ax.fill_between(x, mu - sd, mu + sd, alpha=0.18)
    ax.set_xlabel(axes.get("xlabel", "epoch"))
    ax.set_ylabel(curve)
    ax.set_title(f"{summary.claim.slug} — {curve} ({summary.scale}, {summary.data}, {len(summary.runs)} seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def _grid(summary: Summary, name: str, rows: dict, path: Path, seed: int) -> bool:
    """One PNG grid: a row per entry of ``rows`` ({row name: (K, H, W) or (K, H, W, 3) values in [0, 1]})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arrays = {}
    for row, imgs in rows.items():
        a = np.asarray(imgs, dtype=float)
        if a.ndim == 2:
            a = a[None]
        if a.ndim not in (3, 4) or a.size == 0:
            return False
        arrays[row] = np.clip(np.nan_to_num(a), 0.0, 1.0)
    if not arrays:
        return False
    k = max(a.shape[0] for a in arrays.values())
    fig, axs = plt.subplots(len(arrays), k, figsize=(1.3 * k + 1.2, 1.3 * len(arrays) + 0.4), dpi=110,
                            squeeze=False)
    for i, (row, a) in enumerate(arrays.items()):
        for j in range(k):
            ax = axs[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < a.shape[0]:
                ax.imshow(a[j], cmap="gray" if a.ndim == 3 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(row, fontsize=8)
    fig.suptitle(f"{summary.claim.slug} — {name} ({summary.scale}, {summary.data}, seed {seed})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def write_report(store: ResultStore, out_dir: Path, scales: Sequence[str] | None = None) -> list[Path]:
    """Write the report into ``out_dir``; returns the paths of the markdown and HTML files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = collect(store, scales)
    benches = store.latest_benches()
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    header = ["Claim", "Scale", "Data", "Paper", "Ours", "Baseline", "Metric", "Verdict", "Seeds", "Time"]
    rows = []
    for s in summaries:
        c = s.claim
        p = c.primary
        rows.append([
            f"{c.slug}", s.scale, s.data, c.paper_figure,
            _ms(*s.stat(p.ours, p.metric)), _ms(*s.stat(p.baseline, p.metric)),
            f"{p.metric}{' (' + p.unit + ')' if p.unit else ''}: {p.ours} vs {p.baseline}",
            "PASS" if s.passed else "FAIL", ", ".join(map(str, s.seeds)), f"{s.duration_s:.0f} s",
        ])

    plots: dict[int, list[tuple[str, Path]]] = {}
    for i, s in enumerate(summaries):
        for curve in s.claim.plots:
            rel = Path("plots") / f"{s.claim.slug}-{s.scale}-{s.data_mode}-{curve}.png"
            if _plot(s, curve, out_dir / rel):
                plots.setdefault(i, []).append((curve, rel))
        first = min(s.runs, key=lambda r: r.seed) if s.runs else None
        for name, grid_rows in ((first.info.get("images") or {}) if first else {}).items():
            rel = Path("plots") / f"{s.claim.slug}-{s.scale}-{s.data_mode}-{name}.png"
            if isinstance(grid_rows, dict) and _grid(s, name, grid_rows, out_dir / rel, first.seed):
                plots.setdefault(i, []).append((name, rel))

    md = ["# gradkit reproduction report", "", f"Generated {now} from `{store.path.name}`: "
          f"{len(summaries)} claim result(s), {sum(r[7] == 'PASS' for r in rows)} passing.", "",
          "Ours and baseline are mean ± sample std over the seeds listed; a verdict applies the claim's "
          "criterion to the stored numbers.", ""]
    md.append("| " + " | ".join(header) + " |")
    md.append("|" + "---|" * len(header))
    for r in rows:
        md.append("| " + " | ".join(_md_escape(v) for v in r) + " |")
    md.append("")
    for i, s in enumerate(summaries):
        c = s.claim
        md += [f"## {c.slug} — {s.scale} ({s.data})", "",
               f"*{c.title}* (arXiv:{c.arxiv}).", "", f"**Statement:** {c.statement}", "",
               f"**Paper:** {c.paper_figure}", "",
               f"**Criterion:** {c.criterion_for(s.data).describe()} — **{'PASS' if s.passed else 'FAIL'}**", ""]
        for k in s.checks:
            md.append(f"- {'ok' if k.passed else 'FAIL'}: {k.description} — {k.detail}")
        md += ["", "| arm | " + " | ".join(sorted({m for a in s.stats.values() for m in a})) + " |"]
        metrics = sorted({m for a in s.stats.values() for m in a})
        md.append("|---|" + "---|" * len(metrics))
        for arm, ms in sorted(s.stats.items()):
            md.append(f"| {arm} | " + " | ".join(_ms(*ms.get(m, (float('nan'), float('nan')))) for m in metrics) + " |")
        md.append("")
        if c.notes:
            md += [f"Notes: {c.notes}", ""]
        for curve, rel in plots.get(i, []):
            md += [f"![{c.slug} {curve}]({rel.as_posix()})", ""]
    if benches:
        md += ["## Benchmarks", "", "Per-step time of each component as a ratio to its baseline, "
               "interleaved in one process, median of repeats.", "",
               "| benchmark | paper | ratio | target | verdict | baseline | baseline ms | ours ms |",
               "|---|---|---|---|---|---|---|---|"]
        for b in benches:
            tgt = f"<= {b.target:.2f}x" if b.target is not None else "-"
            v = "-" if b.passed is None else ("PASS" if b.passed else "FAIL")
            md.append(f"| {b.name} | {b.slug} | {b.ratio:.3f}x | {tgt} | {v} | {_md_escape(b.baseline)} | "
                      f"{b.baseline_s * 1e3:.3f} | {b.candidate_s * 1e3:.3f} |")
        md.append("")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")

    h = ["<!doctype html><html><head><meta charset='utf-8'><title>gradkit reproduction report</title>",
         "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top}"
         ".PASS{color:#070;font-weight:bold}.FAIL{color:#b00;font-weight:bold}</style></head><body>",
         f"<h1>gradkit reproduction report</h1><p>Generated {now}.</p><table><tr>"
         + "".join(f"<th>{html.escape(x)}</th>" for x in header) + "</tr>"]
    for r in rows:
        h.append("<tr>" + "".join(
            f"<td class='{v}'>{html.escape(v)}</td>" if j == 7 else f"<td>{html.escape(v)}</td>"
            for j, v in enumerate(r)) + "</tr>")
    h.append("</table>")
    for i, s in enumerate(summaries):
        h.append(f"<h2>{html.escape(s.claim.slug)} ({html.escape(s.scale)}, {html.escape(s.data)})</h2><ul>")
        for k in s.checks:
            h.append(f"<li><span class='{'PASS' if k.passed else 'FAIL'}'>{'ok' if k.passed else 'FAIL'}</span> "
                     f"{html.escape(k.description)} — {html.escape(k.detail)}</li>")
        h.append("</ul>")
        for curve, rel in plots.get(i, []):
            h.append(f"<img src='{html.escape(rel.as_posix())}' alt='{html.escape(curve)}'>")
    if benches:
        h.append("<h2>Benchmarks</h2><table><tr><th>benchmark</th><th>paper</th><th>ratio</th><th>target</th>"
                 "<th>verdict</th></tr>")
        for b in benches:
            v = "-" if b.passed is None else ("PASS" if b.passed else "FAIL")
            tgt = f"<= {b.target:.2f}x" if b.target is not None else "-"
            h.append(f"<tr><td>{html.escape(b.name)}</td><td>{html.escape(b.slug)}</td><td>{b.ratio:.3f}x</td>"
                     f"<td>{tgt}</td><td class='{v}'>{v}</td></tr>")
        h.append("</table>")
    h.append("</body></html>")
    html_path = out_dir / "report.html"
    html_path.write_text("\n".join(h) + "\n", encoding="utf-8")
    return [md_path, html_path]
