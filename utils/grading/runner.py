"""One unittest test per graded function, run by gradescope-utils' JSONTestRunner.

Each test asks the session for its function's result, prints the checks (the runner's buffer makes
them the test's `output`) and sets its score through `partial_credit`. The runner's JSON is then
completed (each test's `visibility`, a numeric `execution_time`, the top-level `score` as the sum
of the tests' rounded scores) and written atomically.
"""
import io
import sys
import unittest

from gradescope_utils.autograder_utils.decorators import number, partial_credit, visibility
from gradescope_utils.autograder_utils.json_test_runner import JSONTestRunner

from utils.files import write_json
from utils.grading import rubric
from utils.grading.session import Session


def function_test(session, function, index, results):
    """A TestCase whose one test grades `function` and records its result in `results`."""

    @number(str(index))
    @visibility("visible")
    @partial_credit(function.points)
    def test(self, set_score=None):
        result = session.grade(function)
        results.append(result)
        print(result.output())
        set_score(result.score)

    test.__doc__ = f"{function.name}: {function.summary}"
    case = type(function.name.replace(".", "_"), (unittest.TestCase,), {"test": test})
    return case("test")


def complete(json_data):
    """Gradescope's fields, as JSONTestRunner leaves them, made exact."""
    for test in json_data["tests"]:
        test["score"] = round(float(test.get("score", 0.0)), 4)
        test.setdefault("output", "")
        test.setdefault("visibility", "visible")
    json_data["score"] = round(sum(test["score"] for test in json_data["tests"]), 4)
    json_data["execution_time"] = float(json_data["execution_time"])
    if not json_data.get("leaderboard"):
        json_data.pop("leaderboard", None)


def grade(submission, timeout=60.0, json_path=None, progress=sys.stderr):
    """Grade the folder `submission`: (results.json's data, [FunctionResult]); writes `json_path`."""
    session = Session(submission, timeout=timeout, progress=progress)
    results = []
    suite = unittest.TestSuite(function_test(session, function, index, results)
                               for index, function in enumerate(rubric.RUBRIC, 1))
    runner = JSONTestRunner(stream=io.StringIO(), visibility="visible", post_processor=complete)
    try:
        runner.run(suite)
    finally:
        session.close()
    if json_path:
        write_json(json_path, runner.json_data)
    return runner.json_data, results


def table(results):
    """The printed table: function, points, max, reason; then the total."""
    width = max(len(function.name) for function in rubric.RUBRIC)
    lines = [f"{'function':<{width}}  {'points':>6}  {'max':>4}  reason"]
    graded = {result.function.name: result for result in results}
    total = 0
    for function in rubric.RUBRIC:  # every row, even one whose grading itself failed
        result = graded.get(function.name)
        score, reason = (result.score, result.summary()) if result else (0, "not graded: an error in the grader")
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        lines.append(f"{function.name:<{width}}  {score:>6g}  {function.points:>4g}  {reason}")
        total += score
    lines.append(f"{'total':<{width}}  {total:>6g}  {rubric.TOTAL_POINTS:>4g}")
    return "\n".join(lines)
