"""Precision for every GPU: the choice by compute capability, fp16 that stays close to fp32, the log."""
import json
import os
import shutil
import unittest
from unittest import mock

import torch

from tests.helpers import TINY, TinyRunCase, run_main, skip_unless_cpu_autocast, tiny_gpt, tiny_lstm
from utils.config import resolve_config
from utils.batch_loss import BatchLoss
from utils.cli import cpu_name
from utils.training import choose_precision, resolve_precision

CUDA = torch.device("cuda", 0)


def on_capability(major, minor):
    """Pretend the GPU has compute capability `major.minor` (no GPU needed)."""
    return mock.patch("torch.cuda.get_device_capability", return_value=(major, minor))


class ChoicePrecisionTest(unittest.TestCase):
    def choice(self, capability, **overrides):
        config = resolve_config("6", **overrides)
        with on_capability(*capability):
            return choose_precision(config, CUDA)

    def test_auto_follows_the_gpu(self):
        self.assertEqual(self.choice((7, 5))[0], "fp16")  # T4: bf16 only emulated
        self.assertEqual(self.choice((7, 0))[0], "fp16")  # V100
        self.assertEqual(self.choice((8, 0))[0], "bf16")  # A100
        self.assertEqual(self.choice((8, 6))[0], "bf16")
        self.assertEqual(self.choice((9, 0))[0], "bf16")  # H100 / H200
        self.assertIn("sm_75", self.choice((7, 5))[1])
        self.assertIn("no native bf16", self.choice((7, 5))[1])

    def test_cpu_is_fp32(self):
        self.assertEqual(choose_precision(resolve_config("6"), torch.device("cpu"))[0], "fp32")
        self.assertIsNone(resolve_precision(resolve_config("2"), torch.device("cpu")))

    def test_an_explicit_flag_always_wins(self):
        for capability in ((7, 5), (9, 0)):
            for asked in ("bf16", "fp16", "fp32"):
                self.assertEqual(self.choice(capability, precision=asked), (asked, f"--precision {asked}"))
        self.assertEqual(choose_precision(resolve_config("6", precision="fp16"), torch.device("cpu"))[0], "fp16")

    def test_reference_path_is_fp32_unless_asked(self):
        self.assertEqual(self.choice((9, 0), fused=False)[0], "fp32")
        self.assertEqual(self.choice((9, 0), fused=False, precision="bf16")[0], "bf16")

    def test_dtypes(self):
        with on_capability(7, 5):
            self.assertIs(resolve_precision(resolve_config("6"), CUDA), torch.float16)
        with on_capability(8, 0):
            self.assertIs(resolve_precision(resolve_config("6"), CUDA), torch.bfloat16)


class Fp16Test(unittest.TestCase):
    """Under fp16 autocast the loss stays within 1% of fp32 and the scaled gradients are finite."""

    def check(self, model, device, fused):
        model = model.to(device)
        generator = torch.Generator().manual_seed(3)
        shape = (4, TINY["sequence_length"])
        source = torch.randint(1, TINY["vocabulary_size"], shape, generator=generator).to(device)
        target = torch.randint(1, TINY["vocabulary_size"], shape, generator=generator).to(device)
        mask = torch.ones(shape, device=device)
        mask[1, 9:] = 0
        reference, _, _ = BatchLoss(model, fused=fused)(source, target, mask, 0.25)
        loss, nll, _ = BatchLoss(model, fused=fused, autocast_dtype=torch.float16)(source, target, mask, 0.25)
        self.assertEqual(loss.dtype, torch.float32)  # the loss itself stays fp32
        self.assertLess(abs(loss.item() - reference.item()) / reference.item(), 0.01)
        scaler = torch.amp.GradScaler(device.type)
        scaler.scale(loss).backward()
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        self.assertTrue(gradients)
        self.assertTrue(all(torch.isfinite(g).all() for g in gradients))
        self.assertTrue(torch.isfinite(nll))

    @skip_unless_cpu_autocast("fp16", "gpt1")
    def test_minigpt1_both_paths_cpu(self):
        for fused in (True, False):
            with self.subTest(fused=fused):
                self.check(tiny_gpt(learn_embeddings=True), torch.device("cpu"), fused)

    @unittest.skipUnless(torch.cuda.is_available(), "needs CUDA (the CPU's fp16 LSTM: the probe's test below)")
    def test_lstm_and_minigpt1_cuda(self):
        for make in (tiny_lstm, tiny_gpt):
            for fused in (True, False):
                with self.subTest(model=make.__name__, fused=fused):
                    self.check(make(learn_embeddings=True), CUDA, fused)


