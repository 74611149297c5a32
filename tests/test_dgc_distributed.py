"""Real multi-process tests of the DGC DDP communication hook (paper slug: dgc): 2 gloo processes on CPU."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradkit.data import load_digits_split
from gradkit.distributed.dgc import DGCCompressor
from gradkit.distributed.dgc_hook import DGCHookError, DGCHookState, DGCState, dgc_comm_hook, dgc_hook
from gradkit.distributed.launch import WorkerError, run_workers
from gradkit.distributed.simulate import CompressorAggregator, DataParallelSimulator
from gradkit.distributed.train_dgc import TrainConfig, build_model, make_compressor, rank_batches, train
from gradkit.engine import fit, seed_everything

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def simulate(cfg: TrainConfig, world_size: int) -> nn.Module:
    """The single-process simulator in flat (whole-bucket) mode, on the ranks' exact batch streams."""
    split = load_digits_split()
    seed_everything(cfg.seed)
    model = build_model(split.num_features, cfg.hidden, split.num_classes).to(torch.float64)
    agg = CompressorAggregator([make_compressor(cfg, world_size) for _ in range(world_size)], mode="flat")
    sim = DataParallelSimulator(model, agg, world_size)
    loaders = [rank_batches(cfg, split.x_train.double(), split.y_train, r, world_size) for r in range(world_size)]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.0)
    fit(model, opt, lambda e: zip(*[ld(e) for ld in loaders]), epochs=cfg.epochs, compute_loss=sim.compute_loss,
        before_step=sim.before_step, on_epoch_start=sim.set_epoch)
    model.ratio = agg.compression_ratio()
    return model


def test_ddp_hook_reproduces_the_simulator_exactly():
    # warm-up over epoch 0 (density 0.25 -> 0.01): set_epoch reaches every rank; iteration 0's bucket rebuild
    # must not misalign the per-parameter residuals
    cfg = TrainConfig(epochs=2, density=0.01, dtype="float64", shuffle=False, steps_per_epoch=20, warmup="paper",
                      warmup_epochs=1, quiet=True)
    res = run_workers(train, 2, cfg, load_digits_split(), timeout=90)
    ref = simulate(cfg, 2)
    assert res[0]["steps"] == 40 and res[1]["steps"] == 40
    for name, p in ref.named_parameters():
        assert torch.equal(res[0]["params"][name], p.detach()), name  # bit-equal to the simulator
        assert torch.equal(res[0]["params"][name], res[1]["params"][name])  # ranks stay in sync
    assert res[0]["ratio"] == pytest.approx(ref.ratio)
    assert res[0]["ratio_steady"] > 20.0
    # overhead: validation headers (iteration 0 and the density change) + a 1-byte flag per step and padding
    assert 0.99 * res[0]["ratio"] < res[0]["ratio_with_header"] < res[0]["ratio"]


def _bad_input_worker(rank: int, world_size: int) -> list[str]:
    """Four faults, each must raise the same clear error on every rank (nothing garbled is averaged)."""
    seed_everything(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    msgs = []

    def one_step(compressor: DGCCompressor, inputs: torch.Tensor = x) -> None:
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)))
        ddp.register_comm_hook(DGCHookState(compressor, module=ddp), dgc_comm_hook)  # the old names still work
        nn.functional.cross_entropy(ddp(inputs), y).backward()

    cases = {
        "world": DGCCompressor(density=0.1, world_size=3, warmup=None),
        "density": DGCCompressor(density=0.1 if rank == 0 else 0.5, world_size=world_size, warmup=None),
        "malformed": DGCCompressor(density=0.1, world_size=world_size, warmup=None),
    }
    if rank == 1:  # this rank sends an index outside the bucket
        orig = cases["malformed"].compress_group

        def corrupt(keys, grads, clip_scale=1.0, **kw):
            sg = orig(keys, grads, clip_scale, **kw)
            idx = sg.indices.clone()
            idx[0] = sg.numel + 5
            return dataclasses.replace(sg, indices=idx)

        cases["malformed"].compress_group = corrupt
    cases["nan"] = DGCCompressor(density=0.1, world_size=world_size, warmup=None)
    x_nan = x.clone()
    if rank == 1:  # this rank's gradient is NaN: both ranks must refuse before anything is sent
        x_nan[0, 0] = float("nan")
    for name, comp in cases.items():
        try:
            one_step(comp, x_nan if name == "nan" else x)
            msgs.append(f"{name}: no error")
        except Exception as e:  # noqa: BLE001 — the message is what the test checks
            msgs.append(f"{name}: {e}")
        dist.barrier()
    return msgs


