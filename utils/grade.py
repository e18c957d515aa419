"""Grade a student's files as the course's Gradescope grader does (staff guide: docs/GRADING.md).

    python -m utils.grade SUBMISSION [--json results.json] [--timeout 60]
    python -m utils.grade --autograder autograder.zip [--overwrite]

SUBMISSION is a folder holding lstm_solution.py and gpt1_solution.py (or gpt1_solution_template.py).
Exit 0 once grading completed, whatever the score; 2 with one line when SUBMISSION is unusable.
"""
import os
import sys

from utils.cli import OneLineParser, UsageError, fail, positive_float
from utils.files import check_writable_folder


def main(argv=None):
    parser = OneLineParser(prog="python -m utils.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("submission", nargs="?", metavar="SUBMISSION",
                        help="the folder holding the student's lstm_solution.py and gpt1_solution.py")
    parser.add_argument("--json", metavar="PATH", help="write Gradescope's results.json there")
    parser.add_argument("--timeout", type=positive_float, default=60.0,
                        help="seconds each graded function (and each file's import) may run")
    parser.add_argument("--autograder", metavar="ZIP", help="build the zip to upload to Gradescope instead")
    parser.add_argument("--overwrite", action="store_true", help="let --autograder replace an existing zip")
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
        from utils.grading import runner
        from utils.grading.session import submission_files

        submission_files(args.submission)  # unusable: one line before anything starts
        if args.json:
            check_writable_folder(os.path.dirname(os.path.abspath(args.json)), "--json")
        json_data, results = runner.grade(args.submission, timeout=args.timeout, json_path=args.json)
    except UsageError as error:
        return fail(parser.prog, error)
    print(runner.table(results))
    if args.json:
        print(f"wrote {args.json}: {json_data['score']:g} of {sum(r.function.points for r in results):g} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
