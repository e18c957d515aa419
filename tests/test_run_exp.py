"""run_exp.py: presets, smoke runs, exact perplexity, logs, resume after kill -9, bad input, torchrun."""
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

from tests.helpers import (ROOT, RUN_DATA, TinyRunCase, popen, run_main, skip_unless_cpu_autocast, slow,
                           subprocess_env, wait_for, write_long_epoch)
from utils import training
from utils.models import load_checkpoint
from utils.config import EXPERIMENTS
from utils.data_utils import read_log
from utils.language_model import token_nll
from utils.wikitext2 import Wikitext2

VOCABULARY, WIDTH = RUN_DATA["vocabulary_size"], RUN_DATA["width"]


class PresetTest(unittest.TestCase):
    TABLE = {1: ("lstm", 1, "adam"), 2: ("lstm", 1, "adamw"), 3: ("lstm", 1, "sgd"),
             4: ("lstm", 1, "momentum"), 5: ("gpt1", 1, "adam"), 6: ("gpt1", 1, "adamw"),
             7: ("gpt1", 1, "sgd"), 8: ("gpt1", 1, "momentum"), 9: ("lstm", 2, "adamw"),
             10: ("lstm", 4, "adamw"), 11: ("gpt1", 2, "adamw"), 12: ("gpt1", 4, "adamw")}

    def test_print_config_gives_the_table(self):
        self.assertEqual(sorted(EXPERIMENTS, key=int), [str(n) for n in range(1, 13)])
        for number, (model, layers, optimizer) in self.TABLE.items():
            code, out, _ = run_main("--exp_id", number, "--print_config")
            self.assertEqual(code, 0)
            config = json.loads(out)
            self.assertEqual((config["model"], config["layers"], config["optimizer"]), (model, layers, optimizer))
            self.assertEqual((config["batch_size"], config["epochs"], config["lr"], config["momentum"],
                              config["weight_decay"], config["seed"]), (16, 10, 1e-3, 0.9, 5e-4, 42))
            self.assertEqual((config["hidden_size"], config["num_heads"], config["embedding_size"],
                              config["sequence_length"], config["embeddings"]), (512, 12, 768, 256, "auto"))

    def test_flags_override_presets_and_lists_expand(self):
        code, out, _ = run_main("--exp_id", "3", "--lr", "0.5", "--layers", "2", "--print_config")
        config = json.loads(out)
        self.assertEqual((config["optimizer"], config["lr"], config["layers"]), ("sgd", 0.5, 2))
        code, out, _ = run_main("--exp_id", "1,5,12", "--print_config")
        self.assertEqual([c["exp_id"] for c in json.loads(out)], ["1", "5", "12"])
        code, out, _ = run_main("--exp_id", "all", "--print_config")
        self.assertEqual(len(json.loads(out)), 12)
        code, out, _ = run_main("--exp_id", "mine", "--model", "gpt1", "--print_config")
        self.assertEqual((json.loads(out)["model"], json.loads(out)["optimizer"]), ("gpt1", "adam"))


class BatchIndicesTest(unittest.TestCase):
    """Each epoch's batches cover every example once, in a seeded order; shares partition them."""

    def test_epochs_shares_and_device_copy(self):
        class Two:  # the second of two processes
            world_size, rank = 2, 1

        class One:
            world_size, rank = 1, 0

        epoch = training.batch_indices(11, 4, One, epoch=3, seed=7)
        self.assertEqual([len(batch) for _, batch in epoch], [4, 4, 3])
        self.assertEqual(sorted(torch.cat([share for share, _ in epoch]).tolist()), list(range(11)))
        def order(batches):
            return [batch.tolist() for _, batch in batches]

        self.assertEqual(order(epoch), order(training.batch_indices(11, 4, One, epoch=3, seed=7)))
        self.assertNotEqual(order(epoch), order(training.batch_indices(11, 4, One, epoch=4, seed=7)))
        second = training.batch_indices(11, 4, Two, epoch=3, seed=7)  # the back half of each batch
        self.assertEqual([share.tolist() for share, _ in second], [batch[2:] for batch in order(epoch)])
        self.assertEqual(training.batch_indices(11, 4, One, limit=2)[1][0].tolist(), [4, 5, 6, 7])  # evaluation: in order
        on_device = training.shares_on_device(second, torch.device("cpu"))
        self.assertEqual([share.tolist() for share in on_device], [share.tolist() for share, _ in second])
        self.assertEqual(training.shares_on_device([], torch.device("cpu")), [])


