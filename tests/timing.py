"""Time the test suite: `python -m tests.timing [-n N] [pattern...]` runs the whole suite (or the
modules, classes or tests named, as `python -m unittest` takes them), then prints the total wall
time, the load average and the N slowest tests with their seconds.

A class's setUpClass is counted in its first test, as it runs just before it. The tests run in this
process, one after the other (TESTS_WORKERS=1), so that each one's seconds are its own."""
import argparse
import os
import sys
import time
import unittest


class TimingResult(unittest.TextTestResult):
    """A text result that also records each test's wall time, from the end of the test before."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds = {}
        self._last = time.perf_counter()

    def stopTest(self, test):
        super().stopTest(test)
        now = time.perf_counter()
        self.seconds[test.id()] = self.seconds.get(test.id(), 0.0) + now - self._last
        self._last = now


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.timing", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--slowest", type=int, default=20, help="how many of the slowest tests to list")
    parser.add_argument("-v", "--verbose", action="store_true", help="unittest's verbose output")
    parser.add_argument("names", nargs="*", help="modules, classes or tests (default: the whole suite)")
    args = parser.parse_args(argv)
    os.environ["TESTS_WORKERS"] = "1"  # read by tests/__init__.py's load_tests
    loader = unittest.TestLoader()
    if args.names:
        suite = loader.loadTestsFromNames(args.names)
    else:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        suite = loader.discover(root, top_level_dir=root)
    runner = unittest.TextTestRunner(resultclass=TimingResult, verbosity=2 if args.verbose else 1)
    start = time.perf_counter()
    result = runner.run(suite)
    total = time.perf_counter() - start
    print(f"\n{result.testsRun} tests in {total:.1f} s; load average {' '.join(map(str, os.getloadavg()))}")
    print(f"The {args.slowest} slowest:")
    for name, seconds in sorted(result.seconds.items(), key=lambda item: -item[1])[:args.slowest]:
        print(f"{seconds:7.2f} s  {name}")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
