"""Flower deployment: the exact commands that run fgrpo's Flower App on a SuperLink and SuperNodes.

Nothing here federates: the SuperLink, the SuperNodes and `flwr run` are
Flower's own programs, running the same `app.py` ServerApp / ClientApp as the
in-process default. This module builds their command lines, the run config
file for `flwr run --run-config`, the SuperLink connection in Flower's config
file, TLS certificates and SuperNode keys, and `LocalFederation`, which starts
a SuperLink and N SuperNodes as separate processes on one machine (the
loopback test, the benchmark and `fgrpo flower launch`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fgrpo.config import Config, dump_config
from fgrpo.errors import ConfigError, FederationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOOPBACK = "127.0.0.1"
SUPERLINK_PORT = 9093
SUPERNODE_PORT = 9094  # each SuperNode's local Runtime API (its ClientApps connect to it): one port per node
CONNECTION = "fgrpo-local"
NODE_WAIT_S = 300.0
FLOWER_BINARIES = ("flower-superlink", "flower-supernode", "flwr")


# ---------------------------------------------------------------- command lines


def flower_binary(name: str) -> str:
    """Path of a Flower executable: on PATH, or next to this Python (a venv that is not activated)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise FederationError(f"'{name}' not found on PATH or in {Path(sys.executable).parent}; install flwr")
    return found


def missing_binaries() -> list[str]:
    missing = []
    for name in FLOWER_BINARIES:
        try:
            flower_binary(name)
        except FederationError:
            missing.append(name)
    return missing


def format_node_config(node_config: Mapping[str, Any]) -> str:
    """{"partition-id": 0, "data-path": "/d/a.jsonl"} -> 'partition-id=0 data-path="/d/a.jsonl"' (Flower's syntax)."""
    parts = []
    for key, value in node_config.items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value}")
        elif isinstance(value, str):
            if '"' in value or "\\" in value:
                raise ConfigError(f"node config {key}={value!r}: quotes and backslashes are not supported")
            parts.append(f'{key}="{value}"')
        else:
            raise ConfigError(f"node config {key}: values must be bool, int, float or str, got {type(value).__name__}")
    return " ".join(parts)


@dataclass(frozen=True)
class TLSFiles:
    """A CA certificate and the SuperLink's certificate + key signed by it (PEM files)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def superlink_command(
    port: int = SUPERLINK_PORT, *, host: str = LOOPBACK, tls: TLSFiles | None = None, supernode_auth: bool = False
) -> list[str]:
    """flower-superlink serving its Fleet, Control and Runtime APIs on host:port (one HTTP port in flwr 1.42)."""
    if supernode_auth and tls is None:
        raise ConfigError("SuperNode authentication needs TLS: pass certificates (fgrpo flower certs)")
    command = ["flower-superlink", "--host", host, "--port", str(port)]
    if tls is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert)]
        command += ["--ssl-keyfile", str(tls.server_key)]
    if supernode_auth:
        command.append("--enable-supernode-auth")
    # fgrpo is installed where the SuperLink runs; never `uv sync` the app's dependencies at run time.
    command.append("--disable-runtime-dependency-installation")
    return command


def supernode_command(
    superlink: str,
    node_config: Mapping[str, Any],
    port: int = SUPERNODE_PORT,
    *,
    host: str = LOOPBACK,
    root_cert: Path | None = None,
    auth_private_key: Path | None = None,
) -> list[str]:
    """flower-supernode connecting to `superlink` (host:port) with this node's own data in its node config."""
    command = ["flower-supernode", "--superlink", superlink, "--host", host, "--port", str(port)]
    command += ["--node-config", format_node_config(node_config)]
    command += ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    if auth_private_key is not None:
        command += ["--auth-supernode-private-key", str(auth_private_key)]
    return command


def flwr_run_command(app_dir: Path | str, run_config_file: Path | str, connection: str = CONNECTION, *, stream: bool = True) -> list[str]:
    command = ["flwr", "run", str(app_dir), connection, "--run-config", str(run_config_file)]
    return command + (["--stream"] if stream else [])


def register_command(public_key: Path | str, connection: str = CONNECTION) -> list[str]:
    return ["flwr", "supernode", "register", str(public_key), connection]


# ---------------------------------------------------------------- files Flower reads


def flower_app_dir(path: Path | str | None = None) -> Path:
    """The Flower App folder `flwr run` builds (a checkout of this repository: its pyproject has [tool.flwr.app])."""
    app = Path(path) if path is not None else Path(__file__).resolve().parents[3]
    pyproject = app / "pyproject.toml"
    if not pyproject.is_file() or "flwr" not in tomllib.loads(pyproject.read_text()).get("tool", {}):
        raise ConfigError(
            f"'{app}' is not the fgrpo Flower App: it needs a pyproject.toml with [tool.flwr.app]; "
            "pass the root of an fgrpo checkout (--app)"
        )
    return app.resolve()



