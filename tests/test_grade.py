"""`python -m utils.grade`: the package's files score 36/36, each mutant loses on its own function
only, results.json is Gradescope's, an unusable SUBMISSION is one line, and the autograder zip
grades a Gradescope-like root."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import zipfile

from tests.helpers import ROOT, run_command, slow
from utils.grading import forbidden, rubric

ALL = {function.name: function.points for function in rubric.RUBRIC}


def patched(name, *replacements):
    """The package's file `name` with each (old, new) replaced once; old must be there."""
    with open(os.path.join(ROOT, name), encoding="utf-8") as file:
        text = file.read()
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} is not once in {name}"
        text = text.replace(old, new)
    return text


def write_submission(folder, lstm=None, gpt1=None, gpt1_name="gpt1_solution_template.py"):
    os.makedirs(folder, exist_ok=True)
    for name, text in (("lstm_solution.py", lstm), (gpt1_name, gpt1)):
        if text is None:
            text = patched(name if name != "gpt1_solution.py" else "gpt1_solution_template.py")
        with open(os.path.join(folder, name), "w", encoding="utf-8") as file:
            file.write(text)
    return folder


def grade(submission, json_path, *flags):
    return run_command([sys.executable, "-m", "utils.grade", submission, "--json", json_path, *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def scores(json_path):
    with open(json_path, encoding="utf-8") as file:
        data = json.load(file)
    return data, {test["name"].split(":")[0]: test for test in data["tests"]}


# Mutants, one per graded function, each (file, old, new) patched into the package's files.
LSTM_LOGITS = ("return F.log_softmax(logits, dim=-1), hidden_states", "return logits, hidden_states")
UNBIASED_VARIANCE = ("    def forward(ctx, inputs, weight, bias, eps):\n"
                     "        variance, mean = torch.var_mean(inputs, dim=-1, correction=0,",
                     "    def forward(ctx, inputs, weight, bias, eps):\n"
                     "        variance, mean = torch.var_mean(inputs, dim=-1, correction=1,")
NO_CAUSAL_MASK = ("        scores = scores * s - 1e4 * (1 - s)\n", "")
SPLIT_NO_TRANSPOSE = ("return tensor.transpose(1, 2)  # (B, H, T, dim)", "return tensor  # (B, T, H, dim)")
MERGE_ENDLESS = ("        batch_size, num_heads, length, dim = tensor.shape\n",
                 "        while True:\n            pass\n        batch_size, num_heads, length, dim = tensor.shape\n")
NO_POSITIONS = ("return self.embedding(inputs, positions.unsqueeze(0).expand_as(inputs))  # (B, T, C)",
                "return self.embedding.tokens(inputs)  # (B, T, C)")
UNMASKED_GPT_LOSS = ("        return super().loss(log_probas, targets, mask)\n        # END SOLUTION\n\n"
                     "    # The shared interface (utils/language_model.py); `step` is its default.",
                     "        return -log_probas.gather(2, targets.unsqueeze(2)).mean()\n        # END SOLUTION\n\n"
                     "    # The shared interface (utils/language_model.py); `step` is its default.")
LSTM_SYNTAX_ERROR = ("def initial_states(self, batch_size, device=None):", "def initial_states(self, batch_size, device=None)")
# Reached at run time only: no name the source check knows.
HIDDEN_LAYER_NORM = ("return LayerNormFunction.apply(inputs, self.weight, self.bias, self.eps)",
                     "return getattr(F, 'layer' + '_norm')(inputs, (self.hidden_size,), self.weight, self.bias, self.eps)")
MERGE_NO_TRANSPOSE = ("        tensor = tensor.transpose(1, 2)  # (B, T, H, dim)\n", "")
GPT_LOGITS = ("        logits = self.classifier(hidden_states)  # (B, T, V)\n"
              "        return F.log_softmax(logits, dim=-1)\n",
              "        logits = self.classifier(hidden_states)  # (B, T, V)\n        return logits\n")
EXPLICIT_ATTENTION = ("        self.fused = True\n        # END SOLUTION\n        # BEGIN SOLUTION\n        width",
                      "        self.fused = False\n        # END SOLUTION\n        # BEGIN SOLUTION\n        width")

# Submission A: every caller (apply_attention, MultiHeadedAttention.forward, MiniGPT1.forward)
# is clean while its callees are broken, so a leak from any of them would show.
MUTANTS_A = {
    "LSTM.forward": ("lstm", LSTM_LOGITS),
    "LayerNorm.forward": ("gpt1", UNBIASED_VARIANCE),
    "MultiHeadedAttention.get_attention_weights": ("gpt1", NO_CAUSAL_MASK),
    "MultiHeadedAttention.split_heads": ("gpt1", SPLIT_NO_TRANSPOSE),
    "MultiHeadedAttention.merge_heads": ("gpt1", MERGE_ENDLESS),
    "MiniGPT1.get_embeddings": ("gpt1", NO_POSITIONS),
    "MiniGPT1.loss": ("gpt1", UNMASKED_GPT_LOSS),
}
# Submission B: a syntax error costs the LSTM's functions only; a disabled function reached at run
# time; a merge without its transposition; logits; and attention's explicit path (not a bug).
MUTANTS_B = {
    "LSTM.forward": ("lstm", LSTM_SYNTAX_ERROR),
    "LSTM.loss": ("lstm", None),
    "LayerNorm.forward": ("gpt1", HIDDEN_LAYER_NORM),
    "MultiHeadedAttention.merge_heads": ("gpt1", MERGE_NO_TRANSPOSE),
    "MiniGPT1.forward": ("gpt1", GPT_LOGITS),
}

# Submission C: the remaining graded functions, each broken alone on the explicit path.
LSTM_UNMASKED_LOSS = ("        return super().loss(log_probas, targets, mask)",
                      "        return -log_probas.gather(2, targets.unsqueeze(2)).mean()")
WEIGHTS_TRANSPOSED = ("return self.merge_heads(weights @ values)", "return self.merge_heads(weights.transpose(-2, -1) @ values)")
NO_OUTPUT_MAP = ("return self.residual_dropout(self.output(attended))  # (B, T, H * D)\n        # END SOLUTION",
                 "return self.residual_dropout(attended)  # (B, T, H * D)\n        # END SOLUTION")
MUTANTS_C = {
    "LSTM.loss": ("lstm", LSTM_UNMASKED_LOSS),
    "MultiHeadedAttention.apply_attention": ("gpt1", WEIGHTS_TRANSPOSED),
    "MultiHeadedAttention.forward": ("gpt1", NO_OUTPUT_MAP),
}


def mutant_submission(folder, mutants, extra_gpt1=()):
    patches = {"lstm": [], "gpt1": list(extra_gpt1)}
    for file, patch in mutants.values():
        if patch is not None:
            patches[file].append(patch)
    return write_submission(folder, lstm=patched("lstm_solution.py", *patches["lstm"]),
                            gpt1=patched("gpt1_solution_template.py", *patches["gpt1"]))


@slow
class GradeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.mkdtemp(prefix="grade-test-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder, ignore_errors=True)

    def check_results_json(self, data):
        self.assertEqual(set(data) >= {"score", "tests", "execution_time"}, True, data.keys())
        self.assertIsInstance(data["execution_time"], float)
        self.assertEqual(len(data["tests"]), len(rubric.RUBRIC))
        for test, function in zip(data["tests"], rubric.RUBRIC):
            self.assertTrue(test["name"].startswith(function.name + ":"), test["name"])
            self.assertEqual(test["max_score"], function.points)
            self.assertTrue(0 <= test["score"] <= test["max_score"])
            self.assertIsInstance(test["output"], str)
            self.assertTrue(test["output"])
            self.assertEqual(test["visibility"], "visible")
        self.assertAlmostEqual(data["score"], sum(test["score"] for test in data["tests"]), places=6)

    def assert_lost_exactly(self, tests, lost):
        """The functions in `lost` score below their maximum, every other one full marks."""
        for name, points in ALL.items():
            if name in lost:
                self.assertLess(tests[name]["score"], points, f"{name} should lose points")
            else:
                self.assertEqual(tests[name]["score"], points, f"{name} lost points: {tests[name]['output']}")

    def test_package_files_score_36(self):
        submission = write_submission(os.path.join(self.folder, "package"))
        json_path = os.path.join(self.folder, "package.json")
        completed = grade(submission, json_path)
        self.assertEqual(completed.returncode, 0, completed.stderr)
        data, tests = scores(json_path)
        self.check_results_json(data)
        self.assertEqual(data["score"], rubric.TOTAL_POINTS)
        self.assert_lost_exactly(tests, set())
        self.assertIn(f"total", completed.stdout)
        self.assertRegex(completed.stdout, r"total\s+36\s+36")
        for name in ALL:  # a progress line per function
            self.assertIn(f"graded {name}:", completed.stderr)

    def test_mutants_a_each_lose_on_their_own_function(self):
        submission = mutant_submission(os.path.join(self.folder, "a"), MUTANTS_A)
        json_path = os.path.join(self.folder, "a.json")
        completed = grade(submission, json_path, "--timeout", "4")
        self.assertEqual(completed.returncode, 0, completed.stderr)
        data, tests = scores(json_path)
        self.check_results_json(data)
        self.assert_lost_exactly(tests, set(MUTANTS_A))
        self.assertIn("time limit of 4 s", tests["MultiHeadedAttention.merge_heads"]["output"])
        self.assertEqual(tests["MultiHeadedAttention.merge_heads"]["score"], 0)
        layer_norm = tests["LayerNorm.forward"]["output"]
        self.assertIn("FAILED  normalised", layer_norm)
        self.assertIn("is your value", layer_norm)
        self.assertIn("the expected one", layer_norm)
        self.assertIn("passed  full mask", tests["MiniGPT1.loss"]["output"])
        self.assertIn("FAILED  ragged mask", tests["MiniGPT1.loss"]["output"])
        self.assertIn("FAILED  causal mask", tests["MultiHeadedAttention.get_attention_weights"]["output"])
        self.assertIn("FAILED  log-probabilities", tests["LSTM.forward"]["output"])
        self.assertLess(data["score"], rubric.TOTAL_POINTS)

    def test_mutants_b_each_lose_on_their_own_function(self):
        submission = mutant_submission(os.path.join(self.folder, "b"), MUTANTS_B, extra_gpt1=[EXPLICIT_ATTENTION])
        json_path = os.path.join(self.folder, "b.json")
        completed = grade(submission, json_path, "--timeout", "20")
        self.assertEqual(completed.returncode, 0, completed.stderr)
        data, tests = scores(json_path)
        self.check_results_json(data)
        self.assert_lost_exactly(tests, set(MUTANTS_B))
        for name in ("LSTM.forward", "LSTM.loss"):
            self.assertEqual(tests[name]["score"], 0)
            self.assertIn("lstm_solution.py does not parse", tests[name]["output"])
        self.assertEqual(tests["LayerNorm.forward"]["score"], 0)
        self.assertIn("torch.nn.functional.layer_norm is disabled", tests["LayerNorm.forward"]["output"])
        self.assertIn("passed  shape", tests["MultiHeadedAttention.merge_heads"]["output"])
        self.assertIn("passed  shape", tests["MiniGPT1.forward"]["output"])
        self.assertIn("FAILED  log-probabilities", tests["MiniGPT1.forward"]["output"])

    def test_mutants_c_each_lose_on_their_own_function(self):
        submission = mutant_submission(os.path.join(self.folder, "c"), MUTANTS_C, extra_gpt1=[EXPLICIT_ATTENTION])
        json_path = os.path.join(self.folder, "c.json")
        completed = grade(submission, json_path, "--timeout", "20")
        self.assertEqual(completed.returncode, 0, completed.stderr)
        data, tests = scores(json_path)
        self.check_results_json(data)
        self.assert_lost_exactly(tests, set(MUTANTS_C))
        self.assertIn("FAILED  ragged mask", tests["LSTM.loss"]["output"])
        self.assertIn("FAILED  values", tests["MultiHeadedAttention.apply_attention"]["output"])
        self.assertIn("passed  causal", tests["MultiHeadedAttention.forward"]["output"])
        self.assertIn("FAILED  values", tests["MultiHeadedAttention.forward"]["output"])

    def test_unusable_submission_is_one_line_and_exit_2(self):
        empty = os.path.join(self.folder, "empty")
        os.makedirs(empty, exist_ok=True)
        a_file = os.path.join(self.folder, "a-file.py")
        open(a_file, "w").close()
        for submission, words in ((os.path.join(self.folder, "missing"), "does not exist"),
                                  (a_file, "is a file, not a folder"), (empty, "holds neither")):
            completed = grade(submission, os.path.join(self.folder, "unusable.json"))
            self.assertEqual(completed.returncode, 2, completed.stderr)
            self.assertEqual(len(completed.stderr.strip().splitlines()), 1, completed.stderr)
            self.assertIn(words, completed.stderr)
            # Gradescope shows a 0 with the reason rather than "the autograder failed".
            data, tests = scores(os.path.join(self.folder, "unusable.json"))
            self.assertEqual((data["score"], tests), (0, {}))
            self.assertIn(words, data["output"])
            os.remove(os.path.join(self.folder, "unusable.json"))

    def test_autograder_zip_grades_a_gradescope_root(self):
        zip_path = os.path.join(self.folder, "autograder.zip")
        build = run_command([sys.executable, "-m", "utils.grade", "--autograder", zip_path],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(build.returncode, 0, build.stderr)
        again = run_command([sys.executable, "-m", "utils.grade", "--autograder", zip_path],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(again.returncode, 2)
        self.assertIn("--overwrite", again.stderr)
        root = os.path.join(self.folder, "autograder")
        with zipfile.ZipFile(zip_path) as archive:
            names = set(archive.namelist())
            archive.extractall(os.path.join(root, "source"))
        for name in ("setup.sh", "run_autograder", "requirements.txt", "lstm_solution.py",
                     "gpt1_solution_template.py", "utils/grade.py", "utils/grading/worker.py"):
            self.assertIn(name, names)
        with open(os.path.join(root, "source", "setup.sh"), encoding="utf-8") as file:
            setup = file.read()
        self.assertIn("-r requirements.txt", setup)
        self.assertIn("--index-url https://download.pytorch.org/whl/cpu", setup)
        # The course's file name, gpt1_solution.py, holding the classes.
        write_submission(os.path.join(root, "submission"), gpt1_name="gpt1_solution.py")
        run = os.path.join(root, "source", "run_autograder")
        os.chmod(run, 0o755)  # extractall drops the mode the zip records
        completed = subprocess.run(["bash", run], env={**os.environ, "AUTOGRADER_ROOT": root},
                                   capture_output=True, text=True, timeout=300)
        self.assertEqual(completed.returncode, 0, completed.stderr)
        data, tests = scores(os.path.join(root, "results", "results.json"))
        self.check_results_json(data)
        self.assertEqual(data["score"], rubric.TOTAL_POINTS)


class StaticCheckTest(unittest.TestCase):
    SOURCE = '''
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import MultiheadAttention as Attention

def helper(x):
    return F.layer_norm(x, x.shape[-1:])

class LayerNorm(nn.Module):
    def __init__(self, size):
        super().__init__()
    def forward(self, x):
        return torch.layer_norm(x, x.shape[-1:])

class MultiHeadedAttention(nn.Module):
    def __init__(self, head_size, num_heads, sequence_length):
        super().__init__()
        self.inner = Attention(head_size * num_heads, num_heads)
    def split_heads(self, x):
        return helper(x)

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = LayerNorm(8)

class MiniGPT1(nn.Module):
    def forward(self, x):
        return nn.LayerNorm(8)(x)
'''

    def test_forbidden_uses_are_attributed(self):
        graded = [function.name for function in rubric.RUBRIC]
        uses = forbidden.static_uses(self.SOURCE, graded)
        self.assertIn("torch.layer_norm", " ".join(uses["LayerNorm.forward"]))
        attention = [name for name in graded if name.startswith("MultiHeadedAttention.")]
        for name in attention:  # a use in __init__ costs every graded method of the class
            self.assertIn("torch.nn.MultiheadAttention", " ".join(uses[name]))
        self.assertIn("F.layer_norm", " ".join(uses["MultiHeadedAttention.split_heads"]))  # through helper
        self.assertIn("nn.LayerNorm", " ".join(uses["MiniGPT1.forward"]))
        self.assertEqual(set(uses), {"LayerNorm.forward", "MiniGPT1.forward", *attention})

    def test_own_attributes_and_type_checks_are_not_uses(self):
        source = """
import torch.nn as nn
class LayerNorm(nn.Module):
    def layer_norm(self, x):
        return x
    def forward(self, x):
        return self.layer_norm(x)
class MiniGPT1(nn.Module):
    def init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.LayerNorm)) or issubclass(type(module), nn.MultiheadAttention):
            module.reset_parameters()
    def forward(self, x):
        return nn.LayerNorm(8)(x)
"""
        uses = forbidden.static_uses(source, [function.name for function in rubric.RUBRIC])
        self.assertEqual(set(uses), {"MiniGPT1.get_embeddings", "MiniGPT1.forward", "MiniGPT1.loss"} & set(uses))
        self.assertEqual(uses["MiniGPT1.forward"], ["uses nn.LayerNorm (line 13)"])
        self.assertNotIn("LayerNorm.forward", uses)
        self.assertNotIn("MiniGPT1.get_embeddings", uses)

    def test_package_files_are_clean(self):
        graded = [function.name for function in rubric.RUBRIC]
        for name in ("lstm_solution.py", "gpt1_solution_template.py"):
            with open(os.path.join(ROOT, name), encoding="utf-8") as file:
                self.assertEqual(forbidden.static_uses(file.read(), graded), {})


if __name__ == "__main__":
    unittest.main()
