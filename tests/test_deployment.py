"""A real deployment on loopback, started exactly as docker/compose.yml + docker/compose.tls.yml start it.

flower-superlink with TLS, SuperNode and SuperExec authentication, the ServerApp's SuperExec, three SuperNodes
(each with its own port, key, secret, data file and state directory) and their ClientApps' SuperExecs: every
command is the compose service's, with container names and paths mapped to loopback ports and test
directories (tests/test_compose.py), and every key and secret is the one docker/'s scripts wrote. Two of the
three keys are registered, so the run is configured for two clients (num_clients = 2, num-partitions = 2 on
the admitted nodes) and the third SuperNode must be refused; SuperExecs without the secret must get no task.

Each process works in a directory of its own, as in its container: the run config's `dataset` is a relative
path that exists only in the ServerApp's directory, so a client that tried to read it would fail the run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import free_ports, process_tree, survivors, write_sentiment_csv
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from test_compose import (
    BASE,
    OWNERS,
    SECRET_FLAG,
    TLS,
    assert_key_file_modes,
    load_compose,
    loopback_commands,
    option,
    run_script,
)

from clients.app import PRIVACY_STATE_KEY
from clients.node import (
    NodeConfigError,
    NodeSettings,
    client_data,
    node_settings,
    persist_node_state,
    saved_states,
    state_directory,
)
from fedsvd.config import ExperimentConfig
from fedsvd.privacy.record_level import PrivacyLedger
from fedsvd.simulation import stop_process_trees

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
ROUNDS, ADMITTED = 2, 2
OWNER_SIZES = (240, 180, 200)
CONNECTION = "fedsvd-tls"
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 420
# Impostor -> (the SuperExec whose command it runs without the secret, the process it polls for tasks).
INTRUDERS = {
    "intruder-serverapp": ("superexec-serverapp", "superlink"),
    "intruder-clientapp-1": ("superexec-clientapp-1", "supernode-1"),
}
SUPEREXEC_REFUSED = "SuperExec authentication failed for /flwr.proto.Runtime/AcquireTask"


@dataclass
class Deployment:
    """What the loopback deployment left behind, for the tests to inspect after every process has stopped."""

    base: Path
    run: subprocess.CompletedProcess | None = None
    commands: dict[str, list[str]] = field(default_factory=dict)
    node_list: list[dict] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)

    def log(self, name: str) -> str:
        return (self.base / "logs" / f"{name}.log").read_text(errors="replace")

    @property
    def results(self) -> Path:
        return self.base / "results" / "run"


def _environment(flwr_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        # Flower starts flwr-serverapp / flwr-clientapp by name: this venv's first.
        "PATH": os.pathsep.join([VENV_BIN, os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def _wait_for_port(port: int, process: subprocess.Popen, deployment: Deployment, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert process.poll() is None, f"{name} exited: {deployment.log(name)[-2000:]}"
        assert time.monotonic() < deadline, f"{name} did not open port {port}"
        time.sleep(0.2)


@contextlib.contextmanager
def _processes(deployment: Deployment) -> Iterator[Callable[[str, list[str]], subprocess.Popen]]:
    """Start named processes, each in its own directory (its 'container'); stop every one of them on exit."""
    running: list[subprocess.Popen] = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        home = deployment.base / "containers" / name
        home.mkdir(parents=True, exist_ok=True)
        with open(deployment.base / "logs" / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=home,
                env=_environment(home / ".flwr"),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        running.append(process)
        deployment.started |= process_tree(process)
        return process

    try:
        yield start
    finally:
        for process in running:
            deployment.started |= process_tree(process)
        stop_process_trees(*running)


def _without_option(command: list[str], flag: str) -> list[str]:
    at = command.index(flag)
    return command[:at] + command[at + 2 :]


def _flwr(deployment: Deployment, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cli_home = deployment.base / "cli"
    command = [str(Path(VENV_BIN) / "flwr"), *args]
    return subprocess.run(
        command, cwd=cli_home, env=_environment(cli_home), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Deployment:
    """One 2-round DP FedSVD run over TLS with two of three SuperNodes admitted (run once, inspected by the tests)."""
    base = tmp_path_factory.mktemp("deployment")
    deployment = Deployment(base)
    (base / "logs").mkdir()
    docker = base / "docker"
    run_script("generate-certs.sh", docker / "certs")
    run_script("generate-keys.sh", OWNERS, docker / "keys")
    for owner, size in enumerate(OWNER_SIZES, start=1):
        (docker / "data" / f"owner-{owner}").mkdir(parents=True)
        write_sentiment_csv(docker / "data" / f"owner-{owner}" / "train.csv", size, seed=owner)
    # The server's own evaluation data, in the ServerApp's directory only.
    server_dir = base / "containers" / "superexec-serverapp"
    server_dir.mkdir(parents=True)
    write_sentiment_csv(server_dir / "eval.csv", 300, seed=99)

    compose = load_compose(BASE, TLS)
    superlink_port, *node_ports = free_ports(1 + OWNERS)
    ports = {"superlink": superlink_port} | {f"supernode-{i}": port for i, port in enumerate(node_ports, start=1)}
    host_paths = {"./certs": docker / "certs", "./keys": docker / "keys", "./data": docker / "data"}
    host_paths |= {"results": base / "results"} | {f"state-{i}": base / "state" / f"owner-{i}" for i in (1, 2, 3)}
    commands = loopback_commands(compose, ports, host_paths)
    for i in range(1, ADMITTED + 1):
        node_config = option(commands[f"supernode-{i}"], "--node-config")
        commands[f"supernode-{i}"][commands[f"supernode-{i}"].index(node_config)] = node_config.replace(
            f"num-partitions={OWNERS}", f"num-partitions={ADMITTED}"
        )
    deployment.commands = commands

    (base / "cli").mkdir()
    (base / "cli" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{superlink_port}"\nroot-certificates = "{docker / "certs" / "ca.crt"}"\n'
    )
    run_config = base / "run.toml"
    run_config.write_text(
        ExperimentConfig(
            model=str(tiny_bert), dataset="eval.csv", num_clients=ADMITTED, rounds=ROUNDS, local_steps=3,
            delta=1e-3, epsilon=4.0, out_dir=str(deployment.results),
        ).to_toml()
    )  # fmt: skip

    with _processes(deployment) as start:
        superlink = start("superlink", commands["superlink"])
        _wait_for_port(superlink_port, superlink, deployment, "superlink")
        start("superexec-serverapp", commands["superexec-serverapp"])
        for i in range(1, ADMITTED + 1):
            registered = _flwr(deployment, "supernode", "register", str(docker / "keys" / f"supernode-{i}.pub"))
            assert registered.returncode == 0, registered.stdout + registered.stderr
        supernodes = {}
        for i in range(1, OWNERS + 1):
            supernodes[i] = start(f"supernode-{i}", commands[f"supernode-{i}"])
            start(f"superexec-clientapp-{i}", commands[f"superexec-clientapp-{i}"])
        # Impostors poll the SuperLink and owner 1's SuperNode for tasks before the run is submitted: a SuperExec
        # that is turned away exits; one that is not keeps polling, and would take the run's tasks.
        _wait_for_port(ports["supernode-1"], supernodes[1], deployment, "supernode-1")
        for name, (superexec, _) in INTRUDERS.items():
            intruder = start(name, _without_option(commands[superexec], SECRET_FLAG))
            with contextlib.suppress(subprocess.TimeoutExpired):
                intruder.wait(timeout=START_TIMEOUT_S)
            deployment.exit_codes[name] = intruder.poll()
        deployment.run = _flwr(
            deployment, "run", str(ROOT), CONNECTION, "--run-config", str(run_config), "--stream",
            timeout=RUN_TIMEOUT_S,
        )  # fmt: skip
        listed = _flwr(deployment, "supernode", "list", "--format", "json")
        deployment.node_list = json.loads(listed.stdout)["nodes"] if listed.returncode == 0 else []
        deployment.exit_codes |= {f"supernode-{i}": process.poll() for i, process in supernodes.items()}
    return deployment


def _rows(deployment: Deployment) -> list[dict]:
    return [json.loads(line) for line in (deployment.results / "metrics.jsonl").read_text().splitlines()]


def test_run_completes_with_metrics_over_tls(deployment: Deployment) -> None:
    assert deployment.run is not None
    assert deployment.run.returncode == 0, deployment.run.stdout[-4000:] + deployment.run.stderr[-2000:]
    assert [f"round {r:>3}" in deployment.run.stdout for r in range(ROUNDS + 1)] == [True] * (ROUNDS + 1)
    rows = _rows(deployment)
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    for round_, row in enumerate(rows[1:], start=1):
        assert row["clients"] == [0, 1] and not row["rejected"], row
        assert {entry["steps"] for entry in row["privacy"].values()} == {3 * round_}, "steps accumulate over rounds"
        assert all(0 < entry["epsilon"] <= 4.0 + 1e-6 for entry in row["privacy"].values())
    summary = json.loads((deployment.results / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS and summary["epsilon_max"] <= 4.0 + 1e-6


def test_each_client_trains_on_its_owners_file_and_is_planned_from_its_size(deployment: Deployment) -> None:
    report = json.loads((deployment.results / "privacy.json").read_text())
    for partition, size in enumerate(OWNER_SIZES[:ADMITTED]):
        history = report["clients"][str(partition)]["history"]
        # The Poisson rate is batch / n_k: n_k is the owner's file, which only that owner's node reads.
        assert [rate for _, rate, _ in history] == pytest.approx([32 / size] * ROUNDS)


def test_unregistered_supernode_is_refused(deployment: Deployment) -> None:
    code = deployment.exit_codes["supernode-3"]
    assert code not in (None, 0), "the SuperNode with the unregistered key must not stay connected"
    assert "Failed to activate SuperNode" in deployment.log("supernode-3")
    assert "flwr-clientapp" not in deployment.log("superexec-clientapp-3"), "no ClientApp ran for it"
    assert [node["status"] for node in deployment.node_list] == ["online"] * ADMITTED, deployment.node_list
    for i in range(1, ADMITTED + 1):
        assert deployment.exit_codes[f"supernode-{i}"] is None, deployment.log(f"supernode-{i}")[-2000:]


def test_keys_and_secrets_are_readable_by_the_containers_user_only(deployment: Deployment) -> None:
    assert_key_file_modes(deployment.base / "docker")


def test_every_superexec_authenticates_and_one_without_the_secret_gets_no_task(deployment: Deployment) -> None:
    for name, (superexec, peer) in INTRUDERS.items():
        # The SuperExec and the process it polls hold the same secret file.
        secret = option(deployment.commands[superexec], SECRET_FLAG)
        assert secret is not None and secret == option(deployment.commands[peer], SECRET_FLAG)
        assert deployment.exit_codes[name] is not None, f"{name} was not turned away: {deployment.log(name)[-2000:]}"
        assert SUPEREXEC_REFUSED in deployment.log(peer), deployment.log(peer)[-2000:]
        assert "flwr-serverapp" not in deployment.log(name) and "flwr-clientapp" not in deployment.log(name)
    for name, command in deployment.commands.items():
        assert option(command, SECRET_FLAG), f"{name} runs without SuperExec authentication"


def test_each_node_keeps_its_clients_privacy_state_in_its_own_state_dir(deployment: Deployment) -> None:
    report = json.loads((deployment.results / "privacy.json").read_text())
    for owner in (1, 2):
        (run_dir,) = (deployment.base / "state" / f"owner-{owner}").glob("run-*")
        saved = saved_states(run_dir)[-1]
        state = recorddict_from_proto(ProtoRecordDict.FromString(saved.read_bytes()))
        ledger = PrivacyLedger.from_record(state[PRIVACY_STATE_KEY])  # type: ignore[arg-type]
        # The node's own accountant agrees with the server's ledger: every step of both rounds is in it.
        server_view = report["clients"][str(owner - 1)]
        assert ledger.steps == 3 * ROUNDS == sum(steps for _, _, steps in server_view["history"])
        assert ledger.epsilon(1e-3) == pytest.approx(server_view["epsilon"]["rdp"], rel=1e-3)
    assert not list((deployment.base / "state").glob("owner-3/*")), "the refused node never ran a client"


def test_every_started_process_is_stopped(deployment: Deployment) -> None:
    assert deployment.started
    assert not survivors(deployment.started)


class _Reply:
    """A ClientApp reply as the mod sees it: only whether it carries an error matters."""

    def __init__(self, error: bool = False) -> None:
        self.error = error

    def has_error(self) -> bool:
        return self.error


def _context(run_id: int, state_dir: Path) -> Context:
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(state_dir)}
    return Context(run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


class _Message:
    """A message as the mod reads it: its round and its type (a real Message needs a running Flower app)."""

    def __init__(self, server_round: int, kind: str) -> None:
        self.content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
        self.metadata = SimpleNamespace(message_type=kind)

    def has_content(self) -> bool:
        return True


def _message(server_round: int, kind: str = MessageType.TRAIN) -> Message:
    return _Message(server_round, kind)  # type: ignore[return-value]


def _count_round(_msg: object, context: Context) -> _Reply:
    rounds = int(context.state["ledger"]["rounds"]) if "ledger" in context.state else 0  # type: ignore[index]
    context.state["ledger"] = ConfigRecord({"rounds": rounds + 1})
    return _Reply()


def _rounds(context: Context) -> int:
    return int(context.state["ledger"]["rounds"])  # type: ignore[index]


def test_a_restarted_node_continues_from_its_saved_state(tmp_path: Path) -> None:
    for server_round in (1, 2):
        persist_node_state(_message(server_round), _context(7, tmp_path), _count_round)
    # A SuperNode restarted within run 7 starts from an empty context, and must continue where it stopped.
    restarted = _context(7, tmp_path)
    persist_node_state(_message(3), restarted, _count_round)
    assert _rounds(restarted) == 3
    # Round 3 run again (a resumed server) starts from the state before round 3, not from round 3's own.
    rerun = _context(7, tmp_path)
    persist_node_state(_message(3), rerun, _count_round)
    assert _rounds(rerun) == 3
    # Evaluation of round 3 sees round 3's state and saves nothing.
    evaluation = _context(7, tmp_path)
    persist_node_state(_message(3, MessageType.EVALUATE), evaluation, lambda _m, _c: _Reply())
    assert _rounds(evaluation) == 3
    # A failed message leaves the saved state alone; another run starts from scratch.
    persist_node_state(_message(4), _context(7, tmp_path), lambda _m, _c: _Reply(error=True))
    assert [p.name for p in saved_states(state_directory(tmp_path, 7))] == [f"round-{r}.state" for r in (1, 2, 3)]
    assert not state_directory(tmp_path, 8).exists()
    fresh_run = _context(8, tmp_path)
    persist_node_state(_message(1), fresh_run, _count_round)
    assert _rounds(fresh_run) == 1


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"partition-id": 0, "num-partitions": 2, "data-file": "/nonexistent/owner.csv"},
         "node config: data-file = '/nonexistent/owner.csv': no such file"),
        ({"partition-id": 0, "num-partitions": 2, "data_file": "x.csv"}, "node config: unknown key 'data_file'"),
        ({"num-partitions": 2}, "node config: missing 'partition-id'"),
        ({"partition-id": 2, "num-partitions": 2}, "node config: partition-id = 2 must be in [0, num-partitions)"),
        ({"partition-id": "0", "num-partitions": 2}, "node config: partition-id = '0' must be an integer"),
        ({"partition-id": 0, "num-partitions": 2, "state-dir": 5}, "node config: state-dir = 5 must be a quoted path"),
    ],
)  # fmt: skip
def test_bad_node_config_is_one_line_naming_the_key(node_config: dict, message: str) -> None:
    with pytest.raises(NodeConfigError) as error:
        node_settings(node_config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_owners_file_with_more_classes_than_the_task_is_refused_naming_the_file(tmp_path: Path) -> None:
    data_file = tmp_path / "owner.csv"
    with data_file.open("w", newline="") as handle:
        csv.writer(handle).writerows([("text", "label"), ("good film", 0), ("bad film", 2)])
    node = NodeSettings(0, 1, data_file=data_file)
    with pytest.raises(
        NodeConfigError, match=rf"node config: data-file = '{data_file}': .*labels must lie in \[0, 2\)"
    ):
        client_data(ExperimentConfig(num_clients=1), node, 2)
    assert len(client_data(ExperimentConfig(num_clients=1), node, 3).train) == 2
