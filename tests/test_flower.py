"""The Flower path (paper slug hyperfl): validating FedAvg strategy, client/server apps, a real loopback run.

Skips cleanly when Flower is not installed (``pip install gradkit[flower]``).
"""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'gradkit[flower]'")

from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType, Metadata, \
    MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from gradkit.distributed.flower import (DEFAULT_RUN_CONFIG, GradkitFedAvg, InversionObserver, check_update,  # noqa: E402
                                        check_weight, load_partition, make_model, record_to_tensors,
                                        run_config, tensors_to_record, update_to_gradients, write_app)
from gradkit.distributed.flower import client_app, server_app  # noqa: E402
from gradkit.distributed.flower.client_app import corrupt_update  # noqa: E402
from gradkit.distributed.flower.task import _digits, load_private_state, private_state  # noqa: E402
from gradkit.engine import cpu_threads  # noqa: E402
from gradkit.privacy import reconstruction_metrics  # noqa: E402


def ref_state():
    return {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.zeros(3),
            "n": torch.tensor(4, dtype=torch.int64)}


# ------------------------------------------------------------------------------------------ validation
def test_check_update_accepts_a_well_formed_update():
    ref = ref_state()
    assert check_update({k: v + 1 for k, v in ref.items()}, ref) is None
    assert check_update({k: v.numpy() for k, v in ref.items()}, ref) is None  # numpy arrays as well


@pytest.mark.parametrize("edit, fragment", [
    (lambda u: u.pop("b"), "missing keys ['b']"),
    (lambda u: u.update(extra=torch.zeros(1)), "unexpected keys ['extra']"),
    (lambda u: u.update(w=torch.zeros(3, 2)), "'w' has shape (3, 2), expected (2, 3)"),
    (lambda u: u.update(w=torch.zeros(2, 3, dtype=torch.float64)), "'w' has dtype torch.float64"),
    (lambda u: u["w"].view(-1).__setitem__(1, float("nan")), "'w' has 1 non-finite value"),
    (lambda u: u["b"].fill_(float("inf")), "'b' has 3 non-finite values"),
    (lambda u: u.update(w=torch.zeros(2, 3, dtype=torch.int64)), "'w' has dtype torch.int64"),
    (lambda u: u.update(w="not an array"), "'w': expected a torch.Tensor or numpy.ndarray"),
])
def test_check_update_names_what_is_wrong(edit, fragment):
    upd = {k: v.clone() for k, v in ref_state().items()}
    edit(upd)
    reason = check_update(upd, ref_state())
    assert reason is not None and fragment in reason, reason


def test_check_update_dtype_check_can_be_relaxed_but_not_for_nan():
    upd = {k: v.double() if v.is_floating_point() else v for k, v in ref_state().items()}
    assert check_update(upd, ref_state(), check_dtype=False) is None
    upd["w"][0, 0] = float("nan")
    assert "non-finite" in check_update(upd, ref_state(), check_dtype=False)
    assert "not a mapping" in check_update([1, 2], ref_state())


@pytest.mark.parametrize("w, ok", [(3, True), (2.5, True), (0, False), (-1, False), (float("nan"), False),
                                   (float("inf"), False), (True, False), ("5", False)])
def test_check_weight(w, ok):
    assert (check_weight(w) is None) is ok


# ------------------------------------------------------------------------------------------ strategy, in-process
def _meta(src: int, message_type: str = MessageType.TRAIN) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{src}", src_node_id=src, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type=message_type)


