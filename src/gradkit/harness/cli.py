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


def _store(args, must_exist: bool = False):
    from .results import ResultStore, default_db_path

    if must_exist:
        path = Path(args.db) if args.db else default_db_path()
        if not path.is_file():
            raise UsageError(f"results database {path} does not exist (run `gradkit run` or "
                             f"`gradkit reproduce` first, or pass --db)")
    return ResultStore(args.db)


def _out_dir(text: str) -> Path:
    """A usable output folder for the report, created if missing; UsageError on one line otherwise."""
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {text}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {text}: cannot create the folder ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {text}: folder is not writable")
    return out


def summary_line(summaries, scale: str | None = None, crashed: int = 0) -> str:
    """'k of n claims hold at quick scale (f FAIL, i INCONCLUSIVE)': one line for the run or the store."""
    n = len(summaries) + crashed
    k = sum(s.verdict.verdict == "PASS" for s in summaries)
    f = sum(s.verdict.verdict == "FAIL" for s in summaries)
    i = sum(s.verdict.verdict == "INCONCLUSIVE" for s in summaries)
    scales = sorted({s.scale for s in summaries}) or ([scale] if scale else [])
    where = f" at {'/'.join(scales)} scale" if scales else ""
    parts = [f"{f} FAIL", f"{i} INCONCLUSIVE"] + ([f"{crashed} crashed"] if crashed else [])
    return f"{k} of {n} claim results hold{where} ({', '.join(parts)})"


def _claims(slugs: Sequence[str]):
    """The named claims; only their own modules are imported (every module for an unknown name)."""
    from .claims import CLAIMS, get_claim

    out = []
    for s in slugs:
        try:
            out.append(get_claim(s))
        except KeyError:
            raise UsageError(f"unknown claim {s!r}; known: {', '.join(CLAIMS.names())}") from None
    return out


def _data_root(args) -> Path | None:
    if args.data_root is None:
        return None
    p = Path(args.data_root).expanduser()
    if not p.is_dir():
        raise UsageError(f"--data-root {args.data_root}: not a folder")
    return p


def _devices(args) -> list:
    """``--device`` as a list: one device, or a comma-separated list that tasks are spread over."""
    from ..engine import resolve_device

    names = [d.strip() for d in str(args.device).split(",")]
    if not all(names):
        raise UsageError(f"--device must be a device or a comma-separated list of devices, got {args.device!r}")
    try:
        return [resolve_device(n) for n in names]
    except ValueError as e:
        raise UsageError(str(e)) from None


