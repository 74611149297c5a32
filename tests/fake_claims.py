"""Claims used by the CLI/store tests (registered through GRADKIT_CLAIMS=fake_claims).

fake-pass / fake-fail: instant, deterministic functions of the seed.
fake-gate: seeds >= GRADKIT_FAKE_GATE_FROM wait until the file GRADKIT_FAKE_GATE exists.
fake-barrier: every process waits until GRADKIT_FAKE_BARRIER_N processes have reached the barrier folder.
fake-crash: raises.
fake-control: its negative control passes too (INCONCLUSIVE); fake-ceiling: both arms at 100%.
"""
import os
import time
from pathlib import Path

from dataclasses import dataclass

from gradkit.harness.claims import ArmResult, Claim, Drop, Gain, Primary, Protocol, register, scaled


@dataclass(frozen=True)
class FakeProtocol(Protocol):
    gain: float = 5.0
    width: int = scaled(smoke=8, quick=16, full=32)


def _arm_metrics(ctx, gain):
    # ours gains ``gain`` over base; both vary with the seed
    return {"acc": 50.0 + (gain if ctx.arm == "ours" else 0.0) + ctx.seed % 3}


def _wait_for(cond, limit=120.0):
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("fake claim waited too long")
        time.sleep(0.02)


def arm_pass(ctx):
    return ArmResult(_arm_metrics(ctx, ctx.p.gain), curves={"acc": [1, 2, 3] if ctx.arm == "ours" else [1, 1, 2]})


def finish_pass(ctx, out):
    out.info.update({"curve_axes": {"acc": {"xlabel": "width", "x": [8, 16, 32]}},
                     "images": {"recon": {"original": [[[0.0, 1.0], [1.0, 0.0]]] * 3,
                                          "ours": [[[0.1, 0.9], [0.8, 0.2]]] * 2},
                                "u(x, t): a/b": {"ours": [[[0.5, 0.5], [0.5, 0.5]]]}}})


def arm_fail(ctx):
    return ArmResult(_arm_metrics(ctx, 0.5))


def arm_gate(ctx):
    if ctx.seed >= int(os.environ.get("GRADKIT_FAKE_GATE_FROM", "2")) and ctx.arm == "ours":
        gate = Path(os.environ["GRADKIT_FAKE_GATE"])
        _wait_for(gate.exists)
    return ArmResult(_arm_metrics(ctx, ctx.p.gain))


def arm_barrier(ctx):
    if ctx.arm == "ours":
        folder = Path(os.environ["GRADKIT_FAKE_BARRIER"])
        n = int(os.environ.get("GRADKIT_FAKE_BARRIER_N", "2"))
        (folder / f"{os.getpid()}").touch()
        _wait_for(lambda: len(list(folder.iterdir())) >= n)
    return ArmResult(_arm_metrics(ctx, ctx.p.gain))


def arm_crash(ctx):
    raise RuntimeError("boom")


def arm_ceiling(ctx):
    return ArmResult({"acc": 100.0 if ctx.arm == "ours" else 99.8})


for slug, fn, crit in (
        ("fake-pass", arm_pass, Gain("acc", "ours", "base", 2.0)),
        ("fake-fail", arm_fail, Gain("acc", "ours", "base", 2.0)),
        ("fake-gate", arm_gate, Gain("acc", "ours", "base", 2.0)),
        ("fake-barrier", arm_barrier, Gain("acc", "ours", "base", 2.0)),
        ("fake-crash", arm_crash, Gain("acc", "ours", "base", 2.0)),
        # non-inferiority alone: the baseline standing in for ours passes it too -> INCONCLUSIVE
        ("fake-control", arm_pass, Drop("acc", "ours", "base", 1.0)),
        # ours beats base, but both sit at the 100% ceiling -> INCONCLUSIVE
        ("fake-ceiling", arm_ceiling, Gain("acc", "ours", "base", 0.1))):
    register(Claim(slug=slug, title=f"Fake {slug}", arxiv="0000.00000", statement="ours beats base by 2",
                   paper_figure="+2", criterion=crit, protocol=FakeProtocol, data="fake",
                   arms={"base": fn, "ours": fn}, finish=finish_pass if fn is arm_pass else None,
                   primary=Primary("acc", "ours", "base", "%", ceiling=100.0), plots=("acc",) if fn is arm_pass else (),
                   threads=None, scale_note="a wider model would settle it" if slug == "fake-fail" else ""))
