"""Run model-written Python in a throwaway process sandbox (the tool of ``opefo/MathTool-v0``).

``run_python(code)`` runs the code in a fresh interpreter that sees a filesystem built for it and
nothing else: ``/usr``, the Python installation, numpy / sympy / mpmath (for math tools) and an
empty writable ``/work`` (its cwd) and ``/tmp``, size-capped tmpfs gone with the sandbox. It has
no network (a new, empty network namespace), no inherited environment, its own pid / ipc / uts
namespaces, and limits on CPU time, address space, file size and process count. The wall-clock
timeout, the output cap (at most a bounded number of bytes is ever read from its pipes), the end
of the run and the death of the process that started it all end its pid namespace, so nothing of
a call outlives it. The interpreter runs ``-I -S``: no site, no environment, no cwd on sys.path.

Two backends build the same sandbox (``sandbox_backend()`` says which is in use; set
``OPEFO_SANDBOX=bwrap|unshare`` to force one):

* ``bwrap`` (bubblewrap, the Flatpak sandbox; ``apt-get install bubblewrap``): preferred, ~40 ms
  a call.
* ``unshare`` (util-linux), with a short mount script that builds the root and ``pivot_root``s
  into it: ~120 ms a call.

Process limits need a user the kernel counts: root's processes ignore ``RLIMIT_NPROC``. As root
the sandbox therefore builds its root without a user namespace and the program drops to a random
unused uid (one per call, so concurrent sandboxes do not share a process budget); as another user
it runs in a new user namespace, where the count is per namespace.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import secrets
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time

__all__ = ["SandboxLimits", "SandboxResult", "run_python", "sandbox_backend", "BACKENDS"]

BACKENDS = ("bwrap", "unshare")
FORCE_ENV = "OPEFO_SANDBOX"
MODULES = ("numpy", "sympy", "mpmath")  # importable by the model's code (mpmath: sympy's dependency)
MODULE_DIR = "/pylib"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # where bwrap, unshare, mount, pivot_root are looked for
TMPFS_MB = 64  # /work and /tmp each: what the code may write in all (RLIMIT_FSIZE caps one file)
DRAIN_S = 3.0  # after a kill: how long the namespace's teardown may take to close the pipes
CHUNK = 65536
SCRATCH_DIRS = ("/mnt", "/media", "/srv", "/run", "/tmp", "/var/tmp")

# Threads count against RLIMIT_NPROC and reserve address space: numpy's BLAS gets one.
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Runs inside the sandbox as its root and pid 1. Reads the code (stdin: its length, a newline,
# the code), gives /work and /tmp to the sandbox uid (argv[1]; -1: no uid change) and forks. The
# child sets the limits, drops to that uid and runs the code as __main__ of main.py, with stdin
# from /dev/null. The parent stays the namespace's init (its exit ends the namespace): it reaps
# orphans and exits with the program's status (128 + signal when killed), or at once when stdin
# reaches EOF: the process that started the sandbox keeps it open until it is done or dead.
_BOOTSTRAP = r"""
import os, resource, select, sys, traceback
uid, cpu, mem, fsize, nproc = (int(a) for a in sys.argv[1:6])
source = sys.stdin.buffer.read(int(sys.stdin.buffer.readline()))
os.chdir("/work")
if uid >= 0:
    for d in ("/work", "/tmp"):
        os.chown(d, uid, uid)