class OptimizerTest(unittest.TestCase):
    """The fused path takes PyTorch's fused optimizers, on the CPU too, and they step as the plain ones."""

    def test_fused_optimizers_on_the_fused_path_only_and_equal_steps(self):
        for name in ("adam", "adamw", "sgd", "momentum"):
            with self.subTest(optimizer=name):
                weights = {}
                for fused in (True, False):
                    config = EXPERIMENTS["2"].replace(optimizer=name, fused=fused, lr=0.01)
                    torch.manual_seed(0)
                    parameter = torch.nn.Parameter(torch.randn(5, 7))
                    start = parameter.detach().clone()
                    optimizer = training.make_optimizer(config, [parameter])
                    self.assertEqual(bool(optimizer.defaults.get("fused")), fused)
                    for step in range(3):
                        optimizer.zero_grad()
                        (parameter * torch.linspace(-1, 2, 7) * (step + 1)).square().sum().backward()
                        optimizer.step()
                    weights[fused] = parameter.detach()
                    self.assertGreater((weights[fused] - start).abs().max().item(), 1e-3)  # it moved
                torch.testing.assert_close(weights[True], weights[False], rtol=1e-5, atol=1e-6)


class SmokeRunTest(TinyRunCase):
    def check_run(self, model):
        code, out, err = run_main(*self.args("smoke_" + model, model))
        self.assertEqual(code, 0, err)
        self.assertIn("learnable", out)
        run_dir = os.path.join(self.logs, "smoke_" + model)
        self.assertTrue({"log.json", "last.pt", "best.pt"} <= set(os.listdir(run_dir)))
        log = read_log(os.path.join(run_dir, "log.json"))
        self.assertEqual(log["status"], "finished")
        self.assertEqual([e["epoch"] for e in log["epochs"]], [1, 2])
        for entry in log["epochs"]:
            for key in ("train_loss", "train_ppl", "valid_loss", "valid_ppl", "train_seconds",
                        "valid_seconds", "cumulative_seconds", "train_tokens_per_second", "lr", "cpu_rss_mb"):
                self.assertIsNotNone(entry[key], key)
            self.assertAlmostEqual(entry["valid_ppl"], math.exp(entry["valid_loss"]), places=6)
        self.assertLess(log["epochs"][1]["train_loss"], log["epochs"][0]["train_loss"])
        for key in ("python", "torch", "device", "device_name", "world_size"):
            self.assertIn(key, log["environment"])
        self.assertEqual(log["parameters"]["total"] - log["parameters"]["learnable"],
                         VOCABULARY * WIDTH + (16 * WIDTH if model == "gpt1" else 0))  # 16 positions used
        self.assertEqual(log["valid_ppls"], [e["valid_ppl"] for e in log["epochs"]])

        # Exact test perplexity: recompute it from best.pt over every real target token.
        best = min(log["epochs"], key=lambda e: e["valid_loss"])
        self.assertEqual(log["best"]["epoch"], best["epoch"])
        network, _, payload = load_checkpoint(os.path.join(run_dir, "best.pt"))
        self.assertEqual(payload["epoch"], best["epoch"])
        test = Wikitext2(self.data, "test", max_length=16, vocabulary_size=VOCABULARY).tensors()
        with torch.no_grad():
            nll = token_nll(network.predict(test["source"]), test["target"])
        expected = float((nll * test["mask"]).sum() / test["mask"].sum())
        self.assertAlmostEqual(log["test"]["loss"], expected, places=5)
        self.assertAlmostEqual(log["test"]["ppl"], math.exp(expected), places=3)

    def test_lstm(self):
        self.check_run("lstm")

    def test_gpt1(self):
        self.check_run("gpt1")

    def test_plain_path_gives_the_same_numbers(self):
        for name, extra in (("fused", ()), ("plain", ("--no_fused",))):
            self.assertEqual(run_main(*self.args(name, "gpt1", "--epochs", 1, *extra))[0], 0)
        fused = read_log(os.path.join(self.logs, "fused", "log.json"))["epochs"][0]
        plain = read_log(os.path.join(self.logs, "plain", "log.json"))["epochs"][0]
        for key in ("train_loss", "valid_loss"):
            self.assertAlmostEqual(fused[key], plain[key], delta=1e-5 * abs(plain[key]))

    def test_learned_embeddings_full_vocabulary(self):
        args = self.args("learned", "gpt1", "--embeddings", "none", "--embedding_size", 8,
                         "--max_steps", 3, "--limit_batches", 2, "--epochs", 1)
        code, out, err = run_main(*args)
        self.assertEqual(code, 0, err)
        log = read_log(os.path.join(self.logs, "learned", "log.json"))
        self.assertEqual(log["epochs"][0]["steps"], 2)
        self.assertEqual(log["parameters"]["learnable"], log["parameters"]["total"])
        self.assertEqual(log["config"]["embeddings"], "none")

    def test_max_steps_and_limit_batches(self):
        code, _, err = run_main(*self.args("limits", "lstm", "--max_steps", 3, "--limit_batches", 2, "--epochs", 5))
        self.assertEqual(code, 0, err)
        log = read_log(os.path.join(self.logs, "limits", "log.json"))
        self.assertEqual([e["steps"] for e in log["epochs"]], [2, 3])
        self.assertEqual(log["epochs"][0]["train_tokens"] <= 2 * 4 * 16, True)


