"""The compose files, checked without a Docker engine: images, commands, ports, volumes, networks, TLS and
authentication flags, and the key files that docker/'s scripts write.

`loopback_commands` turns the compose services into the processes that tests/test_deployment.py starts on
127.0.0.1, so the deployment test runs exactly what the containers would run and the two cannot drift apart.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flwr
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from flwr.common.config import parse_config_args

from clients.node import DATA_FILE, NODE_CONFIG_KEYS, STATE_DIR
from fedsvd.config import load_config
from fedsvd.data import load_texts
from fedsvd.federation import data_for

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BASE, TLS, GPU = DOCKER / "compose.yml", DOCKER / "compose.tls.yml", DOCKER / "compose.gpu.yml"
DOCKERFILE = DOCKER / "superexec.Dockerfile"
OWNERS = 3
TLS_FLAGS = {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--root-certificates"}
SECRET_FLAG = "--superexec-auth-secret-file"
AUTH_FLAGS = {"--auth-supernode-private-key", SECRET_FLAG}
SECRETS_DIR = "/run/secrets/"
# Flower's official images run as the user `app`, uid 49999: the owner the scripts give every private file to.
CONTAINER_UID = 49999
# The certificates among the files the TLS variant mounts; every other one (and ca.key) is private.
PUBLIC_SECRETS = {"ca.crt", "server.pem"}
# Flower's official images start these; the SuperExec image names its entry point in its Dockerfile.
IMAGE_ENTRYPOINTS = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode"}


def _merge(base: Any, override: Any, key: str = "") -> Any:
    """Docker Compose's merge of an override file, for what these files use: mappings merge key by key,
    `command` is replaced, other lists (secrets, networks, volumes, ports) are combined."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merge(base[k], v, k) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    if isinstance(base, list) and isinstance(override, list) and key != "command":
        return base + [item for item in override if item not in base]
    return override


