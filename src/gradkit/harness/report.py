"""The reproduction report, generated from the results database only.

``write_report(store, out_dir)`` writes ``report.html``, ``report.md`` and ``plots/*.png`` from one
document model, so the two carry the same content: counts by verdict, a table of contents, one
summary row per claim, scale, data mode and overrides (paper figure, ours and baseline as mean ± std
over the stored seeds, the check that decided the verdict, seeds, runtime), then per claim the
finding (where a FAIL is the paper's) or, for a verdict other than PASS, what at our scale keeps it
from passing, statement, paper figure, criterion with every check and its
numbers, the negative control, the protocol, a per-arm table, notes, a plot per declared curve and the
image grids it stored (``info["images"]``), and the latest benchmark ratios.
"""
from __future__ import annotations

import datetime as _dt
import html
import math
from pathlib import Path
from typing import Sequence

from .claims import get_claim
from .results import ResultStore
from .suite import Summary, summarize

_SCALE_ORDER = {"smoke": 0, "quick": 1, "full": 2}


def _ms(mu: float, sd: float) -> str:
    return "nan" if not math.isfinite(mu) else f"{mu:.4g} ± {sd:.2g}"


def collect(store: ResultStore, scales: Sequence[str] | None = None,
            seeds: Sequence[int] | None = None) -> list[Summary]:
    """Summaries of every stored (claim, scale, data mode) at the claim's current protocol version.

    ``seeds``: only these seeds' runs count (a group without any of them is left out); default every stored seed.
    """
    keep = None if seeds is None else set(seeds)
    out = []
    for slug, version, scale, mode, overrides in store.groups():
        if scales and scale not in scales:
            continue
        try:
            claim = get_claim(slug)  # imports only the claims that have stored runs
        except KeyError:  # a claim that no longer exists (or of a plugin not loaded)
            continue
        if version != claim.version:
            continue
        runs = [r for r in store.latest_per_seed(slug, version, scale, mode, overrides=overrides).values()
                if keep is None or r.seed in keep]
        if runs:
            out.append(summarize(claim, runs, scale, mode))
    out.sort(key=lambda s: (s.claim.slug, _SCALE_ORDER.get(s.scale, 9), s.data_mode, s.overrides))
    return out