def run_config_text(config: Config, run_dir: Path | str) -> str:
    """The run config overrides for `flwr run --run-config FILE`: the whole fgrpo config and an absolute run-dir."""
    import tomli_w

    # The ServerApp runs in a SuperExec subprocess whose working directory is not the caller's.
    return tomli_w.dumps({"fgrpo-config": dump_config(config), "run-dir": str(Path(run_dir).expanduser().resolve())})


def write_run_config(config: Config, run_dir: Path | str, path: Path | str) -> Path:
    path = Path(path)
    if path.suffix != ".toml":
        raise ConfigError(f"run config file '{path}' must end in .toml (flwr run reads it only then)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_config_text(config, run_dir))
    return path


def flower_config_path(flwr_home: Path | str | None = None) -> Path:
    """Flower's own config file ($FLWR_HOME/config.toml, default ~/.flwr/config.toml)."""
    home = Path(flwr_home) if flwr_home is not None else Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    return home / "config.toml"


def write_connection(
    address: str, *, name: str = CONNECTION, root_cert: Path | None = None, flwr_home: Path | str | None = None
) -> Path:
    """Add (or replace) `[superlink.<name>]` in Flower's config file, keeping its other entries.

    flwr 1.42 reads SuperLink connections ("federations" in older releases)
    from this file, not from the app's pyproject.toml.
    """
    import tomli_w

    path = flower_config_path(flwr_home)
    data: dict = tomllib.loads(path.read_text()) if path.exists() else {}
    connection: dict[str, Any] = {"address": address}
    if root_cert is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_cert).resolve())
    superlinks = data.setdefault("superlink", {})
    superlinks[name] = connection
    superlinks.setdefault("default", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def generate_tls_certificates(out_dir: Path | str, hosts: Sequence[str] = (LOOPBACK, "localhost"), days: int = 365) -> TLSFiles:
    """A self-signed CA and a SuperLink certificate for `hosts` (IPs and DNS names), as Flower's TLS guide makes with openssl."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem_key(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fgrpo-ca")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = key()
    server_cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(pem_key(server_key))
    files.server_key.chmod(0o600)
    return files


def generate_supernode_keys(out_dir: Path | str, count: int) -> list[tuple[Path, Path]]:
    """(private, public) OpenSSH ECDSA P-384 key files per SuperNode, as `ssh-keygen -t ecdsa -b 384` makes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        private = ec.generate_private_key(ec.SECP384R1())
        private_path, public_path = out / f"supernode{i}", out / f"supernode{i}.pub"
        private_path.write_bytes(
            private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        )
        private_path.chmod(0o600)
        public_path.write_bytes(
            private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
        pairs.append((private_path, public_path))
    return pairs


# ---------------------------------------------------------------- ServerApp side


def wait_for_nodes(grid, count: int, timeout_s: float = NODE_WAIT_S, poll_s: float = 1.0) -> list[int]:
    """Block until `count` nodes are connected (a real SuperLink's nodes join over time)."""
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = list(grid.get_node_ids())
        if len(node_ids) >= count:
            return node_ids
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(node_ids)} of {count} SuperNodes connected after {timeout_s:.0f} s; "
                "start one SuperNode per client (see `fgrpo flower commands`)"
            )
        time.sleep(poll_s)


# ---------------------------------------------------------------- a federation on this machine


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _resolve(command: list[str]) -> list[str]:
    return [flower_binary(command[0]), *command[1:]]


