"""Faults an adversarial probe found: each case as a user meets it, and the outcome the package
promises (nothing lost, nothing silently wrong, one line for what the user can fix)."""
import contextlib
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock

from tests.helpers import ROOT, popen, TinyRunCase, run_main, slow
from utils import batch_loss, training
from utils.checkpoint import read_checkpoint, write_payload
from utils.data_utils import read_log
from utils.run_folder import RunLock
from utils.study import PARENT_ENV, Worker
from utils.wikitext2 import Wikitext2


class FaultCase(TinyRunCase):
    def setUp(self):
        super().setUp()
        self.addCleanup(shutil.rmtree, self.data, True)
        self.addCleanup(shutil.rmtree, self.logs, True)

    def one_line(self, code, err, expected_code):
        self.assertEqual(code, expected_code, err)
        lines = [line for line in err.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, err)
        return lines[0]

    def log(self, exp_id):
        return read_log(os.path.join(self.logs, exp_id, "log.json"))


class NonFiniteEvaluationTest(FaultCase):
    def test_a_diverged_model_fails_and_is_not_saved_as_the_best(self):
        code, _, err = run_main(*self.args("nan1", "lstm", "--lr", "1e308", "--epochs", 1,
                                           "--limit_batches", 1, "--optimizer", "sgd"))
        self.assertIn("the validation loss became nan", self.one_line(code, err, 1))
        log = self.log("nan1")
        self.assertEqual((log["status"], log["epochs"], log["test"]), ("failed", [], None))
        self.assertFalse(os.path.exists(os.path.join(self.logs, "nan1", "best.pt")))

    def test_a_non_finite_test_loss_fails_the_run(self):
        real = training.evaluate

        def poisoned(*args, **kwargs):
            figures = real(*args, **kwargs)
            return dict(figures, nll=float("inf")) if kwargs.get("description") == "test" else figures

        with mock.patch.object(training, "evaluate", poisoned):
            code, _, err = run_main(*self.args("inf1", "lstm", "--epochs", 1))
        self.assertIn("the test loss became inf", self.one_line(code, err, 1))
        self.assertEqual(self.log("inf1")["status"], "failed")


class ResumeTest(FaultCase):
    def steps_per_epoch(self):
        return math.ceil(len(Wikitext2(self.data, "train", max_length=16)) / 4)  # --batch_size 4

    def test_an_epoch_cut_short_by_max_steps_is_not_continued(self):
        steps = self.steps_per_epoch()
        self.assertEqual(run_main(*self.args("ms", "lstm", "--max_steps", steps + 3))[0], 0)  # inside epoch 2
        code, _, err = run_main(*self.args("ms", "lstm", "--max_steps", 2 * steps, "--resume"))
        line = self.one_line(code, err, 2)
        self.assertIn(f"epoch 2 of this run was cut short by its --max_steps (3 of {steps} steps)", line)
        self.assertIn("--overwrite", line)
        self.assertEqual([entry["steps"] for entry in self.log("ms")["epochs"]], [steps, steps + 3])

    def test_a_run_stopped_at_an_epoch_boundary_continues_as_a_straight_run(self):
        steps = self.steps_per_epoch()
        self.assertEqual(run_main(*self.args("b", "lstm", "--max_steps", steps))[0], 0)
        self.assertEqual(run_main(*self.args("b", "lstm", "--max_steps", 2 * steps, "--resume"))[0], 0)
        self.assertEqual(run_main(*self.args("straight", "lstm", "--max_steps", 2 * steps))[0], 0)
        resumed, straight = self.log("b")["epochs"], self.log("straight")["epochs"]
        self.assertEqual(len(resumed), 2)
        self.assertEqual([(e["steps"], e["train_loss"], e["valid_loss"]) for e in resumed],
                         [(e["steps"], e["train_loss"], e["valid_loss"]) for e in straight])

    def test_a_damaged_log_without_checkpoints_is_kept_aside(self):
        folder = os.path.join(self.logs, "dmg")
        os.makedirs(folder)
        with open(os.path.join(folder, "log.json"), "w") as file:
            file.write("{not json")
        code, _, err = run_main(*self.args("dmg", "lstm", "--epochs", 1, "--resume"))
        self.assertEqual(code, 0, err)
        self.assertIn(f"kept as {os.path.join(folder, 'log.json.damaged')}", err)
        with open(os.path.join(folder, "log.json.damaged")) as file:
            self.assertEqual(file.read(), "{not json")
        self.assertEqual(self.log("dmg")["status"], "finished")

    def test_a_checkpoint_whose_state_is_of_the_wrong_type_is_one_line(self):
        self.assertEqual(run_main(*self.args("se", "lstm", "--epochs", 1))[0], 0)
        path = os.path.join(self.logs, "se", "last.pt")
        payload = read_checkpoint(path)
        payload["state"]["epochs"] = "abc"
        write_payload(path, payload)  # a digest that vouches for the wrong type
        code, _, err = run_main(*self.args("se", "lstm", "--resume"))
        self.assertIn(f"checkpoint {path}: 'state' is not", self.one_line(code, err, 2))


