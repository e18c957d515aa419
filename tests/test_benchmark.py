"""`python -m utils.benchmark`: FLOP counts, a tiny run's JSON, the GPU check's dry run on the CPU.

No timing is asserted: the runs here are far too small and the machine is shared. The FLOP
formula is checked against PyTorch's own count of the matmuls a step executes
(`torch.utils.flop_counter`), and pinned at the real sizes.
"""
import contextlib
import functools
import json
import os
import shutil
import tempfile
import unittest
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import run_cli, write_tiny_data
from utils import benchmark
from utils.models import build_model
from utils.config import resolve_config
from utils.batch_loss import BatchLoss

REAL_MATMUL_RATE = benchmark.matmul_rate
TINY_SIZES = {"embedding_size": 32, "num_heads": 4, "sequence_length": 16, "hidden_size": 24}


def run_main(*argv):
    """`benchmark.main(argv)` in this process: `(exit code, stdout, stderr)`.

    The device's matmul rate is measured on 256^3 products, and the benchmark's presets are built
    at TINY_SIZES (the vocabulary stays GPT-1's, the embeddings frozen as in the presets): the full
    sizes take seconds here, and no test reads a figure that depends on them.
    """
    small_rate = functools.partial(REAL_MATMUL_RATE, size=256, repeats=2)
    small_presets = functools.partial(resolve_config, **TINY_SIZES)  # the call's sizes win
    with mock.patch.object(benchmark, "matmul_rate", small_rate), \
            mock.patch.object(benchmark, "resolve_config", small_presets):
        return run_cli(benchmark.main, argv)


def counted_flops(exp_id, embeddings, vocabulary_size=97, batch_size=3):
    """Matmul FLOPs per token that PyTorch counts in one reference-path step: (forward, backward)."""
    config = resolve_config(exp_id, embeddings=embeddings, **TINY_SIZES)
    torch.manual_seed(0)
    step = BatchLoss(build_model(config, vocabulary_size), fused=False)
    length = config.sequence_length
    inputs = torch.randint(1, vocabulary_size, (batch_size, length))
    # The native LSTM is written with matmuls the counter sees; oneDNN's fused kernel is not.
    with warnings_off(), torch.backends.mkldnn.flags(enabled=False):
        with FlopCounterMode(display=False) as forward:
            loss, _, _ = step(inputs, inputs, torch.ones(batch_size, length), 1.0)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    tokens = batch_size * length
    return config, forward.get_total_flops() / tokens, backward.get_total_flops() / tokens


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class FlopFormulaTest(unittest.TestCase):
    def test_gpt_against_counted_matmuls(self):
        for exp_id, embeddings in (("6", None), ("11", "none")):  # frozen, then learned embeddings
            with self.subTest(exp_id=exp_id, embeddings=embeddings):
                config, forward, backward = counted_flops(exp_id, embeddings)
                flops = benchmark.model_flops_per_token(config, vocabulary_size=97)
                # The reference path multiplies the whole T x T score matrix; the formula counts
                # the causal half, (T + 1) / 2 keys per query: 2 C (T - 1) less per token and layer.
                width, length = config.embedding_size, config.sequence_length
                masked_half = config.layers * 2 * width * (length - 1)
                self.assertEqual(flops["forward"] + masked_half, forward)
                self.assertEqual(flops["backward"] + 2 * masked_half, backward)
                self.assertEqual(flops["train"], flops["forward"] + flops["backward"])

    def test_lstm_against_counted_matmuls(self):
        for exp_id, embeddings in (("2", None), ("9", None), ("10", "none")):
            with self.subTest(exp_id=exp_id, embeddings=embeddings):
                config, forward, backward = counted_flops(exp_id, embeddings)
                flops = benchmark.model_flops_per_token(config, vocabulary_size=97)
                self.assertEqual(flops["forward"], forward)
                # PyTorch skips the state gradient before the first step (the zero initial state
                # needs none): 1 / T of the recurrent input gradients, which the formula keeps.
                hidden, length = config.hidden_size, config.sequence_length
                self.assertEqual(flops["backward"] - config.layers * 8 * hidden * hidden / length, backward)

    def test_real_sizes_pinned(self):
        gpt1 = benchmark.model_flops_per_token(resolve_config("6"))
        # 24 C^2 + 2 C (T + 1) + 2 C V with C 768, T 256, V 40,479.
        self.assertEqual(gpt1["forward"], 14_155_776 + 394_752 + 62_175_744)
        self.assertEqual(gpt1["backward"], 28_311_552 + 789_504 - 3_538_944 + 62_175_744)
        self.assertEqual(gpt1["train"], 164_464_128)  # the "~170 MFLOP per token"
        lstm1 = benchmark.model_flops_per_token(resolve_config("2"))
        # 8 H (E + H) + 2 H E + 2 E V with E 768, H 512.
        self.assertEqual(lstm1["forward"], 5_242_880 + 786_432 + 62_175_744)
        self.assertEqual(lstm1["train"], 139_293_696)
        learned = benchmark.model_flops_per_token(resolve_config("6", embeddings="none"))
        self.assertEqual(learned["train"] - gpt1["train"], 62_175_744 + 3_538_944)


