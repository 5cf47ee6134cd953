"""optlab.zygote: stage scripts forked from a warm process behave as if run by `python script`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optlab import zygote

SCRIPT = '''
from optlab.zygote import delegate
delegate(__file__)
import os, sys
print("ran", os.getppid(), os.environ.get("PROBE"), os.getcwd(), sys.argv[1:], "torch" in sys.modules, flush=True)
print("to stderr", file=sys.stderr)
sys.exit(int(os.environ.get("CODE", "0")))
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"optlab-zt-{os.getpid()}"
    d.mkdir(exist_ok=True)
    sock = d / "z.sock"
    env = {**os.environ, "PYTHONPATH": str(Path(zygote.__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "optlab.zygote", "serve", str(sock)], env=env)
    deadline = time.monotonic() + 120
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sock.exists(), "the server did not start"
    yield proc, sock
    proc.terminate()
    proc.wait(timeout=30)
    assert not sock.exists(), "the server removes its socket when it stops"
    d.rmdir()


def _run(tmp_path, sock=None, **env):
    script = tmp_path / "stage.py"
    script.write_text(SCRIPT)
    full = {**os.environ, "PYTHONPATH": str(Path(zygote.__file__).resolve().parents[1]), **env}
    full.pop(zygote.ENV, None)
    if sock is not None:
        full[zygote.ENV] = str(sock)
    return subprocess.run([sys.executable, str(script), "a", "--b"], cwd=tmp_path, env=full, capture_output=True,
                          text=True, timeout=120)


def test_a_delegated_script_runs_in_a_child_of_the_server_with_the_callers_world(server, tmp_path):
    proc, sock = server
    out = _run(tmp_path, sock, PROBE="hello", CODE="3")
    assert out.returncode == 3, out.stderr
    # forked from the server: torch is already imported
    assert out.stdout.split() == ["ran", str(proc.pid), "hello", str(tmp_path), "['a',", "'--b']", "True"]
    assert "to stderr" in out.stderr


def test_without_the_variable_or_the_server_the_script_runs_here(server, tmp_path):
    proc, sock = server
    here = _run(tmp_path, None, PROBE="x")
    assert here.returncode == 0 and here.stdout.split()[1] != str(proc.pid)
    gone = _run(tmp_path, tmp_path / "no-such.sock", PROBE="x")
    assert gone.returncode == 0 and gone.stdout.split()[1] != str(proc.pid)


def test_changed_code_runs_in_a_fresh_interpreter(server, tmp_path, monkeypatch):
    """The child compares the package's code hash with the server's; on a mismatch it execs a
    fresh interpreter (exec keeps the pid, so the parent is still the server; torch is not
    imported there)."""
    proc, sock = server
    pkg = Path(zygote.__file__).resolve().parent
    probe = pkg / "_zygote_probe_tmp.py"
    try:
        probe.write_text("# a new module changes the package's code hash\n")
        out = _run(tmp_path, sock, PROBE="fresh", CODE="0")
        words = out.stdout.split()
        assert out.returncode == 0 and words[2] == "fresh"
        assert words[-1] == "False", "a fresh interpreter has not imported torch"
    finally:
        probe.unlink()
    assert zygote.code_hash()  # stdlib-only helper works in-process too
