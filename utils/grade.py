"""Grade a student's files as the course's Gradescope grader does (staff guide: docs/GRADING.md).

    python -m utils.grade SUBMISSION [--json results.json [--overwrite]] [--timeout 60]
    python -m utils.grade --autograder autograder.zip [--overwrite]

SUBMISSION is a folder holding lstm_solution.py and gpt1_solution.py (or gpt1_solution_template.py).
Exit 0 once grading completed, whatever the score; 2 with one line when SUBMISSION is unusable
(with --json, a results.json of 0 points saying why is written all the same).
"""
import os
import sys

from utils.cli import OneLineParser, UsageError, fail, positive_float
from utils.files import check_writable_folder, write_json


MAX_TIMEOUT_S = 3600


def check_json_path(path, overwrite):
    """Refuse, before grading, a `--json` that is a folder, or a file already there without `overwrite`."""
    if os.path.isdir(path):
        raise UsageError(f"--json {path} is a folder: name the results file, e.g. {os.path.join(path, 'results.json')}")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"--json {path} exists: pass --overwrite to replace it, or name another file")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), "--json")


def main(argv=None):
    parser = OneLineParser(prog="python -m utils.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("submission", nargs="?", metavar="SUBMISSION",
                        help="the folder holding the student's lstm_solution.py and gpt1_solution.py")
    parser.add_argument("--json", metavar="PATH", help="write Gradescope's results.json there")
    parser.add_argument("--timeout", type=positive_float, default=60.0,
                        help="seconds each graded function (and each file's import) may run")
    parser.add_argument("--autograder", metavar="ZIP", help="build the zip to upload to Gradescope instead")
    parser.add_argument("--overwrite", action="store_true", help="let --json or --autograder replace an existing file")
    args = parser.parse_args(argv)
    try:
        if args.autograder:
            if args.submission:
                raise UsageError("--autograder builds the zip and grades nothing: drop SUBMISSION")
            from utils.grading.autograder import build_zip

            names = build_zip(args.autograder, overwrite=args.overwrite)
            print(f"wrote {args.autograder} ({len(names)} files): upload it as the assignment's autograder")
            return 0
        if not args.submission:
            raise UsageError("SUBMISSION is missing: name the folder holding lstm_solution.py and "
                             "gpt1_solution.py, or build the zip with --autograder ZIP")
        if args.timeout > MAX_TIMEOUT_S:
            raise UsageError(f"--timeout {args.timeout:g}: expected at most {MAX_TIMEOUT_S} seconds per function")
        if args.json:
            check_json_path(args.json, args.overwrite)
        from utils.grading import runner
        from utils.grading.session import submission_files

        try:
            submission_files(args.submission)  # unusable: one line before anything starts
        except UsageError as error:
            if args.json:  # Gradescope then shows a 0 and the reason, not "the autograder failed"
                write_json(args.json, {"score": 0, "output": f"not graded: {error}", "tests": [],
                                       "execution_time": 0})
            raise
        json_data, results = runner.grade(args.submission, timeout=args.timeout, json_path=args.json)
    except UsageError as error:
        return fail(parser.prog, error)
    print(runner.table(results))
    if args.json:
        print(f"wrote {args.json}: {json_data['score']:g} of {sum(r.function.points for r in results):g} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