def load_compose(*files: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in files:
        merged = _merge(merged, yaml.safe_load(path.read_text()))
    return merged


def entrypoint(service: Mapping[str, Any]) -> str:
    if "build" in service:
        dockerfile = ROOT / service["build"]["dockerfile"]
        match = re.search(r'^ENTRYPOINT \["([^"]+)"\]', dockerfile.read_text(), re.MULTILINE)
        assert match, f"{dockerfile} has no ENTRYPOINT"
        return match.group(1)
    return IMAGE_ENTRYPOINTS[service["image"].split(":")[0]]


def option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def clientapp_of(compose: Mapping[str, Any], supernode: str) -> str:
    """The SuperExec service that runs this SuperNode's ClientApp (it dials the SuperNode's Runtime API)."""
    (name,) = [
        name
        for name, service in compose["services"].items()
        if (option(service["command"], "--runtime-api-address") or "").split(":")[0] == supernode
    ]
    return name


def mounts(compose: Mapping[str, Any], name: str) -> dict[str, str]:
    """Container path -> host source (a path relative to docker/ or a named volume) of one service."""
    service = compose["services"][name]
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found[target] = source
    for secret in service.get("secrets", []):
        found[SECRETS_DIR + secret] = compose["secrets"][secret]["file"]
    return found


def loopback_commands(
    compose: Mapping[str, Any], ports: Mapping[str, int], host_paths: Mapping[str, Path]
) -> dict[str, list[str]]:
    """Each service's command as one process on 127.0.0.1 runs it.

    Service host names become 127.0.0.1 with that service's port from `ports`, `--host 0.0.0.0` becomes
    127.0.0.1, `--port` the service's own port, and every container path the host path it is mounted from
    (`host_paths` maps compose sources, such as ./certs or a named volume, to directories of the test). A
    SuperNode's node config names paths in its ClientApp's container, so those mounts apply to it too.
    """
    commands = {}
    for name, service in compose["services"].items():
        paths = mounts(compose, name)
        if name.startswith("supernode-"):
            paths |= mounts(compose, clientapp_of(compose, name))
        command = [entrypoint(service)]
        for position, arg in enumerate(service["command"]):
            previous = service["command"][position - 1] if position else ""
            if previous == "--host":
                arg = "127.0.0.1"
            elif previous == "--port":
                arg = str(ports[name])
            arg = re.sub(
                r"\b(" + "|".join(map(re.escape, compose["services"])) + r"):\d+\b",
                lambda match: f"127.0.0.1:{ports[match.group(1)]}",
                arg,
            )
            for target, source in sorted(paths.items(), key=lambda item: -len(item[0])):
                arg = arg.replace(target, str(_host_path(source, host_paths)))
            command.append(arg)
        commands[name] = command
    return commands


def _host_path(source: str, host_paths: Mapping[str, Path]) -> Path:
    for prefix, path in host_paths.items():
        if source == prefix:
            return path
        if source.startswith(prefix + "/"):
            return path / source[len(prefix) + 1 :]
    raise KeyError(f"no host path for compose source {source!r}")


def _services(compose: Mapping[str, Any], prefix: str) -> list[str]:
    return sorted(name for name in compose["services"] if name.startswith(prefix))


def _node_config(command: list[str]) -> dict[str, Any]:
    return parse_config_args([option(command, "--node-config")])


def _owner(service: str) -> int | None:
    """The data owner a service belongs to (supernode-<i>, superexec-clientapp-<i>); None for the operator's."""
    match = re.fullmatch(r"(?:supernode|superexec-clientapp)-(\d+)", service)
    return int(match.group(1)) if match else None


def _members(compose: Mapping[str, Any]) -> dict[str, set[str]]:
    """Network -> the services attached to it."""
    return {
        network: {name for name, service in compose["services"].items() if network in service.get("networks", [])}
        for network in compose["networks"]
    }


def script_file_owner() -> int:
    """Whom docker/'s scripts give the private files to when run by these tests (see `run_script`)."""
    return CONTAINER_UID if os.getuid() == 0 else os.getuid()


def run_script(script: str, *args: str | Path) -> None:
    """Run generate-certs.sh or generate-keys.sh as the tests' user can: as root with the default owner (the
    images' uid), as anyone else with their own uid, since only root may give files away (the scripts refuse)."""
    env = {key: value for key, value in os.environ.items() if key != "FEDSVD_CONTAINER_UID"}
    if os.getuid() != 0:
        env["FEDSVD_CONTAINER_UID"] = str(os.getuid())
    subprocess.run([DOCKER / script, *map(str, args)], check=True, capture_output=True, env=env)


def assert_key_file_modes(docker_dir: Path) -> None:
    """Private keys and secrets readable by the containers' user only (0600, owned by it); certificates and
    public keys 0644. `docker_dir` holds certs/ and keys/ as the scripts wrote them."""
    private = [
        (name, docker_dir / spec["file"])
        for name, spec in load_compose(BASE, TLS)["secrets"].items()
        if name not in PUBLIC_SECRETS
    ]
    public = [(name, docker_dir / "certs" / name) for name in PUBLIC_SECRETS]
    public += [(path.name, path) for path in (docker_dir / "keys").glob("*.pub")]
    for name, path in private:
        assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_uid) == (0o600, script_file_owner()), name
    for name, path in public:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, name
    # No container reads the CA's key: it stays private to whoever ran the script.
    assert stat.S_IMODE((docker_dir / "certs" / "ca.key").stat().st_mode) == 0o600


def test_images_are_flowers_official_ones_at_the_installed_flower_version() -> None:
    compose = load_compose(BASE)
    version = flwr.__version__
    services = compose["services"]
    assert services["superlink"]["image"] == f"flwr/superlink:{version}"
    for name in _services(compose, "supernode-"):
        assert services[name]["image"] == f"flwr/supernode:{version}"
    superexecs = _services(compose, "superexec-")
    assert len(superexecs) == OWNERS + 1
    for name in superexecs:
        assert services[name]["build"] == {"context": "..", "dockerfile": "docker/superexec.Dockerfile"}
        assert services[name]["image"] == f"fedsvd-superexec:{version}"
    dockerfile = DOCKERFILE.read_text()
    assert f"ARG FLWR_VERSION={version}\nFROM flwr/superexec:${{FLWR_VERSION}}\n" in dockerfile
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"flwr[simulation]=={version}" in dependencies
    # The build context is the repository root: only the dependency list may be sent to the builder.
    ignored = (DOCKER / "superexec.Dockerfile.dockerignore").read_text().split()
    assert [line for line in ignored if not line.startswith("#")][-2:] == ["*", "!pyproject.toml"]


@pytest.mark.parametrize("files", [(BASE,), (BASE, TLS)], ids=["plain", "tls"])
def test_runtime_dependency_installation_is_off_everywhere(files: tuple[Path, ...]) -> None:
    compose = load_compose(*files)
    assert "--disable-runtime-dependency-installation" in compose["services"]["superlink"]["command"]
    for name, service in compose["services"].items():
        assert "--allow-runtime-dependency-installation" not in service["command"], name
    assert re.search(r"^ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1\b", DOCKERFILE.read_text(), re.MULTILINE)


