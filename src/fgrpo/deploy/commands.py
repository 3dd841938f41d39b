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
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fgrpo.config import Config, dump_config, tomllib
from fgrpo.errors import ConfigError, FederationError
from fgrpo.owned_files import check_replaceable, write_files

LOOPBACK = "127.0.0.1"
SUPERLINK_PORT = 9093
SUPERNODE_PORT = 9094  # each SuperNode's local Runtime API (its ClientApps connect to it): one port per node
CONNECTION = "fgrpo-local"
FLOWER_BINARIES = ("flower-superlink", "flower-supernode", "flwr")
# flwr 1.42's SuperExec (started by each SuperNode) looks for a message to run every second unless this says
# otherwise: 0.1 s takes about half a second off every message's wait, for a negligible poll.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S = "0.1"


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


_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_host(host: str, flag: str = "--host") -> str:
    """`host` if it is an IP address (IPv6 with or without brackets) or a DNS name, else one clear ConfigError.

    Flower takes any string and fails later, far from the typo (or binds nothing at all for '')."""
    text = host.strip()
    if not text:
        raise ConfigError(f"{flag} is empty; give the SuperLink machine's IP address or DNS name (e.g. 127.0.0.1)")
    try:
        ipaddress.ip_address(text[1:-1] if text.startswith("[") and text.endswith("]") else text)
        return text
    except ValueError:
        pass
    labels = text.removesuffix(".").split(".")
    if len(text) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ConfigError(
            f"{flag} {host!r} is neither an IP address nor a DNS name (letters, digits and '-', separated by '.')"
        )
    return text


def check_port(port: int, flag: str = "--port") -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{flag} {port!r} is not a TCP port; expected a whole number from 1 to 65535")
    return port


def join_address(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets ([::1]:9093) as gRPC expects."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def parse_address(address: str, what: str = "SuperLink address") -> tuple[str, int]:
    """'host:port' or '[ipv6]:port' -> (host, port), each checked; anything else is one clear ConfigError."""
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not port_text.isdigit() or (":" in host and not host.startswith("[")):
        raise ConfigError(f"{what} {address!r} must be host:port (e.g. 127.0.0.1:9093 or [::1]:9093)")
    return check_host(host, what), check_port(int(port_text), what)


def check_files(paths: Sequence[Path], flag: str) -> None:
    """Every path is an existing regular file (a typo is refused here, not on a SuperNode hours later)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"{flag}: no such file: {', '.join(missing[:4])}")


def check_tls_folder(folder: Path) -> None:
    """The folder `fgrpo flower certs` makes: ca.crt, server.pem and server.key, all present."""
    if not Path(folder).is_dir():
        raise ConfigError(f"--tls '{folder}' is not a folder; make one with `fgrpo flower certs {folder}`")
    missing = [name for name in ("ca.crt", "server.pem", "server.key") if not (Path(folder) / name).is_file()]
    if missing:
        raise ConfigError(f"--tls '{folder}' lacks {', '.join(missing)} (make them with `fgrpo flower certs {folder}`)")


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

    parse_address(address)
    if root_cert is not None and not Path(root_cert).is_file():
        raise ConfigError(f"--root-cert '{root_cert}': no such file; pass the CA certificate (ca.crt of `fgrpo flower certs`)")
    path = flower_config_path(flwr_home)
    data = read_flower_config(path)
    connection: dict[str, Any] = {"address": address}
    if root_cert is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_cert).resolve())
    superlinks = data.setdefault("superlink", {})
    superlinks[name] = connection
    superlinks.setdefault("default", name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(data))
    except OSError as exc:
        raise ConfigError(f"Flower's config file '{path}' cannot be written: {exc.strerror or exc}") from None
    return path


def read_flower_config(path: Path) -> dict:
    """Flower's config file as a dict ({} when absent); a file that is not TOML, or whose [superlink] is not a
    table, is one ConfigError naming it (fgrpo rewrites this file, so it must understand all of it first)."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Flower's config file '{path}' cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Flower's config file '{path}' is not valid TOML ({exc}); fix or move it, then run again") from None
    if not isinstance(data.get("superlink", {}), dict):
        raise ConfigError(f"Flower's config file '{path}': 'superlink' must be a table of connections ([superlink.NAME])")
    return data


def generate_tls_certificates(
    out_dir: Path | str, hosts: Sequence[str] = (LOOPBACK, "localhost"), days: int = 365, *, overwrite: bool = False
) -> TLSFiles:
    """A self-signed CA and a SuperLink certificate for `hosts` (IPs and DNS names), as Flower's TLS guide makes with
    openssl. Existing files are replaced only with `overwrite` and only if fgrpo wrote them (`fgrpo.owned_files`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    out = Path(out_dir)
    hosts = [check_host(host, "--host") for host in hosts]
    files = TLSFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    check_replaceable(out, [p.name for p in (files.ca_cert, files.server_cert, files.server_key)],
                      overwrite=overwrite, what="certificate folder")  # before the slow key generation
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
    write_files(out, {
        files.ca_cert.name: ca_cert.public_bytes(serialization.Encoding.PEM),
        files.server_cert.name: server_cert.public_bytes(serialization.Encoding.PEM),
        files.server_key.name: pem_key(server_key),
    }, overwrite=overwrite, what="certificate folder", private=[files.server_key.name])
    return files


def generate_supernode_keys(out_dir: Path | str, count: int, *, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(private, public) OpenSSH ECDSA P-384 key files per SuperNode, as `ssh-keygen -t ecdsa -b 384` makes.
    Existing keys are replaced only with `overwrite` and only if fgrpo wrote them (`fgrpo.owned_files`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out_dir)
    contents: dict[str, bytes] = {}
    for i in range(count):
        private = ec.generate_private_key(ec.SECP384R1())
        contents[f"supernode{i}"] = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        contents[f"supernode{i}.pub"] = private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    write_files(out, contents, overwrite=overwrite, what="key folder", private=[f"supernode{i}" for i in range(count)])
    return [(out / f"supernode{i}", out / f"supernode{i}.pub") for i in range(count)]
