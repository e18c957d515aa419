"""Warm child processes: `python script|-m module|-c code` forked from a server that has already
imported torch, instead of a fresh interpreter that imports it again (most of the suite's time).

`WarmPopen` takes the arguments of `subprocess.Popen` that the tests use and starts the command as
a process of its own: its own pid, exit code, session, environment, working folder, umask,
standard streams, passed file descriptors, sys.argv, sys.path, `__main__`, random seeds, and the
signal dispositions exec would give it. What differs from `python`: the server's modules (torch,
numpy) are imported already, with the environment the server started with; the string hash seed
is the server's; tracebacks show runpy's frames; the parent is the server, and the child is
killed if the server ends. `TESTS_COLD=1` makes `start` and `run` start fresh interpreters
(subprocess itself). The server (`python -m tests.warm SOCKET`) starts on first use, one per test
process, and ends with it.
"""
import atexit
import builtins
import ctypes
import fcntl
import gc
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import shutil
import threading
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = ("numpy", "torch", "torch._dynamo")
MAX_FDS = 32
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends
# Signals a child's disposition is copied for; SIGPIPE and SIGXFSZ are Python's own at start-up
# (ignored, in the server as in a fresh interpreter), SIGINT is set apart.
INHERITED_SIGNALS = sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE,
                                                          signal.SIGXFSZ, signal.SIGINT})
_Popen = subprocess.Popen  # the real one, even where a test has replaced subprocess.Popen


def cold():
    return os.environ.get("TESTS_COLD", "") not in ("", "0")


def parse(args):
    """(kind, target, argv) of a `python ...` command line; ValueError for anything else."""
    args = [os.fspath(a) for a in args]
    if len(args) < 2 or os.path.realpath(args[0]) != os.path.realpath(sys.executable):
        raise ValueError(f"not a command of this Python: {args[:2]}")
    if args[1] == "-m" and len(args) > 2:
        return "module", args[2], [args[2], *args[3:]]
    if args[1] == "-c" and len(args) > 2:
        return "code", args[2], ["-c", *args[3:]]
    if args[1].startswith("-"):
        raise ValueError(f"interpreter option {args[1]} is not supported warm")
    return "script", args[1], args[1:]


def start(args, **kwargs):
    """A warm child of `args` where it can be one, else `subprocess.Popen(args, **kwargs)`."""
    if not cold():
        try:
            parse(args)
        except ValueError:
            pass
        else:
            return WarmPopen(args, **kwargs)
    return _Popen(args, **kwargs)


