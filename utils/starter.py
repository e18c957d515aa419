"""`python -m utils.starter OUT`: the student's starter, made from the solution files.

The model files mark each graded answer with `# BEGIN SOLUTION` ... `# END SOLUTION` (the
nbgrader / Otter convention): in the starter the region becomes the course's TODO block and
`pass`, at the markers' indentation. `# BEGIN SOLUTION NO PROMPT` ... `# END SOLUTION` marks
solution-only code (fused kernels, faster overrides) that the starter drops with nothing in its
place. Markers are whole-line comments, balanced, not nested, and each END is indented as its
BEGIN; the starter must parse and every graded function must be left a TODO. Any fault is one line
naming file:line, and nothing is written. OUT gets the course's file names (docs/STARTER.md).
"""
import ast
import io
import itertools
import os
import shutil
import sys
import tempfile
import tokenize

from utils.cli import OneLineParser, UsageError, fail
from utils.files import atomic_write_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BEGIN = "# BEGIN SOLUTION"
BEGIN_NO_PROMPT = "# BEGIN SOLUTION NO PROMPT"
END = "# END SOLUTION"
TODO = ("# ==========================", "# TODO: Write your code here", "# ==========================",
        "pass")

# The starter's model files (the course's names) and the package's files they are made from.
MODEL_SOURCES = {"lstm_solution.py": "lstm_solution.py", "gpt1_solution.py": "gpt1_solution_template.py"}
# Copied as they are: starter name -> package path.
COPIED_FILES = {"requirements.txt": "requirements.txt", "run_exp.py": "run_exp.py",
                "test_shapes_public.py": os.path.join("tests", "public_shapes.py")}
# The staff's tools are not the student's: the grader holds a reference answer to every graded
# function, and neither it nor the starter's maker is needed to train.
STAFF_ONLY = ("grading", "grade.py", "starter.py")

# The graded functions of each starter file, as Class.method; the whole body becomes the TODO,
# except for the partial ones (the course gives their first lines).
GRADED = {
    "lstm_solution.py": ("LSTM.forward", "LSTM.loss"),
    "gpt1_solution.py": ("LayerNorm.forward", "MultiHeadedAttention.split_heads",
                         "MultiHeadedAttention.merge_heads", "MultiHeadedAttention.get_attention_weights",
                         "MultiHeadedAttention.apply_attention", "MultiHeadedAttention.forward",
                         "MultiHeadedAttention.__init__", "MiniGPT1.get_embeddings", "MiniGPT1.forward",
                         "MiniGPT1.loss"),
}
PARTIAL = {"MultiHeadedAttention.__init__"}


class MarkerError(UsageError):
    """A solution marker that is unmatched, nested, misplaced or leaves a starter that cannot work."""


def find_markers(path, text):
    """`[(line, kind, indent)]` of the marker comments of `text`, kind one of BEGIN, BEGIN_NO_PROMPT, END.

    Comments are found with `tokenize`, so a marker inside a string is not one; a comment that
    looks like a marker but is not exactly one, or shares its line with code, is an error.
    """
    markers = []
    lines = text.splitlines()
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type != tokenize.COMMENT:
                continue
            comment, (row, column) = token.string.rstrip(), token.start
            words = comment.lstrip("#").split()
            if words[:2] not in (["BEGIN", "SOLUTION"], ["END", "SOLUTION"]):
                continue
            if comment not in (BEGIN, BEGIN_NO_PROMPT, END):
                raise MarkerError(f"{path}:{row}: {comment!r} is not a marker: use {BEGIN!r}, "
                                  f"{BEGIN_NO_PROMPT!r} or {END!r}")
            if lines[row - 1].strip() != comment:
                raise MarkerError(f"{path}:{row}: {comment!r} shares its line with code: put it on a line of its own")
            markers.append((row, comment, column))
    except (tokenize.TokenError, SyntaxError) as error:
        raise MarkerError(f"{path}: cannot be read as Python: {error}") from None
    return markers


def find_regions(path, text):
    """`[(begin_line, end_line, kind, indent)]`, 1-based, of the balanced, unnested regions of `text`."""
    regions, opened = [], None
    lines = text.splitlines()
    for row, kind, indent in find_markers(path, text):
        if kind == END:
            if opened is None:
                raise MarkerError(f"{path}:{row}: {END!r} with no {BEGIN!r} before it")
            start, start_kind, start_indent = opened
            if indent != start_indent:
                raise MarkerError(f"{path}:{row}: {END!r} is indented {indent}, its {start_kind!r} "
                                  f"at line {start} {start_indent}")
            for number in range(start + 1, row):
                line = lines[number - 1]
                if line.strip() and len(line) - len(line.lstrip()) < indent:
                    raise MarkerError(f"{path}:{number}: a line of the region opened at line {start} "
                                      f"is indented less than its markers")
            regions.append((start, row, start_kind, indent))
            opened = None
        elif opened is not None:
            raise MarkerError(f"{path}:{row}: {kind!r} inside the region opened at line {opened[0]}: "
                              f"close it first ({END!r}), regions do not nest")
        else:
            opened = (row, kind, indent)
    if opened is not None:
        raise MarkerError(f"{path}:{opened[0]}: {opened[1]!r} is never closed by {END!r}")
    return regions


