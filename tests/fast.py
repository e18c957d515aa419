"""The fast subset, for the edit-test loop: `python -m unittest tests.fast`.

The whole suite less the tests marked `@slow` (tests/helpers.py): those that start child
processes (to train: signals, kill -9, `--jobs` workers, torchrun, two owners of a run folder; to
grade, to run the starter, to show every tool's --help; to fetch), that execute the notebook, that
render the whole report, or that re-tokenize the real data. The CI, and anyone before a
commit, runs everything: `python -m unittest`. `python -m tests.timing` finds what is slow.
"""
import os
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_slow(test):
    """A test marked slow, by its method or its class."""
    method = getattr(test, getattr(test, "_testMethodName", ""), None)
    return bool(getattr(test, "slow", False) or getattr(method, "slow", False))


def fast_tests(suite):
    """`suite` flattened, less its slow tests."""
    kept = unittest.TestSuite()
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            kept.addTests(fast_tests(test))
        elif not is_slow(test):
            kept.addTest(test)
    return kept


def load_tests(loader, standard_tests, pattern):
    return fast_tests(loader.discover(os.path.join(ROOT, "tests"), top_level_dir=ROOT))