program = os.fork()
if program:
    done = os.pidfd_open(program)
    while True:
        ready = select.select([done, 0], [], [], 1.0)[0]
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == program:
                code = os.waitstatus_to_exitcode(status)
                os._exit(code if code >= 0 else 128 - code)
        if 0 in ready and not os.read(0, 1):
            os._exit(137)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                   (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_NPROC, (nproc, nproc)),
                   (resource.RLIMIT_CORE, (0, 0))):
    resource.setrlimit(res, value)
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
sys.path.append("/pylib")
sys.argv = ["main.py"]
try:
    exec(compile(source, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as e:
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # without this bootstrap's frame
    sys.exit(1)
"""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """What one run may use; ``max_output_chars`` bounds what comes back (stdout + stderr)."""

    timeout_s: float = 5.0  # wall clock
    cpu_s: int = 5  # RLIMIT_CPU
    memory_mb: int = 512  # RLIMIT_AS
    file_size_mb: int = 8  # RLIMIT_FSIZE
    max_processes: int = 16  # RLIMIT_NPROC (threads count too)
    max_output_chars: int = 2000

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kinds = (int, float) if field.name == "timeout_s" else int  # the others are rlimits or counts
            if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
                raise ValueError(f"SandboxLimits.{field.name} must be a positive {field.type}, got {value!r}")
        if self.memory_mb < 64:
            raise ValueError(f"SandboxLimits.memory_mb must be >= 64 (the interpreter itself), got {self.memory_mb}")
        if self.max_processes < 2:
            raise ValueError(f"SandboxLimits.max_processes must be >= 2 (the sandbox's init and the "
                             f"interpreter), got {self.max_processes}")

    @property
    def read_cap_bytes(self) -> int:
        """Bytes read from each pipe before the run is killed (a char is up to 4 UTF-8 bytes)."""
        return max(CHUNK, 8 * int(self.max_output_chars))


@dataclasses.dataclass
class SandboxResult:
    """One run: its bounded output, its exit code (None when the sandbox killed it), and why."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    truncated: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


# ---------------------------------------------------------------------------------------- the root
@dataclasses.dataclass(frozen=True)
class _Root:
    """The sandbox's filesystem: host dirs bound read-only at the same path, top-level symlinks
    (a merged /usr), module dirs bound under MODULE_DIR, and the interpreter to run."""

    ro_dirs: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]  # (path, target)
    modules: tuple[tuple[str, str], ...]  # (host dir, name under MODULE_DIR)
    python: str
    scratch: str  # unshare: an existing dir to mount the new root on (inside the namespace only)


def _covered(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def _module_dirs() -> list[tuple[str, str]]:
    """The host dirs of MODULES (and their wheels' bundled ``<name>.libs``), found without importing."""
    found = []
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        pkg = os.path.realpath(list(spec.submodule_search_locations)[0])
        found.append((pkg, name))
        libs = os.path.join(os.path.dirname(pkg), f"{name}.libs")
        if os.path.isdir(libs):
            found.append((os.path.realpath(libs), f"{name}.libs"))
    return found


@functools.lru_cache(maxsize=1)
def _root() -> _Root:
    ro_dirs, symlinks = ["/usr"], []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            symlinks.append((top, os.readlink(top)))
        elif os.path.isdir(top):
            ro_dirs.append(top)
    python = os.path.realpath(sys.executable)
    for path in (os.path.realpath(sys.base_prefix), os.path.dirname(python)):
        if not _covered(path, ro_dirs):
            ro_dirs.append(path)
    modules = _module_dirs()
    # A mount point that hides none of the bind sources: no host dir is made, none can be left behind.
    sources = ro_dirs + [host for host, _ in modules]
    scratch = next((d for d in SCRATCH_DIRS if os.path.isdir(d) and not os.path.islink(d)
                    and not any(_covered(src, [d]) for src in sources)), "/tmp")
    return _Root(tuple(ro_dirs), tuple(symlinks), tuple(modules), python, scratch)


def _python_argv(root: _Root, limits: SandboxLimits, uid: int) -> list[str]:
    mb = 1024 * 1024
    numbers = (uid, limits.cpu_s, limits.memory_mb * mb, limits.file_size_mb * mb, limits.max_processes)
    return [root.python, "-I", "-S", "-X", "utf8", "-c", _BOOTSTRAP, *(str(int(n)) for n in numbers)]


def _sandbox_uid() -> int:
    """As root: a random uid no one else uses, so RLIMIT_NPROC counts this run's processes only.
    Otherwise -1 (the user namespace keeps the caller's uid and counts per namespace)."""
    return 2**30 + secrets.randbelow(2**30) if os.geteuid() == 0 else -1


# ---------------------------------------------------------------------------------------- backends
def _bwrap_argv(binary: str, limits: SandboxLimits) -> tuple[list[str], dict]:
    root = _root()
    argv = [binary, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv", "--hostname", "sandbox",
            "--as-pid-1"]  # the bootstrap is init: bwrap's own would be orphaned unreaped (see _kill)
    if os.geteuid() != 0:
        argv.append("--unshare-user")
    for key, value in SANDBOX_ENV.items():
        argv += ["--setenv", key, value]
    binds = [(d, d) for d in root.ro_dirs] + [(host, f"{MODULE_DIR}/{name}") for host, name in root.modules]
    for parent in sorted({p for _, dest in binds for p in _parents(dest)}):
        argv += ["--perms", "0755", "--dir", parent]  # else bwrap makes them 0700: closed to the sandbox uid
    for host, dest in binds:
        argv += ["--ro-bind", host, dest]
    for path, target in root.symlinks:
        argv += ["--symlink", target, path]
    size = ["--size", str(TMPFS_MB * 1024 * 1024)] if _bwrap_has_size(binary) else []
    argv += ["--dev", "/dev", "--proc", "/proc", *size, "--tmpfs", "/tmp", *size, "--tmpfs", "/work",
             "--chdir", "/work", "--", *_python_argv(root, limits, _sandbox_uid())]
    return argv, {}


def _parents(path: str) -> list[str]:
    """The ancestors of an absolute path, without "/": /a/b/c -> [/a, /a/b]."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


@functools.lru_cache(maxsize=None)
def _bwrap_has_size(binary: str) -> bool:
    """``--size`` (a capped tmpfs) came with bubblewrap 0.8; older ones get an uncapped tmpfs."""
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10)
    return "--size" in out.stdout + out.stderr


def _unshare_script(root: _Root, tools: dict[str, str]) -> str:
    """sh, run as the namespace's root: mount a tmpfs on $1, build the root there from binds, and
    make it the root."""
    q = shlex.quote
    mount, mkdir = q(tools["mount"]), q(tools["mkdir"])
    lines = ["set -e", 'R="$1"', "shift", f"{mount} -t tmpfs -o mode=755,size=1m sandbox-root \"$R\""]
    binds = [(d, d) for d in root.ro_dirs] + [(host, f"{MODULE_DIR}/{name}") for host, name in root.modules]
    for host, dest in binds:
        lines += [f"{mkdir} -p \"$R\"{q(dest)}", f"{mount} --rbind {q(host)} \"$R\"{q(dest)}",
                  f"{mount} -o remount,bind,ro,nosuid,nodev \"$R\"{q(dest)}"]
    lines += [f"{q(tools['ln'])} -s {q(target)} \"$R\"{q(path)}" for path, target in root.symlinks]
    lines.append(f"{mkdir} \"$R/work\" \"$R/tmp\" \"$R/proc\" \"$R/dev\"")
    for d in ("work", "tmp"):
        lines.append(f"{mount} -t tmpfs -o mode=755,nosuid,nodev,size={TMPFS_MB}m sandbox-{d} \"$R/{d}\"")
    lines += [f"{mount} -t proc -o nosuid,nodev,noexec proc \"$R/proc\"",
              f"{mount} -t tmpfs -o mode=755,nosuid,size=64k sandbox-dev \"$R/dev\""]
    for dev in ("null", "zero", "full", "random", "urandom"):
        lines += [f"{q(tools['touch'])} \"$R/dev/{dev}\"", f"{mount} --bind /dev/{dev} \"$R/dev/{dev}\""]
    lines.append(f"{mount} -o remount,bind,ro \"$R\"")
    # pivot_root, then detach the old root: unlike a chroot, nothing of the host is left to escape to.
    lines += ['cd "$R"', f"{q(tools['pivot_root'])} . .", f"{q(tools['umount'])} -l .", "cd /"]
    lines.append('exec "$@"')  # the bootstrap becomes the namespace's init
    return "\n".join(lines)


def _unshare_argv(binary: str, limits: SandboxLimits) -> tuple[list[str], dict]:
    root = _root()
    tools = {name: shutil.which(name, path=SYSTEM_PATH) or name
             for name in ("sh", "mount", "umount", "mkdir", "ln", "touch", "pivot_root")}
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    argv = [binary, *user, "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child",
            "--propagation", "private", tools["sh"], "-c", _unshare_script(root, tools), "sandbox", root.scratch,
            *_python_argv(root, limits, _sandbox_uid())]
    return argv, dict(SANDBOX_ENV)


_ARGV = {"bwrap": _bwrap_argv, "unshare": _unshare_argv}


@functools.lru_cache(maxsize=None)
def _binary(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SYSTEM_PATH)


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> str | None:
    """None if backend ``name`` runs a program here, else why not (checked once per process)."""
    if _binary(name) is None:
        return "not installed"
    try:
        result = _run(name, "print(6 * 7)", SandboxLimits(timeout_s=30, cpu_s=10))
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    if result.stdout.strip() != "42":
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"exit {result.exit_code}: {detail[:200]}"
    return None


def sandbox_backend() -> str:
    """The backend ``run_python`` uses: ``$OPEFO_SANDBOX`` if set, else the first of BACKENDS
    that works here; a RuntimeError naming what to install when none does."""
    forced = os.environ.get(FORCE_ENV, "")
    if forced and forced not in BACKENDS:
        raise ValueError(f"{FORCE_ENV}={forced!r}: must be one of {', '.join(BACKENDS)}")
    why = {}
    for name in (forced,) if forced else BACKENDS:
        why[name] = _probe(name)
        if why[name] is None:
            return name
    tried = "; ".join(f"{name}: {reason}" for name, reason in why.items())
    raise RuntimeError(f"no process sandbox for model-written code works here ({tried}); install bubblewrap "
                       f"(apt-get install bubblewrap) and allow namespaces (root, or unprivileged user namespaces)")


# ---------------------------------------------------------------------------------------- running
def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``code`` as a program in a fresh sandbox; never raises for anything the code does."""
    return _run(sandbox_backend(), code, limits)


def _run(backend: str, code: str, limits: SandboxLimits) -> SandboxResult:
    start = time.monotonic()
    argv, env = _ARGV[backend](_binary(backend), limits)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd="/", start_new_session=True, close_fds=True)
    try:
        source = code.encode("utf-8", "replace")
        out, err, timed_out, overflow = _communicate(proc, b"%d\n" % len(source) + source, limits, start)
    finally:
        _kill(proc)
    exit_code = None if timed_out or overflow else proc.returncode
    stdout, stderr, cut = _bound(out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                                 limits.max_output_chars)
    return SandboxResult(stdout, stderr, exit_code, timed_out, cut or overflow, time.monotonic() - start)


def _communicate(proc: subprocess.Popen, source: bytes, limits: SandboxLimits,
                 start: float) -> tuple[bytes, bytes, bool, bool]:
    """Feed the code, read both pipes until EOF, the deadline or the read cap (whichever first).
    Returns (stdout, stderr, timed_out, overflow); the caller kills whatever is still running."""
    deadline = start + limits.timeout_s
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    pending = memoryview(source)
    with selectors.DefaultSelector() as sel:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            os.set_blocking(pipe.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
        for pipe in buffers:
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), True, False
            for key, _ in sel.select(left):
                if key.fileobj is proc.stdin:
                    pending = _feed(proc, pending, sel)
                    continue
                chunk = os.read(key.fd, CHUNK)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buffers[key.fileobj] += chunk
                if len(buffers[key.fileobj]) > limits.read_cap_bytes:
                    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), False, True
    try:  # both pipes closed; the program may still run (it closed them itself)
        proc.wait(max(0.0, deadline - time.monotonic()))
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), timed_out, False


