"""The sandbox contains what model-written code can do, reports it, and never stalls a round.

Every test is bounded by the sandbox's own limits (a 3 s wall clock, 2 s of CPU, 256 MB of address
space, 8 processes), so a failing test cannot endanger the machine. The tests run in the isolation
"auto" picks (namespaces where the kernel allows them) and, where it matters, with the audit hook off
too: then the kernel alone must refuse (namespaces mode), so both layers are shown to hold.
"""

import os
import socket
import time

import psutil
import pytest

from reval_jax.env.sandbox import Sandbox, SandboxConfig, classify

pytestmark = pytest.mark.multiprocess

TIMEOUT_S = 3.0
SLACK_S = 2.0  # start, kill and drain of a call on a loaded 2-core machine
LIMITS = dict(timeout_s=TIMEOUT_S, cpu_s=2, memory_mb=256, max_processes=8, max_output_bytes=4096, workers=4)


def leftovers(box: Sandbox) -> list[int]:
    """Processes of this sandbox still alive (each carries its tag on the command line)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if box.tag in " ".join(proc.info["cmdline"] or ()) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.info["pid"])
    return found


@pytest.fixture(scope="module")
def box():
    sandbox = Sandbox(SandboxConfig(**LIMITS))
    yield sandbox
    sandbox.close()
    assert not leftovers(sandbox)


@pytest.fixture(scope="module")
def proc():
    """The fallback: no namespaces, the audit hook is the guard."""
    sandbox = Sandbox(SandboxConfig(**LIMITS, isolation="process"))
    yield sandbox
    sandbox.close()
    assert not leftovers(sandbox)


@pytest.fixture(scope="module")
def bare():
    """The kernel's layer alone (no audit hook): only meaningful with namespaces."""
    sandbox = Sandbox(SandboxConfig(**LIMITS, audit_hook=False, isolation="auto"))
    if sandbox.isolation != "namespaces":
        sandbox.close()
        pytest.skip("no namespaces here: the audit hook is the only layer (docs/multi_turn.md)")
    yield sandbox
    sandbox.close()
    assert not leftovers(sandbox)


def test_ordinary_code_runs(box):
    r = box.run("import math\nprint(math.factorial(10))\n"
                "open('note.txt', 'w').write('x')\nprint(open('note.txt').read())")
    assert (r.kind, r.exit, r.stdout, r.truncated) == ("ok", 0, "3628800\nx\n", False), r
    r = box.run("raise ValueError('boom')")
    assert r.kind == "error" and r.exit == 1 and "ValueError: boom" in r.stderr and 'File "main.py"' in r.stderr


def test_infinite_loop_times_out(box):
    for code, kinds in (("import time\ntime.sleep(100)", {"timeout"}), ("while True: pass", {"cpu", "timeout"})):
        r = box.run(code)
        assert r.kind in kinds and r.seconds < TIMEOUT_S + SLACK_S, r
    # a CPU kill's classification, independent of the machine's load: SIGXCPU, or SIGKILL past the limit
    assert classify(False, 24, 2.1, 2, False)[0] == "cpu" and classify(False, 9, 2.2, 2, False)[0] == "cpu"


def test_fork_bomb_is_held_at_the_process_limit(box, bare, proc):
    bomb = ("import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n"
            "    except OSError as e:\n        print('forks', n, type(e).__name__); break\n"
            "    if pid == 0:\n        time.sleep(60); os._exit(0)\n    n += 1\n")
    for sandbox in (box, bare, proc):
        start = time.monotonic()
        r = sandbox.run(bomb)
        assert time.monotonic() - start < TIMEOUT_S + SLACK_S, r
        if sandbox.isolation == "namespaces":  # RLIMIT_NPROC: 8 processes, the code's own included
            assert r.kind == "ok" and r.stdout.split()[:2] == ["forks", "7"], r
        else:  # the audit hook refuses new processes
            assert r.stdout.split() == ["forks", "0", "PermissionError"], r
        assert not leftovers(sandbox)  # the sleeping children died with the call


def test_memory_bomb(box):
    for code in ("x = bytearray(1 << 30)", "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))"):
        r = box.run(code)
        assert r.kind == "memory" and "MemoryError" in r.stderr and r.seconds < TIMEOUT_S + SLACK_S, r