class CpuAutocastProbeTest(unittest.TestCase):
    """The probe's answer agrees with trying the model itself, and its refusal names the CPU."""

    def test_the_answer_is_what_the_model_does(self):
        from utils.cpu_autocast import cpu_autocast_refusal
        for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            for name, make in (("lstm", tiny_lstm), ("gpt1", tiny_gpt)):
                with self.subTest(precision=precision, model=name):
                    refusal = cpu_autocast_refusal(precision, name)
                    self.assertIs(cpu_autocast_refusal(precision, name), refusal)  # asked once
                    source = torch.randint(1, TINY["vocabulary_size"], (2, 8))
                    try:
                        loss, _, _ = BatchLoss(make(learn_embeddings=True), autocast_dtype=dtype)(
                            source, source, torch.ones(2, 8), 0.5)
                        loss.backward()
                        ran = None
                    except RuntimeError as error:
                        ran = str(error)
                    self.assertEqual(refusal is None, ran is None, (refusal, ran))

    def test_the_refusal_names_the_cpu_and_what_failed(self):
        from utils import cpu_autocast
        with mock.patch.object(cpu_autocast, "_try_operations",
                               side_effect=RuntimeError("could not create a primitive. Run with VERBOSE")):
            cpu_autocast.cpu_autocast_refusal.cache_clear()
            try:
                refusal = cpu_autocast.cpu_autocast_refusal("bf16", "lstm")
            finally:
                cpu_autocast.cpu_autocast_refusal.cache_clear()
        self.assertIn(f"this CPU ({cpu_name()}) cannot run the lstm under bf16 autocast", refusal)
        self.assertIn("(could not create a primitive;", refusal)
        self.assertNotIn("VERBOSE", refusal)


class PrecisionInTheLogTest(TinyRunCase):
    def tearDown(self):
        shutil.rmtree(self.data, ignore_errors=True)
        shutil.rmtree(self.logs, ignore_errors=True)

    def test_choice_printed_once_and_logged(self):
        code, out, err = run_main(*self.args("p16", "gpt1", "--precision", "fp16", "--epochs", 1))
        self.assertEqual(code, 0, err)
        self.assertEqual(out.count("precision: "), 1)
        self.assertIn("precision: fp16 (--precision fp16)", out)
        with open(os.path.join(self.logs, "p16", "log.json")) as file:
            environment = json.load(file)["environment"]
        self.assertEqual((environment["autocast"], environment["precision_reason"]),
                         ("fp16", "--precision fp16"))
        code, out, _ = run_main(*self.args("p32", "lstm", "--epochs", 1))
        self.assertIn("precision: fp32 (--precision auto on cpu)", out)


class HelpTest(unittest.TestCase):
    def test_precision_and_batch_size_lines(self):
        code, out, _ = run_main("--help")
        self.assertEqual(code, 0)
        text = " ".join(out.split())
        self.assertIn("--precision {auto,bf16,fp16,fp32}", text)
        self.assertIn("global batch size (default: 16)", text)
        self.assertNotIn("(default: None)", text)
        self.assertEqual(text.count("(default: 16)"), 1)


if __name__ == "__main__":
    unittest.main()
