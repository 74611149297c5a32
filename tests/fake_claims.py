"""Claims used by the CLI/store tests (registered through GRADKIT_CLAIMS=fake_claims).

fake-pass / fake-fail: instant, deterministic functions of the seed.
fake-gate: seeds >= GRADKIT_FAKE_GATE_FROM wait until the file GRADKIT_FAKE_GATE exists.
fake-barrier: every process waits until GRADKIT_FAKE_BARRIER_N processes have reached the barrier folder.
fake-crash: raises.
"""
import os
import time
from pathlib import Path

from gradkit.claims import Claim, Gain, Primary, RunOutput, register


def _metrics(seed, gain):
    return {"ours": {"acc": 50.0 + gain + seed % 3}, "base": {"acc": 50.0 + seed % 3}}


def _wait_for(cond, limit=120.0):
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("fake claim waited too long")
        time.sleep(0.02)


def run_pass(ctx):
    return RunOutput(metrics=_metrics(ctx.seed, 5.0), data="fake", curves={"acc": {"ours": [1, 2, 3], "base": [1, 1, 2]}},
                     info={"curve_axes": {"acc": {"xlabel": "width", "x": [8, 16, 32]}},
                           "images": {"recon": {"original": [[[0.0, 1.0], [1.0, 0.0]]] * 3,
                                                "ours": [[[0.1, 0.9], [0.8, 0.2]]] * 2}}})


def run_fail(ctx):
    return RunOutput(metrics=_metrics(ctx.seed, 0.5), data="fake")


def run_gate(ctx):
    if ctx.seed >= int(os.environ.get("GRADKIT_FAKE_GATE_FROM", "2")):
        gate = Path(os.environ["GRADKIT_FAKE_GATE"])
        _wait_for(gate.exists)
    return RunOutput(metrics=_metrics(ctx.seed, 5.0), data="fake")


def run_barrier(ctx):
    folder = Path(os.environ["GRADKIT_FAKE_BARRIER"])
    n = int(os.environ.get("GRADKIT_FAKE_BARRIER_N", "2"))
    (folder / f"{os.getpid()}").touch()
    _wait_for(lambda: len(list(folder.iterdir())) >= n)
    return RunOutput(metrics=_metrics(ctx.seed, 5.0), data="fake")


def run_crash(ctx):
    raise RuntimeError("boom")


for slug, fn in (("fake-pass", run_pass), ("fake-fail", run_fail), ("fake-gate", run_gate),
                 ("fake-barrier", run_barrier), ("fake-crash", run_crash)):
    register(Claim(slug=slug, title=f"Fake {slug}", arxiv="0000.00000", statement="ours beats base by 2",
                   paper_figure="+2", criterion=Gain("acc", "ours", "base", 2.0),
                   primary=Primary("acc", "ours", "base", "%"), run=fn, plots=("acc",)))
