"""A sandbox for model-written code: each call in fresh, limited processes, a pool of them per round.

    with Sandbox(SandboxConfig(timeout_s=5)) as box:
        result = box.run("print(2 + 2)")           # Result(stdout='4\\n', kind='ok', exit=0, ...)
        results = box.run_many(codes)              # a round's calls in parallel, results in order

Each call gets a fresh temporary working directory (removed afterwards) and a fresh interpreter,
``python -I -S -B`` (isolated: no user site, no PYTHON* variables, no site-packages unless
``site_packages``), started in a new session (its own process group) by one of ``workers`` supervisor
threads. The supervisor enforces the wall clock (it kills the whole process group), reads stdout and
stderr concurrently and keeps the first ``max_output_bytes`` of each (the rest is drained and
counted, so a 10 MB print finishes), and turns whatever happened into a ``Result``: a crashed,
killed or timed-out call is an error observation, never an exception and never a stalled round.

What is enforced where (docs/multi_turn.md, "Sandbox", has the full table):

* Always, by the kernel (``setrlimit`` in the process that runs the code): CPU seconds
  (RLIMIT_CPU: SIGXCPU, SIGKILL one second later), address space (RLIMIT_AS), file size
  (RLIMIT_FSIZE; SIGXFSZ ignored, so an oversized write fails with EFBIG), open files
  (RLIMIT_NOFILE), no core files; by the supervisor: the wall clock and the output size.
* ``isolation="namespaces"`` (chosen by ``"auto"`` when the kernel allows it: root, or unprivileged
  user namespaces): the code runs in new user, network, mount, PID and IPC namespaces. No network
  (the new network namespace has only a loopback interface, down); the whole file system is
  remounted read-only except the working directory; the code's processes live in their own PID
  namespace, so ending its init ends every process the code started (daemons and ``setsid``
  escapes included); RLIMIT_NPROC counts only the namespace's processes (``max_processes``, the
  code's own process included). Under root, the namespace's root is mapped to ``nobody`` (65534), so
  the code has no privilege outside it and RLIMIT_NPROC applies (root is exempt from it).
* ``isolation="process"`` (the fallback): no namespaces. The rlimits above hold; under root the code
  runs as ``nobody`` (file permissions then forbid writing root's files, RLIMIT_NPROC applies);
  network, writes outside the working directory and process creation are refused only by the audit
  hook below, which native code (``ctypes``, a C extension) can bypass: weaker, and said so.
* Both modes, in the code's interpreter (``audit_hook=True``): a ``sys.addaudithook`` hook refuses
  sockets, ``open`` for writing and file mutations (remove, rename, mkdir, chmod, links, ...) outside
  the working directory; in ``process`` mode also fork / exec / subprocess. A layer on top of the
  kernel's limits, not instead of them.

Result kinds: ``ok`` (exit 0), ``error`` (the code raised or exited non-zero), ``timeout`` (wall
clock), ``cpu`` (CPU limit), ``memory`` (MemoryError under RLIMIT_AS), ``killed`` (another SIGKILL),
``crash`` (another signal: abort, segfault), ``output_truncated`` (exit 0 but output cut; the
``truncated`` flag is set with any kind), ``setup`` (the sandbox itself could not start the call).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence

NOBODY = 65534
EXIT_MEMORY = 86  # the code's interpreter exits with this after a MemoryError
EXIT_SETUP = 87  # the launcher could not set the sandbox up (the reason is on the status pipe)
KINDS = ("ok", "error", "timeout", "cpu", "memory", "killed", "crash", "output_truncated", "setup")
_READ = 65536
_DRAIN_AFTER_KILL_S = 1.0  # after a kill, how long the supervisor waits for the pipes to close


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """The limits of one call and the pool's size."""

    timeout_s: float = 10.0  # wall clock per call, from the start of its interpreter
    cpu_s: int = 10  # RLIMIT_CPU (seconds of CPU, all threads of the code's process)
    memory_mb: int = 512  # RLIMIT_AS of the code's process (virtual memory)
    max_processes: int = 16  # RLIMIT_NPROC in namespaces mode, the code's own process included
    max_file_mb: int = 16  # RLIMIT_FSIZE: the largest file the code may write
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 16384  # kept per stream (stdout, stderr); the rest is drained and counted
    workers: int = 4  # supervisor threads: calls that run at once
    isolation: str = "auto"  # "auto" | "namespaces" | "process" (module docstring)
    audit_hook: bool = True  # the in-interpreter layer (module docstring)
    site_packages: bool = False  # let the code import the interpreter's site-packages (numpy, sympy)
    python: str = sys.executable
    root_dir: str | None = None  # where working directories are made; None: the system's temp dir

    def __post_init__(self):
        if self.isolation not in ("auto", "namespaces", "process"):
            raise ValueError(f"isolation must be auto, namespaces or process, not {self.isolation!r}")
        if min(self.timeout_s, self.cpu_s, self.memory_mb, self.max_processes, self.workers) <= 0:
            raise ValueError("sandbox limits and workers must be positive")


