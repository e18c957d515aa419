"""A warm child (tests/warm.py) is the process a fresh `python` would be: each fact a probe reports
of itself is compared between a warm child and a cold one started with the same arguments."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import unittest

from tests import warm
from tests.helpers import ROOT, children_take_sigint, slow, wait_for

PROBE = textwrap.dedent("""
    import json, os, signal, sys, tempfile
    facts = {"argv": sys.argv, "path0": sys.path[0], "path_has_extra": "/probe-extra" in sys.path,
             "name": __name__, "file": globals().get("__file__"), "cwd": os.getcwd(),
             "env": os.environ.get("PROBE"), "leader": os.getsid(0) == os.getpid(),
             "sigint": repr(signal.getsignal(signal.SIGINT)), "sigterm": repr(signal.getsignal(signal.SIGTERM)),
             "sigpipe": repr(signal.getsignal(signal.SIGPIPE)), "bytecode": sys.dont_write_bytecode,
             "stdin": sys.stdin.read(), "tmp": tempfile.gettempdir(), "umask": os.umask(0o22),
             "errors": [sys.stdin.errors, sys.stdout.errors, sys.stderr.errors],
             "stdout": [sys.stdout.line_buffering, sys.stdout.write_through, type(sys.stdout.buffer).__name__],
             "stderr": [sys.stderr.line_buffering, sys.stderr.write_through, type(sys.stderr.buffer).__name__],
             "tests": "tests" in sys.modules}
    print(json.dumps(facts))
    print("to stderr", file=sys.stderr)
    sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
