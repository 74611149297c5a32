"""The gradkit command end to end: exit codes, errors, JSON, store, resume after kill -9, concurrency."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


import pytest

from conftest import REPO, TESTS


def gk(*args, env=None, db=None, timeout=120, **kw):
    e = dict(os.environ)
    e["GRADKIT_CLAIMS"] = "fake_claims"
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO / "src"), e.get("PYTHONPATH", "")])
    if db is not None:
        e["GRADKIT_DB"] = str(db)
        if Path(db).parent.is_dir():  # the default ./gradkit-report lands beside the test's database
            kw.setdefault("cwd", Path(db).parent)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "gradkit", *args], capture_output=True, text=True, env=e,
                          timeout=timeout, **kw)


def rows(db, sql="SELECT slug, seed FROM runs ORDER BY id"):
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_list_and_show(tmp_path):
    r = gk("list", db=tmp_path / "r.db")
    assert r.returncode == 0, r.stderr
    for slug in ("dann", "gradient-noise", "reste", "fake-pass"):
        assert slug in r.stdout
    r = gk("list", "--json", db=tmp_path / "r.db")
    slugs = {c["slug"] for c in json.loads(r.stdout)}
    assert {"dann", "gradient-noise", "reste"} <= slugs
    r = gk("show", "fake-pass", db=tmp_path / "r.db")
    assert r.returncode == 0 and "acc: ours >= base + 2" in r.stdout


def test_run_pass_and_fail_exit_codes_and_json(tmp_path):
    db = tmp_path / "r.db"
    r = gk("run", "fake-pass", "--seeds", "3", "--json", db=db)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (c,) = out["claims"]
    assert c["passed"] and c["seeds"] == [0, 1, 2]
    assert c["stats"]["ours"]["acc"]["mean"] == pytest.approx(56.0)
    assert rows(db) == [("fake-pass", 0), ("fake-pass", 1), ("fake-pass", 2)]
    r = gk("run", "fake-fail", "--seeds", "11,12,13", db=db)
    assert r.returncode == 1
    assert "FAIL" in r.stdout and "fake-fail" in r.stdout
    assert [s for _, s in rows(db)][-3:] == [11, 12, 13]


def test_crashing_claim_is_reported_and_exit_1(tmp_path):
    r = gk("run", "fake-crash", "fake-pass", "--seeds", "1", db=tmp_path / "r.db")
    assert r.returncode == 1
    assert "fake-crash" in r.stderr and "boom" in r.stderr and "Traceback" not in r.stderr
    assert "fake-pass" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (("run", "no-such-claim"), "unknown claim 'no-such-claim'"),
    (("show", "no-such-claim"), "unknown claim"),
    (("run", "fake-pass", "--seeds", "0"), "seeds must be a count >= 1"),
    (("run", "fake-pass", "--seeds", "a,b"), "seeds must be a count"),
    (("run", "fake-pass", "--seeds", "1,1"), "distinct"),
    (("run", "fake-pass", "--scale", "huge"), "invalid choice"),
    (("run", "fake-pass", "--data-root", "/nonexistent/dir"), "not a folder"),
    (("run", "fake-pass", "--device", "cuda:7"), "device"),
    (("run", "fake-pass", "--device", "tpu"), "device"),
    (("bench", "no-such-bench"), "unknown benchmark"),
])
def test_usage_errors_exit_2_one_line(tmp_path, args, needle):
    r = gk(*args, db=tmp_path / "r.db")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_database_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "sub").write_text("a file where a folder should be")
    r = gk("run", "fake-pass", "--seeds", "1", db=ro / "sub" / "r.db")
    assert r.returncode == 2 and "results database" in r.stderr and "Traceback" not in r.stderr
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    r = gk("run", "fake-pass", "--seeds", "1", db=corrupt)
    assert r.returncode == 2 and "cannot be used" in r.stderr


def _wait_for_rows(db, n, proc, limit_s):
    """Wait until ``db`` holds ``n`` runs while ``proc`` is alive (the database may not exist yet)."""
    deadline = time.monotonic() + limit_s
    while True:
        if db.exists():
            try:
                if len(rows(db)) >= n:
                    return
            except sqlite3.OperationalError:
                pass
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the run did not store {n} runs in {limit_s} s"
        time.sleep(0.05)


def test_reproduce_resumes_after_kill_9(tmp_path):
    db = tmp_path / "r.db"
    gate = tmp_path / "gate"
    env = {"GRADKIT_FAKE_GATE": str(gate), "GRADKIT_FAKE_GATE_FROM": "2"}
    e = dict(os.environ, GRADKIT_CLAIMS="fake_claims", GRADKIT_DB=str(db), **env,
             PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO / "src")]))
    p = subprocess.Popen([sys.executable, "-m", "gradkit", "reproduce", "--only", "fake-gate", "--seeds", "4"],
                         env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        _wait_for_rows(db, 2, p, 90)  # seeds 0 and 1 stored; seed 2 then blocks on the gate
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert rows(db) == [("fake-gate", 0), ("fake-gate", 1)]
    gate.touch()
    r = gk("reproduce", "--only", "fake-gate", "--seeds", "4", "--json", db=db, env=env)
    assert r.returncode == 0, r.stderr
    assert rows(db) == [("fake-gate", s) for s in range(4)]  # 0 and 1 were not rerun
    (c,) = json.loads(r.stdout)["claims"]
    assert c["seeds"] == [0, 1, 2, 3] and c["passed"]
    r = gk("reproduce", "--only", "fake-gate", "--seeds", "4", db=db, env=env)
    assert r.returncode == 0 and len(rows(db)) == 4 and "stored" in r.stderr


def test_jobs_run_tasks_in_worker_processes_with_the_same_results(tmp_path):
    seq, par = tmp_path / "seq.db", tmp_path / "par.db"
    r1 = gk("run", "fake-pass", "fake-fail", "--seeds", "4", "--json", db=seq)
    r2 = gk("run", "fake-pass", "fake-fail", "--seeds", "4", "--jobs", "2", "--json", db=par)
    assert (r1.returncode, r2.returncode) == (1, 1), r2.stderr
    a, b = json.loads(r1.stdout), json.loads(r2.stdout)
    assert [c["stats"] for c in a["claims"]] == [c["stats"] for c in b["claims"]]
    assert a["summary"] == b["summary"]
    assert sorted(rows(par)) == sorted(rows(seq)) and len(rows(par)) == 8
    r = gk("run", "fake-crash", "fake-pass", "--seeds", "2", "--jobs", "2", db=tmp_path / "c.db")
    assert r.returncode == 1 and "crashed" in r.stderr and "boom" in r.stderr and "fake-pass" in r.stdout


def test_jobs_and_device_errors(tmp_path):
    for args, fragment in ((("--jobs", "0"), "--jobs must be >= 1"),
                           (("--device", "cpu,cpu", "--jobs", "1"), "needs --jobs >= 2"),
                           (("--device", "cpu,"), "comma-separated")):
        r = gk("run", "fake-pass", "--seeds", "1", *args, db=tmp_path / "e.db")
        assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = gk("run", "fake-pass", "--seeds", "2", "--device", "cpu,cpu", db=tmp_path / "d.db")  # one job per device
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(os.name != "posix", reason="process groups (start_new_session, killpg) are POSIX")
def test_parallel_reproduce_resumes_after_kill_9_of_every_process(tmp_path):
    db = tmp_path / "r.db"
    gate = tmp_path / "gate"
    env = {"GRADKIT_FAKE_GATE": str(gate), "GRADKIT_FAKE_GATE_FROM": "2"}
    e = dict(os.environ, GRADKIT_CLAIMS="fake_claims", GRADKIT_DB=str(db), **env,
             PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO / "src")]))
    p = subprocess.Popen([sys.executable, "-m", "gradkit", "reproduce", "--only", "fake-gate", "--seeds", "4",
                          "--jobs", "2"], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, cwd=tmp_path)
    try:
        _wait_for_rows(db, 2, p, 300)  # seeds 0 and 1 stored by the workers; 2 and 3 block on the gate
        os.killpg(p.pid, signal.SIGKILL)  # the parent and its workers, as a power cut would
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert sorted(rows(db)) == [("fake-gate", 0), ("fake-gate", 1)]
    gate.touch()
    r = gk("reproduce", "--only", "fake-gate", "--seeds", "4", "--jobs", "2", "--json", db=db, env=env,
           timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(rows(db)) == [("fake-gate", s) for s in range(4)]  # 0 and 1 were not rerun
    (c,) = json.loads(r.stdout)["claims"]
    assert c["seeds"] == [0, 1, 2, 3] and c["passed"]


def test_two_concurrent_writers_both_land(tmp_path):
    db = tmp_path / "r.db"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    e = dict(os.environ, GRADKIT_CLAIMS="fake_claims", GRADKIT_DB=str(db), GRADKIT_FAKE_BARRIER=str(barrier),
             GRADKIT_FAKE_BARRIER_N="2", PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO / "src")]))
    procs = [subprocess.Popen([sys.executable, "-m", "gradkit", "run", "fake-barrier", "--seeds", seeds],
                              env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seeds in ("0,1,2,3,4", "5,6,7,8,9")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(s for _, s in rows(db)) == list(range(10))


def test_report_from_database(tmp_path):
    db = tmp_path / "r.db"
    assert gk("run", "fake-pass", "--seeds", "2", db=db).returncode == 0
    assert gk("run", "fake-fail", "--seeds", "2", db=db).returncode == 1
    out = tmp_path / "rep"
    r = gk("report", "--out", str(out), db=db)
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "| [fake-pass](#fake-pass-quick-bundled) | quick | fake |" in md and "PASS" in md and "FAIL" in md
    assert "Negative control" in md and "**Protocol:**" in md
    assert md.count("**At this scale:** a wider model would settle it") == 1  # under the FAIL only
    assert (out / "report.html").exists()
    png = out / "plots" / "fake-pass-quick-bundled-acc.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    grid = out / "plots" / "fake-pass-quick-bundled-recon.png"  # info["images"] becomes an image grid
    assert grid.exists() and grid.read_bytes()[:4] == b"\x89PNG"
    assert "fake-pass-quick-bundled-recon.png" in md
    assert (out / "plots" / "fake-pass-quick-bundled-u-x-t-a-b.png").exists()  # a grid name made a file name


def test_report_and_summary_with_a_second_seed_set(tmp_path):
    db = tmp_path / "r.db"
    assert gk("run", "fake-pass", "--seeds", "3", db=db).returncode == 0
    assert gk("run", "fake-pass", "--seeds", "11,12,13", db=db).returncode == 0
    assert gk("run", "fake-fail", "--seeds", "2", db=db).returncode == 1   # no runs on the other seeds
    out = tmp_path / "rep"
    r = gk("report", "--out", str(out), "--seeds", "0-2", "--check-seeds", "11,12,13", db=db)
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "Other seeds" in md and "PASS (11, 12, 13)" in md
    assert "**1 of 1** hold at quick scale on the other seeds 11, 12, 13; 1 claim(s) have no runs there" in md
    assert md.count("**On the other seeds (11, 12, 13):**") == 1
    r = gk("summary", "--seeds", "0-2", "--check-seeds", "11-13", db=db)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("on seeds 0, 1, 2; 1 of 1 on seeds 11, 12, 13")
    r = gk("summary", "--seeds", "11-13", db=db)   # only the claim with runs on those seeds
    assert r.stdout.startswith("1 of 1 claim results hold")
    for args in (("summary", "--seeds", "0-2", "--check-seeds", "2-4"), ("summary", "--seeds", "3-1"),
                 ("report", "--out", str(out), "--seeds", "0-2", "--check-seeds", "1")):
        r = gk(*args, db=db)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)


def test_python_dash_m_and_version(tmp_path):
    r = gk("--version", db=tmp_path / "r.db")
    assert r.returncode == 0 and "gradkit" in r.stdout


def test_bench_runs_stores_and_reports(tmp_path):
    db = tmp_path / "r.db"
    r = gk("bench", "dann-grl-step", "--repeats", "3", "--json", db=db)
    assert r.returncode in (0, 1), r.stderr  # 1 only if the measured ratio misses its target
    (b,) = json.loads(r.stdout)
    assert b["name"] == "dann-grl-step" and b["ratio"] > 0 and b["target"] == 1.05
    assert rows(db, "SELECT name, repeats FROM bench") == [("dann-grl-step", 3)]
    r = gk("bench", "dann-grl-step", "--repeats", "3", "--clock", "cpu", db=db)
    assert r.returncode in (0, 1), r.stderr
    assert "clock=cpu" in r.stdout and "threads=1" in r.stdout  # clock and threads recorded with the result
    r = gk("bench", "dann-grl-step", "--repeats", "4", "--threads", "2", "--json", db=db)
    (b,) = json.loads(r.stdout)
    assert b["threads"] == 2 and b["pairs"] == 4 and b["ratio_min"] <= b["ratio"] <= b["ratio_max"]
    r = gk("bench", "dann-grl-step", "--repeats", "1", db=db)
    assert r.returncode == 2 and "--repeats must be >= 3" in r.stderr
    r = gk("bench", "dann-grl-step", "--threads", "0", db=db)
    assert r.returncode == 2 and "--threads must be >= 1" in r.stderr


def test_set_overrides_are_checked_stored_apart_and_labelled(tmp_path):
    db = tmp_path / "r.db"
    assert gk("run", "fake-pass", "--seeds", "2", db=db).returncode == 0
    r = gk("run", "fake-pass", "--seeds", "2", "--set", "gain=1", "--json", "--resume", db=db)
    assert r.returncode == 1, r.stderr  # gain 1 < the criterion's 2: a real FAIL, not the stored PASS
    (c,) = json.loads(r.stdout)["claims"]
    assert c["overrides"] == "gain=1.0" and c["protocol"]["gain"] == 1.0 and c["verdict"] == "FAIL"
    assert c["stats"]["ours"]["acc"]["mean"] == pytest.approx(51.5)
    assert rows(db, "SELECT overrides FROM runs ORDER BY id") == [("",), ("",), ("gain=1.0",), ("gain=1.0",)]
    # the default runs are resumed without the overridden ones
    r = gk("run", "fake-pass", "--seeds", "2", "--resume", "--json", db=db)
    (c,) = json.loads(r.stdout)["claims"]
    assert r.returncode == 0 and c["overrides"] == "" and c["stats"]["ours"]["acc"]["mean"] == pytest.approx(55.5)
    assert len(rows(db)) == 4
    out = tmp_path / "rep"
    assert gk("report", "--out", str(out), db=db).returncode == 0
    md = (out / "report.md").read_text()
    assert "fake-pass [set gain=1.0]" in md and "| [fake-pass](#fake-pass-quick-bundled) | quick |" in md


@pytest.mark.parametrize("setting, needle", [
    ("nope=1", "unknown protocol field 'nope'"),
    ("gain=abc", "protocol field 'gain' expects float"),
    ("width=1.5", "protocol field 'width' expects int"),
    ("gain", "--set expects field=value"),
])
def test_set_bad_values_exit_2_one_line(tmp_path, setting, needle):
    r = gk("run", "fake-pass", "--set", setting, db=tmp_path / "r.db")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_inconclusive_when_the_control_passes_or_at_ceiling(tmp_path):
    for slug, why in (("fake-control", "the control (base for ours) passes the same criterion"),
                      ("fake-ceiling", "within 0.5 of the ceiling 100")):
        r = gk("run", slug, "--seeds", "2", "--json", db=tmp_path / "r.db")
        assert r.returncode == 1, r.stderr  # INCONCLUSIVE does not count as holding
        (c,) = json.loads(r.stdout)["claims"]
        assert c["verdict"] == "INCONCLUSIVE" and why in c["reason"]
        assert all(k["passed"] for k in c["checks"])
    (c,) = json.loads(gk("run", "fake-pass", "--seeds", "2", "--json", db=tmp_path / "r.db").stdout)["claims"]
    assert c["verdict"] == "PASS" and c["control"]["passed"] is False


def test_show_prints_the_protocol(tmp_path):
    r = gk("show", "fake-pass", db=tmp_path / "r.db")
    assert r.returncode == 0
    assert "protocol (bundled" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("width"))
    assert line.split()[1:] == ["int", "8", "16", "32"]
    info = json.loads(gk("show", "dann", "--json", db=tmp_path / "r.db").stdout)
    assert info["protocol"]["bundled"]["lambda_max"]["quick"] == "6.0"
    assert info["protocol"]["mnist->mnist-m"]["steps"]["quick"] == "500"


def test_reproduce_writes_the_report_and_ends_with_the_summary_line(tmp_path):
    db, out = tmp_path / "r.db", tmp_path / "rep"
    r = gk("reproduce", "--only", "fake-pass", "fake-fail", "--seeds", "2", "--report-dir", str(out), db=db)
    assert r.returncode == 1, r.stderr  # one claim fails: the status says so
    assert r.stdout.strip().splitlines()[-1] == "1 of 2 claim results hold at quick scale (1 FAIL, 0 INCONCLUSIVE)"
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nNow: <!-- gradkit:summary -->old<!-- /gradkit:summary -->.\n")
    r = gk("summary", "--readme", str(readme), db=db)
    assert r.returncode == 0 and "1 of 2 claim results hold" in r.stdout
    assert readme.read_text() == ("# x\n\nNow: <!-- gradkit:summary -->1 of 2 claim results hold at quick scale "
                                  "(1 FAIL, 0 INCONCLUSIVE)<!-- /gradkit:summary -->.\n")


def test_report_and_summary_errors_exit_2_one_line(tmp_path):
    db = tmp_path / "r.db"
    assert gk("run", "fake-pass", "--seeds", "1", db=db).returncode == 0
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for args, needle in ((("report", "--out", str(a_file)), "is not a folder"),
                         (("report", "--out", str(a_file / "sub")), "cannot create the folder"),
                         (("report", "--db", str(tmp_path / "missing.db")), "does not exist"),
                         (("summary", "--db", str(tmp_path / "missing.db")), "does not exist"),
                         (("summary", "--readme", str(a_file)), "no <!-- gradkit:summary -->"),
                         (("reproduce", "--only", "fake-pass", "--report-dir", str(a_file)), "is not a folder")):
        r = gk(*args, db=db)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "missing.db").exists()


def _gk_plain(code, cache):
    """Run python code with gradkit importable and no extra claims (the catalog cache applies)."""
    e = {k: v for k, v in os.environ.items() if k != "GRADKIT_CLAIMS"}
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), e.get("PYTHONPATH", "")])
    e["GRADKIT_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_list_and_show_read_the_catalog_without_torch(tmp_path):
    code = ("import sys; from gradkit.harness.cli import main; rc = main(sys.argv[1:] or ['list']); "
            "print('TORCH', 'torch' in sys.modules); sys.exit(rc)")
    first = _gk_plain(code, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "dann" in first.stdout and "TORCH True" in first.stdout  # built by importing the claims
    assert (tmp_path / "claims-catalog.json").exists()
    again = _gk_plain(code, tmp_path)
    assert again.stdout.replace("TORCH False", "TORCH True") == first.stdout
    shown = _gk_plain(code.replace("['list']", "['show', 'dann']"), tmp_path)
    assert shown.returncode == 0 and "TORCH False" in shown.stdout
    assert "protocol (bundled" in shown.stdout and "criterion:" in shown.stdout


def test_catalog_key_follows_every_source_file(tmp_path, monkeypatch):
    from gradkit.harness import catalog

    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(catalog, "_PACKAGE", tmp_path)
    k1 = catalog.catalog_key()
    assert catalog.catalog_key() == k1
    (tmp_path / "a.py").write_text("x = 22\n")
    assert catalog.catalog_key() != k1


def test_bench_help_lists_benchmark_names(tmp_path):
    r = gk("bench", "--help", db=tmp_path / "r.db")
    assert r.returncode == 0
    assert "dann-grl-step" in r.stdout and "mfac-step-m64" in r.stdout


def test_benchmark_names_have_one_style():
    import re

    from gradkit.harness.bench import BENCHMARKS, load_benchmarks

    load_benchmarks()
    bad = [n for n in BENCHMARKS.names() if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", n)]
    assert not bad, f"benchmark names are lower-case words joined by '-': {bad}"