@dataclasses.dataclass(frozen=True)
class Result:
    """What one call did: its output (each stream cut at max_output_bytes), exit status and kind."""

    stdout: str
    stderr: str
    exit: int | None  # exit code, or -signal; None when the call timed out or never started
    kind: str  # one of KINDS
    seconds: float  # wall clock of the call, supervisor side
    truncated: bool = False  # stdout or stderr was cut

    @property
    def ok(self) -> bool:
        return self.kind in ("ok", "output_truncated")


# The program each call's interpreter runs (`python -I -S -B -c _LAUNCHER <json>`). It sets the sandbox
# up, then runs the code in main.py of the working directory. In namespaces mode it forks: L (this
# process, outside) -> C1 (new namespaces; L writes its uid/gid maps) -> C2 (PID 1 of the new PID
# namespace: it only waits, since PID 1 ignores default-action signals) -> C3 (limits, hook, the code).
# C2 reports C3's wait status and CPU seconds on the status pipe; when C2 ends, the kernel kills
# every process left in the namespace.
_LAUNCHER = r'''
import json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
WORK, STATUS = cfg["workdir"], cfg["status_fd"]
EXIT_SETUP, EXIT_MEMORY, NOBODY = cfg["constants"]

def report(text):
    os.write(STATUS, (text + "\n").encode())

def fail(what, err=None):
    report("setup " + what + (": " + os.strerror(err) if err else ""))
    os._exit(EXIT_SETUP)

def limit():
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value + (1 if name == "RLIMIT_CPU" else 0)))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

def hook(block_processes):
    root = os.path.realpath(WORK)
    inside = lambda p: isinstance(p, int) or (os.path.realpath(os.fsdecode(p)) + os.sep).startswith(root + os.sep)
    checked = {"os.remove": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.rmdir": (0,), "os.chmod": (0,),
               "os.chown": (0,), "os.link": (1,), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
               "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "os.removexattr": (0,),
               "os.setxattr": (0,)}
    procs = ("os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen")
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def audit(event, args):
        if event.startswith("socket."):
            raise PermissionError("sandbox: no network")
        if block_processes and event in procs:
            raise PermissionError("sandbox: no new processes")
        if event == "open" and args[0] is not None:
            mode, flags = args[1] or "", args[2] or 0
            if (any(c in mode for c in "wax+") or flags & writing) and not inside(args[0]):
                raise PermissionError("sandbox: no writing outside the working directory: %r" % (args[0],))
        elif event in checked:
            for i in checked[event]:
                if args[i] is not None and not inside(args[i]):
                    raise PermissionError("sandbox: %s outside the working directory: %r" % (event, args[i]))
    sys.addaudithook(audit)

def drop_privileges(libc, ctypes):
    """C3 is uid 0 of its user namespace: drop every capability for good (no remount, no setuid)."""
    if libc.prctl(28, 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80, 0, 0, 0) != 0:  # SECUREBITS, locked
        fail("securebits", ctypes.get_errno())
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (EINVAL past the last capability)
    header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    if libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        fail("capset", ctypes.get_errno())
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        fail("no_new_privs", ctypes.get_errno())

def run_code():
    os.chdir(WORK)
    with open("main.py", "rb") as f:
        code = compile(f.read(), "main.py", "exec")
    limit()
    if cfg["audit_hook"]:
        hook(cfg["mode"] == "process")
    sys.argv, sys.path[0:0] = ["main.py"], [WORK]
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, scope)
    except MemoryError as e:
        scope.clear()
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_MEMORY)
    except SystemExit:
        raise
    except BaseException as e:
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()

def namespaces():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child:  # L: write C1's id maps from outside its user namespace, then wait for it
        os.close(ready_w)
        if os.read(ready_r, 1) != b"1":
            os._exit(EXIT_SETUP)
        outer_uid = NOBODY if os.getuid() == 0 else os.getuid()
        outer_gid = NOBODY if os.getuid() == 0 else os.getgid()
        for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % outer_uid),
                           ("gid_map", "0 %d 1" % outer_gid)):
            with open("/proc/%d/%s" % (child, name), "w") as f:
                f.write(text)
        os.write(go_w, b"1")
        os._exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) & 255)
    os.close(ready_r)
    hidden = hidden_python_dirs()
    if libc.prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG
        fail("prctl", ctypes.get_errno())
    flags = 0x10000000 | 0x40000000 | 0x00020000 | 0x20000000 | 0x08000000  # USER NET NS PID IPC
    if libc.unshare(flags) != 0:
        fail("unshare", ctypes.get_errno())
    # still the outer uid (owner of a Python under /root): open the hidden dirs in the new mount namespace
    hidden = {a: {d: os.open(d, os.O_PATH) for d in dirs} for a, dirs in hidden.items()}
    os.write(ready_w, b"1")
    if os.read(go_r, 1) != b"1":
        os._exit(EXIT_SETUP)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    readonly_except_workdir(libc, ctypes, hidden)
    init = os.fork()
    if init:
        os._exit(os.waitstatus_to_exitcode(os.waitpid(init, 0)[1]) & 255)
    libc.prctl(1, signal.SIGKILL)  # C2, PID 1: dies with C1; then the kernel ends the namespace
    worker = os.fork()
    if worker == 0:
        drop_privileges(libc, ctypes)
        del libc, ctypes
        run_code()
        os._exit(0)
    _, status, usage = os.wait4(worker, 0)
    report("status %d %.3f" % (status, usage.ru_utime + usage.ru_stime))
    os._exit(0)

def hidden_python_dirs():
    """Under root the code runs as nobody: the interpreter's directories that nobody cannot reach (a
    Python installed under /root, mode 700) -> {the unreachable ancestor: [directories]}.
    Bound into a tmpfs over that ancestor once the namespace exists."""
    if os.getuid() != 0:
        return {}
    wanted = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, *sys.path) if os.path.isdir(p)}
    hidden = {}
    for d in sorted(wanted):
        parts = d.split(os.sep)
        for i in range(2, len(parts) + 1):
            ancestor = os.sep.join(parts[:i])
            if not os.stat(ancestor).st_mode & 0o001:
                if not any(d.startswith(a + os.sep) for a in hidden if a != ancestor):
                    hidden.setdefault(ancestor, []).append(d)
                break
    return hidden

def readonly_except_workdir(libc, ctypes, hidden):
    MS_REC, MS_PRIVATE, MS_BIND = 0x4000, 0x40000, 0x1000
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        fail("mount private", ctypes.get_errno())
    for ancestor, dirs in hidden.items():  # a tmpfs hides the ancestor; the interpreter's dirs come back
        if libc.mount(b"tmpfs", ancestor.encode(), b"tmpfs", 0, b"mode=755,size=64k") != 0:
            fail("tmpfs " + ancestor, ctypes.get_errno())
        for d, fd in dirs.items():
            os.makedirs(d, exist_ok=True)
            if libc.mount(("/proc/self/fd/%d" % fd).encode(), d.encode(), None, MS_BIND | MS_REC, None) != 0:
                fail("bind " + d, ctypes.get_errno())
            os.close(fd)
    if libc.mount(WORK.encode(), WORK.encode(), None, MS_BIND | MS_REC, None) != 0:
        fail("bind workdir", ctypes.get_errno())
    attr = (ctypes.c_uint64 * 4)()
    for path, index in ((b"/", 0), (WORK.encode(), 1)):  # attr_set RDONLY on /, then attr_clr on WORK
        attr[0], attr[1] = (1, 0) if index == 0 else (0, 1)
        if libc.syscall(442, -100, path, 0x8000, ctypes.byref(attr), 32) != 0:  # mount_setattr, AT_RECURSIVE
            fail("mount_setattr " + path.decode(), ctypes.get_errno())

if cfg["mode"] == "namespaces":
    namespaces()
else:
    if os.getuid() == 0 and not hidden_python_dirs():  # nobody can import the standard library
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    run_code()
'''

