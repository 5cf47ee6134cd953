"""A warm process that DVC stage commands fork from, so a stage does not import torch again.

Importing torch, torch._dynamo (which every torch optimizer step pulls in) and optlab takes
about 5 s of CPU, and ``make repro`` runs about 80 stage processes; on 2 cores that alone is
minutes. ``make repro`` (optlab.repro) starts one server, which imports all of it once and
listens on a Unix socket named in ``OPTLAB_ZYGOTE``. A stage script starts with
:func:`delegate`: when that variable is set and the server answers, the script sends its
argv, working directory and environment, and hands over its stdin/stdout/stderr; the server
forks a child that runs the stage script there, exactly as ``python stages/<stage>.py`` would
(same code, same files, same output streams), and the script exits with the child's status.
Signals the script receives (DVC's Ctrl-C) are passed on to the child.

Without ``OPTLAB_ZYGOTE`` (plain ``dvc repro``, tests, a user's shell) nothing changes. If the
code under src/optlab changed since the server started, the child replaces itself with a
fresh interpreter (``exec``), so a stage never runs stale code. This module imports only the
standard library: it must cost the stage script nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import sys
from pathlib import Path

ENV = "OPTLAB_ZYGOTE"
_SRC = Path(__file__).resolve().parent


def code_hash() -> str:
    """sha256 over every .py file of the optlab package (path and bytes)."""
    h = hashlib.sha256()
    for f in sorted(_SRC.rglob("*.py")):
        h.update(f.relative_to(_SRC).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _send(conn: socket.socket, doc: dict) -> None:
    conn.sendall(json.dumps(doc).encode() + b"\n")


def _recv_line(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def delegate(script: str) -> None:
    """Run this stage script in the warm server when ``OPTLAB_ZYGOTE`` names one; never returns
    then (exits with the stage's status). Returns at once, doing nothing, otherwise or when the
    server cannot be reached."""
    path = os.environ.get(ENV)
    if not path:
        return
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        request = {"script": os.path.abspath(script), "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}
        payload = json.dumps(request).encode() + b"\n"
        socket.send_fds(conn, [payload], [0, 1, 2])
        reply = json.loads(_recv_line(conn) or b"{}")
    except (OSError, ValueError):
        conn.close()
        return  # no server: run here
    pid = int(reply["pid"])

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    line = _recv_line(conn)  # a signal forwarded meanwhile does not interrupt it (PEP 475 retries)
    try:
        status = int(json.loads(line)["status"])
    except (ValueError, KeyError):
        status = 1
        print("optlab: error: the stage process ended without a status", file=sys.stderr)
    os._exit(status)


def _child(request: dict, fds: list[int], started_hash: str) -> None:
    """In the forked child: become ``python <script> <args>`` in the client's place."""
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    # fresh stream objects on the new descriptors (line-buffered on a terminal, as at startup)
    sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(ENV, None)  # nothing below delegates again
    sys.argv = list(request["argv"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if code_hash() != started_hash:  # the code changed since the server imported it
        os.execv(sys.executable, [sys.executable, request["script"], *request["argv"][1:]])
    import runpy

    sys.path[0] = os.path.dirname(request["script"])
    try:
        runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def serve(path: str) -> None:
    """Import what every stage imports, then fork one child per request until SIGTERM."""
    import torch._dynamo  # noqa: F401  (every torch optimizer step imports it)

    import optlab.pipeline  # noqa: F401

    started = code_hash()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    server.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # the path appears only once the server is ready
    server.listen(64)
    waiting: dict[int, socket.socket] = {}
    stop = False

    def on_term(_s: int, _f: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        while not stop:
            ready, _, _ = select.select([server], [], [], 0.1)
            if ready:
                conn, _ = server.accept()
                try:
                    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                    while not msg.endswith(b"\n"):
                        more = conn.recv(1 << 20)
                        if not more:
                            break
                        msg += more
                    request = json.loads(msg)
                except (OSError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    server.close()
                    conn.close()
                    _child(request, fds, started)
                for fd in fds:
                    os.close(fd)
                waiting[pid] = conn
                _send(conn, {"pid": pid})
            while waiting:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                conn = waiting.pop(pid, None)
                if conn is not None:
                    try:
                        code = os.waitstatus_to_exitcode(status)  # -N: killed by signal N
                        _send(conn, {"status": 128 - code if code < 0 else code})
                    except OSError:
                        pass
                    conn.close()
    finally:
        server.close()
        if os.path.exists(path):
            os.unlink(path)
        for pid in list(waiting):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit("usage: python -m optlab.zygote serve SOCKET_PATH")
    serve(sys.argv[2])