def _run_seed_job(job: dict) -> dict:
    """One claim-seed task in a worker process of ``--jobs``: run it, store it, say how it went."""
    from ..data import DataError
    from .claims import CLAIMS, load_claims
    from .results import ResultStore
    from .suite import run_claim

    load_claims()
    claim = CLAIMS.get(job["slug"])
    try:
        s = run_claim(claim, scale=job["scale"], seeds=[job["seed"]], device=job["device"],
                      data_root=None if job["data_root"] is None else Path(job["data_root"]),
                      store=ResultStore(job["db"]), resume=False, overrides=job["overrides"])
    except DataError as e:
        return {**job, "error": str(e), "data_error": True}
    except Exception as e:  # reported by the parent; the other tasks go on
        return {**job, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    rec = s.runs[0]
    p = claim.primary
    return {**job, "duration_s": rec.duration_s, "data": rec.data,
            "ours": rec.metrics.get(p.ours, {}).get(p.metric, float("nan")),
            "base": rec.metrics.get(p.baseline, {}).get(p.metric, float("nan"))}


def _run_parallel(args, claims, seed_lists, overrides, store, devices, root, resume: bool, bar) -> dict[str, str]:
    """Run the claim-seed tasks not stored yet in ``args.jobs`` worker processes (each stores its own
    result, so an interrupted run resumes like a sequential one); return ``{slug: error}`` of crashes."""
    import concurrent.futures as cf
    import multiprocessing

    from ..data import DataError
    from .protocol import overrides_key
    from .suite import data_mode

    jobs = []
    for claim, seeds in zip(claims, seed_lists):
        if resume:
            mode = data_mode(claim, root, args.scale)
            proto = claim.protocol_for(args.scale, root if mode == "real" else None, overrides.get(claim.slug, {}))
            okey = overrides_key({k: getattr(proto, k) for k in overrides.get(claim.slug, {})})
            done = store.latest_per_seed(claim.slug, claim.version, args.scale, mode, overrides=okey)
        else:
            done = {}
        for seed in seeds:
            if seed not in done:
                jobs.append({"slug": claim.slug, "seed": seed, "scale": args.scale, "db": str(store.path),
                             "data_root": None if root is None else str(root),
                             "overrides": overrides.get(claim.slug), "device": None})
    for k, job in enumerate(jobs):
        job["device"] = str(devices[k % len(devices)])
    crashed: dict[str, str] = {}
    if not jobs:
        return crashed
    ctx = multiprocessing.get_context("spawn")  # no forked torch state (threads, CUDA) in the workers
    pool = cf.ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs)), mp_context=ctx)
    try:
        futures = [pool.submit(_run_seed_job, job) for job in jobs]
        for fut in cf.as_completed(futures):
            r = fut.result()
            bar.update(1)
            if "error" in r:
                if r.get("data_error"):
                    raise DataError(r["error"])
                crashed.setdefault(r["slug"], r["error"])
                _err(f"claim {r['slug']!r} crashed on seed {r['seed']}: {r['error']}")
                if args.verbose and r.get("traceback"):
                    print(r["traceback"], file=sys.stderr)
            elif not args.json:
                c = next(c for c in claims if c.slug == r["slug"])
                bar.write(f"{c.slug} [{args.scale}, seed {r['seed']}, {r['data']}] {c.primary.metric}: "
                          f"{c.primary.ours} {r['ours']:.4g} vs {c.primary.baseline} {r['base']:.4g} "
                          f"({r['duration_s']:.1f}s, {r['device']})", file=sys.stderr)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(getattr(pool, "_processes", {}).values()):  # stop the running tasks too
            proc.terminate()
        raise
    pool.shutdown(wait=True)
    return crashed