class LocalFederation:
    """A SuperLink and one SuperNode per node config, as separate processes listening on 127.0.0.1 only.

    `close()` (also on error, as a context manager) ends each process with
    everything it spawned: SuperExec, ServerApp and ClientApp processes, which
    Flower starts in sessions of their own. Logs go to `work_dir`.
    """

    def __init__(
        self,
        node_configs: Sequence[Mapping[str, Any]],
        work_dir: Path | str,
        *,
        tls: bool = False,
        supernode_auth: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.node_configs = [dict(c) for c in node_configs]
        self.work_dir = Path(work_dir).resolve()
        self.tls = tls or supernode_auth
        self.supernode_auth = supernode_auth
        self.env = {**os.environ, **(env or {}), "FLWR_HOME": str(self.work_dir / "flwr-home")}
        # Flower's processes run in other working directories: give them this very fgrpo, by absolute path.
        package_root = str(Path(__file__).resolve().parents[2])
        self.env["PYTHONPATH"] = os.pathsep.join(
            [package_root, *(str(Path(p).resolve()) for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p)]
        )
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = []
        self._logs: list = []

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        certs = generate_tls_certificates(self.work_dir / "certificates") if self.tls else None
        keys = generate_supernode_keys(self.work_dir / "keys", len(self.node_configs)) if self.supernode_auth else []
        write_connection(self.address, root_cert=certs.ca_cert if certs else None, flwr_home=self.env["FLWR_HOME"])
        self.superlink = self._spawn("superlink", superlink_command(self.port, tls=certs, supernode_auth=self.supernode_auth))
        self._wait_listening(self.port, self.superlink, "superlink")
        for _, public in keys:
            self._flwr(register_command(public), timeout=120)
        for i, node in enumerate(self.node_configs):
            command = supernode_command(
                self.address, node, free_port(),
                root_cert=certs.ca_cert if certs else None,
                auth_private_key=keys[i][0] if keys else None,
            )
            self.supernodes.append(self._spawn(f"supernode{i}", command))

    def run(self, config: Config, run_dir: Path | str, app_dir: Path | str | None = None, *, timeout_s: float = 600) -> float:
        """`flwr run` the app with this config; wait until its ServerApp is done; return the wall time (s)."""
        run_config = write_run_config(config, run_dir, self.work_dir / "run-config.toml")
        started = time.perf_counter()
        result = self._flwr(flwr_run_command(flower_app_dir(app_dir), run_config), timeout=timeout_s, log="flwr-run")
        wall = time.perf_counter() - started
        if not (Path(run_dir) / "summary.json").exists():
            raise FederationError(
                f"the Flower run ended without {Path(run_dir) / 'summary.json'}; its log ends with:\n{result[-3000:]}"
            )
        return wall

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink reports online (`flwr supernode list`)."""
        import json

        output = self._flwr(["flwr", "supernode", "list", CONNECTION, "--format", "json"], timeout=120)
        nodes = json.loads(output[output.index("{"):])["nodes"]
        return sum(node["status"] == "online" for node in nodes)

    def wait_online(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.online_nodes() < count:
            if time.monotonic() > deadline:
                tails = "\n".join(self.log_tail(f"supernode{i}", 800) for i in range(len(self.supernodes)))
                raise FederationError(f"fewer than {count} SuperNodes online after {timeout_s:.0f} s:\n{tails}")
            time.sleep(1)

    def kill_node(self, index: int) -> None:
        """SIGKILL a SuperNode with its SuperExec and ClientApp processes, as if its machine died."""
        process = self.supernodes[index]
        if process is not None:
            _end_tree(process, signal.SIGKILL)
            self.supernodes[index] = None

    def processes(self) -> list:
        """Every live process this federation started (psutil.Process), children included."""
        import psutil

        found = []
        for process in [*self.supernodes, self.superlink]:
            if process is None or process.poll() is not None:
                continue
            try:
                root = psutil.Process(process.pid)
                found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return found

    def close(self) -> None:
        """SIGTERM the SuperNodes, then the SuperLink, each with its children; SIGKILL what is left after 10 s."""
        for process in [*self.supernodes, self.superlink]:
            if process is not None:
                _end_tree(process, signal.SIGTERM)
        self.supernodes, self.superlink = [], None
        for log in self._logs:
            log.close()
        self._logs = []

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.work_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # -------------------------------------------------------------- helpers

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.work_dir / f"{name}.log", "wb")
        self._logs.append(log)
        return subprocess.Popen(
            _resolve(command), stdout=log, stderr=subprocess.STDOUT, env=self.env,
            cwd=self.work_dir, start_new_session=True,  # a Ctrl-C in the terminal goes to us, not to them
        )

    def _flwr(self, command: list[str], *, timeout: float, log: str | None = None) -> str:
        try:
            result = subprocess.run(
                _resolve(command), capture_output=True, text=True, env=self.env, cwd=self.work_dir, timeout=timeout
            )
        except subprocess.TimeoutExpired as error:
            raise FederationError(f"{' '.join(command[:3])} did not finish in {timeout:.0f} s") from error
        output = result.stdout + result.stderr
        if log is not None:
            (self.work_dir / f"{log}.log").write_text(output)
        if result.returncode != 0:
            raise FederationError(f"{' '.join(command)} failed ({result.returncode}):\n{output[-3000:]}")
        return output

    def _wait_listening(self, port: int, process: subprocess.Popen, name: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise FederationError(f"{name} exited with code {process.returncode}:\n{self.log_tail(name)}")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if sock.connect_ex((LOOPBACK, port)) == 0:
                    return
            time.sleep(0.2)
        raise FederationError(f"{name} did not listen on {LOOPBACK}:{port} within {timeout_s:.0f} s:\n{self.log_tail(name)}")


def _end_tree(process: subprocess.Popen, sig: int, timeout_s: float = 10) -> None:
    """Send `sig` to a process and all its descendants (they run in sessions of their own); SIGKILL stragglers."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
