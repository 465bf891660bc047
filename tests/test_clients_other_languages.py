"""The Node and Go clients against the real services on loopback.

Each client is built by its own toolchain from protos/ (Node loads them at run
time, Go generates code at build time) and runs its example as a subprocess:
inspect, prepare, upload, Train with streamed loss, and a final JSON summary
line that these tests check against what the Python stubs see on the servers.

The toolchains are installed when missing (``npm ci``; Debian packages through
scripts/install-system-deps.sh). Where that is impossible the tests skip, or
fail when MLXTUNE_REQUIRE_PEERS=1 (CI sets it, so a peer never silently drops out).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_helpers import counting_records, jsonl

from mlxtune.common.v1 import checkpoint_pb2 as common
from mlxtune.peft.v1 import peft_service_pb2 as ppb
from mlxtune.peft.v1 import peft_service_pb2_grpc
from mlxtune.testing.random_models import tiny_config, write_hf_model
from mlxtune.testing.services import start_peft, start_trainer
from mlxtune.trainer.v1 import trainer_service_pb2 as tpb
from mlxtune.trainer.v1 import trainer_service_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
NODE_DIR = REPO / "clients" / "node"
GO_DIR = REPO / "clients" / "go"
GOCODE = Path("/usr/share/gocode/src")  # Debian's GOPATH root of Go library sources
STEPS = 4
MODEL = "tiny-llama"
CHECKPOINT_NAME = re.compile(r"^checkpoints/[A-Za-z0-9][A-Za-z0-9-]*$")
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss (\S+)$")


def peers_unavailable(reason: str):
    if os.environ.get("MLXTUNE_REQUIRE_PEERS") == "1":
        pytest.fail(f"{reason} (MLXTUNE_REQUIRE_PEERS=1)")
    pytest.skip(reason)


def run(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


_apt = threading.Lock()  # the builds run in parallel; dpkg takes one installer at a time


def install_system_deps() -> None:
    """The repository's installer: a no-op when every package is there."""
    with _apt:
        result = run([str(REPO / "scripts" / "install-system-deps.sh")], REPO, timeout=600)
    if result.returncode != 0:
        peers_unavailable("Debian packages missing and not installable:\n"
                          + result.stdout[-2000:] + result.stderr[-2000:])


def build_node() -> list[str]:
    if not (shutil.which("node") and shutil.which("npm")):
        install_system_deps()
        if not (shutil.which("node") and shutil.which("npm")):
            peers_unavailable("node and npm are not installed")
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        result = run(["npm", "ci", "--no-audit", "--no-fund"], NODE_DIR, timeout=300)
        if result.returncode != 0:
            peers_unavailable(f"npm ci failed:\n{result.stderr[-2000:]}")
    return ["node", str(NODE_DIR / "example.js")]


def go_toolchain_missing() -> list[str]:
    """What build.sh needs from Debian, by what each package installs."""
    found = {"golang-go": shutil.which("go"), "protobuf-compiler": shutil.which("protoc"),
             "protoc-gen-go-1-3": shutil.which("protoc-gen-go"),
             "golang-google-grpc-dev": (GOCODE / "google.golang.org" / "grpc").is_dir()}
    return [package for package, there in found.items() if not there]


def build_go() -> list[str]:
    # Only when something is missing: the installer also wants packages (e.g.
    # Prometheus) that a machine without root may lack, and Go does not need.
    if go_toolchain_missing():
        install_system_deps()
        if missing := go_toolchain_missing():
            peers_unavailable(f"not installed: {', '.join(missing)}")
    # The tools are there, so a failing build is a bug in the client or the protos.
    result = run([str(GO_DIR / "build.sh")], GO_DIR, timeout=300)
    assert result.returncode == 0, f"Go build failed:\n{result.stdout}\n{result.stderr}"
    return [str(GO_DIR / "bin" / "mlxtune-example")]