def _print_table(summaries, file=sys.stdout) -> None:
    rows = [("claim", "scale", "data", "ours", "baseline", "metric", "seeds", "verdict", "time")]
    for s in summaries:
        c, p = s.claim, s.primary
        rows.append((c.slug + (f" [set {s.overrides}]" if s.overrides else ""), s.scale, s.data,
                     _fmt_ms(*s.stat(p.ours, p.metric)), _fmt_ms(*s.stat(p.baseline, p.metric)),
                     f"{p.metric} ({p.ours} vs {p.baseline})",
                     str(len(s.seeds)), s.verdict.verdict, f"{s.duration_s:.0f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip(), file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=file)
    for s in summaries:
        for k in s.checks:
            print(f"  [{s.claim.slug}] {'ok  ' if k.passed else 'FAIL'} {k.description}: {k.detail}", file=file)
        print(f"  [{s.claim.slug}] {s.verdict.verdict}: {s.verdict.reason}", file=file)


def _run_many(args, claims, *, resume: bool) -> int:
    from ..data import DataError
    from .suite import parse_seeds, run_claim

    store = _store(args)
    devices = _devices(args)
    device = devices[0]
    root = _data_root(args)
    if args.scale is None:
        args.scale = "quick"
    if args.jobs is None:
        args.jobs = len(devices)
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    if len(devices) > 1 and args.jobs < 2:
        raise UsageError(f"--device lists {len(devices)} devices: spreading tasks over them needs --jobs >= 2")
    try:
        seed_lists = [parse_seeds(args.seeds, c.default_seeds) for c in claims]
    except ValueError as e:
        raise UsageError(str(e)) from None
    overrides = _overrides(args, claims, root)
    if getattr(args, "report_dir", None):
        _out_dir(args.report_dir)  # a bad folder fails before hours of runs, not after
    if root is not None:
        for c in claims:
            if c.variant_for(args.scale, root) is None:
                print(f"gradkit: warning: --data-root does not apply to {c.slug} at scale {args.scale}; "
                      f"it runs on its bundled data ({c.data})", file=sys.stderr)
    show = None if args.progress is None else args.progress
    bars = _bar_factory(show)
    total = sum(len(s) for s in seed_lists)
    suite_bar = bars(total=total, desc="claims")
    summaries, crashed = [], []
    quiet = args.json
    parallel_crashed: dict[str, str] = {}
    if args.jobs > 1:  # run every task in worker processes first; the loop below then only collects them
        parallel_crashed = _run_parallel(args, claims, seed_lists, overrides, store, devices, root, resume,
                                         suite_bar)
        resume = True
    try:
        for claim, seeds in zip(claims, seed_lists):
            if claim.slug in parallel_crashed:
                crashed.append((claim.slug, RuntimeError(parallel_crashed[claim.slug])))
                continue

            def on_seed(rec, reused, _c=claim):
                if args.jobs > 1:  # already counted and printed by the workers
                    return
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
                                           store=store, resume=resume, progress=bars, on_seed=on_seed,
                                           overrides=overrides.get(claim.slug)))
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
    line = summary_line(summaries, args.scale, len(crashed))
    report_dir = getattr(args, "report_dir", None)
    if report_dir:
        from .report import write_report

        write_report(store, _out_dir(report_dir))
    if args.json:
        print(json.dumps({"claims": [s.to_json() for s in summaries],
                          "crashed": [{"slug": s, "error": f"{type(e).__name__}: {e}"} for s, e in crashed],
                          "summary": line}, indent=2))
    else:
        if summaries:
            _print_table(summaries)
        print(f"results stored in {store.path}")
        if report_dir:
            print(f"report written to {Path(report_dir) / 'report.html'}")
        print(line)
    return EXIT_OK if (not crashed and all(s.passed for s in summaries)) else EXIT_FAIL  # INCONCLUSIVE fails


def _overrides(args, claims, root) -> dict[str, dict]:
    """``--set field=value`` per claim, checked against each claim's protocol (one-line errors)."""
    from .protocol import ProtocolError, parse_overrides

    items = getattr(args, "set", None) or []
    if not items:
        return {}
    out = {}
    for c in claims:
        proto = c.resolve(c.variant_for(args.scale, root)).protocol
        try:
            out[c.slug] = parse_overrides(proto, items)
        except ProtocolError as e:
            raise UsageError(f"{c.slug}: {e}") from None
    return out


def cmd_list(args) -> int:
    from .catalog import load_catalog

    cat = load_catalog()
    if args.json:
        keys = ("slug", "title", "arxiv", "statement", "real_data", "default_seeds")
        print(json.dumps([{k: e[k] for k in keys} for e in cat.values()], indent=2))
        return EXIT_OK
    w = max((len(n) for n in cat), default=4)
    for slug, e in cat.items():
        print(f"{slug.ljust(w)}  arXiv:{e['arxiv']:<11} {e['title']}")
    return EXIT_OK


def cmd_show(args) -> int:
    from .catalog import load_catalog

    cat = load_catalog()
    if args.slug not in cat:
        raise UsageError(f"unknown claim {args.slug!r}; known: {', '.join(cat)}")
    info = dict(cat[args.slug])
    tables = info.pop("protocol_tables")
    info.pop("real_data", None)
    if args.json:
        info["protocol"] = {name: {f: {"type": t, "smoke": a, "quick": b, "full": d} for f, t, a, b, d in rows}
                            for name, rows in tables.items()}
        print(json.dumps(info, indent=2))
        return EXIT_OK
    for k, v in info.items():
        if isinstance(v, list):
            v = ", ".join(v) or "-"
        if isinstance(v, dict):
            v = "; ".join(f"{a}: {b}" for a, b in v.items()) or "-"
        print(f"{k + ':':<15} {v}")
    for name, rows in tables.items():
        print(f"\nprotocol ({name}; change a field with --set FIELD=VALUE):")
        head = ("field", "type", "smoke", "quick", "full")
        w = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
        for row in [head, *rows]:
            print("  " + "  ".join(str(x).ljust(n) for x, n in zip(row, w)).rstrip())
    return EXIT_OK