@pytest.mark.parametrize("files", [(BASE,), (BASE, TLS)], ids=["plain", "tls"])
def test_every_owner_has_a_supernode_with_its_partition_and_only_its_own_data_and_state(
    files: tuple[Path, ...],
) -> None:
    compose = load_compose(*files)
    services = compose["services"]
    supernodes = _services(compose, "supernode-")
    assert supernodes == [f"supernode-{i}" for i in range(1, OWNERS + 1)]
    for partition, name in enumerate(supernodes):
        owner = partition + 1
        node_config = _node_config(services[name]["command"])
        assert set(node_config) <= set(NODE_CONFIG_KEYS)
        assert (node_config["partition-id"], node_config["num-partitions"]) == (partition, OWNERS)
        assert "volumes" not in services[name], "the SuperNode itself reads no data"
        clientapp = clientapp_of(compose, name)
        assert clientapp == f"superexec-clientapp-{owner}"
        volumes = mounts(compose, clientapp)
        (data_dir,) = [target for target in volumes if node_config[DATA_FILE].startswith(target + "/")]
        assert f"./data/owner-{owner}:{data_dir}:ro" in services[clientapp]["volumes"]
        assert volumes[node_config[STATE_DIR]] == f"state-{owner}"
        data_and_state = {f"./data/owner-{owner}", f"state-{owner}"}
        own = data_and_state | {f"./keys/superexec-clientapp-{owner}.secret"}  # the secret with compose.tls.yml
        assert data_and_state <= set(volumes.values()) <= own, "its own data, state and secret only"
        # The ClientApp sits on its owner's internal network: it reaches its SuperNode and nothing else.
        assert services[clientapp]["networks"] == [f"owner-{owner}"]
        assert compose["networks"][f"owner-{owner}"] == {"internal": True}
        assert set(services[name]["networks"]) == {f"uplink-{owner}", f"owner-{owner}"}
    server_mounts = mounts(compose, "superexec-serverapp").values()
    assert not [source for source in server_mounts if source.startswith("./data")], "the server reads no owner data"


@pytest.mark.parametrize("files", [(BASE,), (BASE, TLS)], ids=["plain", "tls"])
def test_ports_connect_each_process_to_the_right_peer(files: tuple[Path, ...]) -> None:
    compose = load_compose(*files)
    services = compose["services"]
    superlink = services["superlink"]["command"]
    assert option(superlink, "--port") == "8000" and option(superlink, "--host") == "0.0.0.0"
    assert option(superlink, "--isolation") == "process"
    # SuperNodes and the flwr CLI reach the SuperLink here; published on the host's loopback unless the operator
    # names an address (whoever reaches the port can submit runs: README, "Threat model").
    assert services["superlink"]["ports"] == ["${SUPERLINK_BIND:-127.0.0.1}:8000:8000"]
    assert option(services["superexec-serverapp"]["command"], "--runtime-api-address") == "superlink:8000"
    for name in _services(compose, "supernode-"):
        command = services[name]["command"]
        assert option(command, "--superlink") == "superlink:8000"
        assert option(command, "--isolation") == "process"
        assert "ports" not in services[name], "a SuperNode's Runtime API stays inside its owner's network"
        runtime = option(services[clientapp_of(compose, name)]["command"], "--runtime-api-address")
        assert runtime == f"{name}:{option(command, '--port')}"
    # Every process shares a network with the one it dials.
    for name, service in services.items():
        for flag in ("--superlink", "--runtime-api-address"):
            if (address := option(service["command"], flag)) is not None:
                peer = address.split(":")[0]
                assert set(service["networks"]) & set(services[peer]["networks"]), f"{name} cannot reach {peer}"


@pytest.mark.parametrize("files", [(BASE,), (BASE, TLS)], ids=["plain", "tls"])
def test_no_network_joins_two_owners(files: tuple[Path, ...]) -> None:
    compose = load_compose(*files)
    members = _members(compose)
    for network, names in members.items():
        owners = {owner for name in names if (owner := _owner(name)) is not None}
        assert len(owners) <= 1, f"network {network} joins the containers of owners {sorted(owners)}"
    for owner in range(1, OWNERS + 1):
        # An owner's SuperNode port (its Runtime API) is reachable from its own ClientApp and from the SuperLink.
        assert members[f"owner-{owner}"] == {f"supernode-{owner}", f"superexec-clientapp-{owner}"}
        assert members[f"uplink-{owner}"] == {"superlink", f"supernode-{owner}"}
        assert compose["networks"][f"uplink-{owner}"] == {"internal": True}
    # The one network with a way out (the SuperLink's published port) holds the operator's containers only.
    open_networks = {name for name, spec in compose["networks"].items() if not (spec or {}).get("internal")}
    assert open_networks == {"server"}
    assert members["server"] == {"superlink", "superexec-serverapp"}


