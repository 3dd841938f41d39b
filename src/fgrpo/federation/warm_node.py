"""A node's warm worker: one long-lived process per (node, run) that runs fgrpo's ClientApp on every message
the node's short-lived ClientApp processes hand it (`fgrpo.federation.handoff`).

What it keeps between messages is what the ClientApp process caches anyway: the imported libraries, the model
and tokenizer, the node's data and reward functions (`fgrpo.federation.clientapp`'s caches). What changes
from round to round (optimizer moments, compression residuals, a local-only or fedsa client's own weights)
still lives in the node's Flower Context.state and comes with every message, exactly as in a fresh process:
so a message gives the same reply here as in a fresh ClientApp process, bit for bit, and a worker that is
killed, expires or is replaced by a restarted node loses nothing the next message needs.

Apart: a worker serves one run of one node (its socket is named after both) and refuses a message of any other
run, node, node config or run config, so a second run, or two runs at once, never share a process, a model
or a cache. Nothing received is unpickled or executed (`handoff`'s frame); a peer that sends anything else gets
a refusal and the worker goes on.

Ends: after `--idle-s` seconds without a message (the run is over, or the node left it), when the process it
watches (the SuperNode) is gone, or on SIGTERM / SIGINT; it removes its socket and pid file on the way out.
Its log (start, each message with its time, the reason it ends) is the file beside its socket.

    python -m fgrpo.federation.warm_node --socket PATH --run-id R --node-id N [--idle-s S] [--watch-pid P]
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from fgrpo.errors import FgrpoError
from fgrpo.federation import handoff
from fgrpo.federation.handoff import FrameError

logger = logging.getLogger("fgrpo.warm_node")

ACCEPT_POLL_S = 0.5  # how often an idle worker looks at its idle time and at the process it watches
READ_TIMEOUT_S = 10.0  # a peer that sends nothing for this long, mid-frame, is dropped (the worker serves one at a time)


class WarmWorker:
    """The worker's state: which (node, run) it serves, and what the first message of that run pinned."""

    def __init__(self, run_id: int, node_id: int) -> None:
        self.run_id, self.node_id = run_id, node_id
        self.pinned: tuple | None = None  # (node config, run config) of the run's first message
        self.messages = 0

    def answer(self, header: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        """The reply frame (header, blobs) to one request frame: the ClientApp's reply, its error, or a refusal."""
        try:
            message, context = handoff.decode_request(header, blobs)
            self._check_same_run(context)
        except FrameError as refusal:
            logger.warning("refused a request: %s", refusal)
            return {"kind": "refused", "reason": str(refusal)}, []
        kind = message.metadata.message_type
        started = time.perf_counter()  # the first message's work includes importing torch and the ClientApp, once
        try:
            from fgrpo.federation.clientapp import client_app

            reply = client_app(message, context)
        except FgrpoError as error:  # the ClientApp's mods made it value-free: it goes back as it is
            logger.info("%s message: raised %s (%.2f s)", kind, type(error).__name__, time.perf_counter() - started)
            return {"kind": "raised", "error": type(error).__name__, "text": str(error)}, []
        except Exception:  # noqa: BLE001 - outside the ClientApp's mods (its import): only the type leaves the node
            logger.exception("%s message: the ClientApp could not run", kind)
            text = "this node's warm worker could not run fgrpo's ClientApp (the details stay in its log)"
            return {"kind": "raised", "error": "FgrpoError", "text": text}, []
        work_s = time.perf_counter() - started
        self.messages += 1
        logger.info("%s message %d: %.2f s", kind, self.messages, work_s)
        if reply.has_error():
            return {"kind": "error-reply", "code": int(reply.error.code), "reason": str(reply.error.reason)}, []
        blobs = [handoff.encode_records(reply.content), handoff.encode_records(context.state)]
        return {"kind": "reply", "work_s": work_s}, blobs

    def _check_same_run(self, context) -> None:
        if (context.run_id, context.node_id) != (self.run_id, self.node_id):
            raise FrameError(f"this worker serves run {self.run_id} on node {self.node_id}, "
                             f"not run {context.run_id} on node {context.node_id}")
        seen = (sorted(context.node_config.items()), sorted(context.run_config.items()))
        if self.pinned is None:
            self.pinned = seen
        elif seen != self.pinned:
            raise FrameError("the node config or run config differs from this run's first message")


def _watched_alive(pid: int | None, started: float | None) -> bool:
    """Whether the process this worker serves still runs (the same process: a reused pid has another start time)."""
    if pid is None:
        return True
    import psutil

    try:
        process = psutil.Process(pid)
        alive = process.status() != psutil.STATUS_ZOMBIE
        return alive and (started is None or abs(process.create_time() - started) < 0.01)
    except psutil.NoSuchProcess:
        return False


def serve(
    path: Path, run_id: int, node_id: int, *, idle_s: float, watch_pid: int | None = None, watch_started: float | None = None
) -> str:
    """Listen on `path` until idle, orphaned or signalled; returns why it ended."""
    handoff.owner_only_dir(path.parent)
    lock = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return "another worker already serves this node's run"
    pid_file = Path(f"{path}.pid")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)  # a killed worker's socket file (the lock says none is alive)
        old_umask = os.umask(0o177)  # the socket is born 0600: no moment where others could connect
        try:
            server.bind(str(path))
        finally:
            os.umask(old_umask)
        server.listen(16)
        server.settimeout(ACCEPT_POLL_S)
        pid_file.write_text(f"{os.getpid()}\n")
        logger.info("warm worker %d serves run %d on node %d at %s (idle limit %.0f s, watching pid %s)",
                    os.getpid(), run_id, node_id, path, idle_s, watch_pid)
        worker, last = WarmWorker(run_id, node_id), time.monotonic()
        while True:
            if not _watched_alive(watch_pid, watch_started):
                return f"the process it served ({watch_pid}) is gone"
            if time.monotonic() - last > idle_s:
                return f"no message for {idle_s:.0f} s"
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                _serve_connection(worker, conn)
            last = time.monotonic()
    finally:
        server.close()
        for leftover in (path, pid_file):
            leftover.unlink(missing_ok=True)
        os.close(lock)


