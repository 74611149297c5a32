"""The ``gradkit`` command: list, show, run, reproduce, report, bench.

Exit status: 0 when every claim run holds, 1 when any fails its criterion (or crashes),
2 for usage or data errors (unknown slug, bad scale or seeds, unusable database, missing data).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A user error reported on one line with exit status 2."""


def _err(msg: str) -> None:
    print(f"gradkit: error: {msg}", file=sys.stderr)


def _bar_factory(enabled: bool | None):
    from tqdm.auto import tqdm

    def make(total: int | None = None, desc: str = ""):
        return tqdm(total=total, desc=desc, leave=False, disable=(not enabled) if enabled is not None else None,
                    dynamic_ncols=True, file=sys.stderr)

    return make


def _fmt_ms(mu: float, sd: float) -> str:
    if not math.isfinite(mu):
        return "nan"
    return f"{mu:.4g} ± {sd:.2g}"


def _store(args):
    from .results import ResultStore

    return ResultStore(args.db)


def _claims(slugs: Sequence[str]):
    from .claims import CLAIMS, load_claims

    load_claims()
    out = []
    for s in slugs:
        if s not in CLAIMS:
            raise UsageError(f"unknown claim {s!r}; known: {', '.join(CLAIMS.names())}")
        out.append(CLAIMS.get(s))
    return out


def _data_root(args) -> Path | None:
    if args.data_root is None:
        return None
    p = Path(args.data_root).expanduser()
    if not p.is_dir():
        raise UsageError(f"--data-root {args.data_root}: not a folder")
    return p