class LossScalingTest(TinyRunCase):
    """Dynamic loss scaling whenever autocast is on: the same steps, its state kept across resume."""

    def test_scaled_step_equals_the_plain_step(self):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        inputs = torch.randn(4, 5)
        results = []
        for enabled in (False, True):
            copy_ = torch.nn.Linear(5, 3)
            copy_.load_state_dict(model.state_dict())
            optimizer = torch.optim.AdamW(copy_.parameters(), lr=0.1)
            scaler = torch.amp.GradScaler("cpu", enabled=enabled)
            for _ in range(3):
                optimizer.zero_grad()
                loss = copy_(inputs).pow(2).mean()
                training.optimizer_step(loss, optimizer, scaler, list(copy_.parameters()), clip_grad_norm=0.5)
            results.append(copy_.weight.detach())
        # Scaling by a power of two and back is exact.
        self.assertTrue(torch.equal(results[0], results[1]))
        self.assertFalse(torch.equal(results[0], model.weight.detach()))

    @skip_unless_cpu_autocast("bf16", "lstm")
    def test_mixed_precision_run_keeps_its_scaler_state(self):
        code, _, err = run_main(*self.args("mixed", "lstm", "--precision", "bf16"))
        self.assertEqual(code, 0, err)
        payload = torch.load(os.path.join(self.logs, "mixed", "last.pt"), weights_only=True)
        steps = payload["steps"]
        self.assertEqual(payload["grad_scaler"]["scale"], 65536.0)
        self.assertEqual(payload["grad_scaler"]["_growth_tracker"], steps)  # no step overflowed
        code, _, err = run_main(*self.args("mixed", "lstm", "--precision", "bf16", "--epochs", 3, "--resume"))
        self.assertEqual(code, 0, err)
        payload = torch.load(os.path.join(self.logs, "mixed", "last.pt"), weights_only=True)
        self.assertEqual(payload["grad_scaler"]["_growth_tracker"], payload["steps"])  # carried on
        self.assertGreater(payload["steps"], steps)
        log = read_log(os.path.join(self.logs, "mixed", "log.json"))
        self.assertEqual(log["environment"]["autocast"], "bf16")
        self.assertLess(log["epochs"][-1]["train_loss"], log["epochs"][0]["train_loss"])
        code, _, err = run_main(*self.args("plain32", "lstm", "--precision", "fp32", "--epochs", 1))
        self.assertEqual(code, 0, err)
        payload = torch.load(os.path.join(self.logs, "plain32", "last.pt"), weights_only=True)
        self.assertEqual(payload["grad_scaler"], {})  # no autocast, no scaling


