"""The child process that imports the student's files and runs the checks, one function at a time.

    python -m utils.grading.worker SUBMISSION   (run from the package root)

It answers JSON lines on its original stdout; the student's prints go to stderr. Requests:
`{"load": "lstm" | "gpt1", "path": FILE}` -> `{"error": null | message}`;
`{"grade": "Class.method", "file": "lstm" | "gpt1"}` -> `{"checks": [...], "forbidden": ...}`.
The disabled torch functions are patched before any student file is imported. The package root
leaves `sys.path` once `utils` is imported, so a student's `import gpt1_solution_template` finds
the submission's file, never the reference (loaded by path under a private name).
"""
import importlib.util
import json
import os
import sys


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return sys.modules[name]  # what the file left there: the course's alias file replaces itself


def main(submission):
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the student's prints go to stderr, never into the replies

    def reply(message):
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    import torch

    from utils.grading import checks, forbidden, rubric

    torch.set_num_threads(1)  # tiny tensors: threads only cost
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(checks.__file__))))
    reference = load_module("_grading_reference_gpt1", os.path.join(root, "gpt1_solution_template.py"))
    forbidden.disable()
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != root]
    sys.path.insert(0, os.path.abspath(submission))

    modules, files = {}, {}
    reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        if "load" in request:
            key, path = request["load"], request["path"]
            files[key] = os.path.basename(path)
            try:
                modules[key] = load_module(os.path.splitext(os.path.basename(path))[0], path)
                reply({"error": None})
            except BaseException as error:  # SystemExit too: the file is the student's
                reply({"error": checks.describe_exception(error, tuple(files.values()))})
            continue
        function = rubric.BY_NAME[request["grade"]]
        results, forbidden_reason = checks.grade(
            function.name, modules[function.file], reference, tuple(files.values()),
            [name for name, _ in function.checks])
        reply({"checks": results, "forbidden": forbidden_reason})


if __name__ == "__main__":
    main(sys.argv[1])
