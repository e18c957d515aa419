"""tests/parallel.py: outcomes run in worker processes come back into the runner's result as
unittest would have recorded them, module fixtures included."""
import io
import os
import shutil
import sys
import tempfile
import textwrap
import unittest
from unittest import mock

from tests.parallel import ParallelSuite, worker_count

PROBE = textwrap.dedent('''
    import os, unittest

    def setUpModule():
        os.environ["PROBE_MODULE_SET_UP"] = "yes"

    class Probe(unittest.TestCase):
        def test_passes(self):
            self.assertEqual(os.environ.get("PROBE_MODULE_SET_UP"), "yes")

        def test_fails(self):
            self.assertEqual(1, 2, "one is not two")

        def test_errors(self):
            raise KeyError("no such key")

        @unittest.skip("not here")
        def test_skipped(self):
            pass

        def test_subtests(self):
            for value in (1, 2):
                with self.subTest(value=value):
                    self.assertEqual(value, 1)

    class BrokenFixture(unittest.TestCase):
        @classmethod
        def setUpClass(cls):
            raise RuntimeError("the class fixture broke")

        def test_never_runs(self):
            pass
''')


class ParallelSuiteTest(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder, True)
        for name in ("probe_one", "probe_two"):
            with open(os.path.join(self.folder, f"{name}.py"), "w", encoding="utf-8") as file:
                file.write(PROBE)
        path = os.pathsep.join([self.folder, os.environ.get("PYTHONPATH", "")])
        patcher = mock.patch.dict(os.environ, {"PYTHONPATH": path, "TESTS_WORKERS": "2"})
        patcher.start()
        self.addCleanup(patcher.stop)
        sys.path.insert(0, self.folder)
        self.addCleanup(sys.path.remove, self.folder)
        self.addCleanup(lambda: [sys.modules.pop(name, None) for name in ("probe_one", "probe_two")])

    def run_suite(self, suite):
        result = unittest.TextTestResult(unittest.runner._WritelnDecorator(io.StringIO()), descriptions=True,
                                         verbosity=2)
        suite.run(result)
        return result

    def test_outcomes_equal_a_plain_run(self):
        loader = unittest.TestLoader()
        names = ("probe_one", "probe_two")
        plain = self.run_suite(unittest.TestSuite(loader.loadTestsFromName(name) for name in names))
        parallel = self.run_suite(ParallelSuite(loader.loadTestsFromName(name) for name in names))
        self.assertEqual(parallel.testsRun, plain.testsRun)
        for kind in ("failures", "errors", "skipped"):
            self.assertEqual(len(getattr(parallel, kind)), len(getattr(plain, kind)), kind)
            # A failed subtest is reported on its test, the subtest named in the text.
            self.assertEqual(sorted(getattr(test, "test_case", test).id() for test, _ in getattr(parallel, kind)),
                             sorted(getattr(test, "test_case", test).id() for test, _ in getattr(plain, kind)), kind)
        failures = " ".join(text for _, text in parallel.failures)
        self.assertIn("one is not two", failures)
        self.assertIn("value=2", failures)  # the subtest that failed, named
        self.assertIn("no such key", " ".join(text for _, text in parallel.errors))
        self.assertIn("the class fixture broke", " ".join(text for _, text in parallel.errors))
        self.assertFalse(parallel.wasSuccessful())

    def test_workers_come_from_the_environment(self):
        with mock.patch.dict(os.environ, {"TESTS_WORKERS": "1"}):
            self.assertEqual(worker_count(), 1)
        cores = os.cpu_count() or 1
        with mock.patch.dict(os.environ, {"TESTS_WORKERS": "1000"}):
            self.assertEqual(worker_count(), cores)
        for unset in ("", "lots", "0"):
            with mock.patch.dict(os.environ, {"TESTS_WORKERS": unset}):
                self.assertEqual(worker_count(), min(cores, 4))


if __name__ == "__main__":
    unittest.main()