""")


def both(args, **kwargs):
    """(warm, cold) CompletedProcess of `args`."""
    return (warm.run(args, capture_output=True, text=True, timeout=120, **kwargs),
            subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs))


@slow
class SameFactsTest(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="warm-test-")
        self.addCleanup(shutil.rmtree, self.folder)
        self.script = os.path.join(self.folder, "probe.py")
        with open(self.script, "w") as file:
            file.write(PROBE)
        self.env = dict(os.environ, PROBE="here", PROBE_EXIT="3", PYTHONPATH="/probe-extra",
                        PYTHONDONTWRITEBYTECODE="1", TMPDIR=self.folder)

    def assert_same(self, args, cwd=None, **kwargs):
        hot, fresh = both(args, env=self.env, cwd=cwd or self.folder, input="some\r\ninput\r", **kwargs)
        self.assertEqual(hot.returncode, fresh.returncode)
        self.assertEqual(hot.returncode, 3, fresh.stderr)
        self.assertEqual(hot.stderr, fresh.stderr)
        facts = json.loads(hot.stdout), json.loads(fresh.stdout)
        for key in facts[1]:
            self.assertEqual(facts[0][key], facts[1][key], key)
        return facts[0]

    def test_a_script(self):
        facts = self.assert_same([sys.executable, self.script, "a", "b c"])
        self.assertEqual((facts["argv"], facts["stdin"], facts["tmp"]),
                         ([self.script, "a", "b c"], "some\r\ninput\r", self.folder))

    def test_a_script_and_a_folder_given_relative(self):
        facts = self.assert_same([sys.executable, "probe.py"], cwd=os.path.relpath(self.folder))
        self.assertEqual(facts["file"], self.script)

    def test_a_missing_script_and_a_missing_folder(self):
        hot, fresh = both([sys.executable, "missing.py"], cwd=self.folder)
        self.assertEqual((hot.returncode, hot.stderr), (fresh.returncode, fresh.stderr))
        self.assertEqual(hot.returncode, 2)
        for run in (warm.run, subprocess.run):
            with self.subTest(run=run), self.assertRaises(FileNotFoundError):
                run([sys.executable, self.script], cwd=os.path.join(self.folder, "missing"))

    def test_the_umask_and_an_ignored_sigterm(self):
        umask = os.umask(0o077)
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            facts = self.assert_same([sys.executable, self.script])
        finally:
            os.umask(umask)
            signal.signal(signal.SIGTERM, previous)
        self.assertEqual((facts["umask"], facts["sigterm"]), (0o077, repr(signal.SIG_IGN)))

    def test_unbuffered_and_buffered_streams(self):
        for unbuffered in ("1", ""):
            with self.subTest(PYTHONUNBUFFERED=unbuffered):
                self.env["PYTHONUNBUFFERED"] = unbuffered
                self.assert_same([sys.executable, self.script])

    def test_a_module(self):
        facts = self.assert_same([sys.executable, "-m", "probe", "x"])
        self.assertEqual(facts["path0"], self.folder)

    def test_code(self):
        facts = self.assert_same([sys.executable, "-c", PROBE, "x"])
        self.assertEqual((facts["argv"], facts["path0"]), (["-c", "x"], ""))

    def test_a_new_session_and_an_ignored_sigint(self):
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under `command &`
        try:
            facts = self.assert_same([sys.executable, self.script], start_new_session=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        self.assertTrue(facts["leader"])
        self.assertIn("SIG_IGN", facts["sigint"])

    def test_an_exception_and_stderr_into_stdout(self):
        code = "import sys; print('out', flush=True); raise ValueError('boom')"
        hot = warm.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fresh = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.assertEqual((hot.returncode, hot.stdout.splitlines()[0], hot.stdout.splitlines()[-1]),
                         (fresh.returncode, fresh.stdout.splitlines()[0], fresh.stdout.splitlines()[-1]))
        self.assertEqual(hot.stdout.splitlines()[-1], "ValueError: boom")


@slow
class SignalsTest(unittest.TestCase):
    CODE = "import time; print('up', flush=True); time.sleep(60)"

    def returncode_after(self, signum, start):
        process = start([sys.executable, "-c", self.CODE], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.assertEqual(process.stdout.readline(), "up\n")
        process.send_signal(signum)
        process.communicate(timeout=30)
        return process.returncode

    def test_returncodes_of_signals(self):
        children_take_sigint(self)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            with self.subTest(signal=signum):
                self.assertEqual(self.returncode_after(signum, warm.WarmPopen),
                                 self.returncode_after(signum, subprocess.Popen))

    def test_wait_and_poll(self):
        process = warm.WarmPopen([sys.executable, "-c", self.CODE], stdout=subprocess.DEVNULL)
        self.assertIsNone(process.poll())
        with self.assertRaises(subprocess.TimeoutExpired):
            process.wait(timeout=0.1)
        os.kill(process.pid, signal.SIGTERM)
        self.assertEqual(process.wait(timeout=30), -signal.SIGTERM)
        self.assertEqual(process.poll(), -signal.SIGTERM)
        process.kill()  # an ended child: nothing to signal, as with Popen

    def test_one_thread_waits_while_another_polls(self):
        process = warm.WarmPopen([sys.executable, "-c", "import time; time.sleep(0.5)"])
        waited = []
        waiter = threading.Thread(target=lambda: waited.append(process.wait()))
        waiter.start()
        polled = []
        while not polled or polled[-1] is None:
            polled.append(process.poll())
            process.send_signal(0)
        waiter.join(30)
        self.assertEqual((waited, polled[-1]), ([0], 0))


@slow
class ProcessTest(unittest.TestCase):
    def test_passed_descriptors_keep_their_numbers(self):
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        try:
            code = f"import os; os.write({write}, b'through the fd')"
            process = warm.WarmPopen([sys.executable, "-c", code], pass_fds=[write])
        finally:
            os.close(write)
        self.assertEqual(process.wait(timeout=60), 0)
        self.assertEqual(os.read(read, 100), b"through the fd")

    def test_children_differ_where_fresh_interpreters_do(self):
        code = ("import numpy, torch; "
                "print(numpy.random.randint(1 << 30), torch.initial_seed(), torch.get_num_threads())")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        outputs = [warm.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.split()
                   for _ in range(2)]
        self.assertNotEqual(outputs[0][0], outputs[1][0])  # numpy's global generator, seeded per process
        self.assertNotEqual(outputs[0][1], outputs[1][1])  # and torch's
        self.assertEqual(outputs[0][2], "1")  # the threads the child's environment asks for

    def test_commands_it_cannot_start_warm_go_to_subprocess(self):
        process = warm.start(["true"])
        self.assertIsInstance(process, subprocess.Popen)
        self.assertEqual(process.wait(), 0)
        with self.assertRaises(ValueError):
            warm.parse([sys.executable, "-u", "x.py"])

    def test_cold_is_asked_for_by_the_environment(self):
        previous = os.environ.get("TESTS_COLD")
        os.environ["TESTS_COLD"] = "1"
        try:
            process = warm.start([sys.executable, "-c", "pass"])
        finally:
            os.environ.pop("TESTS_COLD") if previous is None else os.environ.update(TESTS_COLD=previous)
        self.assertIsInstance(process, subprocess.Popen)
        self.assertEqual(process.wait(), 0)

    def test_the_server_ends_with_its_client(self):
        code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tests import warm; "
                "p = warm.WarmPopen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                "print(warm.Server.pid(), p.pid, flush=True); time.sleep(60)")
        client = subprocess.Popen([sys.executable, "-c", code, ROOT], stdout=subprocess.PIPE, text=True)
        server, child = map(int, client.stdout.readline().split())
        client.kill()
        client.wait()
        client.stdout.close()
        wait_for(lambda: not alive(server) and not alive(child), timeout=30)

    def test_a_child_ends_with_a_killed_server(self):
        code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tests import warm; "
                "p = warm.WarmPopen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                "print(warm.Server.pid(), p.pid, flush=True); sys.stdin.readline(); "
                "p.kill(); print('killed', flush=True)")
        client = subprocess.Popen([sys.executable, "-c", code, ROOT], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        self.addCleanup(client.kill)
        server, child = map(int, client.stdout.readline().split())
        os.kill(server, signal.SIGKILL)
        wait_for(lambda: not alive(child), timeout=30)
        client.stdin.write("go\n")
        client.stdin.close()
        self.assertEqual(client.stdout.read(), "killed\n")  # the handle's kill does not raise
        self.assertEqual(client.wait(timeout=30), 0)
        client.stdout.close()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


if __name__ == "__main__":
    unittest.main()