_PROBED: dict[tuple[str, str], str] = {}  # (python, root_dir) -> the isolation "auto" resolved to
_PROBE_LOCK = threading.Lock()


def classify(timed_out: bool, status: int | None, cpu_s: float, cpu_limit: int,
             truncated: bool) -> tuple[str, int | None]:
    """(kind, exit) of a call from what the supervisor saw: its deadline, the code's wait status (None if
    it never reported one) and CPU seconds. exit is the exit code, or -signal."""
    if timed_out:
        return "timeout", None
    if status is None:
        return "killed", None
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= cpu_limit):
            return "cpu", -sig
        return ("killed" if sig == signal.SIGKILL else "crash"), -sig
    code = os.WEXITSTATUS(status)
    if code == EXIT_MEMORY:
        return "memory", code
    if code == EXIT_SETUP:
        return "setup", code
    if code:
        return "error", code
    return ("output_truncated" if truncated else "ok"), 0


@dataclasses.dataclass
class _Stream:
    """One of a call's output streams: the first `limit` bytes kept, the rest counted."""

    limit: int
    data: bytearray = dataclasses.field(default_factory=bytearray)
    total: int = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    def text(self) -> str:
        out = self.data.decode("utf-8", errors="replace")
        if self.total > len(self.data):
            out += f"\n[output truncated: {self.total} bytes, {len(self.data)} kept]"
        return out