def _device(args):
    from .engine import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _print_table(summaries, file=sys.stdout) -> None:
    rows = [("claim", "scale", "data", "ours", "baseline", "metric", "seeds", "verdict", "time")]
    for s in summaries:
        c = s.claim
        rows.append((c.slug, s.scale, s.data, _fmt_ms(*s.stat(c.primary.ours, c.primary.metric)),
                     _fmt_ms(*s.stat(c.primary.baseline, c.primary.metric)),
                     f"{c.primary.metric} ({c.primary.ours} vs {c.primary.baseline})",
                     str(len(s.seeds)), "PASS" if s.passed else "FAIL", f"{s.duration_s:.0f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip(), file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=file)
    for s in summaries:
        for k in s.checks:
            print(f"  [{s.claim.slug}] {'ok  ' if k.passed else 'FAIL'} {k.description}: {k.detail}", file=file)


def _run_many(args, claims, *, resume: bool) -> int:
    from .data import DataError
    from .suite import parse_seeds, run_claim

    store = _store(args)
    device = _device(args)
    root = _data_root(args)
    if args.scale is None:
        args.scale = "quick"
    try:
        seed_lists = [parse_seeds(args.seeds, c.default_seeds) for c in claims]
    except ValueError as e:
        raise UsageError(str(e)) from None
    show = None if args.progress is None else args.progress
    bars = _bar_factory(show)
    total = sum(len(s) for s in seed_lists)
    suite_bar = bars(total=total, desc="claims")
    summaries, crashed = [], []
    quiet = args.json
    try:
        for claim, seeds in zip(claims, seed_lists):
            def on_seed(rec, reused, _c=claim):
                suite_bar.update(1)
                if not quiet:
                    tag = "stored" if reused else f"{rec.duration_s:.1f}s"
                    m = rec.metrics
                    p = _c.primary
                    ours = m.get(p.ours, {}).get(p.metric, float("nan"))
                    base = m.get(p.baseline, {}).get(p.metric, float("nan"))
                    suite_bar.write(f"{_c.slug} [{args.scale}, seed {rec.seed}, {rec.data}] "
                                    f"{p.metric}: {p.ours} {ours:.4g} vs {p.baseline} {base:.4g} ({tag})",
                                    file=sys.stderr)
            suite_bar.set_description(claim.slug)
            try:
                summaries.append(run_claim(claim, scale=args.scale, seeds=seeds, device=device, data_root=root,
                                           store=store, resume=resume, progress=bars, on_seed=on_seed))
            except DataError:
                raise
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a crashing claim is reported and the suite goes on
                crashed.append((claim.slug, e))
                _err(f"claim {claim.slug!r} crashed: {type(e).__name__}: {e}")
                if args.verbose:
                    traceback.print_exc()
    finally:
        suite_bar.close()
    if args.json:
        print(json.dumps({"claims": [s.to_json() for s in summaries],
                          "crashed": [{"slug": s, "error": f"{type(e).__name__}: {e}"} for s, e in crashed]},
                         indent=2))
    else:
        if summaries:
            _print_table(summaries)
        print(f"results stored in {store.path}")
    return EXIT_OK if (not crashed and all(s.passed for s in summaries)) else EXIT_FAIL


def cmd_list(args) -> int:
    from .claims import CLAIMS, load_claims

    load_claims()
    if args.json:
        print(json.dumps([{"slug": c.slug, "title": c.title, "arxiv": c.arxiv, "statement": c.statement,
                           "real_data": c.real_data, "default_seeds": c.default_seeds}
                          for _, c in CLAIMS.items()], indent=2))
        return EXIT_OK
    w = max((len(n) for n in CLAIMS.names()), default=4)
    for slug, c in CLAIMS.items():
        print(f"{slug.ljust(w)}  arXiv:{c.arxiv:<11} {c.title}")
    return EXIT_OK


def cmd_show(args) -> int:
    (c,) = _claims([args.slug])
    info = {
        "slug": c.slug, "title": c.title, "arxiv": c.arxiv, "statement": c.statement,
        "paper_figure": c.paper_figure, "criterion": c.criterion.describe(),
        "data_criteria": {k: v.describe() for k, v in c.data_criteria.items()},
        "primary": f"{c.primary.metric}: {c.primary.ours} vs {c.primary.baseline}",
        "real_data": c.real_data or "none", "default_seeds": c.default_seeds, "version": c.version,
        "uses": list(c.uses), "notes": c.notes,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    for k, v in info.items():
        if isinstance(v, list):
            v = ", ".join(v) or "-"
        if isinstance(v, dict):
            v = "; ".join(f"{a}: {b}" for a, b in v.items()) or "-"
        print(f"{k + ':':<15} {v}")
    return EXIT_OK


def cmd_run(args) -> int:
    return _run_many(args, _claims(args.slugs), resume=args.resume)


def cmd_reproduce(args) -> int:
    from .claims import CLAIMS, load_claims

    load_claims()
    claims = _claims(args.only or CLAIMS.names())
    return _run_many(args, claims, resume=not args.fresh)


def cmd_report(args) -> int:
    from .report import write_report

    store = _store(args)
    paths = write_report(store, Path(args.out), scales=args.scale)
    for p in paths:
        print(p)
    return EXIT_OK


def cmd_bench(args) -> int:
    from .bench import BENCHMARKS, load_benchmarks, run_benchmarks
    from .results import BenchRecord, environment_versions, git_revision

    load_benchmarks()
    for n in args.names:
        if n not in BENCHMARKS:
            raise UsageError(f"unknown benchmark {n!r}; known: {', '.join(BENCHMARKS.names())}")
    if args.repeats < 3:
        raise UsageError(f"--repeats must be >= 3, got {args.repeats}")
    store = _store(args)
    out = []
    for b, r in run_benchmarks(args.names or None, repeats=args.repeats, clock=args.clock):
        passed = None if b.target is None else bool(r.ratio <= b.target)
        rec = BenchRecord(name=b.name, slug=b.slug, description=b.description, baseline=b.baseline,
                          baseline_s=r.baseline_s, candidate_s=r.candidate_s, ratio=r.ratio, target=b.target,
                          passed=passed, repeats=args.repeats, extra=r.extra, versions=environment_versions(),
                          git_rev=git_revision())
        store.add_bench(rec)
        out.append(rec)
        if not args.json:
            tgt = f"<= {b.target:.2f}x" if b.target is not None else "report"
            verdict = "-" if passed is None else ("PASS" if passed else "FAIL")
            print(f"{b.name:<28} {r.ratio:6.3f}x  (target {tgt}, {verdict})  "
                  f"{b.baseline}: {r.baseline_s * 1e3:.3f} ms, ours: {r.candidate_s * 1e3:.3f} ms  [{b.slug}]",
                  flush=True)
            if r.extra:  # e.g. saved-bytes ratios and the settings measured
                print("    " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in r.extra.items()), flush=True)
    if args.json:
        print(json.dumps([{"name": o.name, "slug": o.slug, "ratio": o.ratio, "target": o.target,
                           "passed": o.passed, "baseline_ms": o.baseline_s * 1e3, "ours_ms": o.candidate_s * 1e3,
                           **o.extra} for o in out], indent=2))
    return EXIT_OK if all(o.passed is not False for o in out) else EXIT_FAIL


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="gradkit", description="Gradient techniques from papers, with reproduced claims.")
    p.add_argument("--version", action="version", version=f"gradkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, runs: bool = False):
        sp.add_argument("--db", default=None, help="results database (default: $GRADKIT_DB or the user data dir)")
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        if runs:
            sp.add_argument("--scale", choices=("smoke", "quick", "full"), default="quick",
                            help="experiment scale (default: quick)")
            sp.add_argument("--seeds", default=None,
                            help="a count (3 -> seeds 0,1,2) or a list (11,12,13); default: the claim's own count")
            sp.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
            sp.add_argument("--data-root", default=None, metavar="DIR",
                            help="folder with the papers' real data sets (MNIST, MNIST-M, USPS, ...)")
            g = sp.add_mutually_exclusive_group()
            g.add_argument("--progress", dest="progress", action="store_true", default=None,
                           help="always show progress bars (default: only on a terminal)")
            g.add_argument("--no-progress", dest="progress", action="store_false")
            sp.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of crashing claims")

    sp = sub.add_parser("list", help="list the registered claims")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("show", help="show one claim: paper, figure, criterion, components")
    sp.add_argument("slug")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_show)

    sp = sub.add_parser("run", help="run claims (ours and baselines, several seeds) and print verdicts")
    sp.add_argument("slugs", nargs="+", metavar="SLUG")
    common(sp, runs=True)
    sp.add_argument("--resume", action="store_true", help="reuse seeds already stored instead of rerunning them")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("reproduce", help="run every claim, resuming what is already stored")
    common(sp, runs=True)
    sp.add_argument("--only", nargs="+", metavar="SLUG", help="restrict to these claims")
    sp.add_argument("--fresh", action="store_true", help="rerun seeds even if they are stored")
    sp.set_defaults(func=cmd_reproduce)

    sp = sub.add_parser("report", help="write the reproduction report (markdown, HTML, plots) from the database")
    sp.add_argument("--db", default=None)
    sp.add_argument("--out", default="gradkit-report", help="output folder (default: ./gradkit-report)")
    sp.add_argument("--scale", nargs="+", choices=("smoke", "quick", "full"), default=None,
                    help="scales to include (default: all stored)")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("bench", help="time components against plain PyTorch (ratios, one process)")
    sp.add_argument("names", nargs="*", metavar="NAME")
    sp.add_argument("--repeats", type=int, default=30, help="timed repetitions per side (default 30)")
    sp.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or CPU time of the process (steadier on a shared machine)")
    sp.add_argument("--db", default=None)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP threads that spin while waiting make small models 10-50x slower when another
    # process shares the cores; passive waiting costs nothing measurable when they are idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    from .data import DataError
    from .results import StoreError

    try:
        return args.func(args)
    except (UsageError, StoreError, DataError) as e:
        _err(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted; finished runs are stored (rerun `gradkit reproduce` to resume)")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