_PALETTE = ("#7f7f7f", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#2ca02c")


def _unit(summary: Summary, curve: str) -> str:
    """The unit of a curve's values: declared in ``info["curve_axes"]``, the primary metric's, or % for
    a metric bounded by [0, 100]."""
    axes = (summary.runs[0].info.get("curve_axes") or {}).get(curve, {}) if summary.runs else {}
    if axes.get("unit"):
        return axes["unit"]
    p = summary.primary
    if curve == p.metric and p.unit:
        return p.unit
    if summary.claim.bounds.get(curve) == (0.0, 100.0) or curve.endswith("_acc") or curve == "acc":
        return "%"
    return ""


def _plot(summary: Summary, curve: str, path: Path) -> bool:
    """Mean curve per arm over seeds with a ±1 std band (clipped to the metric's bounds); our method is
    drawn last, thickest, in green; the legend sits outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    def seeds_of(name: str) -> dict[str, list[list[float]]]:
        out: dict[str, list[list[float]]] = {}
        for r in summary.runs:
            for arm, ys in r.curves.get(name, {}).items():
                if ys:
                    out.setdefault(arm, []).append([float(y) for y in ys])
        return out

    per_arm = seeds_of(curve)
    if not per_arm:
        return False
    all_axes = summary.runs[0].info.get("curve_axes") or {}
    axes = all_axes.get(curve, {})
    # "x_curve": plot against another curve's seed mean (e.g. I(T;Y) against I(X;T): an information plane)
    x_of = seeds_of(axes["x_curve"]) if axes.get("x_curve") else {}
    ours = summary.primary.ours
    order = sorted(per_arm, key=lambda a: (a == ours, a))  # ours last: drawn on top
    bounds = summary.claim.bounds.get(curve)
    fig, ax = plt.subplots(figsize=(7.2, 3.6), dpi=110)
    for i, arm in enumerate(order):
        seqs = per_arm[arm]
        n = min(len(s) for s in seqs)
        a = np.array([s[:n] for s in seqs], dtype=float)
        mu = np.nanmean(a, 0)
        given = axes.get("x")
        x = np.asarray(given[:n], dtype=float) if given is not None and len(given) >= n else np.arange(1, n + 1)
        if arm in x_of and min(len(s) for s in x_of[arm]) >= n:
            x = np.nanmean(np.array([s[:n] for s in x_of[arm]], dtype=float), 0)
        is_ours = arm == ours
        color = _PALETTE[-1] if is_ours else _PALETTE[i % (len(_PALETTE) - 1)]
        ax.plot(x, mu, label=arm + (" (ours)" if is_ours else ""), lw=2.6 if is_ours else 1.3, color=color,
                zorder=3 if is_ours else 2, marker="o" if n <= 12 else None, ms=3)
        if len(seqs) > 1:
            sd = np.nanstd(a, 0)
            lo, hi = mu - sd, mu + sd
            if bounds is not None:
                lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
            ax.fill_between(x, lo, hi, alpha=0.15, color=color, lw=0)
    if x_of:
        xa = all_axes.get(axes["x_curve"], {})
        xunit = _unit(summary, axes["x_curve"])
        ax.set_xlabel(xa.get("ylabel", axes["x_curve"].replace("_", " ")) + (f" ({xunit})" if xunit else ""))
    else:
        if axes.get("x") is None:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axes.get("logx"):
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel(axes.get("xlabel", "epoch"))
    unit = _unit(summary, curve)
    ax.set_ylabel(axes.get("ylabel", curve.replace("_", " ")) + (f" ({unit})" if unit else ""))
    if axes.get("log"):
        ax.set_yscale("log")
    ax.set_title(f"{summary.claim.slug}: {curve} ({summary.scale}, {summary.data}, mean ± std of "
                 f"{len(summary.runs)} seed{'s' if len(summary.runs) != 1 else ''})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def _file_slug(name: str) -> str:
    """A grid's name as a portable file name (its title keeps the original)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "grid"


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


# ---------------------------------------------------------------------------------- document model
# A report is a list of blocks; each renderer (markdown, HTML) turns every block into its format, so
# neither can carry less than the other.
def _h(level: int, text: str, anchor: str = "") -> tuple:
    return ("h", level, text, anchor)


def _p(*runs) -> tuple:
    """A paragraph of runs: plain strings, ("b", text) bold, ("i", text) italic, ("v", verdict)."""
    return ("p", runs)


def _ul(items: list) -> tuple:
    """A list of items, each a tuple of runs as in :func:`_p`."""
    return ("ul", items)


def _table(header: list[str], rows: list[list], verdict_col: int | None = None, cls: str = "") -> tuple:
    return ("table", header, rows, verdict_col, cls)


def _grid_block(names: list[str], cells: dict, legend: dict[str, str]) -> tuple:
    """A square grid: ``cells[(a, b)] = (status, reason)`` for a <= b in ``names`` order."""
    return ("grid", names, cells, legend)


def _img(src: str, alt: str) -> tuple:
    return ("img", src, alt)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_runs(runs) -> str:
    out = []
    for r in runs:
        if isinstance(r, str):
            out.append(r)
        elif r[0] == "b":
            out.append(f"**{r[1]}**")
        elif r[0] == "i":
            out.append(f"*{r[1]}*")
        elif r[0] == "v":
            out.append(f"**{r[1]}**")
        elif r[0] == "a":
            out.append(f"[{r[1]}](#{r[2]})")
        elif r[0] == "c":
            out.append(f"`{r[1]}`")
    return "".join(out)


def _html_runs(runs) -> str:
    out = []
    for r in runs:
        if isinstance(r, str):
            out.append(html.escape(r))
        elif r[0] == "b":
            out.append(f"<b>{html.escape(r[1])}</b>")
        elif r[0] == "i":
            out.append(f"<i>{html.escape(r[1])}</i>")
        elif r[0] == "v":
            out.append(f"<span class='{html.escape(r[1])}'>{html.escape(r[1])}</span>")
        elif r[0] == "a":
            out.append(f"<a href='#{html.escape(r[2])}'>{html.escape(r[1])}</a>")
        elif r[0] == "c":
            out.append(f"<code>{html.escape(r[1])}</code>")
    return "".join(out)


def _cell_md(v) -> str:
    return _md_escape(_md_runs(v) if isinstance(v, tuple) else str(v))


def _cell_html(v) -> str:
    return _html_runs(v) if isinstance(v, tuple) else html.escape(str(v))


def _render_md(blocks: list) -> str:
    md: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            md += ["#" * b[1] + " " + b[2], ""]
        elif kind == "p":
            md += [_md_runs(b[1]), ""]
        elif kind == "ul":
            md += [f"- {_md_runs(item)}" for item in b[1]] + [""]
        elif kind == "table":
            _, header, rows, _vc, _cls = b
            md.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
            md.append("|" + "---|" * len(header))
            md += ["| " + " | ".join(_cell_md(v) for v in row) + " |" for row in rows]
            md.append("")
        elif kind == "img":
            md += [f"![{b[2]}]({b[1]})", ""]
        elif kind == "grid":
            _, names, cells, legend = b
            md.append("| | " + " | ".join(names) + " |")
            md.append("|" + "---|" * (len(names) + 1))
            for i, a in enumerate(names):
                row = [cells.get((a, c), ("", ""))[0] if j >= i else "" for j, c in enumerate(names)]
                md.append(f"| **{a}** | " + " | ".join(legend.get(v, v) for v in row) + " |")
            md.append("")
            odd = [(k, v) for k, v in cells.items() if v[0] != "ok"]
            md += [f"- {a}{'' if a == c else ' + ' + c}: {v[0]} — {_md_escape(v[1])}" for (a, c), v in odd] + [""]
    return "\n".join(md) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;"
        "vertical-align:top}th{background:#f4f4f4}code{font-size:12px}"
        ".PASS{color:#070;font-weight:bold}.FAIL{color:#b00;font-weight:bold}.INCONCLUSIVE{color:#a60;font-weight:bold}"
        ".counts span{margin-right:1.2em;font-size:1.1em}img{max-width:100%;display:block;margin:.5em 0}"
        "nav ul{columns:3}section{border-top:1px solid #ddd;margin-top:1.5em}"
        ".compose td{text-align:center;min-width:2.2em}.c-ok{background:#cfc}.c-invariant{background:#dfd}"
        ".c-error{background:#ffd}.c-broken{background:#fcc;font-weight:bold}")