def test_writing_outside_the_workdir_is_refused(box, bare, proc, tmp_path):
    outside = tmp_path / "escaped.txt"
    for sandbox in (box, bare, proc):
        for code in ("open('/etc/passwd', 'w')", "open('/etc/passwd', 'a').write('x')",
                     f"open({str(outside)!r}, 'w').write('x')", f"import os\nos.mkdir({str(tmp_path / 'd')!r})",
                     "import os\nos.symlink('/etc/passwd', 'link')\nopen('link', 'a').write('x')"):
            r = sandbox.run(code)
            refused = "PermissionError" in r.stderr or "Read-only file system" in r.stderr
            assert r.kind == "error" and refused, (code, r)
    assert not outside.exists() and not (tmp_path / "d").exists()


def test_no_network(box, bare, proc):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    try:
        for sandbox in (box, bare, proc):
            r = sandbox.run(code)
            assert r.kind == "error" and "connected" not in r.stdout, r
            assert ("Network is unreachable" if sandbox is bare else "no network") in r.stderr, r
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


def test_the_kernel_holds_without_the_hook(bare):
    """No remounting the file system read-write, no new privileges: the code has no capability left."""
    r = bare.run("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                 "print(libc.mount(None, b'/', None, 0x20 | 0x1000 | 0x4000, None), ctypes.get_errno())\n"
                 "open('/tmp/reval_sandbox_escape', 'w')")
    assert r.stdout.split() == ["-1", "1"] and "Read-only file system" in r.stderr, r  # EPERM
    assert not os.path.exists("/tmp/reval_sandbox_escape")


def test_big_output_is_truncated_and_the_call_finishes(box):
    r = box.run("import sys\nprint('x' * 10_000_000)\nsys.stderr.write('e' * 100_000)")
    assert r.kind == "output_truncated" and r.truncated and r.exit == 0 and r.seconds < TIMEOUT_S, r
    assert r.stdout.startswith("x" * 4096) and "10000001 bytes" in r.stdout and len(r.stdout) < 4096 + 100
    assert "100000 bytes" in r.stderr


def test_a_crash_is_an_observation(box):
    r = box.run("import os\nos.abort()")
    assert (r.kind, r.exit) == ("crash", -6), r
    r = box.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert (r.kind, r.exit) == ("killed", -9), r


def test_a_round_with_every_pathology_finishes_in_order(box):
    bad = ["import time\ntime.sleep(100)", "while True: pass", "x = bytearray(1 << 30)", "import os\nos.abort()",
           "open('/etc/passwd', 'w')", "print('y' * 10_000_000)", "import os\nwhile True:\n    try: os.fork()\n"
           "    except OSError: pass", "import socket\nsocket.create_connection(('127.0.0.1', 1))"]
    codes = [f"print({i} * {i})" for i in range(8)] + bad
    codes = [c for pair in zip(codes[:8], codes[8:], strict=True) for c in pair]  # interleaved
    start = time.monotonic()
    results = box.run_many(codes)
    elapsed = time.monotonic() - start
    # 16 calls on 4 workers: at most 2 waves of the wall clock (the sleeps and loops) plus slack
    assert elapsed < 2 * TIMEOUT_S + 2 * SLACK_S, elapsed
    assert [r.stdout for r in results[0::2]] == [f"{i * i}\n" for i in range(8)]
    kinds = [r.kind for r in results[1::2]]
    assert kinds[0] == "timeout" and kinds[1] in ("cpu", "timeout") and kinds[2] == "memory", kinds
    assert kinds[3] == "crash" and kinds[4] == "error" and kinds[5] == "output_truncated" and kinds[7] == "error"
    assert kinds[6] in ("timeout", "cpu", "error"), kinds  # a bomb that keeps retrying at the process limit
    assert not leftovers(box)
    assert box.run("print('after')").stdout == "after\n"  # the pool goes on


def test_close_leaves_nothing_behind():
    sandbox = Sandbox(SandboxConfig(**LIMITS))
    sandbox.run_many(["import os, time\nif os.fork() == 0:\n    time.sleep(60)\n"] * 4)
    sandbox.close()
    assert not leftovers(sandbox)
    with pytest.raises(ValueError):  # the fallback without its only guard is refused
        Sandbox(SandboxConfig(**LIMITS, isolation="process", audit_hook=False))