def strip_solutions(path, text, keep_solutions=False):
    """The starter's text of the solution file `text`.

    A `BEGIN SOLUTION` region becomes the TODO block; a `NO PROMPT` one goes, and of the blank
    lines around it those of the more generous side stay. With `keep_solutions` (tests only) the graded
    answers stay without their markers: the starter once a student has filled it with them.
    """
    lines = text.splitlines(keepends=True)
    output, position = [], 0
    for start, end, kind, indent in find_regions(path, text):
        output.extend(lines[position:start - 1])
        if kind == BEGIN:
            output.extend(lines[start:end - 1] if keep_solutions
                          else [" " * indent + line + "\n" for line in TODO])
        else:  # as many blank lines as the more generous side had, not both sides' together
            before = len(output) - len(list(itertools.dropwhile(str.isspace, reversed(output))))
            after = 0
            while after < before and end + after < len(lines) and lines[end + after].isspace():
                after += 1
            end += after
        position = end
    output.extend(lines[position:])
    return "".join(output)


def graded_functions(tree):
    """`{"Class.method": FunctionDef}` of the classes of a module's AST."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
    return found


def is_todo_body(function):
    """Whether `function`'s body is its docstring (if any) and `pass` alone."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return len(body) == 1 and isinstance(body[0], ast.Pass)


def check_starter(path, text, graded):
    """Raise MarkerError unless `text` parses and each graded function of `graded` is a TODO."""
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as error:
        raise MarkerError(f"{path}:{error.lineno}: the starter made from it does not parse "
                          f"({error.msg}): check the markers around that line") from None
    functions = graded_functions(tree)
    for name in graded:
        if name not in functions:
            raise MarkerError(f"{path}: the starter has no {name}, a graded function")
        function = functions[name]
        if name in PARTIAL:
            statements = text.splitlines()[function.lineno - 1:function.end_lineno]
            if TODO[1] not in (line.strip() for line in statements):
                raise MarkerError(f"{path}:{function.lineno}: {name} has no {BEGIN!r} region")
        elif not is_todo_body(function):
            raise MarkerError(f"{path}:{function.lineno}: {name} is not all one {BEGIN!r} region "
                              f"after its docstring")


def starter_texts(sources=None, keep_solutions=False):
    """`{starter name: text}` of the model files; `sources` maps starter names to solution paths."""
    if sources is None:
        sources = {name: os.path.join(ROOT, source) for name, source in MODEL_SOURCES.items()}
    texts = {}
    for name, source in sources.items():
        with open(source, encoding="utf-8") as file:
            texts[name] = strip_solutions(source, file.read(), keep_solutions)
        if not keep_solutions:
            check_starter(source, texts[name], GRADED.get(name, ()))
    return texts


def check_out_folder(out, overwrite):
    """Refuse OUT when it is a file, the package itself, or a folder with files in it (unless
    `overwrite`)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{out} is a file, not a folder: choose another OUT")
    real_out, real_root = os.path.realpath(out), os.path.realpath(ROOT)
    if os.path.commonpath([real_out, real_root]) in (real_out, real_root):
        raise UsageError(f"{out} is the package or in it: choose a folder outside {ROOT}")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UsageError(f"{out} is not empty: choose a new or empty folder, or pass --overwrite to replace it")


def write_starter(out, sources=None, overwrite=False, keep_solutions=False):
    """Write the starter into the folder `out`; returns the paths written, relative to `out`.

    The whole starter is made in a temporary folder beside `out` and moved into place at the end,
    so a failure leaves `out` as it was.
    """
    check_out_folder(out, overwrite)
    texts = starter_texts(sources, keep_solutions)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    building = tempfile.mkdtemp(dir=parent, prefix=".tmp-starter-")
    try:
        for name, text in texts.items():
            atomic_write_bytes(os.path.join(building, name), text.encode("utf-8"))
        for name, source in COPIED_FILES.items():
            shutil.copyfile(os.path.join(ROOT, source), os.path.join(building, name))
        shutil.copytree(os.path.join(ROOT, "utils"), os.path.join(building, "utils"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", *STAFF_ONLY))
        written = sorted(os.path.relpath(os.path.join(folder, name), building)
                         for folder, _, names in os.walk(building) for name in names)
        if os.path.isdir(out):
            shutil.rmtree(out)  # empty, or --overwrite
        os.replace(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return written


def main(argv=None):
    parser = OneLineParser(prog="python -m utils.starter",
                           description="Write the student's starter: the model files with each graded "
                                       "answer a TODO, the package's utils/, requirements.txt, run_exp.py "
                                       "and public shape tests.")
    parser.add_argument("out", metavar="OUT", help="a new or empty folder to write the starter in")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it has files in it")
    args = parser.parse_args(argv)
    try:
        written = write_starter(args.out, overwrite=args.overwrite)
    except (UsageError, OSError) as error:
        return fail(parser.prog, error)
    models = [name for name in written if name in MODEL_SOURCES]
    graded = sum(len(GRADED[name]) for name in models)
    print(f"wrote {len(written)} files to {args.out}: {', '.join(models)} ({graded} graded functions "
          f"left as TODOs), {', '.join(COPIED_FILES)}, "
          f"utils/ ({sum(name.startswith('utils' + os.sep) for name in written)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