def _feed(proc: subprocess.Popen, pending: memoryview, sel: selectors.BaseSelector) -> memoryview:
    try:
        pending = pending[os.write(proc.stdin.fileno(), pending[:CHUNK]):]
    except BlockingIOError:
        return pending
    except BrokenPipeError:  # the sandbox is gone; its exit code and stderr say why
        pending = pending[:0]
    if not pending:  # stdin stays open: its EOF tells the sandbox's init to end the sandbox
        sel.unregister(proc.stdin)
    return pending


def _kill(proc: subprocess.Popen) -> None:
    """End the sandbox and wait until nothing of it is left.

    The namespace's init (the backend's child) is killed first: the kernel then kills the rest of
    the namespace and the backend reaps the init and exits. Killing the backend first would orphan
    the init to the host's pid 1, which in a container may never reap it (a zombie per call)."""
    _close(proc.stdin)
    if proc.poll() is None:
        for pid in _children(proc.pid):
            _kill_child(proc.pid, pid)
    # Drained before the wait: the backend may be blocked writing its own message to a full pipe.
    _drain([p for p in (proc.stdout, proc.stderr) if p is not None], DRAIN_S)
    try:
        proc.wait(DRAIN_S)
    except subprocess.TimeoutExpired:  # killed before it started the namespace
        proc.kill()
        proc.wait()
    _close(proc.stdout)
    _close(proc.stderr)