def _reply(src: int, arrays=None, n=10, metrics_extra=None, record=None) -> Message:
    content = RecordDict()
    if record is not None:
        content["arrays"] = record
    elif arrays is not None:
        content["arrays"] = tensors_to_record(arrays)
    if n is not None:
        content["metrics"] = MetricRecord({"num-examples": n, **(metrics_extra or {"train_loss": 1.0})})
    return Message(metadata=_meta(src), content=content)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def flwr_log():
    handler, logger = _Capture(), logging.getLogger("flwr")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def test_strategy_rejects_malformed_updates_logs_why_and_averages_the_rest(flwr_log):
    ref = ref_state()
    seen = []
    strat = GradkitFedAvg(on_update=lambda r, cid, arrays, glob: seen.append((r, cid, arrays, glob)))
    strat.set_global(3, tensors_to_record(ref))
    good1 = {k: v + 1 for k, v in ref.items()}
    good2 = {k: v + 3 for k, v in ref.items()}
    nan = {k: v.clone() for k, v in ref.items()}
    nan["b"][1] = float("nan")
    shape = dict(ref, w=torch.zeros(3, 3))
    bad_bytes = ArrayRecord({k: Array(v.numpy()) for k, v in ref.items()})
    bad_bytes["w"] = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"garbage")
    replies = [
        _reply(1, good1, n=30),
        _reply(2, nan),
        _reply(3, shape),
        _reply(4, good2, n=10),
        _reply(5, good1, n=0),
        _reply(6, good1, n=None),
        _reply(7, record=bad_bytes),
        Message(metadata=_meta(8), error=Error(code=1, reason="client crashed")),
    ]
    arrays, metrics = strat.aggregate_train(3, replies)
    out = record_to_tensors(arrays)
    torch.testing.assert_close(out["w"], (30 * good1["w"] + 10 * good2["w"]) / 40)
    torch.testing.assert_close(out["b"], (30 * good1["b"] + 10 * good2["b"]) / 40)
    assert metrics["train_loss"] == pytest.approx(1.0)
    assert strat.accepted == [(3, 1), (3, 4)]
    reasons = {r.client_id: r.reason for r in strat.rejections}
    assert set(reasons) == {2, 3, 5, 6, 7, 8} and all(r.server_round == 3 for r in strat.rejections)
    assert "'b' has 1 non-finite value" in reasons[2]
    assert "'w' has shape (3, 3), expected (2, 3)" in reasons[3]
    assert "'num-examples'" in reasons[5] and "> 0" in reasons[5]
    assert "MetricRecord" in reasons[6]
    assert "undecodable" in reasons[7]
    assert "client crashed" in reasons[8]
    for cid, reason in reasons.items():  # every rejection is logged with its node and reason
        assert any(f"node {cid}" in line and reason in line for line in flwr_log), (cid, flwr_log)
    # the observer saw exactly the accepted updates, with the global arrays they came from
    assert [(r, cid) for r, cid, _, _ in seen] == [(3, 1), (3, 4)]
    torch.testing.assert_close(seen[0][2]["w"], good1["w"])
    torch.testing.assert_close(seen[0][3]["w"], ref["w"])


def test_a_lying_node_cannot_take_over_the_average(flwr_log):
    ref = ref_state()
    honest1 = {k: v + 1 for k, v in ref.items()}
    honest2 = {k: v + 3 for k, v in ref.items()}
    liar = {k: v + 100 for k, v in ref.items()}
    replies = [_reply(1, honest1, n=40), _reply(2, honest2, n=40), _reply(3, liar, n=10**6)]
    uncapped = GradkitFedAvg()
    uncapped.set_global(1, ref)
    w = record_to_tensors(uncapped.aggregate_train(1, replies)[0])["w"]
    assert (w - ref["w"]).min() > 99  # without a bound the liar's update is the new model
    strat = GradkitFedAvg(max_weight=45)
    strat.set_global(1, ref)
    out = record_to_tensors(strat.aggregate_train(1, replies)[0])
    torch.testing.assert_close(out["w"], (40 * honest1["w"] + 40 * honest2["w"] + 45 * liar["w"]) / 125)
    assert strat.capped == [(1, 3, 1e6, 45.0)]
    assert any("node 3 reported" in line and "45" in line for line in flwr_log)
    with pytest.raises(ValueError, match="max_weight"):
        GradkitFedAvg(max_weight=0)


def test_the_weight_cap_is_the_largest_shard():
    from gradkit.distributed.flower import max_shard

    sizes = [len(load_partition(i, 3).y_train) for i in range(3)]
    assert max_shard(3) == max(sizes) and run_config({"max-examples": 50})["max-examples"] == 50
    with pytest.raises(ValueError, match="max-examples"):
        run_config({"max-examples": -1})


def test_strategy_all_rejected_gives_no_new_model_and_observer_errors_do_not_stop_it(flwr_log):
    ref = ref_state()
    strat = GradkitFedAvg(on_update=lambda *a: 1 / 0)
    strat.set_global(1, ref)
    arrays, metrics = strat.aggregate_train(1, [_reply(1, dict(ref, w=torch.full((2, 3), float("inf"))))])
    assert arrays is None and metrics is None and len(strat.rejections) == 1
    arrays, _ = strat.aggregate_train(2, [_reply(2, ref)])
    assert arrays is not None and len(strat.observer_errors) == 1
    assert "ZeroDivisionError" in strat.observer_errors[0][2]
    assert any("on_update failed" in line for line in flwr_log)


