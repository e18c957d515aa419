"""The package's tests; `python -m unittest` runs them in one worker process per core, up to 4, and
`TESTS_WORKERS=1 python -m unittest` in this one (tests/parallel.py)."""
import os


def load_tests(loader, standard_tests, pattern):
    from tests.parallel import ParallelSuite, worker_count

    found = loader.discover(start_dir=os.path.dirname(__file__), pattern=pattern or "test*.py",
                            top_level_dir=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    standard_tests.addTests(found)
    return ParallelSuite(standard_tests) if worker_count() > 1 else standard_tests