class ExistingRunTest(TinyRunCase):
    def test_never_overwritten_silently(self):
        args = self.args("again", "lstm", "--epochs", 1)
        self.assertEqual(run_main(*args)[0], 0)
        before = os.path.getmtime(os.path.join(self.logs, "again", "last.pt"))
        code, _, err = run_main(*args)
        self.assertEqual(code, 2)
        self.assertIn("already holds a run", err)
        self.assertIn("--resume", err)
        self.assertEqual(os.path.getmtime(os.path.join(self.logs, "again", "last.pt")), before)
        self.assertEqual(run_main(*args, "--overwrite")[0], 0)
        code, out, err = run_main(*self.args("again", "lstm", "--epochs", 2, "--resume"))
        self.assertEqual(code, 0, err)
        self.assertIn("resuming", out)
        self.assertEqual(len(read_log(os.path.join(self.logs, "again", "log.json"))["epochs"]), 2)
        code, _, err = run_main(*self.args("again", "lstm", "--epochs", 2, "--resume", "--lr", "0.1"))
        self.assertEqual(code, 2)
        self.assertIn("lr: 0.001 -> 0.1", err)

    def test_list_skips_finished_runs(self):
        self.assertEqual(run_main(*self.args("a", "lstm", "--epochs", 1))[0], 0)
        code, out, err = run_main(*self.args("a,b", "lstm", "--epochs", 1))
        self.assertEqual(code, 0, err)
        self.assertIn("exp a: finished already, skipped", out)
        self.assertTrue(os.path.isfile(os.path.join(self.logs, "b", "log.json")))


