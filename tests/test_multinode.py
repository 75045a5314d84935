"""Training across machines, run here on one (issue 29): two torchrun launches that meet
through a c10d rendezvous as two nodes of one process each (and both against one process
with the whole batch: issue 9's torchrun check), and torchrun's elastic agent
restarting a worker group after one worker is SIGKILLed, the restarted run resuming with
`--resume auto`. Gloo on CPU; the manifests in kubernetes/jobs/ run the same commands.

    .venv/bin/python -m pytest tests/test_multinode.py -q
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ROOT

PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PY), "torchrun")
pytestmark = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="no torchrun beside python")


def train_args(out: Path, *extra: str) -> list[str]:
    # The smoke preset, no drop-path (its random draws differ between ranks' layouts), a
    # global batch of 32 in two processes; one thread each, as several processes share the
    # cores (two spin-waiting threads a process burn several times the CPU on this model).
    return [
        str(ROOT / "source" / "train.py"), "--preset", "smoke", "--tracker", "none",
        "--threads", "1",
        "--drop-path-rate", "0", "--epochs", "1", "--limit-train-batches", "4",
        "--batch-size", "16",
        "--model-path", str(out / "model.pth"), "--results-dir", str(out / "r"),
        "--classes-path", str(out / "classes.txt"), "--runs-dir", str(out / "runs"),
        *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resume_state(out: Path) -> dict:
    return torch.load(out / "model.resume.pth", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    """The same two-epoch training run laid out three ways, side by side (one start-up's
    wall time instead of three): `single`, one process with the global batch of 32 (this
    one, while the launches start up: an interpreter start fewer); `one-node`, torchrun with
    two processes of 16 on one node; `two-nodes`, two torchrun launches of one process each
    that meet through a c10d rendezvous, sharing one output folder as pods share the
    ReadWriteMany volume. Each launch's log is its folder's .log."""
    import train

    tmp = tmp_path_factory.mktemp("layouts")
    epochs = ("--epochs", "2")
    port = free_port()
    commands = {
        "one-node": [TORCHRUN, "--standalone", "--nproc-per-node", "2",
                     *train_args(tmp / "one-node", *epochs)],
        **{
            f"two-nodes-{rank}": [
                TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", "two-nodes", *train_args(tmp / "two-nodes", *epochs),
            ]
            for rank in (0, 1)
        },
    }  # fmt: skip
    procs = {}
    for name, cmd in commands.items():
        with open(tmp / f"{name}.log", "w") as sink:  # files: no pipe fills up and blocks
            procs[name] = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
    previous = signal.getsignal(signal.SIGTERM)  # train.main installs its own
    try:
        single = train_args(tmp / "single", *epochs, "--batch-size", "32")[1:]
        assert train.main(single) == 0
        for name, proc in procs.items():
            proc.wait(timeout=300)
            assert proc.returncode == 0, (tmp / f"{name}.log").read_text()[-3000:]
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return tmp


@pytest.mark.slow
def test_two_nodes_match_one_node_with_two_processes(layouts):
    a, b = resume_state(layouts / "one-node"), resume_state(layouts / "two-nodes")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 8)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        # The same ranks, shards and Gloo all-reduce whether the processes share a node.
        assert torch.equal(a["model"][key], b["model"][key]), key
    model = torch.load(layouts / "two-nodes" / "model.pth", map_location="cpu", weights_only=True)
    assert model["state_dict"].keys() == a["model"].keys()


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(layouts):
    """Two processes of 16 (torchrun --standalone) train as one process of 32 does: the same
    steps and, up to the order of float sums, the same weights and validation accuracy."""
    a, b = resume_state(layouts / "single"), resume_state(layouts / "one-node")
    assert a["step"] == b["step"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-4, rtol=1e-4)
    assert a["history"][-1]["val_accuracy"] == pytest.approx(
        b["history"][-1]["val_accuracy"], abs=0.01
    )


def workers(agent: psutil.Process) -> dict[int, psutil.Process]:
    """torchrun's worker processes by LOCAL_RANK."""
    found = {}
    for child in agent.children(recursive=True):
        try:
            rank = child.environ().get("LOCAL_RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "train.py" in " ".join(child.cmdline()):
            found[int(rank)] = child
    return found


@pytest.mark.slow
def test_killed_worker_restarts_and_resumes_from_the_last_save(tmp_path):
    out = tmp_path / "run"
    # --save-every-minutes 0: a resume state after every step, so the restart loses none.
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           *train_args(out, "--limit-train-batches", "12", "--resume", "auto",
                       "--save-every-minutes", "0")]  # fmt: skip
    log = tmp_path / "torchrun.log"
    with open(log, "w") as sink:
        agent = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and agent.poll() is None:
            if (out / "model.resume.pth").exists():
                state = resume_state(out)
                if state["epoch"] == 0 and 2 <= state["batch"] <= 8:
                    break  # mid-epoch, with steps left in it
            time.sleep(0.05)
        else:
            pytest.fail(f"no mid-epoch resume state:\n{log.read_text()[-3000:]}")
        killed_at = (state["epoch"], state["batch"])
        victim = workers(psutil.Process(agent.pid))[1]
        victim.send_signal(signal.SIGKILL)
        agent.wait(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    text = log.read_text()
    assert agent.returncode == 0, text[-3000:]
    assert "exitcode: -9" in text, text[-3000:]  # torchrun saw the SIGKILL
    resumed = [ln for ln in text.splitlines() if ln.startswith("resumed ")]
    assert len(resumed) == 1, text[-3000:]  # the first start had no state: it started fresh
    epoch, batch = _epoch_batch(resumed[0])
    assert (epoch - 1, batch) >= killed_at, (resumed[0], killed_at)  # nothing older
    final = resume_state(out)
    assert (final["epoch"], final["batch"]) == (1, 0) and final["step"] == 12
    model = torch.load(out / "model.pth", map_location="cpu", weights_only=True)
    for key in ("state_dict", "config", "classes", "preprocessing"):
        assert key in model, key
    assert model["state_dict"].keys() == final["model"].keys()
    assert all(torch.isfinite(t).all() for t in model["state_dict"].values())


def _epoch_batch(line: str) -> tuple[int, int]:
    """(epoch, batch) from train.py's `resumed <file>: epoch E, batch B, step S`."""
    tail = line.rsplit(": ", 1)[1]
    parts = dict(p.strip().split(" ") for p in tail.split(","))
    return int(parts["epoch"]), int(parts["batch"])
