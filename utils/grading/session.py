"""The parent's side of grading: the submission's files, one worker, and each function's result.

One worker process serves the functions one after another (torch is imported once); a function
that runs past the time limit or kills the worker costs its own points, and the next function
starts a fresh worker. A file that does not parse, does not import, or uses a disabled function
costs the functions it holds, found before the worker is asked.
"""
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from utils.cli import UsageError
from utils.grading import forbidden, rubric

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_SECONDS = 120  # importing torch in a fresh process, not counted against a function


def submission_files(submission):
    """{"lstm": path or None, "gpt1": path or None} of the folder `submission`; UsageError when
    it is unusable (missing, not a folder, neither file in it)."""
    if not os.path.exists(submission):
        raise UsageError(f"SUBMISSION {submission!r} does not exist: name the folder that holds "
                         f"{rubric.LSTM_FILE} and {rubric.GPT1_FILES[0]}")
    if not os.path.isdir(submission):
        raise UsageError(f"SUBMISSION {submission!r} is a file, not a folder: name the folder that holds "
                         f"{rubric.LSTM_FILE} and {rubric.GPT1_FILES[0]}")
    lstm = os.path.join(submission, rubric.LSTM_FILE)
    gpt1 = [os.path.join(submission, name) for name in rubric.GPT1_FILES
            if os.path.isfile(os.path.join(submission, name))]
    # The course's alias file (it only imports the template) defers to the template beside it.
    defining = [path for path in gpt1 if "class MiniGPT1" in read_text(path)]
    files = {"lstm": lstm if os.path.isfile(lstm) else None, "gpt1": (defining or gpt1 or [None])[0]}
    if files["lstm"] is None and files["gpt1"] is None:
        raise UsageError(f"SUBMISSION {submission!r} holds neither {rubric.LSTM_FILE} nor "
                         f"{' nor '.join(rubric.GPT1_FILES)}: put the solution files in that folder")
    return files


def read_text(path):
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.read()


@dataclass
class FunctionResult:
    """One graded function's outcome: `checks` are {name, passed, message} with points added."""
    function: rubric.GradedFunction
    checks: list = field(default_factory=list)
    reason: str = ""  # why the whole function scored 0 (a file, a time limit, a disabled function)
    seconds: float = 0.0

    @property
    def score(self):
        if self.reason:
            return 0.0
        points = dict(self.function.checks)
        return float(sum(points[check["name"]] for check in self.checks if check["passed"]))

    def summary(self):
        """The table's reason: empty at full marks, else the first failure."""
        if self.reason:
            return self.reason
        failed = [check for check in self.checks if not check["passed"]]
        return f"{failed[0]['name']}: {failed[0]['message']}" if failed else ""

    def output(self):
        """What the student reads on Gradescope: each check, its points and why it failed."""
        points = dict(self.function.checks)
        lines = [f"0 of {self.function.points:g} points: {self.reason}"] if self.reason else []
        for name, _ in self.function.checks:
            check = next((c for c in self.checks if c["name"] == name), None)
            if self.reason or check is None:
                lines.append(f"  not scored  {name}")
            elif check["passed"]:
                lines.append(f"  passed  {name} ({points[name]:g}/{points[name]:g})")
            else:
                lines.append(f"  FAILED  {name} (0/{points[name]:g}): {check['message']}")
        return "\n".join(lines)


class WorkerStopped(Exception):
    """The worker ran past its time limit or died; the message says which."""


class Worker:
    """A child process running `utils.grading.worker` on `submission`, spoken to in JSON lines."""

    def __init__(self, submission):
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "utils.grading.worker", os.path.abspath(submission)],
            cwd=PACKAGE_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.buffer = b""
        self.loaded = {}  # file key -> error message or None
        self.receive(STARTUP_SECONDS)

    def send(self, message, timeout):
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode())
            self.process.stdin.flush()
        except OSError:
            pass  # it died: receive says how
        return self.receive(timeout)

    def receive(self, timeout):
        deadline = time.monotonic() + timeout
        stream = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise WorkerStopped(f"ran past the time limit of {timeout:g} s (an endless loop?)")
            ready, _, _ = select.select([stream], [], [], left)
            if ready:
                chunk = os.read(stream, 65536)
                if not chunk:
                    self.process.wait()
                    raise WorkerStopped(f"the process running your code stopped "
                                        f"(exit code {self.process.returncode}){self.last_words()}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def last_words(self):
        self.log.seek(0)
        lines = [line for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        return f": {lines[-1].strip()[:300]}" if lines else ""

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


class Session:
    """Grades the functions of `submission` one by one, `timeout` seconds each at most."""

    def __init__(self, submission, timeout=60.0, progress=None):
        self.submission = submission
        self.files = submission_files(submission)
        self.timeout = timeout
        self.progress = progress
        self.worker = None
        self.static = {key: self.read_static(path) for key, path in self.files.items()}

    def read_static(self, path):
        """(file error or None, {function: forbidden uses}) from the file's source."""
        if path is None:
            return None, {}
        graded = [f.name for f in rubric.RUBRIC]
        try:
            return None, forbidden.static_uses(read_text(path), graded)
        except SyntaxError as error:
            return (f"{os.path.basename(path)} does not parse: {error.msg} at line {error.lineno}: "
                    f"fix the syntax error"), {}

    def grade(self, function):
        start = time.monotonic()
        result = FunctionResult(function)
        try:
            result.reason = self.blocking_reason(function)
            if not result.reason:
                reply = self.worker.send({"grade": function.name}, self.timeout)
                result.checks = reply["checks"]
                if reply["forbidden"]:
                    result.reason = reply["forbidden"]
        except WorkerStopped as error:
            self.worker = None
            result.reason = f"{function.name}: {error}"
        result.seconds = time.monotonic() - start
        if self.progress is not None:
            print(f"graded {function.name}: {result.score:g}/{function.points:g} ({result.seconds:.1f} s)",
                  file=self.progress, flush=True)
        return result

    def blocking_reason(self, function):
        """Why `function` scores 0 before it runs, or ""."""
        path = self.files[function.file]
        if path is None:
            names = rubric.LSTM_FILE if function.file == "lstm" else " or ".join(rubric.GPT1_FILES)
            return f"no {names} in the submission"
        error, uses = self.static[function.file]
        if error:
            return error
        if uses.get(function.name):
            return "; ".join(uses[function.name]) + ", disabled in this assignment"
        return self.load(function.file)

    def load(self, key):
        """"" once the worker has imported file `key`, else why it could not."""
        worker = self.ensure_worker()
        if key not in worker.loaded:
            try:
                error = worker.send({"load": key, "path": self.files[key]}, self.timeout)["error"]
            except WorkerStopped as stopped:
                self.worker = None
                error = f"importing it {stopped}"
                self.static[key] = (f"{os.path.basename(self.files[key])}: {error}", {})
            worker.loaded[key] = error and f"{os.path.basename(self.files[key])} could not be imported: {error}"
        return worker.loaded[key] or ""

    def ensure_worker(self):
        if self.worker is None:
            self.worker = Worker(self.submission)
        return self.worker

    def close(self):
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