def _serve_connection(worker: WarmWorker, conn: socket.socket) -> None:
    """One request and its reply; a broken peer costs that connection only."""
    conn.settimeout(READ_TIMEOUT_S)
    try:
        uid = handoff.peer_uid(conn)
        if uid is not None and uid != os.geteuid():
            logger.warning("refused a connection from user id %d", uid)
            handoff.send_frame(conn, {"kind": "refused", "reason": "only this node's own user may use its worker"})
            return
        try:
            header, blobs = handoff.read_frame(conn)
        except handoff.Closed:
            return
        except FrameError as refusal:
            logger.warning("refused a request: %s", refusal)
            handoff.send_frame(conn, {"kind": "refused", "reason": str(refusal)})
            return
        except socket.timeout:
            logger.warning("dropped a peer that stopped sending mid-frame")
            return
        conn.settimeout(None)  # the reply goes out however long the work took
        reply, blobs = worker.answer(header, blobs)
        handoff.send_frame(conn, reply, blobs)
    except OSError as error:  # the peer went away (its ClientApp process was ended): nothing to answer
        logger.warning("lost a peer: %s", error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--run-id", type=int, required=True)
    parser.add_argument("--node-id", type=int, required=True)
    parser.add_argument("--idle-s", type=float, default=handoff.DEFAULT_IDLE_S)
    parser.add_argument("--watch-pid", type=int)
    parser.add_argument("--watch-started", type=float)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s warm worker %(process)d: %(message)s")

    def stop(signum, _frame):
        raise SystemExit(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        reason = serve(args.socket, args.run_id, args.node_id, idle_s=args.idle_s, watch_pid=args.watch_pid,
                       watch_started=args.watch_started)
    except SystemExit as stopped:
        reason = str(stopped)
    logger.info("warm worker ends: %s", reason)
    logging.shutdown()  # the log is complete; what is left is the interpreter's own teardown of torch
    return 0


if __name__ == "__main__":
    main()
    os._exit(0)  # no slow teardown of a loaded model: its socket and pid file are gone, so it has ended
