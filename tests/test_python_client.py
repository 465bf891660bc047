"""The Python client and the mlxtune CLI against the real services on loopback.

Connection failures are real ones: a TCP proxy we cut in the middle of a
stream (the job goes on, so the client must resume without losing or
repeating an event), and a trainer killed with SIGKILL and restarted on the
same port and store (the job comes back INTERRUPTED).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from mlxtune_client import Backoff, MlxtuneClient, MlxtuneClientError
from mlxtune_client.cli import main as cli_main

from mlxtune.testing.random_models import tiny_config, write_hf_model
from mlxtune.testing.services import start_peft, start_trainer
from mlxtune.trainer.v1 import trainer_service_pb2 as trainer_pb
from mlxtune.trainer.v1 import trainer_service_pb2_grpc

FAST_BACKOFF = Backoff(initial=0.05, maximum=0.5)
TINY_TRAINING = {"max_steps": 6, "batch_size": 2, "learning_rate": 1e-2, "eval_every_steps": 3,
                 "eval_batches": 1, "save_every_steps": 0}


def _records(n: int = 24) -> bytes:
    lines = [json.dumps({"text": f"record {i}: one two three four five six seven eight nine "
                                 "ten, the quick brown fox jumps over the lazy dog."})
             for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


class Servers:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.store, self.logs, self.models = root / "store", root / "logs", root / "models"
        self.models.mkdir(parents=True)
        with ThreadPoolExecutor(2) as pool:  # servers start while the model is written
            peft = pool.submit(start_peft, self.store, self.models, self.logs)
            trainer = pool.submit(start_trainer, self.store, self.logs)
            write_hf_model(self.models / "tiny-llama", tiny_config("llama"), seed=1)
            self.peft, self.trainer = peft.result(), trainer.result()

    def restart_trainer_killed(self) -> None:
        """SIGKILL the trainer (no goodbye to anyone), then start it again in its place."""
        port = self.trainer.port
        self.trainer.kill()
        self.trainer = start_trainer(self.store, self.logs, port=port)

    def cli(self, *args: str) -> int:
        return cli_main(["--peft", self.peft.address, "--trainer", self.trainer.address, *args])

    def stop(self) -> None:
        with ThreadPoolExecutor(2) as pool:  # each drains for a moment: overlap that
            list(pool.map(lambda service: service.stop(), (self.peft, self.trainer)))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    running = Servers(tmp_path_factory.mktemp("client"))
    yield running
    running.stop()


@pytest.fixture
def client(servers):
    with MlxtuneClient(servers.peft.address, servers.trainer.address, timeout=60,
                       backoff=FAST_BACKOFF, reconnect_timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def checkpoint(servers) -> str:
    with MlxtuneClient(servers.peft.address, servers.trainer.address) as c:
        return c.prepare("tiny-llama", rank=4).checkpoint.name


@pytest.fixture(scope="module")
def dataset(servers) -> str:
    with MlxtuneClient(servers.peft.address, servers.trainer.address) as c:
        return c.upload_dataset(_records(), display_name="records").name


# -- a TCP proxy we can cut ---------------------------------------------------------


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to the trainer; cut() drops every connection
    and refuses new ones for a while, as a restarting mesh sidecar would."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.refuse_until = 0.0
        self.cuts = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return  # closed
            if time.monotonic() < self.refuse_until:
                downstream.close()
                continue
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [downstream, upstream]
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self, refuse_seconds: float) -> None:
        self.refuse_until = time.monotonic() + refuse_seconds
        self.cuts += 1
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut(0)


def _assert_each_event_once(events, after: int = 0) -> None:
    sequences = [e.sequence for e in events]
    assert sequences == list(range(after + 1, after + 1 + len(events))), sequences


@pytest.fixture(scope="module")
def trained(servers, checkpoint, dataset):
    """A job trained while the connection under its event stream was cut."""
    proxy = CuttableProxy(servers.trainer.address)
    try:
        with MlxtuneClient(servers.peft.address, proxy.address, backoff=FAST_BACKOFF,
                           reconnect_timeout=60) as c:
            stream = c.train(checkpoint, dataset, config=TINY_TRAINING)
            events = []
            for event in stream:
                events.append(event)
                if event.HasField("step") and event.step.step == 2 and not proxy.cuts:
                    # The job trains on while nobody listens for a second.
                    proxy.cut(refuse_seconds=1.0)
            return stream, events, proxy.cuts
    finally:
        proxy.close()


# -- tests --------------------------------------------------------------------------


def test_inspect_prepare_get_list_delete(client, checkpoint):
    report = client.inspect("tiny-llama")
    assert report.base_model.architecture == "llama" and report.num_layers == 2
    first = client.prepare("tiny-llama", rank=2, target_modules=["q_proj", "v_proj"],
                           request_id="prepare-q-v")
    again = client.prepare("tiny-llama", rank=2, target_modules=["q_proj", "v_proj"],
                           request_id="prepare-q-v")
    made = first.checkpoint
    assert again.checkpoint.name == made.name
    assert made.adapter_config.rank == 2 and list(made.adapter_config.target_modules) == [
        "q_proj", "v_proj"]
    assert made.parameters.summary.startswith("trainable params: ")
    assert client.get_checkpoint(made.name).name == made.name
    listed = [c.name for c in client.list_checkpoints(page_size=1)]  # one page per checkpoint
    assert len(listed) == len(set(listed)) and {made.name, checkpoint} <= set(listed)
    client.delete_checkpoint(made.name)
    with pytest.raises(MlxtuneClientError) as caught:
        client.get_checkpoint(made.name)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and caught.value.reason


def test_upload_from_a_file_in_several_chunks(client, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(_records(30))
    uploaded = client.upload_dataset(path, chunk_size=512, format="text")
    assert path.stat().st_size > 5 * 512  # so it really travelled in several chunks
    assert uploaded.num_records == 30 and uploaded.display_name == "train.jsonl"
    assert uploaded.format == trainer_pb.DATASET_FORMAT_TEXT
    # The name derives from the content: the same bytes in one chunk give the same dataset.
    assert client.upload_dataset(path.read_bytes()).name == uploaded.name
    assert uploaded.name in {d.name for d in client.list_datasets()}


def test_train_streams_each_event_once_across_a_cut_connection(client, trained):
    stream, events, cuts = trained
    assert cuts == 1 and stream.reconnects >= 1
    _assert_each_event_once(events)
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds.count("step") == TINY_TRAINING["max_steps"]
    assert [e.step.step for e in events if e.HasField("step")] == list(range(1, 7))
    assert events[-1].state_change.state == trainer_pb.JOB_STATE_SUCCEEDED
    assert stream.final_state == trainer_pb.JOB_STATE_SUCCEEDED
    job = client.get_job(stream.job)
    assert job.output_checkpoint and job.last_sequence == events[-1].sequence


def test_watch_survives_the_trainer_being_killed_and_restarted(servers, client, checkpoint,
                                                               dataset):
    job = client.create_job(checkpoint, dataset, config=dict(TINY_TRAINING, max_steps=10_000))
    events, restarter = [], None
    stream = client.watch(job.name)
    for event in stream:
        events.append(event)
        if event.state_change.state == trainer_pb.JOB_STATE_RUNNING and restarter is None:
            # Kill and restart behind the stream's back; the watch must find its way.
            restarter = threading.Thread(target=servers.restart_trainer_killed)
            restarter.start()
    restarter.join()
    assert stream.reconnects >= 1
    _assert_each_event_once(events)
    last = events[-1].state_change
    assert last.state == trainer_pb.JOB_STATE_INTERRUPTED
    assert last.error.reason == "SERVER_RESTARTED"
    assert stream.final_state == trainer_pb.JOB_STATE_INTERRUPTED
    # The restarted server knows the job, as the stream left it.
    assert client.get_job(job.name).last_sequence == events[-1].sequence


class _LoseFirstCreateResponse(grpc.UnaryUnaryClientInterceptor):
    """Lets the first CreateTrainingJob reach the server, then reports UNAVAILABLE
    as if the response had been lost on the way back."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []

    def intercept_unary_unary(self, continuation, details, request):
        if not details.method.endswith("/CreateTrainingJob"):
            return continuation(details, request)
        self.request_ids.append(request.request_id)
        outcome = continuation(details, request)
        if len(self.request_ids) == 1:
            outcome.result()  # the server created the job ...
            raise _Unavailable()  # ... and the client never heard of it
        return outcome