def cmd_run(args) -> int:
    return _run_many(args, _claims(args.slugs), resume=args.resume)


def cmd_reproduce(args) -> int:
    from .claims import CLAIMS, load_claims

    if not args.only:
        load_claims()
    claims = _claims(args.only or CLAIMS.names())
    return _run_many(args, claims, resume=not args.fresh)


def cmd_report(args) -> int:
    from .report import write_report

    store = _store(args, must_exist=True)
    out = _out_dir(args.out)
    try:
        paths = write_report(store, out, scales=args.scale, seeds=args.seeds, check_seeds=args.check_seeds)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for p in paths:
        print(p)
    return EXIT_OK


def _seeds(text: str) -> list[int]:
    """'0,1,2' or '3-5' (or a mix) -> sorted distinct seeds; argparse turns the ValueError into a usage error."""
    out: set[int] = set()
    for part in text.split(","):
        a, sep, b = part.strip().partition("-")
        lo, hi = int(a), int(b) if sep else int(a)
        if lo < 0 or hi < lo:
            raise ValueError(part)
        out.update(range(lo, hi + 1))
    return sorted(out)


_seeds.__name__ = "seed list"


def _seed_args(sp) -> None:
    sp.add_argument("--seeds", type=_seeds, default=None, metavar="LIST",
                    help="only these seeds' runs, e.g. 0-2 or 0,1,2 (default: every stored seed)")
    sp.add_argument("--check-seeds", type=_seeds, default=None, metavar="LIST",
                    help="a second seed set (e.g. seeds never used in development, 3-5) whose verdicts are "
                         "shown beside the main ones")


README_MARK = ("<!-- gradkit:summary -->", "<!-- /gradkit:summary -->")


def cmd_summary(args) -> int:
    """The one-line count of holding claims, from the database; optionally written into a README."""
    from .report import collect

    store = _store(args, must_exist=True)
    summaries = [s for s in collect(store, [args.scale], args.seeds) if not s.overrides]
    line = summary_line(summaries, args.scale)
    if args.seeds is not None:
        line += f" on seeds {', '.join(map(str, sorted(args.seeds)))}"
    if args.check_seeds is not None:
        if args.seeds is not None and set(args.seeds) & set(args.check_seeds):
            raise UsageError(f"--check-seeds must not overlap --seeds, got {args.check_seeds} and {args.seeds}")
        keys = {(s.claim.slug, s.data_mode) for s in summaries}
        again = [s for s in collect(store, [args.scale], args.check_seeds)
                 if not s.overrides and (s.claim.slug, s.data_mode) in keys]
        k2 = sum(s.verdict.verdict == "PASS" for s in again)
        line += f"; {k2} of {len(again)} on seeds {', '.join(map(str, sorted(args.check_seeds)))}"
    if args.readme:
        path = Path(args.readme)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--readme {args.readme}: {e.strerror}") from None
        a, b = README_MARK
        if a not in text or b not in text:
            raise UsageError(f"--readme {args.readme}: no {a} ... {b} block to fill")
        head, rest = text.split(a, 1)
        _, tail = rest.split(b, 1)
        path.write_text(f"{head}{a}{line}{b}{tail}", encoding="utf-8")
    print(line)
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
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    for b, r in run_benchmarks(args.names or None, repeats=args.repeats, clock=args.clock, threads=args.threads,
                               peers=args.peers):
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
            spread = (f" [{r.extra['ratio_min']:.3f}-{r.extra['ratio_max']:.3f}, {r.extra['pairs']} pairs]"
                      if "ratio_min" in r.extra else "")
            print(f"{b.name:<28} {r.ratio:6.3f}x{spread}  (target {tgt}, {verdict})  "
                  f"{b.baseline}: {r.baseline_s * 1e3:.3f} ms, ours: {r.candidate_s * 1e3:.3f} ms  [{b.slug}]",
                  flush=True)
            for peer in r.extra.get("peers", []):
                if peer["status"] != "ok":
                    print(f"    peer {peer['name']}: {peer['status']} (pip install 'gradkit[peers]')", flush=True)
                else:
                    direct = (f"; timed against each other: {peer['direct']:.3f} [{peer['direct_min']:.3f}-"
                              f"{peer['direct_max']:.3f}]" if "direct" in peer else "")
                    print(f"    peer {peer['name']}: {peer['ratio']:.3f}x [{peer['ratio_min']:.3f}-"
                          f"{peer['ratio_max']:.3f}] ({peer['ms']:.3f} ms); ours / peer = "
                          f"{peer['ours_vs_peer']:.3f}{direct}", flush=True)
            shown = {k: v for k, v in r.extra.items() if k != "peers"}
            if shown:  # e.g. saved-bytes ratios and the settings measured
                print("    " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in shown.items()), flush=True)
    if args.json:
        print(json.dumps([{"name": o.name, "slug": o.slug, "ratio": o.ratio, "target": o.target,
                           "passed": o.passed, "baseline_ms": o.baseline_s * 1e3, "ours_ms": o.candidate_s * 1e3,
                           **o.extra} for o in out], indent=2))
    return EXIT_OK if all(o.passed is not False for o in out) else EXIT_FAIL