class OpCounterTest(unittest.TestCase):
    def test_counts_operations_and_skips_views(self):
        x = torch.randn(4, 6)

        def function():
            y = (x * 2).view(24).sum() + x.t().mean()  # mul, sum, mean, add; view and t are views
            y.item()  # the read-back is an operation too

        ops = benchmark.count_ops(function)
        self.assertEqual(ops["by_op"], {"mul": 1, "sum": 1, "mean": 1, "add": 1, "_local_scalar_dense": 1})
        self.assertEqual(ops["total"], 5)

    def test_counts_the_backward_pass(self):
        weight = torch.randn(3, 5, requires_grad=True)
        ops = benchmark.count_ops(lambda: (torch.randn(2, 5) @ weight.t()).sum().backward())
        self.assertEqual(ops["by_op"]["mm"], 2)  # the forward product and the weight's gradient


class QuickRunTest(unittest.TestCase):
    """A run smaller than --quick completes, prints the table and writes the JSON."""

    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.mkdtemp()
        cls.json_path = os.path.join(cls.folder, "bench.json")
        cls.code, cls.out, cls.err = run_main(
            "--device", "cpu", "--quick", "--batch_size", 1, "--sequence_length", 8, "--windows", 2,
            "--json", cls.json_path)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder)

    def test_exit_code_and_json(self):
        self.assertEqual(self.code, 0, self.err)
        with open(self.json_path) as file:
            result = json.load(file)
        self.assertEqual(set(result), {"environment", "settings", "matmul_rate", "models", "seconds", "errors"})
        self.assertEqual(result["errors"], {})
        for key in ("python", "torch", "date", "command", "device", "device_name", "threads"):
            self.assertIn(key, result["environment"])
        self.assertEqual(result["environment"]["device"], "cpu")
        self.assertTrue(result["environment"]["command"].startswith("python -m utils.benchmark --device cpu --quick"))
        settings = result["settings"]
        self.assertEqual((settings["batch_size"], settings["sequence_length"], settings["windows"]), (1, 8, 2))
        self.assertEqual(settings["vocabulary_size"], 40479)
        self.assertTrue(settings["quick"])
        # Batch and windows were given; what --quick itself reduced is said.
        self.assertEqual(settings["reduced"], ["models lstm1,gpt1 (full run: lstm1,lstm2,lstm4,gpt1,gpt2,gpt4)"])
        self.assertEqual([model["model"] for model in result["models"]], list(benchmark.QUICK_MODELS))
        self.assertGreater(result["matmul_rate"]["flops_per_second"], 0)
        for model in result["models"]:
            self.assertEqual(set(model["paths"]), {"reference", "fused"})
            self.assertEqual(model["paths"]["reference"]["fused"], False)
            self.assertEqual(model["paths"]["fused"]["fused"], True)
            self.assertEqual({path["precision"] for path in model["paths"].values()}, {"fp32"})  # CPU
            for path in model["paths"].values():
                self.assertEqual(len(path["train_window_seconds"]), 2)
                for key in ("train_tokens_per_second", "eval_tokens_per_second", "matmul_fraction"):
                    self.assertGreater(path[key], 0, key)
                self.assertIn("steady_mb", path["memory"])
                self.assertIn("peak_mb", path["memory"])
                ops = path["train_ops_per_step"]
                self.assertGreater(ops["total"], 0)
                self.assertEqual(sum(ops["by_op"].values()), ops["total"])
                self.assertIn("mm" if model["kind"] == "lstm" else "addmm", ops["by_op"])  # the matmuls run
            self.assertEqual(set(model["speedup"]), {"train", "eval"})
            self.assertEqual(set(model["speedup_paired"]), {"train", "eval"})
            self.assertAlmostEqual(model["ops_ratio"], model["paths"]["fused"]["train_ops_per_step"]["total"]
                                   / model["paths"]["reference"]["train_ops_per_step"]["total"])
            self.assertGreater(model["flops_per_token"]["train"], model["flops_per_token"]["forward"])
            self.assertLess(model["parameters"]["learnable"], model["parameters"]["total"])  # frozen

    def test_table(self):
        lines = self.out.strip().splitlines()
        header = next(index for index, line in enumerate(lines) if line.startswith("model"))
        table = lines[header:]
        self.assertEqual(len(table), 2 + 3 * len(benchmark.QUICK_MODELS))  # header, rule, 3 rows a model
        for column in ("train tok/s", "eval tok/s", "peak MiB", "ops/step"):  # right-aligned under the header
            end = table[0].index(column) + len(column)
            for line in table[2:]:
                self.assertEqual(len(line[:end].rstrip()), end, f"{column!r} not aligned in {line!r}")
        self.assertIn("fused / reference", self.out)
        self.assertIn("--quick reduced: models", self.out)
        self.assertIn("gpt1: train window 2/2", self.err)  # progress goes to stderr


