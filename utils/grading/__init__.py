"""The course's Gradescope grader for a student's `lstm_solution.py` and `gpt1_solution.py`.

- `rubric`: the handout's points split over the graded functions and their named checks.
- `forbidden`: the torch functions the course disables, patched to raise and found in the source.
- `checks`: each graded function against the reference, the other graded functions substituted.
- `worker`: the child process that imports the student's code and runs the checks.
- `session`: the parent's side: one worker, restarted after a time limit or a crash.
- `runner`: one unittest test per function, Gradescope's results.json, the printed table.
- `autograder`: the zip to upload to Gradescope.

`python -m utils.grade` is the command line; docs/GRADING.md is the staff guide.
"""