def test_hook_fails_loudly_on_every_rank():
    res = run_workers(_bad_input_worker, 2, timeout=90)
    for rank, msgs in enumerate(res):
        assert "compressor.world_size is 3 but the process group has 2" in msgs[0], msgs[0]
        assert "disagree" in msgs[1] and "set_epoch" in msgs[1], msgs[1]
        assert "malformed part from worker 1" in msgs[2] and "outside" in msgs[2], msgs[2]
        assert "rank 1: the gradient of" in msgs[3] and "non-finite entries (NaN/inf)" in msgs[3], msgs[3]
    assert DGCHookError.__mro__[1] is RuntimeError


def _resume_worker(rank: int, world_size: int) -> dict:
    """Train 8 steps; save model + this rank's DGCState after 4; a fresh model/DDP/state loaded from that
    checkpoint must finish with bit-identical parameters (each rank keeps its own residuals)."""
    gen = torch.Generator().manual_seed(100 + rank)
    data = [(torch.randn(8, 10, generator=gen, dtype=torch.float64), torch.randint(0, 4, (8,), generator=gen))
            for _ in range(8)]

    def setup(seed: int):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)).double()
        ddp = nn.parallel.DistributedDataParallel(model)
        state = DGCState(DGCCompressor(density=0.05, momentum=0.9, world_size=world_size, warmup=("paper", 1)),
                         module=ddp)
        ddp.register_comm_hook(state, dgc_hook)
        return model, ddp, state, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.0)

    def train_steps(ddp, state, opt, lo: int, hi: int) -> None:
        for i in range(lo, hi):
            if i % 4 == 0:
                state.set_epoch(i // 4)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(data[i][0]), data[i][1]).backward()
            opt.step()

    model, ddp, state, opt = setup(0)
    train_steps(ddp, state, opt, 0, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "dgc": state.state_dict()}, buf)
    train_steps(ddp, state, opt, 4, 8)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, ddp2, state2, opt2 = setup(1)
    model2.load_state_dict(ckpt["model"])
    state2.load_state_dict(ckpt["dgc"])
    train_steps(ddp2, state2, opt2, 4, 8)
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    return {"same": same, "params": [p.detach().clone() for p in model.parameters()],
            "residual_norm": float(sum(v.norm() for v in state.compressor.v.values()))}


def test_checkpoint_resume_is_bit_identical_on_two_ranks():
    res = run_workers(_resume_worker, 2, timeout=90)
    assert res[0]["same"] and res[1]["same"]
    assert all(torch.equal(p, q) for p, q in zip(res[0]["params"], res[1]["params"]))  # ranks in sync
    assert res[0]["residual_norm"] != res[1]["residual_norm"]   # the per-rank residuals did differ


def _dying_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(3)
    cfg = TrainConfig(epochs=1, steps_per_epoch=3, quiet=True)
    train(rank, world_size, cfg)


def test_a_dying_worker_is_reported():
    with pytest.raises(WorkerError, match="worker 1"):
        run_workers(_dying_worker, 2, timeout=60)


def test_train_script_runs_under_torchrun():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gradkit.distributed.train_dgc", "--epochs", "2", "--steps-per-epoch", "5", "--density", "0.01"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["world_size"] == 2 and out["steps"] == 10 and 0.0 <= out["test_acc"] <= 100.0
    assert out["ratio"] > 1.0
    assert "epoch 2/2" in proc.stdout