class BadInputTest(TinyRunCase):
    def check(self, argv, expected, code=2):
        got, _, err = run_main(*argv)
        self.assertEqual(got, code, err)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn(expected, lines[0])
        return lines[0]

    def test_bad_values(self):
        self.check(["--exp_id", "13", "--print_config"], "'13' is not an experiment")
        self.check(["--exp_id", "1", "--lr", "0", "--print_config"], "--lr=0.0 is invalid")
        self.check(["--exp_id", "1", "--lr", "-1", "--print_config"], "--lr=-1.0 is invalid")
        self.check(["--exp_id", "1", "--batch_size", "0", "--print_config"],
                   "argument --batch_size: '0' is not a whole number >= 1")
        self.check(["--exp_id", "1", "--batch_size", "1e20", "--print_config"],
                   "argument --batch_size: '1e20' is not a whole number >= 1")
        self.check(["--exp_id", "1", "--batch_size", str(10 ** 20), "--print_config"],
                   "--batch_size=100000000000000000000 is invalid: expected a whole number in 1..2,147,483,647")
        self.check(["--exp_id", "1", "--print_every", "-1", "--print_config"],
                   "argument --print_every: '-1' is not a whole number >= 0")
        self.check(["--exp_id", "1", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'")
        self.check(["--exp_id", "1", "--epochs", "ten"], "argument --epochs: 'ten' is not a whole number >= 1")
        self.check(["--exp_id", "x", "--model", "gpt1", "--num_heads", "5", "--print_config"],
                   "--num_heads=5 is invalid")
        self.check(["--exp_id", "a/b", "--print_config"], "--exp_id='a/b' is invalid")

    def test_bad_files(self):
        self.check(self.args("e1", "lstm", "--embeddings", os.path.join(self.data, "absent.npz")),
                   "embeddings file not found")
        self.check(self.args("e2", "lstm", "--embedding_size", "32"), "--embedding_size=32 applies only with --embeddings none")
        with open(os.path.join(self.data, "wiki.validation.npz"), "wb") as file:
            file.write(b"PK\x03\x04 truncated")
        self.check(self.args("e3", "lstm"), "wiki.validation.npz is not a readable .npz")
        np.savez(os.path.join(self.data, "wiki.validation.npz"), tokens=np.array([1, 99], np.uint16),
                 sizes=np.array([2]))
        self.check(self.args("e4", "lstm"), "must lie in 1..60 (vocabulary_size=61)")
        np.savez(os.path.join(self.data, "embeddings.npz"), tokens=np.zeros((61, 16), np.float32))
        self.check(self.args("e5", "gpt1"), "lacks the array(s) ['position']")

    def test_non_finite_loss_stops_and_keeps_last_good_epoch(self):
        args = self.args("nan", "lstm", "--optimizer", "sgd", "--lr", "1e30", "--epochs", 3)
        line = self.check(args, "training loss became", code=1)
        self.assertIn("lower --lr", line)
        log = read_log(os.path.join(self.logs, "nan", "log.json"))
        self.assertEqual(log["status"], "failed")
        self.assertIn("training loss became", log["message"])
        for entry in log["epochs"]:
            self.assertTrue(math.isfinite(entry["train_loss"]))


@slow
class KillResumeTest(TinyRunCase):
    """A run killed with SIGKILL and resumed ends with the numbers of a run left alone."""

    def test_kill_nine_then_resume(self):
        # Epochs of tiny data take some 25 ms: the run could end before this process, polling on a
        # busy machine, sees epoch 1 and kills it. Long epochs leave it three epochs to do so.
        write_long_epoch(self.data)
        args = [str(a) for a in self.args("k", "gpt1", "--epochs", 4)]
        command = [sys.executable, os.path.join(ROOT, "run_exp.py"), *args]
        env = subprocess_env()
        reference_logs = tempfile.mkdtemp()
        reference = [a if a != self.logs else reference_logs for a in command]
        # The run left alone goes on beside the killed one and its resumption.
        alone_run = popen(reference, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(alone_run.kill)

        process = popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log_path = os.path.join(self.logs, "k", "log.json")
        wait_for(lambda: len(read_log(log_path)["epochs"]) >= 1, timeout=240)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        killed_at = len(read_log(log_path)["epochs"])
        self.assertLess(killed_at, 4, "the run finished before it could be killed")
        # Resumed in this process (one thread, as the children): no second child to start.
        code, _, err = run_main(*args, "--resume")
        self.assertEqual(code, 0, err)
        _, err = alone_run.communicate(timeout=300)
        self.assertEqual(alone_run.returncode, 0, err)

        resumed = read_log(log_path)
        alone = read_log(os.path.join(reference_logs, "k", "log.json"))
        keys = ("epoch", "steps", "train_loss", "train_ppl", "valid_loss", "valid_ppl", "train_tokens")
        self.assertEqual([{k: e[k] for k in keys} for e in resumed["epochs"]],
                         [{k: e[k] for k in keys} for e in alone["epochs"]])
        self.assertEqual(resumed["test"], alone["test"])
        for name in ("last.pt", "best.pt"):
            a = torch.load(os.path.join(self.logs, "k", name), weights_only=True)["model"]
            b = torch.load(os.path.join(reference_logs, "k", name), weights_only=True)["model"]
            for key in a:
                self.assertTrue(torch.equal(a[key], b[key]), key)


@slow
class TorchrunTest(TinyRunCase):
    """Two gloo processes with the same global batch train like one process."""

    def test_two_processes_match_one(self):
        single = self.args("one", "lstm", "--epochs", 2)
        self.assertEqual(run_main(*single)[0], 0)
        double = [str(a) for a in self.args("two", "lstm", "--epochs", 2)]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--standalone", os.path.join(ROOT, "run_exp.py"), *double]
        result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        one = read_log(os.path.join(self.logs, "one", "log.json"))
        two = read_log(os.path.join(self.logs, "two", "log.json"))
        self.assertEqual(two["environment"]["world_size"], 2)
        for a, b in zip(one["epochs"], two["epochs"]):
            for key in ("train_loss", "valid_loss"):
                self.assertAlmostEqual(a[key], b[key], delta=1e-5)
            self.assertEqual(a["train_tokens"], b["train_tokens"])
        self.assertAlmostEqual(one["test"]["loss"], two["test"]["loss"], delta=1e-5)


if __name__ == "__main__":
    unittest.main()