def make_tiny_splits(folder):
    """wiki.{train,validation,test}.npz with a few hundred ids each (GPT-1 id range)."""
    write_tiny_data(folder, vocabulary_size=40479, stream="random", embeddings=False)


class GpuCheckDryRunTest(unittest.TestCase):
    """`--gpu-check` on the CPU with tiny limits: every part runs and lands in one JSON file."""

    def test_dry_run(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        make_tiny_splits(folder)
        json_path = os.path.join(folder, "check.json")
        code, out, err = run_main("--gpu-check", "--device", "cpu", "--data_folder", folder,
                                  "--json", json_path, "--models", "gpt1", "--batch_size", 2,
                                  "--sequence_length", 8, "--windows", 1, "--limit_batches", 2)
        self.assertEqual(code, 0, err)
        with open(json_path) as file:
            report = json.load(file)
        self.assertEqual(report["errors"], {})
        self.assertEqual([m["model"] for m in report["benchmark"]["models"]], ["gpt1"])
        self.assertEqual(set(report["epochs"]), {"2", "6"})
        for exp_id, run in report["epochs"].items():
            self.assertEqual(run["config"]["epochs"], 1)
            self.assertEqual(run["config"]["limit_batches"], 2)
            self.assertEqual(run["embeddings"], "learned")  # no embeddings.npz in the folder
            self.assertGreater(run["train_seconds"], 0)
            self.assertEqual(run["train_tokens"] > 0, True)
            self.assertIsNotNone(run["valid_ppl"])
        self.assertNotIn("targets", report)  # figures and ratios, no pass/fail against an issue
        self.assertIsNotNone(report["benchmark"]["models"][0]["speedup"]["train"])
        self.assertGreater(report["gpu_check"]["seconds"], 0)
        self.assertIn("dry run", err)
        self.assertIn("config 6 (gpt1 x1", out)

    def test_a_failing_part_is_recorded_and_the_rest_runs(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        make_tiny_splits(folder)
        json_path = os.path.join(folder, "check.json")
        finished = {"config": {"model": "gpt1", "layers": 1}, "embeddings": "learned", "train_seconds": 2.0,
                    "train_tokens_per_second": 1e6, "valid_seconds": 0.5, "valid_ppl": 900.0}

        def epoch_run(exp_id, args, device):
            if exp_id == "2":
                raise RuntimeError("CUDA error: an illegal memory access")
            return dict(finished, exp_id=exp_id)

        with mock.patch.object(benchmark, "run_benchmark", side_effect=RuntimeError("no kernel")), \
                mock.patch.object(benchmark, "epoch_run", side_effect=epoch_run):
            code, out, _ = run_main("--gpu-check", "--device", "cpu", "--data_folder", folder, "--json", json_path)
        self.assertEqual(code, 1)
        with open(json_path) as file:
            report = json.load(file)
        self.assertEqual(report["errors"], {"benchmark": "RuntimeError: no kernel",
                                            "epoch 2": "RuntimeError: CUDA error: an illegal memory access"})
        self.assertEqual(report["epochs"]["6"]["train_seconds"], 2.0)
        self.assertNotIn("2", report["epochs"])  # failed: no figures
        self.assertIn("config 6 (gpt1 x1, embeddings learned): one epoch 2.0 s train", out)
        self.assertIn("error in epoch 2", out)


class ModelFailureTest(unittest.TestCase):
    def test_one_failing_model_keeps_the_others(self):
        real = benchmark.benchmark_model

        def benchmark_model(name, *args, **kwargs):
            if name == "lstm1":
                raise RuntimeError("cuDNN RNN: no kernel for this dtype")
            return real(name, *args, **kwargs)

        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        json_path = os.path.join(folder, "bench.json")
        with mock.patch.object(benchmark, "benchmark_model", side_effect=benchmark_model):
            code, out, err = run_main("--device", "cpu", "--models", "lstm1,gpt1", "--batch_size", 1,
                                      "--sequence_length", 8, "--windows", 1, "--json", json_path)
        self.assertEqual(code, 1)
        with open(json_path) as file:
            result = json.load(file)
        self.assertEqual([model["model"] for model in result["models"]], ["gpt1"])
        self.assertEqual(result["errors"], {"lstm1": "RuntimeError: cuDNN RNN: no kernel for this dtype"})
        self.assertIn("lstm1 failed: RuntimeError", out)
        self.assertRegex(out, r"\ngpt1 +fused / reference")


class CommandLineTest(unittest.TestCase):
    def test_bad_model_names_the_choices(self):
        code, _, err = run_main("--models", "gpt1,gpt3", "--device", "cpu")
        self.assertEqual(code, 2)
        self.assertIn("gpt3", err)
        self.assertIn("lstm1, lstm2, lstm4, gpt1, gpt2, gpt4", err)
        self.assertEqual(len(err.strip().splitlines()), 1)

    def test_bad_numbers_and_devices(self):
        self.assertEqual(run_main("--batch_size", 0)[0], 2)
        code, _, err = run_main("--device", "tpu")
        self.assertEqual(code, 2)
        self.assertIn("cpu, cuda or cuda:N", err)

    @unittest.skipIf(torch.cuda.is_available(), "this machine has CUDA")
    def test_cuda_asked_without_cuda(self):
        code, _, err = run_main("--device", "cuda", "--quick")
        self.assertEqual(code, 2)
        self.assertIn("--device cpu", err)

    @unittest.skipIf(torch.cuda.is_available(), "this machine has CUDA")
    def test_gpu_check_needs_a_gpu_unless_told_cpu(self):
        code, _, err = run_main("--gpu-check")
        self.assertEqual(code, 2)
        self.assertIn("--device cpu", err)

    def test_gpu_check_without_data(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        code, _, err = run_main("--gpu-check", "--device", "cpu", "--data_folder", folder,
                                "--json", os.path.join(folder, "x.json"))
        self.assertEqual(code, 2)
        self.assertIn(os.path.join(folder, "wiki.train.npz"), err)
        self.assertFalse(os.path.exists(os.path.join(folder, "x.json")))


if __name__ == "__main__":
    unittest.main()