def _render_html(blocks: list, title: str) -> str:
    h = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>"]
    open_section = False
    for b in blocks:
        kind = b[0]
        if kind == "h":
            _, level, text, anchor = b
            if level == 2:
                if open_section:
                    h.append("</section>")
                h.append(f"<section id='{html.escape(anchor)}'>" if anchor else "<section>")
                open_section = True
            h.append(f"<h{level}>{html.escape(text)}</h{level}>")
        elif kind == "p":
            h.append(f"<p>{_html_runs(b[1])}</p>")
        elif kind == "ul":
            h.append("<ul>" + "".join(f"<li>{_html_runs(item)}</li>" for item in b[1]) + "</ul>")
        elif kind == "table":
            _, header, rows, vc, cls = b
            h.append(f"<table class='{cls}'><tr>" + "".join(f"<th>{html.escape(x)}</th>" for x in header) + "</tr>")
            for row in rows:
                h.append("<tr>" + "".join(
                    f"<td class='{html.escape(str(v))}'>{_cell_html(v)}</td>" if j == vc else f"<td>{_cell_html(v)}</td>"
                    for j, v in enumerate(row)) + "</tr>")
            h.append("</table>")
        elif kind == "img":
            h.append(f"<img src='{html.escape(b[1])}' alt='{html.escape(b[2])}' loading='lazy'>")
        elif kind == "grid":
            _, names, cells, legend = b
            h.append("<table class='compose'><tr><th></th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names)
                     + "</tr>")
            for i, a in enumerate(names):
                tds = []
                for j, c in enumerate(names):
                    st, why = cells.get((a, c), ("", "")) if j >= i else ("", "")
                    label = f"{a}" + ("" if a == c else f" + {c}") + f": {st} — {why}"
                    tds.append(f"<td class='c-{html.escape(st)}' title='{html.escape(label)}'>"
                               f"{html.escape(legend.get(st, st))}</td>" if st else "<td></td>")
                h.append(f"<tr><th>{html.escape(a)}</th>" + "".join(tds) + "</tr>")
            h.append("</table>")
            odd = [(k, v) for k, v in cells.items() if v[0] != "ok"]
            if odd:
                h.append("<ul>" + "".join(f"<li><b>{html.escape(a if a == c else a + ' + ' + c)}</b>: "
                                          f"<span class='c-{html.escape(v[0])}'>{html.escape(v[0])}</span> — "
                                          f"{html.escape(v[1])}</li>" for (a, c), v in odd) + "</ul>")
    if open_section:
        h.append("</section>")
    h.append("</body></html>")
    return "\n".join(h) + "\n"


