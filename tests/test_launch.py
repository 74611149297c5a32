"""gradkit.distributed.launch.run_workers: real gloo processes, results by rank, loud failures."""
import pytest
import torch

from _dist_workers import all_reduce_scaled, die_on_rank0, raise_on_rank1
from gradkit.distributed.launch import WorkerError, run_workers

pytestmark = pytest.mark.slow


def test_results_come_back_by_rank():
    out = run_workers(all_reduce_scaled, 3, 1.5)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["world"] == 3 and o["threads"] == 1 for o in out)
    for o in out:
        torch.testing.assert_close(o["sum"], torch.tensor([1.5 * 6], dtype=torch.float64))


def test_worker_exception_names_rank_and_traceback():
    with pytest.raises(WorkerError, match="malformed bucket from rank 1") as e:
        run_workers(raise_on_rank1, 2, timeout=30)
    assert e.value.rank == 1


def test_dead_worker_is_reported_not_its_victim():
    with pytest.raises(WorkerError, match="worker 0 exited with code 3") as e:
        run_workers(die_on_rank0, 2, timeout=30)
    assert e.value.rank == 0


@pytest.mark.parametrize("kw", [dict(world_size=0), dict(world_size=True), dict(timeout=0), dict(threads=0)])
def test_bad_arguments(kw):
    args = dict(world_size=2)
    args.update(kw)
    ws = args.pop("world_size")
    with pytest.raises((ValueError, TypeError)):
        run_workers(all_reduce_scaled, ws, 1.0, **args)


def test_fn_must_be_callable():
    with pytest.raises(TypeError, match="callable"):
        run_workers("nope", 2)