class OutOfMemoryTest(FaultCase):
    ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 2413035520 bytes. Error code 12 (Cannot allocate memory)")

    def test_training_out_of_cpu_memory_fails_in_one_line(self):
        with mock.patch.object(batch_loss.BatchLoss, "forward", side_effect=RuntimeError(self.ALLOCATOR)):
            code, _, err = run_main(*self.args("oom", "lstm", "--batch_size", 1000000000))
        line = self.one_line(code, err, 1)
        self.assertIn("out of memory on the CPU at --batch_size 1000000000, --sequence_length 16", line)
        self.assertEqual(self.log("oom")["status"], "failed")

    def test_a_model_too_large_to_build_is_one_line(self):
        with mock.patch("utils.experiment.model_for_config", side_effect=RuntimeError(self.ALLOCATOR)):
            code, _, err = run_main(*self.args("big", "gpt1", "--sequence_length", 100000,
                                               "--embeddings", "none", "--embedding_size", 8))
        self.assertIn("not enough memory to build the model and data", self.one_line(code, err, 2))

    def test_other_runtime_errors_are_not_taken_for_memory(self):
        with mock.patch.object(batch_loss.BatchLoss, "forward", side_effect=RuntimeError("a bug")):
            with self.assertRaisesRegex(RuntimeError, "a bug"):
                run_main(*self.args("bug", "lstm"))
        self.assertEqual(self.log("bug")["message"], "RuntimeError: a bug")


class FlagsTest(FaultCase):
    def test_an_empty_log_dir_is_named(self):
        code, _, err = run_main(*(self.args("e", "lstm") + ["--log_dir", ""]))
        self.assertEqual(self.one_line(code, err, 2), "run_exp.py: error: --log_dir is empty: name a folder")

    def test_the_whole_split_is_cut_without_a_loop_over_items(self):
        # A per-item loop took minutes and gigabytes for --sequence_length 1 (2.4 M examples).
        dataset = Wikitext2(self.data, "train", max_length=1)
        with mock.patch.object(Wikitext2, "__getitem__", side_effect=AssertionError("item by item")):
            tensors = dataset.tensors()
        self.assertEqual(tuple(tensors["source"].shape), (len(dataset), 1))


class WorkerFolderTest(unittest.TestCase):
    """A `--jobs` worker's folder: refused while another command owns it, and the lock handed on."""

    def setUp(self):
        self.logs = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.logs)

    def test_a_folder_in_use_is_refused_before_its_output_is_touched(self):
        run_dir = os.path.join(self.logs, "a")
        with RunLock(run_dir):  # another command's run of the same id
            worker = Worker("a", [sys.executable, "-c", "print('ran')"], self.logs, dict(os.environ))
            with contextlib.redirect_stdout(io.StringIO()):
                code = worker.run()
            outcome = worker.outcome(code)
        self.assertEqual((code, outcome.status), (2, "failed"))
        self.assertIn(f"is in use by process {os.getpid()}", outcome.message)
        self.assertEqual(sorted(os.listdir(run_dir)), [".lock"])  # no output.txt of ours

    def test_the_worker_owns_the_lock_its_parent_took(self):
        script = ("import os, sys; from utils.run_folder import RunLock; "
                  "lock = RunLock(sys.argv[1]).acquire(); print('owner', open(lock.path).read())")
        worker = Worker("b", [sys.executable, "-c", script, os.path.join(self.logs, "b")], self.logs,
                        dict(os.environ, PYTHONPATH=ROOT))
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(worker.run(), 0)
        with open(os.path.join(self.logs, "b", "output.txt")) as file:
            self.assertEqual(file.read().strip(), f"owner {worker.process.pid}")
        with RunLock(os.path.join(self.logs, "b")):  # given back when the worker ended
            pass


@slow
class OrphanTest(unittest.TestCase):
    def test_a_worker_ends_when_its_parent_is_killed(self):
        # parent (killed with -9) -> worker (watches the parent, as run_exp.py's main does)
        worker = ("import signal, sys, time; from utils.study import die_with_parent; "
                  "signal.signal(signal.SIGTERM, lambda *a: (print('SIGTERM', flush=True), sys.exit(143))); "
                  "die_with_parent(); print('ready', flush=True); time.sleep(60)")
        parent = ("import os, subprocess, sys, time; "
                  f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], "
                  f"env=dict(os.environ, {PARENT_ENV}=str(os.getpid())), stdout=sys.stdout); "
                  "print(p.pid, flush=True); p.wait()")
        with tempfile.TemporaryFile("w+") as output:
            started = popen([sys.executable, "-c", parent], cwd=ROOT, stdout=output,
                                       env=dict(os.environ, PYTHONPATH=ROOT))
            deadline = time.monotonic() + 60
            while "ready" not in read(output) and time.monotonic() < deadline:
                time.sleep(0.1)
            worker_pid = int(read(output).split()[0])
            started.kill()
            started.wait()
            deadline = time.monotonic() + 10
            while process_exists(worker_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.assertFalse(process_exists(worker_pid), "the worker outlived its parent")
            self.assertIn("SIGTERM", read(output))


def read(file):
    file.seek(0)
    return file.read()


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has ended; only its parent's wait is due
        return stat.read().split(")")[-1].split()[0] != "Z"


if __name__ == "__main__":
    unittest.main()
