"""`python -m utils.starter`: the student's starter made from the marked solution files.

The starter is checked from outside, in child processes whose working folder is the starter, so
they import its modules and not the repository's: it parses and imports, each graded function is
the TODO block alone with its docstring, no line of a solution region is left, the public shape
tests fail on it only through the TODOs' None and pass on the solution. Filled with the solution's
answers it trains through the defaults of utils/language_model.py, which give the overrides' numbers.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

import torch

from lstm_solution import LSTM
from tests.helpers import ROOT, TINY, run_command, slow, tiny_gpt, tiny_lstm
from utils.batch_loss import BatchLoss
from utils.grading import rubric
from utils.language_model import LanguageModel
from utils.cli import UsageError
from utils.starter import GRADED, MODEL_SOURCES, MarkerError, check_out_folder, write_starter

TODO_LINES = ["# ==========================", "# TODO: Write your code here", "# =========================="]
TRIVIAL = {"", "pass", "return", "else:", "try:", "finally:", '"""', "@staticmethod", "@property"}


def run_child(folder, code, timeout=120):
    """Run `code` with python in `folder` (first on sys.path); the completed process."""
    environment = dict(os.environ, PYTHONPATH=folder, PYTHONDONTWRITEBYTECODE="1")
    return run_command([sys.executable, "-c", textwrap.dedent(code)], cwd=folder, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def child_json(folder, code):
    process = run_child(folder, code)
    if process.returncode != 0:
        raise AssertionError(f"child failed ({process.returncode}):\n{process.stderr}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def solution_region_lines(path):
    """Stripped, non-trivial lines between a `# BEGIN SOLUTION...` and a `# END SOLUTION` line."""
    inside, found = False, set()
    with open(path, encoding="utf-8") as file:
        for line in file:
            stripped = line.strip()
            if stripped.startswith("# BEGIN SOLUTION"):
                inside = True
            elif stripped == "# END SOLUTION":
                inside = False
            elif inside and stripped not in TRIVIAL and stripped.strip("()[]{},:") and not stripped.startswith("#"):
                found.add(stripped)
    return found


def methods(path):
    """`{"Class.method": (FunctionDef, source lines)}` of a file."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    tree = ast.parse(text)
    return {f"{node.name}.{item.name}": (item, text.splitlines())
            for node in tree.body if isinstance(node, ast.ClassDef)
            for item in node.body if isinstance(item, ast.FunctionDef)}


# Runs the public shape tests of the working folder; prints {test: null | last line of its error}.
RUN_SHAPES = """
import json, sys, unittest
import test_shapes_public
suite, result = unittest.defaultTestLoader.loadTestsFromModule(test_shapes_public), unittest.TestResult()
outcomes = {test.id(): None for group in suite for test in group}  # before run() lets them go
suite.run(result)
for test, trace in result.errors + result.failures:
    outcomes[test.id()] = trace.strip().splitlines()[-1]
print(json.dumps(outcomes))
"""


SHAPE_CLASSES = {"LSTM": "LSTMShapes", "LayerNorm": "LayerNormShapes",
                 "MultiHeadedAttention": "AttentionShapes", "MiniGPT1": "MiniGPT1Shapes"}


def check_every_graded_function_is_tested(case, outcomes):
    """Each graded function has its shape test (`__init__`'s part through `forward`)."""
    for name in (name for names in GRADED.values() for name in names):
        cls, method = name.split(".")
        method = "forward" if method == "__init__" else method
        case.assertIn(f"test_shapes_public.{SHAPE_CLASSES[cls]}.test_{method}", outcomes)


@slow
class StarterOfThePackageTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.temporary = tempfile.mkdtemp()
        cls.out = os.path.join(cls.temporary, "starter")
        cls.written = write_starter(cls.out)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.temporary)

    def test_the_course_files_are_written(self):
        for name in ("lstm_solution.py", "gpt1_solution.py", "requirements.txt", "test_shapes_public.py",
                     os.path.join("utils", "language_model.py"), os.path.join("utils", "batch_loss.py")):
            self.assertIn(name, self.written)
            self.assertTrue(os.path.isfile(os.path.join(self.out, name)), name)
        self.assertFalse(any("__pycache__" in name or name.endswith(".pyc") for name in self.written))
        self.assertFalse(any(os.path.basename(name).startswith("tests_") for name in self.written),
                         "the course's own public tests are not handed out")
        # The grader holds a reference answer to every graded function: staff only.
        for staff in (os.path.join("utils", "grading", "checks.py"), os.path.join("utils", "grade.py"),
                      os.path.join("utils", "starter.py")):
            self.assertTrue(os.path.isfile(os.path.join(ROOT, staff)), staff)
            self.assertNotIn(staff, self.written)

    def test_graded_bodies_are_the_todo_block_with_the_docstring(self):
        for starter_name, source in MODEL_SOURCES.items():
            starter, solution = methods(os.path.join(self.out, starter_name)), methods(os.path.join(ROOT, source))
            for name in GRADED[starter_name]:
                (function, lines), (solved, _) = starter[name], solution[name]
                self.assertEqual(ast.get_docstring(function), ast.get_docstring(solved), name)
                body = function.body
                self.assertIsInstance(body[-1], ast.Pass, name)
                before_pass = [line.strip() for line in lines[body[-1].lineno - 4:body[-1].lineno - 1]]
                self.assertEqual(before_pass, TODO_LINES, name)
                if name == "MultiHeadedAttention.__init__":  # the course's lines stay, then the TODO
                    assigned = {target.attr for node in body if isinstance(node, ast.Assign)
                                for target in node.targets if isinstance(target, ast.Attribute)}
                    self.assertLessEqual({"head_size", "num_heads", "sequence_length"}, assigned)
                    self.assertNotIn("queries", assigned)
                    calls = [node for node in ast.walk(function) if isinstance(node, ast.Attribute)
                             and node.attr == "register_buffer"]
                    self.assertEqual(calls, [], "the mask is the student's")
                else:
                    self.assertEqual(len(body), 2, name)  # the docstring and pass
                    self.assertIsInstance(body[0].value, ast.Constant, name)

    def test_no_line_of_a_solution_region_is_left(self):
        for starter_name, source in MODEL_SOURCES.items():
            solution = solution_region_lines(os.path.join(ROOT, source))
            self.assertGreater(len(solution), 10, source)
            with open(os.path.join(self.out, starter_name), encoding="utf-8") as file:
                text = file.read()
            left = solution & {line.strip() for line in text.splitlines()}
            self.assertEqual(left, set(), starter_name)
            self.assertNotIn("SOLUTION", text, starter_name)
            for helper in ("LayerNormFunction", "lstm_by_layer", "_run", "fused_forward", "def features",
                           "def step", "self.fused"):
                self.assertNotIn(helper, text, f"{helper} in {starter_name}")

    def test_it_imports_its_own_modules_and_its_models_construct(self):
        found = child_json(self.out, f"""
            import json, os
            import gpt1_solution, lstm_solution
            from utils.models import build_model
            from utils.batch_loss import set_fused_kernels
            gpt = gpt1_solution.MiniGPT1(97, 32, 16, 4, 2)
            lstm = lstm_solution.LSTM(97, 32, 24, 2)
            set_fused_kernels(gpt, True)  # the starter has no `fused` flags: it changes nothing
            print(json.dumps({{"files": [gpt1_solution.__file__, lstm_solution.__file__],
                               "parameters": [sum(p.numel() for p in m.parameters()) for m in (gpt, lstm)],
                               "fused": [m.__class__.__name__ for m in gpt.modules() if hasattr(m, "fused")]}}))
            """)
        for path in found["files"]:
            self.assertEqual(os.path.dirname(os.path.realpath(path)), os.path.realpath(self.out))
        self.assertEqual(found["parameters"][1], sum(p.numel() for p in tiny_lstm().parameters()))
        self.assertEqual(found["fused"], [])
        self.assertGreater(found["parameters"][0], 0)

    def test_public_shape_tests_fail_only_on_the_todos_none(self):
        outcomes = child_json(self.out, RUN_SHAPES)
        check_every_graded_function_is_tested(self, outcomes)
        for test, error in outcomes.items():
            self.assertIsNotNone(error, f"{test} passed on the starter")
            self.assertIn("None", error, test)
            self.assertNotRegex(error, "ImportError|SyntaxError|ModuleNotFound|NameError", test)

    def test_the_grader_gives_it_zero_without_a_crash(self):
        results = os.path.join(self.temporary, "results.json")
        process = run_command([sys.executable, "-m", "utils.grade", self.out, "--json", results,
                                  "--timeout", "30"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        self.assertEqual(process.returncode, 0, process.stderr)
        with open(results, encoding="utf-8") as file:
            data = json.load(file)
        self.assertEqual(len(data["tests"]), len(rubric.RUBRIC))
        self.assertEqual(data["score"], 0)
        for test in data["tests"]:  # each reached its checks: the TODO's None, not a time limit or crash
            self.assertEqual(test["score"], 0, test["name"])
            self.assertIn("NoneType is your value", test["output"], test["name"])
            self.assertNotRegex(test["output"], "time limit|crashed|does not parse|cannot import", test["name"])

    def test_public_shape_tests_pass_on_the_solution(self):
        folder = os.path.join(self.temporary, "solution")
        os.makedirs(folder)
        for name in ("lstm_solution.py", "gpt1_solution.py", "gpt1_solution_template.py", "utils"):
            os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
        shutil.copyfile(os.path.join(self.out, "test_shapes_public.py"), os.path.join(folder, "test_shapes_public.py"))
        outcomes = child_json(folder, RUN_SHAPES)
        check_every_graded_function_is_tested(self, outcomes)
        self.assertEqual({test: error for test, error in outcomes.items() if error}, {})


class DefaultsTest(unittest.TestCase):
    """The defaults of LanguageModel, on which the starter runs, equal the solution's overrides."""

    def test_default_features_are_the_overrides(self):
        x = torch.randint(1, TINY["vocabulary_size"], (3, 9))
        for model in (tiny_lstm(), tiny_gpt()):
            self.assertIsNot(type(model).features, LanguageModel.features)
            torch.testing.assert_close(LanguageModel.features(model, x), model.features(x), rtol=0, atol=0)

    def test_default_step_is_the_lstms_step(self):
        model = tiny_lstm().eval()
        tokens = torch.randint(1, TINY["vocabulary_size"], (2, 7))
        state = default_state = None
        for start, stop in ((0, 4), (4, 5), (5, 7)):
            log_probas, state = model.step(tokens[:, start:stop], state)
            default, default_state = LanguageModel.step(model, tokens[:, start:stop], default_state)
            torch.testing.assert_close(default, log_probas, rtol=1e-5, atol=1e-6)
        self.assertEqual(default_state.tolist(), tokens.tolist())

    def test_default_step_cuts_the_context_to_sequence_length(self):
        model = tiny_gpt().eval()
        self.assertIs(type(model).step, LanguageModel.step)
        tokens = torch.randint(1, TINY["vocabulary_size"], (2, TINY["sequence_length"] + 5))
        log_probas, state = model.step(tokens[:, :10])
        log_probas, state = model.step(tokens[:, 10:], state)
        self.assertEqual(state.tolist(), tokens[:, -TINY["sequence_length"]:].tolist())
        torch.testing.assert_close(log_probas, model(tokens[:, -TINY["sequence_length"]:])[:, -1])

    def test_one_training_step_on_the_defaults_gives_the_overrides_numbers(self):
        class DefaultsLSTM(LSTM):
            features, step = LanguageModel.features, LanguageModel.step

        source = torch.randint(1, TINY["vocabulary_size"], (4, 8))
        target, mask = torch.randint(1, TINY["vocabulary_size"], (4, 8)), torch.ones(4, 8)
        losses, gradients = [], []
        for make in (LSTM, DefaultsLSTM):
            torch.manual_seed(0)
            model = make(TINY["vocabulary_size"], TINY["embedding_size"], TINY["hidden_size"], 2)
            loss, _, _ = BatchLoss(model, fused=True)(source, target, mask, 1 / 4)
            loss.backward()
            losses.append(loss.detach())
            gradients.append([p.grad for p in model.parameters() if p.grad is not None])
        torch.testing.assert_close(losses[1], losses[0])
        self.assertEqual(len(gradients[0]), len(gradients[1]))
        for default, override in zip(*gradients):
            torch.testing.assert_close(default, override)


# In a filled starter's folder: one BatchLoss step of each model; prints its loss and weights' sum.
FILLED_STEP = """
import json, torch
from gpt1_solution import MiniGPT1
from lstm_solution import LSTM
from utils.batch_loss import BatchLoss
from utils.language_model import LanguageModel
found = {}
for name, make in (("lstm", lambda: LSTM(97, 32, 24, 2)), ("gpt", lambda: MiniGPT1(97, 32, 16, 4, 2))):
    torch.manual_seed(0)
    model = make()
    assert type(model).features is LanguageModel.features and type(model).step is LanguageModel.step
    torch.manual_seed(1)
    source, target = torch.randint(1, 97, (4, 8)), torch.randint(1, 97, (4, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, nll_sum, tokens = BatchLoss(model, fused=True)(source, target, torch.ones(4, 8), 1 / 4)
    loss.backward()
    optimizer.step()
    found[name] = {"loss": loss.item(), "after": model.loss(model.predict(source), target, torch.ones(4, 8)).item()}
print(json.dumps(found))
"""


@slow
class FilledStarterTest(unittest.TestCase):
    """The starter with the solution's answers in its TODOs trains as the package does."""

    def test_one_training_step(self):
        with tempfile.TemporaryDirectory() as temporary:
            out = os.path.join(temporary, "filled")
            write_starter(out, keep_solutions=True)
            found = child_json(out, FILLED_STEP)
        for name, make in (("lstm", lambda: tiny_lstm(seed=0)), ("gpt", lambda: tiny_gpt(seed=0))):
            model = make()
            torch.manual_seed(1)
            source, target = (torch.randint(1, 97, (4, 8)) for _ in range(2))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            loss, _, _ = BatchLoss(model, fused=True)(source, target, torch.ones(4, 8), 1 / 4)
            loss.backward()
            optimizer.step()
            after = model.loss(model.predict(source), target, torch.ones(4, 8)).item()
            self.assertAlmostEqual(found[name]["loss"], loss.item(), places=5, msg=name)
            self.assertAlmostEqual(found[name]["after"], after, places=4, msg=name)
            self.assertLess(after, loss.item(), name)


class BadInputTest(unittest.TestCase):
    def setUp(self):
        self.temporary = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.temporary)

    def command(self, *args):
        return run_command([sys.executable, "-m", "utils.starter", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    def test_a_folder_with_files_is_refused_then_replaced_with_overwrite(self):
        out = os.path.join(self.temporary, "out")
        os.makedirs(out)
        with open(os.path.join(out, "mine.txt"), "w") as file:
            file.write("keep")
        refused = self.command(out)
        self.assertEqual(refused.returncode, 2)
        self.assertEqual(len(refused.stderr.strip().splitlines()), 1, refused.stderr)
        self.assertIn(out, refused.stderr)
        self.assertEqual(os.listdir(out), ["mine.txt"])
        replaced = self.command(out, "--overwrite")
        self.assertEqual(replaced.returncode, 0, replaced.stderr)
        self.assertIn("lstm_solution.py", replaced.stdout)
        self.assertFalse(os.path.exists(os.path.join(out, "mine.txt")))
        self.assertTrue(os.path.isfile(os.path.join(out, "gpt1_solution.py")))

    def test_a_file_and_the_package_are_refused(self):
        path = os.path.join(self.temporary, "file")
        open(path, "w").close()
        inside = os.path.join(ROOT, "tests", "starter-out-never-made")
        for out in (path, ROOT, inside):
            refused = self.command(out, "--overwrite")
            self.assertEqual(refused.returncode, 2, out)
            self.assertEqual(len(refused.stderr.strip().splitlines()), 1, refused.stderr)
        self.assertFalse(os.path.exists(inside))
        for folder in ("docs", "utils", "tests"):  # --overwrite would replace a folder of the package
            with self.assertRaisesRegex(UsageError, "outside"):
                check_out_folder(os.path.join(ROOT, folder), overwrite=True)

    def broken(self, edit):
        """The LSTM's source with `edit(lines)` applied; the MarkerError's message and the lines."""
        with open(os.path.join(ROOT, "lstm_solution.py"), encoding="utf-8") as file:
            lines = file.read().splitlines(keepends=True)
        edit(lines)
        path = os.path.join(self.temporary, "broken_lstm.py")
        with open(path, "w", encoding="utf-8") as file:
            file.writelines(lines)
        out = os.path.join(self.temporary, "out")
        with self.assertRaises(MarkerError) as caught:
            write_starter(out, sources={"lstm_solution.py": path})
        self.assertFalse(os.path.exists(out), "nothing is written")
        self.assertEqual(len(str(caught.exception).splitlines()), 1)
        return str(caught.exception), lines

    def marker_lines(self, lines, marker):
        return [number for number, line in enumerate(lines, 1) if line.strip() == marker]

    def test_an_unclosed_begin_names_its_line(self):
        def drop_last_end(lines):
            del lines[self.marker_lines(lines, "# END SOLUTION")[-1] - 1]
        message, lines = self.broken(drop_last_end)
        last_begin = self.marker_lines(lines, "# BEGIN SOLUTION NO PROMPT")[-1]
        self.assertIn(f"broken_lstm.py:{last_begin}:", message)

    def test_an_end_without_begin_names_its_line(self):
        def drop_first_begin(lines):
            del lines[self.marker_lines(lines, "# BEGIN SOLUTION NO PROMPT")[0] - 1]
        message, lines = self.broken(drop_first_begin)
        first_end = self.marker_lines(lines, "# END SOLUTION")[0]
        self.assertIn(f"broken_lstm.py:{first_end}:", message)

    def test_a_nested_begin_names_its_line(self):
        def drop_an_end(lines):  # forward's region now runs into loss's BEGIN
            del lines[self.marker_lines(lines, "# END SOLUTION")[1] - 1]
        message, lines = self.broken(drop_an_end)
        self.assertIn(f"broken_lstm.py:{self.marker_lines(lines, '# BEGIN SOLUTION')[1]}:", message)

    def test_a_misindented_end_names_its_line(self):
        def shift_an_end(lines):
            number = self.marker_lines(lines, "# END SOLUTION")[1]
            lines[number - 1] = "    # END SOLUTION\n"
        message, lines = self.broken(shift_an_end)
        self.assertIn(f"broken_lstm.py:{self.marker_lines(lines, '# END SOLUTION')[1]}:", message)

    def test_a_graded_function_without_markers_is_named(self):
        def unmark_loss(lines):
            begin = [n for n in self.marker_lines(lines, "# BEGIN SOLUTION")
                     if "super().loss" in lines[n]][0]
            del lines[begin + 1], lines[begin - 1]  # its END and BEGIN, around the one line
        message, _ = self.broken(unmark_loss)
        self.assertIn("LSTM.loss", message)


if __name__ == "__main__":
    unittest.main()