def test_tls_variant_adds_tls_node_and_superexec_authentication_and_changes_nothing_else() -> None:
    plain, tls = load_compose(BASE), load_compose(BASE, TLS)
    secret_files = {name: spec["file"] for name, spec in tls["secrets"].items()}
    superlink = tls["services"]["superlink"]["command"]
    assert "--enable-supernode-auth" in superlink
    assert {flag: option(superlink, flag) for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")} == {
        "--ssl-ca-certfile": SECRETS_DIR + "ca.crt",
        "--ssl-certfile": SECRETS_DIR + "server.pem",
        "--ssl-keyfile": SECRETS_DIR + "server.key",
    }
    assert option(tls["services"]["superexec-serverapp"]["command"], "--root-certificates") == SECRETS_DIR + "ca.crt"
    keys = []
    for name in _services(tls, "supernode-"):
        command = tls["services"][name]["command"]
        assert option(command, "--root-certificates") == SECRETS_DIR + "ca.crt"
        key = option(command, "--auth-supernode-private-key")
        assert key == f"{SECRETS_DIR}{name}.key" and secret_files[f"{name}.key"] == f"./keys/{name}"
        assert set(tls["services"][name]["secrets"]) == {
            "ca.crt",
            f"{name}.key",
            f"superexec-clientapp-{_owner(name)}.secret",
        }, "each node gets only its own key and secret"
        keys.append(key)
    assert len(set(keys)) == OWNERS
    # SuperExec authentication: every SuperExec signs with the secret of the process it polls, each owner's pair
    # has its own, and no other container holds it.
    superexecs = _services(tls, "superexec-")
    pairs = {"superexec-serverapp": "superlink"} | {
        f"superexec-clientapp-{i}": f"supernode-{i}" for i in range(1, OWNERS + 1)
    }
    assert set(pairs) == set(superexecs) and len(superexecs) == OWNERS + 1
    for superexec, peer in pairs.items():
        secret = f"{superexec}.secret"
        for name in (superexec, peer):
            assert option(tls["services"][name]["command"], SECRET_FLAG) == SECRETS_DIR + secret, name
        holders = {name for name, service in tls["services"].items() if secret in service.get("secrets", [])}
        assert holders == {superexec, peer}
        directory = "certs" if peer == "superlink" else "keys"  # the operator's files, or the owner's
        assert secret_files[secret] == f"./{directory}/{secret}"
    assert "server.key" in tls["services"]["superlink"]["secrets"]
    assert all("server.key" not in s.get("secrets", []) for n, s in tls["services"].items() if n != "superlink")
    for name, service in tls["services"].items():
        if not name.startswith("superexec-clientapp-"):  # on its owner's internal network, see compose.tls.yml
            assert "--insecure" not in service["command"], name
        # Without the TLS and authentication arguments, every command is the plain one.
        assert _without_security(service["command"]) == _without_security(plain["services"][name]["command"]), name