class _Unavailable(grpc.RpcError, grpc.Call):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection reset (simulated)"

    def initial_metadata(self):
        return ()

    def trailing_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


def test_create_is_retried_with_the_same_request_id(servers, client, checkpoint, dataset):
    lossy = _LoseFirstCreateResponse()
    channel = grpc.intercept_channel(
        grpc.insecure_channel(servers.trainer.address), lossy)
    client.trainer = trainer_service_pb2_grpc.TrainerServiceStub(channel)
    job = client.create_job(checkpoint, dataset, config=TINY_TRAINING, display_name="retried")
    client.cancel_job(job.name)
    assert len(lossy.request_ids) == 2 and lossy.request_ids[0] == lossy.request_ids[1]
    assert lossy.request_ids[0]  # a uuid4 the client made up
    assert [j.name for j in client.list_jobs() if j.display_name == "retried"] == [job.name]
    # The CLI's exit code says the job did not succeed.
    assert servers.cli("watch", job.name) == 1


def test_errors_carry_reason_and_field_violations(client, checkpoint, dataset):
    with pytest.raises(MlxtuneClientError) as caught:
        client.create_job(checkpoint, dataset, config={"learning_rate": -1.0, "batch_size": 0})
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason
    assert {"config.learning_rate", "config.batch_size"} <= {v.field for v in error.violations}
    # Mistakes a client can see are reported before any call, the same way.
    with pytest.raises(MlxtuneClientError) as caught:
        client.create_job(checkpoint, dataset, config={"learning_rat": 1e-3})
    assert [v.field for v in caught.value.violations] == ["config.learning_rat"]
    assert "learning_rate" in caught.value.violations[0].description
    with pytest.raises(MlxtuneClientError) as caught:
        client.inspect("no-such-model")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "MODEL_NOT_FOUND"