def _close(pipe) -> None:
    try:
        if pipe is not None:
            pipe.close()
    except BrokenPipeError:  # stdin's unflushed bytes, for a sandbox already gone
        pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _kill_child(parent: int, pid: int) -> None:
    """SIGKILL ``pid`` through a pidfd, once it is known to be ``parent``'s child (not a reused pid)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        if ppid == parent:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass
    finally:
        os.close(fd)


def _drain(pipes: list, seconds: float) -> None:
    """Read the pipes to EOF, discarding: every process of the namespace holds them until it is gone."""
    end = time.monotonic() + seconds
    with selectors.DefaultSelector() as sel:
        for pipe in pipes:
            if not pipe.closed:
                sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map() and time.monotonic() < end:
            for key, _ in sel.select(end - time.monotonic()):
                if not os.read(key.fd, CHUNK):
                    sel.unregister(key.fileobj)


def _bound(out: str, err: str, limit: int) -> tuple[str, str, bool]:
    """stdout's head and stderr's tail (a traceback ends with the error), ``limit`` chars together;
    stderr keeps at least half of them when both are long."""
    keep_err = min(len(err), max(limit - len(out), limit // 2))
    keep_out = limit - keep_err
    cut = len(out) > keep_out or len(err) > keep_err
    if len(out) > keep_out:
        out = out[:keep_out] + f"\n[... {len(out) - keep_out} more characters]"
    if len(err) > keep_err:
        err = f"[... {len(err) - keep_err} characters before]\n" + err[len(err) - keep_err:]
    return out, err, cut