def cmd_compose(args) -> int:
    from .compose import FAMILIES, check_pair, run_matrix

    if args.list:
        w = max(len(n) for n in FAMILIES)
        for f in FAMILIES.values():
            print(f"{f.name.ljust(w)}  {f.kind:<9}  {f.description}  [{f.components}]")
        return EXIT_OK
    if len(args.families) > 2:
        raise UsageError(f"give no family (the whole matrix), one (alone) or two (a pair), got {len(args.families)}")
    for n in args.families:
        if n not in FAMILIES:
            raise UsageError(f"unknown family {n!r}; known: {', '.join(FAMILIES)}")
    store = _store(args)
    order = list(FAMILIES)

    def line(c) -> str:
        pair = c.a if c.a == c.b else f"{c.a} + {c.b}"
        return f"{pair:<36} {c.status:<9} {c.reason}"

    if args.families:
        a, b = sorted(args.families, key=order.index) if len(args.families) == 2 else args.families * 2
        cells = [check_pair(a, b)]
        if not args.json:
            print(line(cells[0]))
    else:
        show = None if args.json else (lambda c: print(line(c), flush=True))
        cells = run_matrix(progress=show)
    store.add_compose([{"a": c.a, "b": c.b, "status": c.status, "reason": c.reason,
                        "max_rel_err": c.max_rel_err, "seconds": c.seconds} for c in cells])
    green = sum(c.green for c in cells)
    if args.json:
        print(json.dumps([{"a": c.a, "b": c.b, "status": c.status, "reason": c.reason,
                           "max_rel_err": None if c.max_rel_err != c.max_rel_err else c.max_rel_err,
                           "seconds": c.seconds} for c in cells], indent=2))
    elif len(cells) > 1:
        print(f"{green} of {len(cells)} cells green ({sum(c.status == 'ok' for c in cells)} exact, "
              f"{sum(c.status == 'invariant' for c in cells)} invariant held, "
              f"{sum(c.status == 'error' for c in cells)} documented errors, "
              f"{len(cells) - green} broken); stored in {store.path}")
    return EXIT_OK if green == len(cells) else EXIT_FAIL


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

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
            sp.add_argument("--device", default="cpu",
                            help="cpu (default), cuda, cuda:N or auto; a comma-separated list (cuda:0,cuda:1) "
                                 "spreads claim-seed tasks over the devices")
            sp.add_argument("--jobs", type=int, default=None, metavar="N",
                            help="run claim-seed tasks in N worker processes against one database "
                                 "(default: one per --device)")
            sp.add_argument("--data-root", default=None, metavar="DIR",
                            help="folder with the papers' real data sets (MNIST, MNIST-M, USPS, ...)")
            g = sp.add_mutually_exclusive_group()
            g.add_argument("--progress", dest="progress", action="store_true", default=None,
                           help="always show progress bars (default: only on a terminal)")
            g.add_argument("--no-progress", dest="progress", action="store_false")
            sp.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of crashing claims")
            sp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                            help="override a protocol field (repeatable; see `gradkit show SLUG`); such runs "
                                 "are stored apart from the defaults")

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
    sp.add_argument("--report-dir", default="gradkit-report", metavar="DIR",
                    help="write the report here when done (default: ./gradkit-report; '' to skip)")
    sp.set_defaults(func=cmd_reproduce)

    sp = sub.add_parser("report", help="write the reproduction report (markdown, HTML, plots) from the database")
    sp.add_argument("--db", default=None)
    sp.add_argument("--out", default="gradkit-report", help="output folder (default: ./gradkit-report)")
    sp.add_argument("--scale", nargs="+", choices=("smoke", "quick", "full"), default=None,
                    help="scales to include (default: all stored)")
    _seed_args(sp)
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("summary", help="one line: how many claims hold, from the database")
    sp.add_argument("--db", default=None)
    sp.add_argument("--scale", choices=("smoke", "quick", "full"), default="quick")
    sp.add_argument("--readme", default=None, metavar="FILE",
                    help="also write the line into FILE between <!-- gradkit:summary --> markers")
    _seed_args(sp)
    sp.set_defaults(func=cmd_summary)

    sp = sub.add_parser("compose", help="check which techniques stack in one model (gradients vs a plain reference)")
    sp.add_argument("families", nargs="*", metavar="FAMILY",
                    help="none: every pair; one: that family alone; two: that pair (see --list)")
    sp.add_argument("--list", action="store_true", help="list the families and exit")
    sp.add_argument("--db", default=None)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_compose)

    sp = sub.add_parser("bench", help="time components against plain PyTorch (ratios, one process)")
    sp.add_argument("names", nargs="*", metavar="NAME")
    sp.add_argument("--repeats", type=int, default=30, help="timed repetitions per side (default 30)")
    sp.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or CPU time of the process (steadier on a shared machine)")
    sp.add_argument("--threads", type=int, default=1,
                    help="intra-op threads while timing (default 1; stored with each result)")
    sp.add_argument("--peers", action="store_true",
                    help="also time the public peer implementations (revlib, torch_tract, captum, opacus) against "
                         "the same baseline in the same run, where installed (pip install 'gradkit[peers]')")
    sp.add_argument("--db", default=None)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_bench)
    plain_help = sp.format_help
    sp.format_help = lambda: plain_help() + _benchmark_names()  # looked up only when help is printed
    return p


def _benchmark_names() -> str:
    from .catalog import benchmark_catalog

    cat = benchmark_catalog()
    w = max((len(n) for n in cat), default=4)
    short = lambda d: d if len(d) <= 70 else d[:69].rstrip() + "…"  # noqa: E731
    lines = [f"  {n.ljust(w)}  [{e['slug']}] {short(e['description'])}" for n, e in cat.items()]
    return "\nbenchmarks (NAME; none given runs them all):\n" + "\n".join(lines) + "\n"


def _usage_errors() -> tuple[type[Exception], ...]:
    """The errors that end the command with one line and exit status 2. The results store's and the data
    layer's errors are only looked up when their modules were imported (importing the data layer imports
    torch, which ``list`` and ``show`` do without): an error cannot come from a module never loaded."""
    errors: list[type[Exception]] = [UsageError]
    for module, name in (("gradkit.harness.results", "StoreError"), ("gradkit.data.errors", "DataError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP threads that spin while waiting make small models 10-50x slower when another
    # process shares the cores; passive waiting costs nothing measurable when they are idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not isinstance(e, _usage_errors()):
            raise
        _err(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted; finished runs are stored (rerun `gradkit reproduce` to resume)")
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