def test_cli_json_output_parses(servers, trained, checkpoint, capsys):
    stream, events, _ = trained
    assert servers.cli("--json", "watch", stream.job) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [int(line["sequence"]) for line in lines] == [e.sequence for e in events]
    assert lines[-1]["state_change"]["state"] == "JOB_STATE_SUCCEEDED"

    assert servers.cli("checkpoints", "list", "--json") == 0
    names = [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines()]
    assert checkpoint in names

    assert servers.cli("--json", "jobs", "get", stream.job) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["output_checkpoint"]

    assert servers.cli("--json", "inspect", "tiny-llama") == 0
    assert json.loads(capsys.readouterr().out)["base_model"]["architecture"] == "llama"


def test_cli_reports_errors_with_violations_and_exit_code_2(servers, capsys):
    assert servers.cli("prepare", "tiny-llama", "--rank", "0") == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "adapter_config.rank" in err
    assert servers.cli("--json", "prepare", "tiny-llama", "--rank", "0") == 2
    error = json.loads(capsys.readouterr().err)["error"]
    assert "adapter_config.rank" in [v["field"] for v in error["violations"]]
    assert servers.cli("train") == 2  # usage error: arguments missing
    capsys.readouterr()
    assert servers.cli("jobs", "list") == 0
    assert "jobs/" in capsys.readouterr().out