def test_strategy_errors():
    with pytest.raises(TypeError, match="on_update must be callable"):
        GradkitFedAvg(on_update=3)
    with pytest.raises(RuntimeError, match="no global arrays"):
        GradkitFedAvg().aggregate_train(1, [_reply(1, ref_state())])


def test_strategy_evaluate_ignores_malformed_metrics():
    strat = GradkitFedAvg()
    ok = Message(metadata=_meta(1, MessageType.EVALUATE),
                 content=RecordDict({"metrics": MetricRecord({"accuracy": 80.0, "num-examples": 30})}))
    ok2 = Message(metadata=_meta(2, MessageType.EVALUATE),
                  content=RecordDict({"metrics": MetricRecord({"accuracy": 40.0, "num-examples": 10})}))
    nan = Message(metadata=_meta(3, MessageType.EVALUATE),
                  content=RecordDict({"metrics": MetricRecord({"accuracy": float("nan"), "num-examples": 10})}))
    noweight = Message(metadata=_meta(4, MessageType.EVALUATE),
                       content=RecordDict({"metrics": MetricRecord({"accuracy": 10.0})}))
    out = strat.aggregate_evaluate(1, [ok, ok2, nan, noweight])
    assert out["accuracy"] == pytest.approx(70.0)
    assert strat.aggregate_evaluate(1, [nan]) is None


# ------------------------------------------------------------------------------------------ task and apps
def test_partitions_are_disjoint_images_that_cover_the_digits():
    parts = [load_partition(i, 3) for i in range(3)]
    xs = torch.cat([torch.cat([p.x_train, p.x_test]) for p in parts]).flatten(1)
    assert xs.shape == (1797, 64) and 0.0 <= xs.min() and xs.max() <= 1.0
    full = torch.from_numpy(_digits()[0]).flatten(1)
    assert sorted(map(tuple, xs.tolist())) == sorted(map(tuple, full.tolist()))  # a partition of the data set
    assert sum(p.n_train + len(p.y_test) for p in parts) == 1797
    with pytest.raises(ValueError, match="partition_id must be an int in"):
        load_partition(3, 3)
    with pytest.raises(ValueError, match="num_partitions must be a positive int"):
        load_partition(0, 0)


def test_models_share_what_the_method_says():
    fed = make_model("fedavg")
    assert set(fed.shared_state()) == set(fed.model.state_dict()) and private_state(fed) == {}
    hyp = make_model("hyperfl")
    shared = set(hyp.shared_state())
    assert shared and all(k.startswith("hypernet.") for k in shared)
    priv = private_state(hyp)
    assert {"embedding.weight", "head.weight", "head.bias"} <= set(priv) and not shared & set(priv)
    torch.testing.assert_close(make_model("fedavg", seed=0).shared_state()["1.weight"], fed.shared_state()["1.weight"])
    with pytest.raises(ValueError, match="method must be one of"):
        make_model("fedprox")
    with pytest.raises(KeyError, match="private state keys"):
        load_private_state(hyp, {"nope": torch.zeros(1)})


def test_run_config_and_app_folder(tmp_path):
    from flwr.common.config import validate_config
    import tomllib

    cfg = run_config({"num-server-rounds": 5, "lr": 1})
    assert cfg["num-server-rounds"] == 5 and cfg["lr"] == 1.0 and cfg["method"] == DEFAULT_RUN_CONFIG["method"]
    path = write_app(tmp_path / "app", **{"method": "hyperfl", "result-path": "/tmp/x y.json"})
    conf = tomllib.loads(path.read_text())
    ok, errors, _ = validate_config(conf, check_module=True, project_dir=path.parent)
    assert ok, errors
    assert conf["tool"]["flwr"]["app"]["config"]["method"] == "hyperfl"
    assert conf["tool"]["flwr"]["app"]["config"]["result-path"] == "/tmp/x y.json"
    for bad, match in [({"rounds": 3}, "unknown run-config key 'rounds'"),
                       ({"num-server-rounds": 0}, "'num-server-rounds' must be >= 1"),
                       ({"num-server-rounds": 2.5}, "must be a int"),
                       ({"method": "fedsgd"}, "'method' must be 'fedavg' or 'hyperfl'"),
                       ({"lr": float("nan")}, "'lr' must be a float"),
                       ({"momentum": 1.0}, "'momentum' must be in"),
                       ({"fraction-evaluate": 2.0}, "'fraction-evaluate' must be in")]:
        with pytest.raises(ValueError, match=match):
            run_config(bad)
    with pytest.raises(ValueError, match="name must be"):
        write_app(tmp_path / "b", name="bad name")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="must be a folder"):
        write_app(tmp_path / "file")


