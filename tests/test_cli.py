"""The helpers every command line shares (utils/cli.py), and perplexity, written once."""
import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import unittest
from unittest import mock

import torch

from tests.helpers import run_command, slow
from utils import cli
from utils.language_model import perplexity, sequence_mean_loss, sequence_nll

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ParserTest(unittest.TestCase):
    def parser(self):
        parser = cli.OneLineParser(prog="tool")
        parser.add_argument("--size", type=cli.positive_int, default=16, help="batch size")
        parser.add_argument("--rate", type=cli.positive_float, default=None, help="rate (default: 1e-3)")
        parser.add_argument("--count", type=cli.nonnegative_int, default=0, help="how many")
        parser.add_argument("--fast", action="store_true", help="go fast")
        parser.add_argument("--slow", dest="fast", action="store_false", help="go slow")
        return parser

    def test_bad_value_is_one_line_and_exit_2(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as raised:
            self.parser().parse_args(["--size", "0"])
        self.assertEqual(raised.exception.code, 2)
        self.assertEqual(err.getvalue().count("\n"), 1)
        self.assertIn("tool: error: argument --size: '0' is not a whole number >= 1 (see --help)", err.getvalue())

    def test_each_default_shown_once(self):
        text = " ".join(self.parser().format_help().split())
        self.assertIn("batch size (default: 16)", text)
        self.assertIn("rate (default: 1e-3)", text)
        self.assertNotIn("(default: None)", text)
        self.assertIn("how many (default: 0)", text)
        self.assertIn("go fast --slow go slow", text)  # flags: no "(default: False)" / "(default: True)"

    def test_number_types(self):
        self.assertEqual(cli.positive_int("3"), 3)
        self.assertEqual(cli.nonnegative_int("0"), 0)
        self.assertEqual(cli.positive_float("0.5"), 0.5)
        for function, text in ((cli.positive_int, "1.5"), (cli.positive_int, "-2"), (cli.nonnegative_int, "-1"),
                               (cli.positive_float, "0"), (cli.positive_float, "nan"), (cli.positive_float, "inf"),
                               (cli.positive_float, "x")):
            with self.subTest(function=function.__name__, text=text), self.assertRaises(argparse.ArgumentTypeError):
                function(text)


class DeviceTest(unittest.TestCase):
    def test_cpu_and_default(self):
        self.assertEqual(cli.resolve_device("cpu"), torch.device("cpu"))
        if not torch.cuda.is_available():
            self.assertEqual(cli.resolve_device(None), torch.device("cpu"))

    def test_bad_names(self):
        for name, words in (("gpu", "is not a device"), ("meta", "is not supported")):
            with self.subTest(name=name), self.assertRaises(cli.UsageError) as raised:
                cli.resolve_device(name)
            self.assertIn(words, str(raised.exception))

    @unittest.skipIf(torch.cuda.is_available(), "checks the message on a machine without CUDA")
    def test_cuda_without_a_gpu(self):
        with self.assertRaises(cli.UsageError) as raised:
            cli.resolve_device("cuda")
        self.assertIn("none is available: use --device cpu", str(raised.exception))


class EnvironmentTest(unittest.TestCase):
    def test_record(self):
        record = cli.environment_record(torch.device("cpu"))
        self.assertEqual(record["torch"], torch.__version__)
        self.assertEqual(record["device"], "cpu")
        self.assertIsNone(record["cuda"])
        self.assertTrue(record["device_name"])

    def test_shared_data_path(self):
        with mock.patch.dict(os.environ, {cli.SHARED_DATA_ENV: "/x"}):
            self.assertEqual(cli.shared_data_path("wikitext2"), os.path.join("/x", "wikitext2"))
        with mock.patch.dict(os.environ, clear=True):
            self.assertIsNone(cli.shared_data_path("wikitext2"))


class PerplexityTest(unittest.TestCase):
    def test_values(self):
        self.assertAlmostEqual(perplexity(math.log(40479)), 40479, places=6)
        self.assertEqual(perplexity(0.0), 1.0)
        self.assertEqual(perplexity(1000.0), math.inf)

    def test_course_loss_from_shared_per_sequence_nll(self):
        nll = torch.tensor([[1.0, 3.0, math.inf], [2.0, 2.0, 2.0], [5.0, 5.0, 5.0]])
        mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
        per_sequence, masked, lengths = sequence_nll(nll, mask)
        self.assertEqual(per_sequence.tolist(), [2.0, 2.0, 0.0])
        self.assertEqual(masked[0].tolist(), [1.0, 3.0, 0.0])  # inf at padding is dropped, not NaN
        self.assertEqual(lengths.tolist(), [2.0, 3.0, 0.0])
        self.assertEqual(sequence_mean_loss(nll, mask).item(), 2.0)  # the empty sequence is left out


# One child process prints every tool's --help, each run as `python TOOL --help` runs it (as
# __main__, by runpy), so that PyTorch is imported once rather than once a tool.
HELP_CHILD = """
import contextlib, io, json, runpy, sys
results = []
for command in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [command[-1], "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if command[0] == "-m":
                runpy.run_module(command[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(command[0], run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code
    results.append((code, out.getvalue(), err.getvalue()))
print(json.dumps(results))
"""


@slow
class ToolsHelpTest(unittest.TestCase):
    """Every command line of the package shows each default once, and never "(default: None)"."""

    def test_help_of_every_tool(self):
        commands = [["run_exp.py"], ["-m", "utils.benchmark"], ["-m", "utils.prepare_data"],
                    ["-m", "utils.generate"], ["-m", "utils.report"], ["-m", "utils.bench_tokenizer"],
                    ["-m", "utils.grade"], ["-m", "utils.starter"], ["-m", "utils.gpu_study"]]
        done = run_command([sys.executable, "-c", HELP_CHILD, json.dumps(commands)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        for command, (code, stdout, stderr) in zip(commands, json.loads(done.stdout), strict=True):
            with self.subTest(command=command):
                self.assertEqual(code, 0, stderr)
                text = " ".join(stdout.split())
                self.assertIn("usage:", text)
                self.assertNotIn("(default: None)", text)
                self.assertNotIn("(default: False)", text)
                for line in stdout.split("\n  -"):
                    self.assertLessEqual(" ".join(line.split()).count("default"), 1, line)


if __name__ == "__main__":
    unittest.main()