def run(args, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """`subprocess.run` with a warm child where it can be one."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with start(args, **kwargs) as process:
        try:
            out, err = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        except BaseException:  # Ctrl-C included, as subprocess.run: the child does not outlive it
            process.kill()
            raise
    completed = subprocess.CompletedProcess(args, process.returncode, out, err)
    if check:
        completed.check_returncode()
    return completed


# The client -------------------------------------------------------------------------------------

class Server:
    """The warm server of this process, started on first use."""
    _lock = threading.Lock()
    _instance = None

    @classmethod
    def get(cls):
        with cls._lock:
            if cls._instance is None or cls._instance.process.poll() is not None:
                cls._instance = cls()
            return cls._instance

    @classmethod
    def path(cls):
        return cls.get().socket_path

    @classmethod
    def pid(cls):
        return cls.get().process.pid

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="warm-")
        self.socket_path = os.path.join(self.folder, "socket")
        # Without the thread counts a test may have set while it started, so that torch's default
        # is a fresh interpreter's (each child sets its own from its environment).
        env = {key: value for key, value in os.environ.items()
               if key not in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        # stdin: the server's lifeline (it ends when this process does); stdout: its "ready".
        self.process = _Popen([sys.executable, "-m", "tests.warm", self.socket_path], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self.process.stdout.readline() != b"ready\n":
            raise RuntimeError("the warm server did not start")
        atexit.register(self.close)

    def close(self):
        self.process.stdin.close()
        self.process.wait()
        self.process.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class WarmPopen:
    """A warm child with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, args, stdin=None, stdout=None, stderr=None, env=None, cwd=None, text=False,
                 universal_newlines=None, start_new_session=False, pass_fds=(), bufsize=-1):
        self.args = args
        kind, target, argv = parse(args)
        cwd = os.path.abspath(cwd or os.getcwd())
        if not os.path.isdir(cwd):  # Popen raises in the parent, before any child exists
            raise FileNotFoundError(2, "No such file or directory", cwd)
        text = bool(text or universal_newlines)
        self.returncode = None
        self.stdin = self.stdout = self.stderr = None
        self._lock = threading.Lock()  # one reader of the server's lines at a time (wait, poll)
        self._buffer = b""
        try:
            self._start(kind, target, argv, stdin, stdout, stderr, env, cwd, text, start_new_session,
                        pass_fds)
        except BaseException:
            for stream in (self.stdin, self.stdout, self.stderr):
                if stream:
                    stream.close()
            if hasattr(self, "_connection"):
                self._connection.close()
            raise

    def _start(self, kind, target, argv, stdin, stdout, stderr, env, cwd, text, start_new_session, pass_fds):
        ours, theirs = {}, []  # our ends of the pipes; the child's ends, for fds 0, 1 and 2
        for number, spec in ((0, stdin), (1, stdout), (2, stderr)):
            if spec == subprocess.STDOUT and number == 2:
                theirs.append(theirs[1])
            elif spec == subprocess.PIPE:
                read, write = os.pipe()
                mine, child = (write, read) if number == 0 else (read, write)
                ours[number] = open(mine, ("w" if number == 0 else "r") + ("" if text else "b"),
                                    buffering=-1 if not text or number else 1)
                theirs.append(child)
            elif spec == subprocess.DEVNULL:
                theirs.append(os.open(os.devnull, os.O_RDWR))
            elif spec is None:
                theirs.append(number)
            else:
                theirs.append(spec if isinstance(spec, int) else spec.fileno())
        self.stdin, self.stdout, self.stderr = ours.get(0), ours.get(1), ours.get(2)
        umask = os.umask(0o022)
        os.umask(umask)
        request = {"kind": kind, "target": target, "argv": argv, "cwd": cwd, "umask": umask,
                   "env": dict(os.environ if env is None else env), "setsid": bool(start_new_session),
                   "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
                   "ignored": [int(n) for n in INHERITED_SIGNALS if signal.getsignal(n) is signal.SIG_IGN],
                   "fds": [0, 1, 2, *pass_fds]}
        try:
            self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._connection.connect(Server.path())
            payload = json.dumps(request).encode()
            socket.send_fds(self._connection, [b"%d\n" % len(payload)], theirs + list(pass_fds))
            self._connection.sendall(payload)
        finally:
            for number, spec in ((0, stdin), (1, stdout), (2, stderr)):
                if spec in (subprocess.PIPE, subprocess.DEVNULL):
                    os.close(theirs[number])
        line = self._line(None)
        if not line.isdigit():
            raise OSError(f"the warm server could not start {argv}: {line}")
        self.pid = int(line)

    def _line(self, timeout):
        """The server's next line; TimeoutExpired after `timeout` seconds (None: wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._connection], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            data = self._connection.recv(4096)
            if not data:
                raise OSError("the warm server closed the connection")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def wait(self, timeout=None):
        if self.returncode is not None:
            return self.returncode
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)  # another thread is waiting
        try:
            if self.returncode is None:
                self.returncode = int(self._line(timeout))
                self._connection.close()
        finally:
            self._lock.release()
        return self.returncode

    def poll(self):
        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, signum):
        try:
            running = self.poll() is None
        except OSError:
            running = True  # the server is gone; the child may not be (it gets SIGKILL from the kernel)
        if running:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass  # reaped by the server, its exit code not read yet: as Popen, nothing to signal

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, input=None, timeout=None):
        """Write `input`, read stdout and stderr to their ends and wait, as Popen.communicate."""
        if not hasattr(self, "_readers"):
            self._read = {}
            self._readers = [threading.Thread(target=self._drain, args=(name,), daemon=True)
                             for name in ("stdout", "stderr") if getattr(self, name)]
            for reader in self._readers:
                reader.start()
            if self.stdin:
                try:
                    if input:
                        self.stdin.write(input)
                    self.stdin.close()
                except BrokenPipeError:
                    pass
        for reader in self._readers:
            reader.join(timeout)
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(timeout)
        return self._read.get("stdout"), self._read.get("stderr")

    def _drain(self, name):
        stream = getattr(self, name)
        with stream:
            self._read[name] = stream.read()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        for stream in (self.stdout, self.stderr, self.stdin):
            if stream and not hasattr(self, "_readers"):
                stream.close()
        if kind is KeyboardInterrupt:  # as Popen: a moment for the child to end, then no waiting
            try:
                self.wait(0.25)
            except subprocess.TimeoutExpired:
                pass
            return
        self.wait()


# The server -------------------------------------------------------------------------------------

def serve(socket_path):
    """Accept requests until stdin closes; in a forked child, return its (request, fds)."""
    for name in PRELOAD:
        __import__(name)
    import torch

    default_threads = torch.get_num_threads()
    server = os.getpid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the tests; the server ends with them
    # What the imports made lives as long as each child: left out of every collection, the final
    # one included (some 0.9 s at each child's exit), and its pages stay shared with the server.
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wake-up fd hears it
    children = {}  # pid -> the connection its exit status goes to
    sys.stdout.buffer.write(b"ready\n")
    sys.stdout.flush()
    while True:
        try:
            readable = select.select([listener, sys.stdin, wake_read], [], [])[0]
        except InterruptedError:
            continue
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1024):
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            for pid in children:
                os.waitpid(pid, 0)
            shutil.rmtree(os.path.dirname(socket_path), ignore_errors=True)  # even if the client was killed
            return None
        if wake_read in readable:
            while True:
                try:
                    if not os.read(wake_read, 1024):
                        break
                except BlockingIOError:
                    break
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            connection = children.pop(pid)
            try:
                connection.sendall(b"%d\n" % os.waitstatus_to_exitcode(status))
            except OSError:
                pass  # the test no longer waits for it
            connection.close()
        if listener in readable:
            connection, _ = listener.accept()
            try:
                request, fds = receive(connection)
                pid = os.fork()
            except Exception as error:  # a client gone, a request cut short, no fork: that one fails
                try:
                    connection.sendall(f"{type(error).__name__}: {error}\n".encode())
                except OSError:
                    pass
                connection.close()
                continue
            if pid == 0:
                for other in (listener, *children.values()):
                    other.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in (wake_read, wake_write):
                    os.close(fd)
                connection.close()
                request["default_threads"] = default_threads
                request["server"] = server
                return request, fds
            for fd in fds:
                os.close(fd)
            children[pid] = connection
            try:
                connection.sendall(b"%d\n" % pid)
            except OSError:
                pass  # its client is gone; the child is reaped as any other


def receive(connection):
    """A request: its header line comes with the file descriptors, then its JSON."""
    data, fds, flags, _ = socket.recv_fds(connection, 65536, MAX_FDS)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError(f"more than {MAX_FDS} file descriptors passed")
    header, payload = data.split(b"\n", 1)
    while len(payload) < int(header):
        payload += connection.recv(int(header) - len(payload))
    return json.loads(payload), fds


def become(request, fds):
    """Turn this forked server into the child `python` would have started for `request`."""
    # Ends with the server, so that a server killed leaves no child nobody can wait for.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != request["server"]:
        os._exit(1)  # the server ended before that took effect
    if request["setsid"]:
        os.setsid()
    # The received descriptors above every target first, so that no dup2 overwrites one not yet moved.
    high = max(request["fds"]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, high) for fd in fds]
    for fd in fds:
        os.close(fd)
    for source, target in zip(moved, request["fds"]):
        os.dup2(source, target)
    for fd in set(moved):
        os.close(fd)
    env = request["env"]
    os.environ.clear()
    os.environ.update(env)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    # As exec: what the client ignores stays ignored, every other disposition is the default.
    for number in INHERITED_SIGNALS:
        try:
            signal.signal(number, signal.SIG_IGN if number in request["ignored"] else signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # a signal the system does not let a process set
    signal.signal(signal.SIGINT, signal.SIG_IGN if request["sigint_ignored"] else signal.default_int_handler)
    streams(env)
    sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
    kind, target = request["kind"], request["target"]
    first = os.path.dirname(os.path.realpath(target)) if kind == "script" else (os.getcwd() if kind == "module" else "")
    extra = [path for path in env.get("PYTHONPATH", "").split(os.pathsep) if path]
    sys.path[:] = [first, *extra, *sys.path[1:]]
    sys.path_importer_cache.clear()
    for name in [name for name in sys.modules if name == "tests" or name.startswith("tests.")]:
        del sys.modules[name]  # the server's own: a child may find another `tests` on its path
    tempfile.tempdir = None  # chosen again from this environment's TMPDIR
    sys.argv[:] = request["argv"]
    import numpy
    import torch

    numpy.random.seed()  # fresh interpreters' global generators are seeded from the OS
    torch.seed()
    threads = env.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdecimal() and int(threads) else request["default_threads"])


def streams(env):
    """New sys.stdin, stdout and stderr on fds 0, 1 and 2, buffered as Python buffers them."""
    encoding, _, errors = env.get("PYTHONIOENCODING", "").partition(":")
    encoding = encoding or sys.__stdout__.encoding
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))

    def stream(fd, write, errors, line_buffering):
        raw = io.FileIO(fd, "wb" if write else "rb", closefd=False)
        buffered = raw if write and unbuffered else (io.BufferedWriter(raw) if write else io.BufferedReader(raw))
        return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, newline="\n",
                                line_buffering=line_buffering, write_through=write and unbuffered)

    # The server's own streams were made by Python's start-up for the same locale.
    sys.stdin = sys.__stdin__ = stream(0, False, errors or sys.__stdin__.errors, False)
    sys.stdout = sys.__stdout__ = stream(1, True, errors or sys.__stdout__.errors, os.isatty(1) and not unbuffered)
    sys.stderr = sys.__stderr__ = stream(2, True, "backslashreplace", not unbuffered)


def execute(request):
    """Run the request's script, module or code as `__main__`; its exceptions go to the top level."""
    import runpy

    kind, target = request["kind"], request["target"]
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif kind == "code":
        run_main(compile(target, "<string>", "exec"))
    else:
        path = os.path.abspath(target)  # __file__ is absolute in a fresh interpreter, sys.argv[0] as given
        try:
            with open(path, "rb") as file:
                source = file.read()
        except OSError as error:
            sys.stderr.write(f"{sys.executable}: can't open file {path!r}: [Errno {error.errno}] {error.strerror}\n")
            sys.exit(2)
        run_main(compile(source, path, "exec"), file=path)


def run_main(code, file=None):
    """Execute `code` in a fresh `__main__` module, as the interpreter runs a script or -c."""
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    if file is not None:
        main.__file__ = file
        main.__cached__ = None
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


if __name__ == "__main__":
    child = serve(sys.argv[1])
    if child is not None:
        become(*child)
        execute(child[0])