@pytest.fixture(scope="module")
def builds():
    """Both clients build in the background while the services start
    (a cold Go build and a model load each take tens of seconds on 2 cores).
    A skip or failure inside a build is re-raised by result()."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {"node": pool.submit(build_node), "go": pool.submit(build_go)}


@pytest.fixture(scope="module")
def servers(builds, tmp_path_factory):
    """Both services on loopback over a models dir holding one tiny random llama.
    (Takes `builds` only to start them first.) The trainer runs two jobs at
    once so both examples train together."""
    root = tmp_path_factory.mktemp("clients")
    write_hf_model(root / "models" / MODEL, tiny_config("llama"), seed=1)
    peft = start_peft(root / "store", root / "models", root / "logs")
    try:
        trainer = start_trainer(root / "store", root / "logs", ["--max-concurrent-jobs", "2"])
    except BaseException:
        peft.stop()
        raise
    peft_channel = grpc.insecure_channel(peft.address)
    trainer_channel = grpc.insecure_channel(trainer.address)
    yield SimpleNamespace(
        peft=peft, trainer=trainer,
        peft_stub=peft_service_pb2_grpc.PeftServiceStub(peft_channel),
        trainer_stub=trainer_service_pb2_grpc.TrainerServiceStub(trainer_channel))
    peft_channel.close()
    trainer_channel.close()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda service: service.stop(), (peft, trainer)))


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clients") / "counting.jsonl"
    path.write_bytes(jsonl(counting_records()))
    return path


@pytest.fixture(scope="module")
def client_runs(builds, servers, dataset_file):
    """Both examples run at once, each as soon as it is built:
    language -> future of (stdout lines, parsed summary)."""

    def run_example(language: str) -> tuple[list[str], dict]:
        command = builds[language].result() + [
            "--peft", servers.peft.address, "--trainer", servers.trainer.address,
            "--model", MODEL, "--dataset", str(dataset_file), "--steps", str(STEPS)]
        result = run(command, REPO, timeout=120)
        output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        assert result.returncode == 0, f"{language} example failed\n{output}"
        lines = result.stdout.strip().splitlines()
        return lines, json.loads(lines[-1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {language: pool.submit(run_example, language) for language in builds}


def get_checkpoint(servers, name: str) -> common.Checkpoint:
    return servers.peft_stub.GetCheckpoint(ppb.GetCheckpointRequest(name=name)).checkpoint


@pytest.mark.parametrize("language", ["node", "go"])
def test_example_trains_and_streams_loss(language, client_runs, servers):
    lines, summary = client_runs[language].result()
    print("\n".join(lines))  # shown when the test fails (or with -rP)

    assert CHECKPOINT_NAME.match(summary["checkpoint"]), summary
    prepared = get_checkpoint(servers, summary["checkpoint"])
    assert prepared.origin == common.CHECKPOINT_ORIGIN_PREPARED
    assert prepared.adapter_config.rank == 8
    assert any(line.endswith(prepared.parameters.summary) for line in lines), lines

    # One printed line and one counted event per optimizer step, in order.
    steps = [STEP_LINE.match(line) for line in lines if line.startswith("step ")]
    assert [(int(m[1]), int(m[2])) for m in steps] == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert summary["step_events"] == STEPS == summary["total_steps"]
    for loss in (summary["first_loss"], summary["last_loss"]):
        assert loss is not None and math.isfinite(loss) and loss > 0, summary
    assert summary["eval_events"] >= 1  # validation runs at the end of every job

    assert summary["final_state"] == "JOB_STATE_SUCCEEDED"
    job = servers.trainer_stub.GetTrainingJob(
        tpb.GetTrainingJobRequest(name=summary["job"])).training_job
    assert job.state == tpb.JOB_STATE_SUCCEEDED
    assert job.output_checkpoint == summary["output_checkpoint"]
    trained = get_checkpoint(servers, summary["output_checkpoint"])
    assert trained.origin == common.CHECKPOINT_ORIGIN_TRAINED
    assert (trained.parent, trained.job, trained.step) == (prepared.name, job.name, STEPS)


def test_node_and_go_send_the_same_requests(client_runs):
    """Same flags, same wire messages: the same prepared checkpoint (names are
    derived from model and config) and the same deterministic losses. A field
    that one language failed to set, e.g. a proto3 optional, shows up here."""
    node, go = client_runs["node"].result()[1], client_runs["go"].result()[1]
    assert node["checkpoint"] == go["checkpoint"]
    assert node["dataset"] == go["dataset"]
    assert node["job"] != go["job"]
    assert go["first_loss"] == pytest.approx(node["first_loss"], rel=1e-5)
    assert go["last_loss"] == pytest.approx(node["last_loss"], rel=1e-5)
