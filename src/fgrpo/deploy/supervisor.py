"""`LocalFederation`: a SuperLink and N SuperNodes as separate processes on one machine, and their clean shutdown.

Used by the loopback test, the Flower overhead benchmark and `fgrpo flower launch`. The command lines
come from `fgrpo.deploy.commands`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from fgrpo.config import Config
from fgrpo.core.threads import Threads, auto_threads, thread_env
from fgrpo.errors import FederationError
from fgrpo.deploy.commands import (
    CONNECTION,
    LOOPBACK,
    SUPEREXEC_POLL_ENV,
    SUPEREXEC_POLL_S,
    flower_app_dir,
    flower_binary,
    flwr_run_command,
    generate_supernode_keys,
    generate_tls_certificates,
    path_with_flower,
    register_command,
    superlink_command,
    supernode_command,
    write_connection,
    write_run_config,
)


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

    The N SuperNodes share this machine's cores: each gets a thread budget
    (OMP_NUM_THREADS, which its ClientApp processes inherit and honour) of
    `threads`, by default "auto" = cores // N, so they never oversubscribe.

    Each SuperNode keeps a warm worker per run (`fgrpo.federation.warm_node`) unless `warm=False` (or its node
    config says `warm=false`): the workers' sockets and logs go to a folder of this federation's own
    (`warm_dir`, short enough for a socket path), and `close()` ends the workers too and moves their logs to
    `work_dir/warm-logs`.
    """

    def __init__(
        self,
        node_configs: Sequence[Mapping[str, Any]],
        work_dir: Path | str,
        *,
        tls: bool = False,
        supernode_auth: bool = False,
        env: Mapping[str, str] | None = None,
        threads: Threads = "auto",
        warm: bool | None = None,
    ) -> None:
        import tempfile

        from fgrpo.federation.handoff import WARM, WARM_DIR

        self.warm_dir = Path(tempfile.mkdtemp(prefix="fgrpo-warm-"))  # 0700, in the short system temp folder
        chosen = {} if warm is None else {WARM: warm}
        self.node_configs = [{WARM_DIR: str(self.warm_dir)} | dict(c) | chosen for c in node_configs]
        self.work_dir = Path(work_dir).resolve()
        self.tls = tls or supernode_auth
        self.supernode_auth = supernode_auth
        self.env = {**os.environ, **(env or {}), "FLWR_HOME": str(self.work_dir / "flwr-home")}
        self.env["PATH"] = path_with_flower(self.env.get("PATH", ""))  # Flower starts its own programs by name
        # A SuperNode's SuperExec looks for a message to run once a second by default; 0.1 s costs nothing here.
        self.env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S)
        self.threads = auto_threads(len(self.node_configs), threads, env=self.env)
        self.env.update(thread_env(self.threads))
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
        certs = generate_tls_certificates(self.work_dir / "certificates", overwrite=True) if self.tls else None
        keys = generate_supernode_keys(self.work_dir / "keys", len(self.node_configs), overwrite=True) if self.supernode_auth else []
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

    def warm_workers(self) -> list:
        """The live warm workers of this federation's SuperNodes (psutil.Process), from their pid files."""
        import psutil

        found = []
        for pid_file in self.warm_dir.glob("*.sock.pid") if self.warm_dir.is_dir() else []:
            try:
                found.append(psutil.Process(int(pid_file.read_text())))
            except (OSError, ValueError, psutil.NoSuchProcess):
                pass  # gone, or ending right now
        return found

    def processes(self) -> list:
        """Every live process this federation started (psutil.Process), children and warm workers included."""
        import psutil

        found = self.warm_workers()
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
        """SIGTERM the SuperNodes, then the SuperLink, each with its children, then the warm workers (which would
        also end on their own once their SuperNode is gone); SIGKILL what is left after 10 s."""
        import shutil

        import psutil

        workers = self.warm_workers()  # now: a worker whose SuperNode is gone removes its pid file as it ends
        for process in [*self.supernodes, self.superlink]:
            if process is not None:
                _end_tree(process, signal.SIGTERM)
        self.supernodes, self.superlink = [], None
        workers += [w for w in self.warm_workers() if w.pid not in {known.pid for known in workers}]
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.terminate()
        _, alive = psutil.wait_procs(workers, timeout=10)
        for worker in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        psutil.wait_procs(alive, timeout=10)
        if self.warm_dir.is_dir():  # the workers' logs join the others in work_dir
            logs = self.work_dir / "warm-logs"
            for log in self.warm_dir.glob("*.log"):
                logs.mkdir(parents=True, exist_ok=True)
                shutil.move(str(log), str(logs / log.name))
        shutil.rmtree(self.warm_dir, ignore_errors=True)
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