class Sandbox:
    """A pool of supervisor threads, each running one call at a time in fresh processes (module docstring)."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.tag = f"reval-sandbox-{uuid.uuid4().hex[:12]}"  # in every process's command line (tests find leftovers)
        self._live: dict[int, subprocess.Popen] = {}  # process group -> launcher
        self._lock = threading.Lock()
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(self.config.workers, thread_name_prefix="sandbox")
        self.isolation = self._resolve_isolation()
        if self.isolation == "process" and not self.config.audit_hook:
            self.close()
            raise ValueError("isolation='process' needs audit_hook=True: the hook is its only network, file "
                             "and process guard")

    def run(self, code: str) -> Result:
        """Run one program (Python source) in the sandbox; never raises for anything the code does."""
        return self._pool.submit(self._call, code, self.isolation).result()

    def run_many(self, codes: Sequence[str]) -> list[Result]:
        """Run a round's programs in parallel over the pool; the results in the order of `codes`."""
        futures = [self._pool.submit(self._call, code, self.isolation) for code in codes]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Wait for running calls (each bounded by its wall clock), then kill anything left."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        with self._lock:
            for group in list(self._live):
                _kill_group(group)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _resolve_isolation(self) -> str:
        wanted = self.config.isolation
        if wanted == "process":
            return wanted
        key = (self.config.python, self.config.root_dir or tempfile.gettempdir())
        with _PROBE_LOCK:
            if key not in _PROBED:
                probe = self._call("pass", "namespaces")
                _PROBED[key] = "namespaces" if probe.kind == "ok" else "process"
                self.probe_error = probe.stderr
        if wanted == "namespaces" and _PROBED[key] != "namespaces":
            raise RuntimeError(f"namespaces are not available here: {getattr(self, 'probe_error', '')}")
        return _PROBED[key]

    def _command(self, workdir: str, status_fd: int, mode: str) -> list[str]:
        c = self.config
        rlimits = {"RLIMIT_CPU": int(c.cpu_s), "RLIMIT_AS": c.memory_mb << 20, "RLIMIT_FSIZE": c.max_file_mb << 20,
                   "RLIMIT_NOFILE": c.max_open_files, "RLIMIT_CORE": 0}
        if mode == "namespaces":  # counts the namespace's processes: C1 and C2 besides the code's
            rlimits["RLIMIT_NPROC"] = c.max_processes + 2
        elif os.getuid() == 0:  # counts every process of `nobody`, all calls together
            rlimits["RLIMIT_NPROC"] = c.max_processes * c.workers
        cfg = {"workdir": workdir, "status_fd": status_fd, "mode": mode, "rlimits": rlimits,
               "audit_hook": c.audit_hook, "tag": self.tag, "constants": [EXIT_SETUP, EXIT_MEMORY, NOBODY]}
        flags = ["-I", "-B"] + ([] if c.site_packages else ["-S"])
        return [c.python, *flags, "-c", _LAUNCHER, json.dumps(cfg)]

    def _call(self, code: str, mode: str) -> Result:
        start = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="reval_sandbox_", dir=self.config.root_dir)
        status_r, status_w = os.pipe()
        proc = None
        try:
            with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
                f.write(code)
            if os.getuid() == 0:  # the code runs as nobody (module docstring)
                os.chown(workdir, NOBODY, NOBODY)
                os.chown(os.path.join(workdir, "main.py"), NOBODY, NOBODY)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "LANG": "C.UTF-8",
                   "TMPDIR": workdir, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            proc = subprocess.Popen(self._command(workdir, status_w, mode), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
                                    start_new_session=True, cwd=workdir, env=env)
            with self._lock:
                self._live[proc.pid] = proc
            os.close(status_w)
            status_w = -1
            return self._supervise(proc, status_r, start, mode)
        except OSError as e:  # the sandbox could not start the call (no interpreter, no temp dir, ...)
            return Result("", f"sandbox: {e}", None, "setup", time.monotonic() - start)
        finally:
            if proc is not None:
                _kill_group(proc.pid)
                with self._lock:
                    self._live.pop(proc.pid, None)
            for fd in (status_r, status_w):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)

    def _supervise(self, proc: subprocess.Popen, status_r: int, start: float, mode: str) -> Result:
        """Read the call's streams until they close or its wall clock runs out; then its status."""
        limit = self.config.max_output_bytes
        out, err, status_text = _Stream(limit), _Stream(limit), bytearray()
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        deadline, timed_out = start + self.config.timeout_s, False
        with selectors.DefaultSelector() as sel:
            for fd in (*streams, status_r):
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                wait = deadline - time.monotonic()
                if wait <= 0:
                    if timed_out:
                        break  # the pipes are still open a second after the kill: give up on them
                    timed_out = True
                    _kill_group(proc.pid)
                    deadline = time.monotonic() + _DRAIN_AFTER_KILL_S
                    continue
                for key, _ in sel.select(wait):
                    chunk = os.read(key.fd, _READ)
                    if not chunk:
                        sel.unregister(key.fd)
                    elif key.fd == status_r:
                        status_text += chunk
                    else:
                        streams[key.fd].add(chunk)
        proc.stdout.close()
        proc.stderr.close()
        status, cpu_s = self._wait_status(proc, bytes(status_text), mode)
        truncated = out.total > limit or err.total > limit
        kind, exit_code = classify(timed_out, status, cpu_s, self.config.cpu_s, truncated)
        stderr = err.text()
        if kind == "setup":
            stderr = bytes(status_text).decode(errors="replace") + stderr
        return Result(out.text(), stderr, exit_code, kind, time.monotonic() - start, truncated)

    @staticmethod
    def _wait_status(proc: subprocess.Popen, status_text: bytes, mode: str) -> tuple[int | None, float]:
        """The code's wait status and CPU seconds: reported by C2 in namespaces mode, the launcher's own in
        process mode (where the launcher is the code's process)."""
        _kill_group(proc.pid)  # the call is over: nothing of it may outlive this
        _, launcher_status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(launcher_status)
        if mode == "process":
            return launcher_status, usage.ru_utime + usage.ru_stime
        for line in status_text.decode(errors="replace").splitlines():
            if line.startswith("status "):
                _, status, cpu = line.split()
                return int(status), float(cpu)
        if os.WIFEXITED(launcher_status) and os.WEXITSTATUS(launcher_status) == EXIT_SETUP:
            return launcher_status, 0.0
        return None, 0.0


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