@pytest.mark.parametrize("mode, fragment", [("nan", "non-finite"), ("inf", "non-finite"), ("shape", "has shape"),
                                            ("missing", "missing keys"), ("dtype", "has dtype")])
def test_every_corruption_is_caught_by_the_server(mode, fragment):
    ref = make_model("fedavg").shared_state()
    assert fragment in check_update(corrupt_update(ref, mode), ref)
    assert check_update(corrupt_update(ref, "none"), ref) is None
    with pytest.raises(ValueError, match="corrupt must be one of"):
        corrupt_update(ref, "zero")


# -------- an in-process federation: the real ServerApp main and ClientApp, a grid that calls the clients directly
class LocalGrid:
    """Delivers the strategy's messages to the ClientApp in this process (no SuperLink, no Ray)."""

    def __init__(self, node_configs, run_config_):
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=nc, state=RecordDict(),
                                      run_config=run_config_) for nid, nc in node_configs.items()}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"msg-{len(out)}"
            out.append(client_app.app(m, self.contexts[m.metadata.dst_node_id]))
        return out


@pytest.fixture
def task_identity():
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = saved


@pytest.mark.parametrize("method", ["fedavg", "hyperfl"])
def test_in_process_federation_with_a_corrupt_client(method, task_identity, tmp_path, flwr_log):
    result = tmp_path / "summary.json"
    cfg = dict(run_config({"num-server-rounds": 2, "method": method, "result-path": str(result),
                           "lr": 0.1 if method == "fedavg" else 0.02}))
    grid = LocalGrid({11: {"partition-id": 0, "num-partitions": 3},
                      12: {"partition-id": 1, "num-partitions": 3},
                      13: {"partition-id": 2, "num-partitions": 3, "corrupt": "shape"}}, cfg)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    server_app.main(grid, ctx)
    s = json.loads(result.read_text())
    assert [(r["round"], r["client_id"]) for r in s["rejections"]] == [(1, 13), (2, 13)]
    assert all("has shape" in r["reason"] for r in s["rejections"])
    assert sorted(map(tuple, s["accepted"])) == [(1, 11), (1, 12), (2, 11), (2, 12)]
    assert s["final_finite"] and set(s["evaluate_metrics"]) == {"1", "2"}
    assert all(0 <= m["accuracy"] <= 100 for m in s["evaluate_metrics"].values())
    assert any("rejected the update of node 13" in line for line in flwr_log)
    if method == "hyperfl":  # only phi went on the wire; v and psi stayed in the clients' state
        assert s["final_keys"] and all(k.startswith("hypernet.") for k in s["final_keys"])
        assert "gradkit-private" in grid.contexts[11].state
        emb = [record_to_tensors(grid.contexts[n].state["gradkit-private"])["embedding.weight"] for n in (11, 12)]
        assert not torch.equal(emb[0], emb[1])  # private per client
    else:
        assert s["final_keys"] == sorted(make_model("fedavg").shared_state())
        assert s["evaluate_metrics"]["2"]["accuracy"] > 30.0  # learns on the two good shards


# ------------------------------------------------------------------------------------------ honest-but-curious server
def test_inversion_observer_reconstructs_a_one_step_fedavg_update():
    model = make_model("fedavg", seed=0)
    data = load_partition(0, 2)
    x, y = data.x_train[3:4], data.y_train[3:4]
    before, lr = model.shared_state(), 0.05
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    after = model.shared_state()
    with cpu_threads(1):
        spy = InversionObserver(make_model("fedavg", seed=0), (1, 8, 8), lr=lr, iters=150)
        strat = GradkitFedAvg(on_update=spy)
        strat.set_global(1, before)
        strat.aggregate_train(1, [_reply(5, after)])
    (rec,) = spy.results
    assert (rec.server_round, rec.client_id) == (1, 5) and torch.equal(rec.labels, y)
    assert reconstruction_metrics(x, rec.x)["psnr"] > 25.0  # a single-step FedAvg update leaks the image
    grads = update_to_gradients(spy.model, after, before, lr)
    torch.testing.assert_close(grads[0], torch.autograd.grad(
        torch.nn.functional.cross_entropy(spy.model(x), y), next(spy.model.parameters()))[0], atol=1e-4, rtol=1e-3)