def _anchor(s: Summary, i: int) -> str:
    return f"{s.claim.slug}-{s.scale}-{s.data_mode}" + (f"-set{i}" if s.overrides else "")


def _compose_order() -> list[str]:
    from .compose import FAMILIES

    return list(FAMILIES)


def _seed_list(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, sorted(seeds)))


def write_report(store: ResultStore, out_dir: Path, scales: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None, check_seeds: Sequence[int] | None = None) -> list[Path]:
    """Write the report into ``out_dir``; returns the paths of the markdown and HTML files.

    ``seeds``: the seeds the report is about (default: every stored seed). ``check_seeds``: a second seed set,
    e.g. seeds never used while a claim was developed; each claim's verdict on it is shown beside the main one
    (an "Other seeds" column and a line in the claim's section), from the same criterion.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = collect(store, scales, seeds)
    if check_seeds is not None and seeds is not None and set(check_seeds) & set(seeds):
        raise ValueError(f"check_seeds must not overlap seeds, got {sorted(check_seeds)} and {sorted(seeds)}")
    checked = {} if check_seeds is None else {
        (s.claim.slug, s.scale, s.data_mode, s.overrides): s for s in collect(store, scales, check_seeds)}

    def other(s: Summary) -> Summary | None:
        return checked.get((s.claim.slug, s.scale, s.data_mode, s.overrides))
    benches = store.latest_benches()
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    plots: dict[int, list[tuple[str, Path]]] = {}
    for i, s in enumerate(summaries):
        tag = _anchor(s, i)
        for curve in s.claim.plots:
            rel = Path("plots") / f"{tag}-{curve}.png"
            if _plot(s, curve, out_dir / rel):
                plots.setdefault(i, []).append((curve, rel))
        first = min(s.runs, key=lambda r: r.seed) if s.runs else None
        for name, grid_rows in ((first.info.get("images") or {}) if first else {}).items():
            rel = Path("plots") / f"{tag}-{_file_slug(name)}.png"
            if isinstance(grid_rows, dict) and _grid(s, name, grid_rows, out_dir / rel, first.seed):
                plots.setdefault(i, []).append((name, rel))

    verdicts = [s.verdict.verdict for s in summaries]
    counts = {v: verdicts.count(v) for v in ("PASS", "FAIL", "INCONCLUSIVE")}
    blocks: list = [_h(1, "gradkit reproduction report"),
                    _p(f"Generated {now} from the results database {store.path.name}: {len(summaries)} claim "
                       f"result(s) — ", ("v", "PASS"), f" {counts['PASS']}, ", ("v", "FAIL"), f" {counts['FAIL']}, ",
                       ("v", "INCONCLUSIVE"), f" {counts['INCONCLUSIVE']}."),
                    _p("Ours and baseline are mean ± sample std over the seeds listed. A verdict applies the "
                       "claim's criterion to the stored numbers; it is INCONCLUSIVE when the negative control "
                       "(our method switched off, or the baseline standing in for it) passes the same criterion, "
                       "or when both arms sit at the metric's ceiling. The 'deciding check' column says why.")]
    for scale in sorted({s.scale for s in summaries}, key=lambda x: _SCALE_ORDER.get(x, 9)):
        at = [s for s in summaries if s.scale == scale and not s.overrides]
        k = sum(s.verdict.verdict == "PASS" for s in at)
        on = f" on seeds {_seed_list(seeds)}" if seeds is not None else ""
        blocks.append(_p(("b", f"{k} of {len(at)}"), f" claim results hold at {scale} scale{on} (default protocols)."))
        if check_seeds is not None:
            again = [o for o in map(other, at) if o is not None]
            k2 = sum(o.verdict.verdict == "PASS" for o in again)
            blocks.append(_p(("b", f"{k2} of {len(again)}"), f" hold at {scale} scale on the other seeds "
                             f"{_seed_list(check_seeds)}; {len(at) - len(again)} claim(s) have no runs there."))
    header = ["Claim", "Scale", "Data", "Paper", "Ours", "Baseline", "Metric", "Deciding check", "Verdict",
              "Seeds", "Time"] + (["Other seeds"] if check_seeds is not None else [])
    rows = []
    toc = []
    for i, s in enumerate(summaries):
        c, p = s.claim, s.primary
        anchor = _anchor(s, i)
        label = c.slug + (f" [set {s.overrides}]" if s.overrides else "")
        rows.append([("a", label, anchor), s.scale, s.data, c.paper_figure,
                     _ms(*s.stat(p.ours, p.metric)), _ms(*s.stat(p.baseline, p.metric)),
                     f"{p.metric}{' (' + p.unit + ')' if p.unit else ''}: {p.ours} vs {p.baseline}",
                     s.verdict.reason, s.verdict.verdict, ", ".join(map(str, s.seeds)), f"{s.duration_s:.0f} s"]
                    + ([("—" if other(s) is None else f"{other(s).verdict.verdict} ({_seed_list(other(s).seeds)})")]
                       if check_seeds is not None else []))
        toc.append((("a", f"{label} — {s.scale}, {s.data}", anchor), " ", ("v", s.verdict.verdict)))
    blocks.append(_h(2, "Contents", "contents"))
    blocks.append(_ul(toc + ([(("a", "Benchmarks", "benchmarks"),)] if benches else [])
                      + ([(("a", "Composition", "composition"),)] if store.latest_compose() else [])))
    blocks.append(_h(2, "Summary", "summary"))
    blocks.append(_table(header, [[(r[0],)] + r[1:] for r in rows], verdict_col=8, cls="summary"))
    for i, s in enumerate(summaries):
        c = s.claim
        v = s.verdict
        anchor = _anchor(s, i)
        blocks.append(_h(2, f"{c.slug} — {s.scale} ({s.data})" + (f" — overrides: {s.overrides}" if s.overrides else ""),
                         anchor))
        blocks.append(_p(("i", c.title), f" (arXiv:{c.arxiv}). Verdict: ", ("v", v.verdict), f" — {v.reason}."))
        o = other(s)
        if o is not None:
            blocks.append(_p(("b", f"On the other seeds ({_seed_list(o.seeds)}):"), " ", ("v", o.verdict.verdict),
                             f" — {o.verdict.reason}; ours {_ms(*o.stat(s.primary.ours, s.primary.metric))}, "
                             f"baseline {_ms(*o.stat(s.primary.baseline, s.primary.metric))}."))
        if c.findings:
            blocks.append(_p(("b", "Finding:"), " ", c.findings))
        if v.verdict != "PASS":
            if c.scale_note:
                blocks.append(_p(("b", "At this scale:"), " ", c.scale_note))
            elif not c.findings:
                blocks.append(_p(("b", "Unexplained:"), " this claim records neither a finding about the paper nor "
                                 "what at our scale keeps it from passing."))
        blocks.append(_p(("b", "Statement:"), " ", c.statement))
        blocks.append(_p(("b", "Paper:"), " ", c.paper_figure))
        blocks.append(_p(("b", "Criterion:"), " ", c.criterion_for(s.data).describe()))
        blocks.append(_ul([("ok" if k.passed else ("v", "FAIL"), ": ", k.description, " — ", k.detail)
                           for k in s.checks]))
        r = c.resolved_for_data(s.data)
        ctrl = ", ".join(f"{b} in place of {a}" for a, b in r.control.items())
        state = {True: "passes too (the experiment could not fail)", False: "fails, as it must",
                 None: "cannot be evaluated"}[v.control_passed]
        blocks.append(_p(("b", "Negative control"), f" ({ctrl}{'; ' + c.control_note if c.control_note else ''}): ",
                         state + "."))
        blocks.append(_ul([("ok" if k.passed else "fail", ": ", k.description, " — ", k.detail)
                           for k in v.control_checks]))
        proto = s.runs[0].info.get("protocol") if s.runs else None
        if proto:
            blocks.append(_p(("b", "Protocol:"), " ", *[x for k2, v2 in proto.items()
                                                      for x in (("c", f"{k2}={v2!r}"), " ")]))
        metrics = sorted({m for a in s.stats.values() for m in a})
        if metrics:
            blocks.append(_table(["arm"] + metrics,
                                 [[arm] + [_ms(*ms.get(m, (float("nan"), float("nan")))) for m in metrics]
                                  for arm, ms in sorted(s.stats.items())], cls="arms"))
        if c.notes:
            blocks.append(_p(("b", "Notes:"), " ", c.notes))
        for curve, rel in plots.get(i, []):
            blocks.append(_img(rel.as_posix(), f"{c.slug} {curve}"))
    if benches:
        blocks.append(_h(2, "Benchmarks", "benchmarks"))
        blocks.append(_p("Per-step time of each component as a ratio to its plain-PyTorch baseline, interleaved "
                         "in one process: the ratio of the medians, then [min-max] of the per-repetition ratios and "
                         "the number of timed pairs; the clock and thread count are listed with each. 'vs best "
                         "peer' is our ratio over the fastest public implementation's ratio to the same baseline, "
                         "timed in the same run (`gradkit bench --peers`; below 1: ours is faster), and, where "
                         "given, our step timed head to head against the peer's in one interleaved loop."))
        brows = []
        for b in benches:
            tgt = f"<= {b.target:.2f}x" if b.target is not None else "-"
            verdict = "-" if b.passed is None else ("PASS" if b.passed else "FAIL")
            shown = {k: v for k, v in b.extra.items() if k not in ("ratio_min", "ratio_max", "pairs", "peers")}
            timed = [p for p in b.extra.get("peers", []) if p.get("status") == "ok"]
            if timed:
                best = min(timed, key=lambda p: p["ratio"])
                vs_peer = f"{best['ours_vs_peer']:.3f} ({best['name']}: {best['ratio']:.3f}x)"
                if "direct" in best:
                    vs_peer += f"; head to head {best['direct']:.3f} [{best['direct_min']:.3f}-{best['direct_max']:.3f}]"
            elif b.extra.get("peers"):
                vs_peer = ", ".join(f"{p['name']}: {p['status']}" for p in b.extra["peers"])
            else:
                vs_peer = "-"
            extra = ", ".join(f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}" for k, val in shown.items())
            ratio = f"{b.ratio:.3f}x"
            if "ratio_min" in b.extra:
                ratio += f" [{b.extra['ratio_min']:.3f}-{b.extra['ratio_max']:.3f}], {b.extra['pairs']} pairs"
            else:
                ratio += f", {b.repeats} repeats"
            brows.append([b.name, b.slug, ratio, tgt, verdict, vs_peer, b.baseline,
                          f"{b.baseline_s * 1e3:.3f}", f"{b.candidate_s * 1e3:.3f}", extra])
        blocks.append(_table(["benchmark", "paper", "ratio", "target", "verdict", "vs best peer", "baseline",
                              "baseline ms", "ours ms", "settings"], brows, verdict_col=4, cls="bench"))

    compose = store.latest_compose()
    if compose:
        order = _compose_order()
        names = sorted({c["a"] for c in compose} | {c["b"] for c in compose},
                       key=lambda n: (order.index(n) if n in order else len(order), n))
        cells = {(c["a"], c["b"]): (c["status"], c["reason"]) for c in compose}
        green = sum(c["status"] in ("ok", "invariant", "error") for c in compose)
        blocks.append(_h(2, "Composition", "composition"))
        blocks.append(_p("Which techniques stack in one model (", ("c", "gradkit compose"), "). Each cell builds a "
                         "small float64 model that uses both families, takes one training step, and compares the "
                         "loss, the gradients after every transform, the parameters after the step and the running "
                         "statistics with a reference built from plain PyTorch parts. ",
                         ("b", "ok"), ": equal to 1e-9 relative; ", ("b", "inv"), ": a lossy or stochastic family "
                         "kept its invariant (Mesa gradients within 5% and fewer saved bytes, gradient noise of the "
                         "scheduled size) and every exact stage matched; ", ("b", "err"), ": a documented, clear "
                         "error; ", ("b", "BROKEN"), ": the gradients differ or an exception was unexpected. The "
                         "diagonal is a family alone.", f" {green} of {len(compose)} cells are green."))
        blocks.append(_grid_block(names, cells, {"ok": "ok", "invariant": "inv", "error": "err",
                                                 "broken": "BROKEN"}))

    md_path = out_dir / "report.md"
    md_path.write_text(_render_md(blocks), encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(_render_html(blocks, "gradkit reproduction report"), encoding="utf-8")
    return [md_path, html_path]
