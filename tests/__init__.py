"""The package's tests; `TESTS_WORKERS=2 python -m unittest` runs them on two cores (tests/parallel.py)."""
import os


def load_tests(loader, standard_tests, pattern):
    from tests.parallel import ParallelSuite, worker_count

    found = loader.discover(start_dir=os.path.dirname(__file__), pattern=pattern or "test*.py",
                            top_level_dir=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    standard_tests.addTests(found)
    return ParallelSuite(standard_tests) if worker_count() > 1 else standard_tests