def test_inversion_observer_errors():
    m = make_model("fedavg")
    for kwargs, match in [(dict(input_shape=(), lr=0.1), "input_shape must be"),
                          (dict(input_shape=(1, 8, 8), lr=0.0), "lr must be > 0"),
                          (dict(input_shape=(1, 8, 8), lr=0.1, steps=0), "steps must be a positive int"),
                          (dict(input_shape=(1, 8, 8), lr=0.1, num_images=0), "num_images must be"),
                          (dict(input_shape=(1, 8, 8), lr=0.1, iters=0), "iters must be a positive int"),
                          (dict(input_shape=(1, 8, 8), lr=0.1, labels=torch.tensor([0.5])), "labels must be")]:
        with pytest.raises(ValueError, match=match):
            InversionObserver(m, **kwargs)
    with pytest.raises(KeyError, match="not in the shared update"):
        update_to_gradients(m.model, {}, {}, 0.1)


# ------------------------------------------------------------------------------------------ the real thing
BIN = Path(sys.executable).parent
HANG_GUARD_S = 180.0  # only against a hung Flower process, never a timing assertion


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pids):
    """Every live descendant of ``pids`` (Linux /proc walk; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stop(procs):
    """Terminate the process groups we started and every process they spawned (also detached ones)."""
    own = os.getpgrp()
    victims = [p.pid for p in procs] + _descendants([p.pid for p in procs])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in victims:
            try:
                pg = os.getpgid(pid)
                if pg != own:
                    os.killpg(pg, sig)
                else:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + 5
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        if all(p.poll() is not None for p in procs) and not _descendants([p.pid for p in procs]):
            alive = [pid for pid in victims if Path(f"/proc/{pid}").exists()]
            if not alive:
                break


class _Loopback:
    """A Flower deployment on 127.0.0.1 in ``folder``: its own FLWR_HOME with a connection named "local",
    a written app, process logs, and a teardown that kills every process group it started."""

    def __init__(self, folder: Path, connection: str, **app_config):
        self.folder, self.t0 = folder, time.time()
        home = folder / "flwr_home"
        home.mkdir()
        self.port = _free_port()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                          f'address = "127.0.0.1:{self.port}"\n{connection}\n')
        self.summary, self.app_dir = folder / "summary.json", folder / "app"
        write_app(self.app_dir, **{"num-server-rounds": 2, "result-path": str(self.summary),
                                   "fraction-evaluate": 0.0, "round-timeout": 90.0, **app_config})
        load_partition(0, 2)  # writes the digits cache that the client processes read
        self.env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2")
        self.procs, self.logs = [], {}

    def start(self, name, args):
        self.logs[name] = open(self.folder / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(args, stdout=self.logs[name], stderr=subprocess.STDOUT, env=self.env,
                                           cwd=self.folder, start_new_session=True))

    def log(self, name) -> str:
        return (self.folder / f"{name}.log").read_text()

    def tails(self) -> str:
        return "\n".join(f"--- {n}\n" + self.log(n)[-3000:] for n in self.logs)

    def flwr(self, *args):
        left = max(10.0, HANG_GUARD_S - (time.time() - self.t0))
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.folder, capture_output=True,
                              text=True, timeout=left)

    def close(self):
        _stop(self.procs)
        for f in self.logs.values():
            f.close()
        assert all(p.poll() is not None for p in self.procs)


def _tls_material(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost, signed by it (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("gradkit test CA")).issuer_name(name("gradkit test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def _node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 authentication key pair in OpenSSH format."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / f"{name}_key", folder / f"{name}_key.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return priv, pub


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="process groups (start_new_session, killpg) are POSIX")
@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flower-superlink is not installed next to python")
def test_tls_authenticated_loopback_refuses_strangers_and_bounds_a_liar(tmp_path):
    """TLS SuperLink with SuperNode authentication: two registered nodes (one over-reports its examples by
    1000x) and one with an unregistered key; 2 rounds finish with the registered two, the liar capped."""
    from gradkit.distributed.flower import max_shard

    ca, cert, key = _tls_material(tmp_path)
    fed = _Loopback(tmp_path, f'root-certificates = "{ca}"')
    keys = [_node_keys(tmp_path, f"node{i}") for i in range(3)]
    try:
        fed.start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
                            "--ssl-keyfile", str(key), "--enable-supernode-auth", "--host", "127.0.0.1", "--port",
                            str(fed.port), "--database", str(tmp_path / "state.db"),
                            "--disable-runtime-dependency-installation"])
        for i in (0, 1):  # node 2's key is never registered
            while True:  # retry until the SuperLink answers
                r = fed.flwr("supernode", "register", str(keys[i][1]), "local")
                if r.returncode == 0 or time.time() - fed.t0 > HANG_GUARD_S / 3:
                    break
                time.sleep(0.5)
            assert r.returncode == 0, r.stdout + r.stderr + fed.tails()
        for i, extra in enumerate(["", " inflate=1000", ""]):
            fed.start(f"node{i}", [str(BIN / "flower-supernode"), "--root-certificates", str(ca),
                               "--auth-supernode-private-key", str(keys[i][0]),
                               "--superlink", f"127.0.0.1:{fed.port}", "--port", str(_free_port()),
                               "--node-config", f"partition-id={i % 2} num-partitions=2{extra}"])
        r = fed.flwr("run", str(fed.app_dir), "local", "--stream")
        out = r.stdout + r.stderr
        assert r.returncode == 0, out + fed.tails()
        s = json.loads(fed.summary.read_text())
        nodes = {cid for _, cid in s["accepted"]}
        assert len(s["accepted"]) == 4 and len(nodes) == 2 and not s["rejections"], s
        cap = max_shard(2)
        assert [c["round"] for c in s["capped"]] == [1, 2] and {c["used"] for c in s["capped"]} == {cap}, s
        assert all(c["reported"] == 1000 * c["used"] or c["reported"] > 100 * cap for c in s["capped"])
        assert len({c["client_id"] for c in s["capped"]} & nodes) == 1 and s["final_finite"]
        assert "reported" in out and "more than any node holds" in out  # logged in the server's stream
        stranger = fed.log("node2").lower()
        assert "failed to activate supernode" in stranger, fed.tails()  # refused by the SuperLink
        assert all("failed to activate supernode" not in fed.log(f"node{i}").lower()
                   for i in (0, 1))
        print(f"TLS loopback run: {time.time() - fed.t0:.1f} s")  # not asserted (no wall-time tests)
    finally:
        fed.close()


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="process groups (start_new_session, killpg) are POSIX")
@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flower-superlink is not installed next to python")
def test_loopback_superlink_two_supernodes_flwr_run(tmp_path):
    """A real SuperLink and two SuperNodes on 127.0.0.1; node 1 sends NaNs; 2 rounds finish with node 0's update."""
    # no federated evaluation here (the in-process test covers it): each message costs a fresh
    # flwr-clientapp process that imports torch, so 2 rounds x 2 nodes x train = 4 process starts
    fed = _Loopback(tmp_path, "insecure = true", **{"attack-iters": 5})
    try:
        fed.start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                str(fed.port), "--database", str(tmp_path / "state.db"),
                                "--disable-runtime-dependency-installation"])
        for i, extra in enumerate(["", ' corrupt="nan"']):
            fed.start(f"node{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                   f"127.0.0.1:{fed.port}", "--port", str(_free_port()), "--node-config",
                                   f"partition-id={i} num-partitions=2{extra}"])
        out = None
        while time.time() - fed.t0 < HANG_GUARD_S / 2:  # retry until the SuperLink answers
            r = fed.flwr("run", str(fed.app_dir), "local", "--stream")
            out = r.stdout + r.stderr
            if r.returncode == 0 or "unavailable" not in out.lower():
                break
            time.sleep(0.5)
        assert r.returncode == 0, out + fed.tails()
        assert fed.summary.exists(), out + fed.tails()
        s = json.loads(fed.summary.read_text())
        ids = {tuple(a) for a in s["accepted"]}
        assert {r_["round"] for r_ in s["rejections"]} == {1, 2} and len(s["rejections"]) == 2, s
        assert all("non-finite" in r_["reason"] for r_ in s["rejections"])
        good = {cid for _, cid in ids}
        assert len(ids) == 2 and {rnd for rnd, _ in ids} == {1, 2} and len(good) == 1, s
        assert not good & {r_["client_id"] for r_ in s["rejections"]}
        assert s["final_finite"] and set(s["train_metrics"]) == {"1", "2"}
        assert [a["client_id"] for a in s["attacks"]] == [next(iter(good))] * 2  # the curious server looked
        assert "rejected the update of node" in out and "non-finite" in out  # logged in the server's stream
        print(f"loopback run: {time.time() - fed.t0:.1f} s")  # ~25-45 s on 2 cores; not asserted (no wall-time tests)
    finally:
        fed.close()