def _without_security(command: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in command:
        if skip:
            skip = False
        elif arg in TLS_FLAGS | AUTH_FLAGS:
            skip = True
        elif arg not in ("--insecure", "--enable-supernode-auth"):
            kept.append(arg)
    return kept


def test_scripts_make_every_file_the_tls_variant_mounts(tmp_path: Path) -> None:
    for script in ("generate-certs.sh", "generate-keys.sh"):
        assert (DOCKER / script).stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
    run_script("generate-certs.sh", tmp_path / "certs")
    run_script("generate-keys.sh", OWNERS, tmp_path / "keys")
    secrets = load_compose(BASE, TLS)["secrets"]
    for name, spec in secrets.items():
        assert (tmp_path / spec["file"]).is_file(), f"secret {name}: {spec['file']} is not made by the scripts"
    certificate = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    authority = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.crt").read_bytes())
    assert certificate.issuer == authority.subject
    names = certificate.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    # The names under which the SuperNodes and SuperExecs dial the SuperLink: in compose, and on loopback.
    assert {"superlink", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    for i in range(1, OWNERS + 1):
        assert (tmp_path / "keys" / f"supernode-{i}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert_key_file_modes(tmp_path)
    auth_secrets = {name: (tmp_path / spec["file"]).read_bytes() for name, spec in secrets.items() if ".secret" in name}
    assert len(auth_secrets) == OWNERS + 1 and len(set(auth_secrets.values())) == OWNERS + 1, "one secret per pair"
    assert all(re.fullmatch(rb"[0-9a-f]{64}\n", secret) for secret in auth_secrets.values()), "256 random bits"


def test_scripts_run_again_keep_keys_and_secrets_and_close_up_files_left_open(tmp_path: Path) -> None:
    run_script("generate-certs.sh", tmp_path / "certs")
    run_script("generate-keys.sh", OWNERS, tmp_path / "keys")
    owned = [*(tmp_path / "keys").iterdir(), tmp_path / "certs" / "superexec-serverapp.secret"]
    kept = {path: path.read_bytes() for path in owned}
    # What the earlier version of the scripts left: world-readable private keys.
    for path in [tmp_path / "certs" / "server.key", tmp_path / "certs" / "ca.key", tmp_path / "keys" / "supernode-1"]:
        path.chmod(0o644)
    run_script("generate-certs.sh", tmp_path / "certs")
    run_script("generate-keys.sh", OWNERS, tmp_path / "keys")
    assert {path: path.read_bytes() for path in kept} == kept, "running pairs keep their keys and secrets"
    assert_key_file_modes(tmp_path)


def test_keys_and_secrets_never_reach_the_repository() -> None:
    compose = load_compose(BASE, TLS)
    paths = [DOCKER / spec["file"] for spec in compose["secrets"].values()] + [DOCKER / "certs" / "ca.key"]
    for path in paths:
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert ignored.returncode == 0, f"{path.relative_to(ROOT)} is not ignored by git"


def test_gpu_override_reserves_a_gpu_for_every_owners_clientapp_and_changes_no_command() -> None:
    plain, gpu = load_compose(BASE), load_compose(BASE, GPU)
    for name, service in gpu["services"].items():
        assert service["command"] == plain["services"][name]["command"], name
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if name.startswith("superexec-clientapp-"):
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
            assert service["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"
            assert service["image"] != plain["services"]["superexec-serverapp"]["image"], "CUDA image, own tag"
        else:
            assert devices is None, name


def test_loopback_commands_leave_no_container_name_or_path(tmp_path: Path) -> None:
    compose = load_compose(BASE, TLS)
    ports = {name: 20000 + i for i, name in enumerate(compose["services"])}
    sources = ["./certs", "./keys", "./data", "results", *(f"state-{i}" for i in range(1, OWNERS + 1))]
    commands = loopback_commands(compose, ports, {source: tmp_path / source.strip("./") for source in sources})
    assert commands["superlink"][0] == "flower-superlink"
    assert commands["supernode-1"][0] == "flower-supernode"
    assert commands["superexec-clientapp-1"][0] == "flower-superexec"
    text = " ".join(arg for command in commands.values() for arg in command)
    assert "/app/" not in text and SECRETS_DIR not in text and "0.0.0.0" not in text
    assert not re.search(r"\b(superlink|supernode-\d|superexec-[a-z]+-?\d?):\d", text)
    assert option(commands["supernode-2"], "--superlink") == f"127.0.0.1:{ports['superlink']}"
    assert option(commands["superexec-clientapp-2"], "--runtime-api-address") == f"127.0.0.1:{ports['supernode-2']}"
    node_config = _node_config(commands["supernode-2"])
    assert node_config[DATA_FILE] == str(tmp_path / "data" / "owner-2" / "train.csv")
    assert node_config[STATE_DIR] == str(tmp_path / "state-2")


def test_demo_data_script_writes_the_file_every_supernode_is_configured_with(
    tmp_path: Path, sentiment_csv: Path
) -> None:
    config = tmp_path / "deploy.toml"
    config.write_text((ROOT / "configs" / "deploy.toml").read_text() + f'dataset = "{sentiment_csv}"\n')
    script = [sys.executable, str(DOCKER / "make-owner-data.py"), str(config), str(tmp_path / "data")]
    subprocess.run(script, check=True, capture_output=True)
    compose = load_compose(BASE)
    cfg = load_config(config)
    assert cfg.num_clients == len(_services(compose, "supernode-")), "configs/deploy.toml fits the compose file"
    volumes = ("results", *(f"state-{i}" for i in range(1, OWNERS + 1)))
    host_paths = {"./data": tmp_path / "data"} | {volume: tmp_path / volume for volume in volumes}
    commands = loopback_commands(compose, dict.fromkeys(compose["services"], 1), host_paths)
    partitions = data_for(cfg).partitions
    for partition, name in enumerate(_services(compose, "supernode-")):
        owner_file = load_texts(_node_config(commands[name])[DATA_FILE])
        assert (owner_file.texts, owner_file.labels) == (partitions[partition].texts, partitions[partition].labels)
