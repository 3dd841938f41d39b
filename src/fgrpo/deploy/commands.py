"""Flower deployment files and commands: the exact command lines that run fgrpo's Flower App on a SuperLink
and SuperNodes, the run config file for `flwr run --run-config`, the SuperLink connection in Flower's
config file, TLS certificates and SuperNode keys.

Nothing here federates or starts a process: the SuperLink, the SuperNodes and `flwr run` are Flower's
own programs, running the same ServerApp / ClientApp as the in-process default
(`fgrpo.deploy.supervisor` starts them on one machine).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fgrpo.config import Config, dump_config, tomllib
from fgrpo.errors import ConfigError, FederationError

LOOPBACK = "127.0.0.1"
SUPERLINK_PORT = 9093
SUPERNODE_PORT = 9094  # each SuperNode's local Runtime API (its ClientApps connect to it): one port per node
CONNECTION = "fgrpo-local"
FLOWER_BINARIES = ("flower-superlink", "flower-supernode", "flwr")


# ---------------------------------------------------------------- command lines


def flower_binary(name: str) -> str:
    """Path of a Flower executable: next to this Python (the flwr that fgrpo imports, also from a venv that is
    not activated), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise FederationError(f"'{name}' not found on PATH or in {Path(sys.executable).parent}; install flwr")
    return found


def path_with_flower(path: str) -> str:
    """`path` (a PATH value) with the folder of this Python's Flower executables first.

    The SuperLink and the SuperNodes start `flower-superexec`, and it the `flwr-serverapp` / `flwr-clientapp`
    processes, by name from PATH: from a venv that is not activated they would not be found (or another
    install's would), although `flower_binary` found the first one next to this Python.
    """
    try:
        folder = str(Path(flower_binary("flower-superlink")).parent)
    except FederationError:
        return path  # starting the SuperLink says what is missing
    parts = [part for part in path.split(os.pathsep) if part and part != folder]
    return os.pathsep.join([folder, *parts])


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
