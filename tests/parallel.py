"""The suite on several cores: `python -m unittest` runs the test modules in worker processes, one
per core up to 4 (`TESTS_WORKERS=N` sets how many; 1 runs the suite in this process).

Most of the suite's time is child processes that train, signal or grade, one core each, so a
worker per core keeps every core busy. `tests/__init__.py` hands discovery's suite to
`ParallelSuite`: each module goes whole to one worker (its class and module fixtures stay
together), the slowest first, and every outcome is replayed into the runner's own result, so the
output, the counts and the exit code are unittest's. A module, class or test named on the command
line runs in this process, as plain unittest runs it.
"""
import json
import os
import subprocess
import sys
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The modules that take longest (child processes): started first, so no worker idles at the end.
SLOW_FIRST = ("test_run_safety", "test_report", "test_notebook", "test_grade", "test_run_exp", "test_study",
              "test_prepare_data", "test_warm", "test_starter", "test_download", "test_findings",
              "test_benchmark", "test_faults", "test_tokenization", "test_cli")


def worker_count():
    """`TESTS_WORKERS` (1: the suite in this process, as plain unittest runs it), at most one per
    core; by default one per core, up to 4."""
    cores = os.cpu_count() or 1
    value = os.environ.get("TESTS_WORKERS", "")
    return min(int(value), cores) if value.isdecimal() and int(value) else min(cores, 4)


def flatten(suite):
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from flatten(test)
        else:
            yield test


class RemoteError(Exception):
    """A failure or error in a worker, carrying its formatted traceback."""


class ParallelSuite(unittest.TestSuite):
    def run(self, result, debug=False):
        tests = list(flatten(self))
        by_module, local = {}, []
        for test in tests:
            module = type(test).__module__
            if isinstance(test, unittest.TestCase) and type(test).__name__ != "_FailedTest":
                by_module.setdefault(module, []).append(test)
            else:
                local.append(test)  # an import error and the like: reported here, as unittest does
        order = sorted(by_module, key=lambda name: (SLOW_FIRST.index(name[6:]) if name[6:] in SLOW_FIRST
                                                    else len(SLOW_FIRST), name))
        queue, lock = list(order), threading.Lock()

        def serve():
            worker = subprocess.Popen([sys.executable, "-m", "tests.parallel"], cwd=ROOT, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, bufsize=1)
            try:
                while not result.shouldStop:
                    with lock:
                        if not queue:
                            break
                        module = queue.pop(0)
                    named = {test.id(): test for test in by_module[module]}
                    worker.stdin.write(json.dumps(list(named)) + "\n")
                    worker.stdin.flush()
                    for line in worker.stdout:
                        record = json.loads(line)
                        if record.get("done"):
                            break
                        with lock:
                            replay(result, named, record)
                    else:
                        with lock:
                            replay(result, named, {"id": module, "outcome": "error",
                                                   "text": f"the worker running {module} died"})
                        return
            finally:
                worker.stdin.close()
                worker.wait()
                worker.stdout.close()

        threads = [threading.Thread(target=serve) for _ in range(min(worker_count(), len(order)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for test in local:
            test(result)
        return result


def replay(result, named, record):
    """One worker outcome into this process's result."""
    test = named.get(record["id"]) or unittest.suite._ErrorHolder(record["id"])
    outcome = record["outcome"]
    if outcome == "start":
        result.startTest(test)
    elif outcome == "stop":
        result.stopTest(test)
    elif outcome == "success":
        result.addSuccess(test)
    elif outcome == "skip":
        result.addSkip(test, record["text"])
    elif outcome == "expected failure":
        result.addExpectedFailure(test, (RemoteError, RemoteError(record["text"]), None))
    elif outcome == "unexpected success":
        result.addUnexpectedSuccess(test)
    else:
        # A class or module fixture's error comes on an _ErrorHolder, outside any test, as unittest does.
        add = result.addFailure if outcome == "failure" else result.addError
        add(test, (RemoteError, RemoteError(record["text"]), None))


class RecordingResult(unittest.TestResult):
    """A worker's result: every outcome as one JSON line on `stream`."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def send(self, test, outcome, text=""):
        self.stream.write(json.dumps({"id": test.id() if hasattr(test, "id") else str(test),
                                      "outcome": outcome, "text": text}) + "\n")
        self.stream.flush()

    def startTest(self, test):
        super().startTest(test)
        self.send(test, "start")

    def stopTest(self, test):
        super().stopTest(test)
        self.send(test, "stop")

    def addSuccess(self, test):
        self.send(test, "success")

    def addSkip(self, test, reason):
        self.send(test, "skip", reason)

    def addFailure(self, test, err):
        self.send(test, "failure", self._exc_info_to_string(err, test))

    def addError(self, test, err):
        self.send(test, "error", self._exc_info_to_string(err, test))

    def addSubTest(self, test, subtest, err):
        if err is not None:
            kind = "failure" if issubclass(err[0], test.failureException) else "error"
            self.send(test, kind, f"{subtest}\n{self._exc_info_to_string(err, test)}")

    def addExpectedFailure(self, test, err):
        self.send(test, "expected failure", self._exc_info_to_string(err, test))

    def addUnexpectedSuccess(self, test):
        self.send(test, "unexpected success")


def work():
    """The worker: read a module's test ids per line, run them, write each outcome, then `done`."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the tests print goes to stderr, never into the protocol
    loader = unittest.TestLoader()
    for line in sys.stdin:
        suite = unittest.TestSuite(loader.loadTestsFromName(name) for name in json.loads(line))
        started = time.perf_counter()
        suite.run(RecordingResult(protocol))
        protocol.write(json.dumps({"done": True, "seconds": time.perf_counter() - started}) + "\n")


if __name__ == "__main__":
    work()
