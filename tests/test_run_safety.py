"""Nothing lost, whatever happens to a run: each fault reproduced as it was found, and its outcome.

Faults: overwrite with bad input, two runs of one id, a damaged checkpoint, signals, kill -9, a stop
in epoch 1, a damaged log, a copied best.pt, file-system errors, temporaries, bad data, file modes,
a resumed configuration, odd ids.
"""
import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zipfile
from unittest import mock

import numpy as np

from tests.helpers import (RUN_EXP, TINY, TinyRunCase, children_take_sigint, popen, run_command, run_main, slow,
                           subprocess_env, tiny_lstm, wait_for, write_long_epoch)
from utils import checkpoint, experiment, run_folder, training
from utils.checkpoint import DIGEST_LINE_BYTES, read_checkpoint, verify_checkpoint
from utils.cli import UsageError
from utils.data_utils import read_log
from utils.wikitext2 import read_split

def digests(folder):
    """sha256 of every file under `folder`, by relative path."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                found[os.path.relpath(path, folder)] = hashlib.sha256(file.read()).hexdigest()
    return found


class SafetyCase(TinyRunCase):
    def setUp(self):
        super().setUp()
        self.addCleanup(shutil.rmtree, self.data, True)
        self.addCleanup(shutil.rmtree, self.logs, True)

    def one_line(self, code, err, expected_code):
        self.assertEqual(code, expected_code, err)
        lines = [line for line in err.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, err)
        return lines[0]

    def command(self, exp_id, model="lstm", *extra):
        return [sys.executable, RUN_EXP, *[str(a) for a in self.args(exp_id, model, *extra)]]

    def log(self, exp_id):
        return read_log(os.path.join(self.logs, exp_id, "log.json"))


class OverwriteTest(SafetyCase):
    def test_overwrite_checks_before_it_touches_the_old_run(self):
        self.assertEqual(run_main(*self.args("o", "lstm"))[0], 0)
        before = digests(os.path.join(self.logs, "o"))
        broken = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, broken)
        for name in os.listdir(self.data):
            shutil.copy(os.path.join(self.data, name), broken)
        with open(os.path.join(broken, "wiki.test.npz"), "wb") as file:
            file.write(b"PK\x03\x04 truncated")
        code, _, err = run_main(*self.args("o", "lstm", "--overwrite", "--data_folder", broken))
        self.assertIn("wiki.test.npz is not a readable .npz", self.one_line(code, err, 2))
        self.assertEqual(digests(os.path.join(self.logs, "o")), before)  # nothing lost

    def test_overwrite_replaces_once_the_new_log_exists(self):
        self.assertEqual(run_main(*self.args("o", "lstm"))[0], 0)
        code, _, err = run_main(*self.args("o", "lstm", "--overwrite", "--epochs", 1))
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.log("o")["epochs"]), 1)
        self.assertFalse(os.path.exists(os.path.join(self.logs, "o", ".replaced")))

    def test_an_interrupted_overwrite_puts_the_old_run_back(self):
        self.assertEqual(run_main(*self.args("o", "lstm"))[0], 0)
        before = digests(os.path.join(self.logs, "o"))
        with mock.patch.object(experiment, "write_log", side_effect=experiment.Interrupted(signal.SIGTERM)):
            code, _, _ = run_main(*self.args("o", "lstm", "--overwrite"))
        self.assertEqual(code, 143)
        self.assertEqual(digests(os.path.join(self.logs, "o")), before)


@slow
class OneOwnerTest(SafetyCase):
    def test_two_runs_of_one_id_started_together(self):
        write_long_epoch(self.data)
        env = subprocess_env()
        processes = [popen(self.command("same", "lstm", "--epochs", 1), env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        results = []
        for process in processes:
            out, err = process.communicate(timeout=300)
            results.append((process.returncode, out, err))
        codes = sorted(code for code, _, _ in results)
        self.assertEqual(codes, [0, 2], results)
        loser = next(err for code, _, err in results if code == 2)
        self.assertEqual(len(loser.strip().splitlines()), 1, loser)
        self.assertRegex(loser, r"is in use by process \d+ |already holds a run")
        winner = next(out for code, out, _ in results if code == 0)
        log = self.log("same")
        self.assertEqual(log["status"], "finished")
        self.assertIn(f"test ppl {log['test']['ppl']:.2f}", winner)  # the folder holds the winner's run

    def test_a_second_process_is_refused_naming_the_owner(self):
        write_long_epoch(self.data)
        first = popen(self.command("busy", "lstm", "--epochs", 50), env=subprocess_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(first.wait)
        self.addCleanup(first.kill)
        wait_for(lambda: os.path.isfile(os.path.join(self.logs, "busy", "log.json")))
        code, _, err = run_main(*self.args("busy", "lstm", "--resume"))
        self.assertIn(f"in use by process {first.pid}", self.one_line(code, err, 2))


def dead_pid():
    """The PID of a process that has ended."""
    return run_command([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()


class LockOwnerTest(unittest.TestCase):
    """The owner writes its PID just after taking the lock; a reader in between must wait for it."""

    def read_with_late_writer(self, old_content, pid):
        def write_pid(path):  # through a file object of its own, as the owner process does
            with open(path, "r+") as owner:
                owner.truncate(0)
                owner.write(str(pid))

        with tempfile.NamedTemporaryFile("w+") as file:
            file.write(old_content)
            file.flush()
            writer = threading.Timer(0.2, write_pid, (file.name,))
            writer.start()
            try:  # a generous wait: it ends as soon as the PID is there
                return run_folder.read_owner(file, wait_s=60)
            finally:
                writer.join()

    def test_a_pid_written_a_moment_late_is_named(self):
        self.assertEqual(self.read_with_late_writer("", os.getppid()), str(os.getppid()))

    def test_the_pid_of_a_dead_owner_is_not_named(self):
        self.assertEqual(self.read_with_late_writer(dead_pid(), os.getppid()), str(os.getppid()))

    def test_a_pid_not_running_here_is_named_after_the_wait(self):  # an owner on another machine
        pid = dead_pid()
        with tempfile.TemporaryFile("w+") as file:
            file.write(pid)
            self.assertEqual(run_folder.read_owner(file, wait_s=0.05), pid)

    def test_no_pid_at_all_names_no_one(self):
        with tempfile.TemporaryFile("w+") as file:
            self.assertIsNone(run_folder.read_owner(file, wait_s=0.05))

    def test_a_lock_file_that_cannot_be_made_is_an_error_not_a_spin(self):
        with tempfile.TemporaryDirectory() as folder:
            os.symlink(os.path.join(folder, "missing", "lock"), os.path.join(folder, run_folder.LOCK_NAME))
            with self.assertRaisesRegex(UsageError, "cannot open the lock file .*: remove it"):
                run_folder.RunLock(folder).acquire()

    def test_release_empties_the_lock_file(self):
        with tempfile.TemporaryDirectory() as folder:
            with run_folder.RunLock(folder):
                with open(os.path.join(folder, run_folder.LOCK_NAME)) as file:
                    self.assertEqual(file.read(), str(os.getpid()))
            with open(os.path.join(folder, run_folder.LOCK_NAME)) as file:
                self.assertEqual(file.read(), "")

    def test_a_folder_removed_under_the_lock_is_made_again(self):
        with tempfile.TemporaryDirectory() as parent:
            folder = os.path.join(parent, "gone")  # as remove_if_unused leaves it for the next process
            with run_folder.RunLock(folder) as lock:
                self.assertTrue(os.path.isfile(os.path.join(folder, run_folder.LOCK_NAME)))
                self.assertTrue(lock.made_folder)


class VerifiedCheckpointTest(SafetyCase):
    def damage(self, path):
        with open(path, "r+b") as file:
            file.seek(os.path.getsize(path) // 2)
            data = file.read(64)
            file.seek(os.path.getsize(path) // 2)
            file.write(bytes(255 - b for b in data))

    def test_damaged_last_is_refused_and_best_named(self):
        self.assertEqual(run_main(*self.args("d", "lstm", "--epochs", 2))[0], 0)
        self.damage(os.path.join(self.logs, "d", "last.pt"))
        before = digests(os.path.join(self.logs, "d"))
        code, _, err = run_main(*self.args("d", "lstm", "--epochs", 3, "--resume"))
        line = self.one_line(code, err, 2)
        self.assertIn("last.pt is damaged", line)
        self.assertIn("best.pt verifies (epoch 2)", line)
        self.assertEqual(digests(os.path.join(self.logs, "d")), before)

    def test_copying_best_over_last_then_resume_continues(self):
        self.assertEqual(run_main(*self.args("c", "lstm", "--epochs", 2))[0], 0)
        shutil.copy(os.path.join(self.logs, "c", "best.pt"), os.path.join(self.logs, "c", "last.pt"))
        code, _, err = run_main(*self.args("c", "lstm", "--epochs", 3, "--resume"))
        self.assertEqual(code, 0, err)
        self.assertEqual([e["epoch"] for e in self.log("c")["epochs"]], [1, 2, 3])

    def test_old_files_load_with_a_warning_and_old_best_is_refused_in_one_line(self):
        self.assertEqual(run_main(*self.args("w", "lstm", "--epochs", 1))[0], 0)
        path = os.path.join(self.logs, "w", "last.pt")
        self.assertTrue(verify_checkpoint(path))
        with open(path, "rb") as file:
            data = file.read()[:-DIGEST_LINE_BYTES]  # as written before digests
        with open(path, "wb") as file:
            file.write(data)
        with self.assertWarnsRegex(UserWarning, "has no digest"):
            payload = read_checkpoint(path)
        payload["optimizer"] = None  # a best.pt of before: weights only
        checkpoint.atomic_write_bytes(path, _torch_bytes(payload))
        code, _, err = run_main(*self.args("w", "lstm", "--epochs", 2, "--resume"))
        line = [line for line in err.splitlines() if "error" in line]
        self.assertEqual(code, 2, err)
        self.assertEqual(len(line), 1)
        self.assertIn("holds no optimizer state", line[0])

    def test_the_bytes_verified_are_the_bytes_loaded(self):
        # A newer checkpoint put in place between the check and the load must not be loaded unverified.
        self.assertEqual(run_main(*self.args("v", "lstm", "--epochs", 2))[0], 0)
        last = os.path.join(self.logs, "v", "last.pt")
        shutil.copy(last, last + ".epoch2")
        self.assertEqual(run_main(*self.args("v", "lstm", "--epochs", 1, "--overwrite"))[0], 0)
        verify = checkpoint.verify_open_checkpoint

        def verify_then_replace(file, path):
            verified = verify(file, path)
            os.replace(last + ".epoch2", path)
            return verified

        with mock.patch.object(checkpoint, "verify_open_checkpoint", verify_then_replace):
            payload = read_checkpoint(last)
        self.assertEqual(payload["epoch"], 1)


def _torch_bytes(payload):
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


class SignalsTest(SafetyCase):
    """SIGINT and SIGTERM end with "stopped" and 130 / 143; --resume then gives the run left alone."""

    def interrupt_and_resume(self, signum, code, wait_epochs, epochs=2):
        """Signal a run of `epochs` once `wait_epochs` are logged: the signal must arrive within its
        remaining epochs less the 0.3 s sleep, or the run finishes first."""
        write_long_epoch(self.data)
        children_take_sigint(self)
        exp_id = f"s{signum}"
        alone = [a if a != self.logs else self.logs + "-alone"
                 for a in self.command(exp_id, "lstm", "--epochs", epochs)]
        self.addCleanup(shutil.rmtree, self.logs + "-alone", True)
        # The run left alone goes on beside the signalled one and its resumption.
        alone_run = popen(alone, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(alone_run.kill)
        process = popen(self.command(exp_id, "lstm", "--epochs", epochs), env=subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: len(self.log(exp_id)["epochs"]) >= wait_epochs)
        time.sleep(0.3)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
        self.assertEqual(process.returncode, code, err)
        self.assertIn("--resume", err)
        log = self.log(exp_id)
        self.assertEqual(log["status"], "stopped")
        self.assertIn("--resume", log["message"])
        self.assertEqual([name for name in os.listdir(os.path.join(self.logs, exp_id)) if ".tmp-" in name], [])
        # Resumed in this process (one thread, as the children): no second child to start.
        code, _, resume_err = run_main(*self.args(exp_id, "lstm", "--epochs", epochs, "--resume"))
        self.assertEqual(code, 0, resume_err)
        _, alone_err = alone_run.communicate(timeout=300)
        self.assertEqual(alone_run.returncode, 0, alone_err)
        resumed, reference = self.log(exp_id), read_log(os.path.join(self.logs + "-alone", exp_id, "log.json"))
        keys = ("epoch", "steps", "train_loss", "valid_loss", "train_tokens")
        self.assertEqual([{k: e[k] for k in keys} for e in resumed["epochs"]],
                         [{k: e[k] for k in keys} for e in reference["epochs"]])
        self.assertEqual(resumed["test"], reference["test"])
        return resumed

    def test_a_signal_while_the_first_log_replaces_a_run_is_held_until_it_can_be_recorded(self):
        # A signal as the old run's files are dropped (after the new run's first log). Without the
        # hold the log said "running", or the old checkpoints were put back beside the new log.
        # Through run_exp.py (SIGTERM, its handlers) and as the notebook calls it (SIGINT, Python's).
        import run_exp

        cases = (("cli", signal.SIGTERM, 143, mock.patch.object(run_exp, "signals_interrupt", run_exp.signals_interrupt)),
                 ("notebook", signal.SIGINT, 130, mock.patch.object(run_exp, "signals_interrupt", contextlib.nullcontext)))
        for exp_id, signum, expected, handlers in cases:
            with self.subTest(exp_id):
                self.assertEqual(run_main(*self.args(exp_id, "lstm", "--epochs", 1))[0], 0)
                drop = experiment.drop_replaced

                def drop_under_signal(run_dir):
                    # Never SIG_DFL here: a SIGTERM would end the test runner itself.
                    self.assertNotIn(signal.getsignal(signum), (signal.SIG_DFL, signal.SIG_IGN))
                    os.kill(os.getpid(), signum)
                    drop(run_dir)

                previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
                try:
                    with handlers, mock.patch.object(experiment, "drop_replaced", drop_under_signal):
                        code, _, err = run_main(*self.args(exp_id, "lstm", "--epochs", 1, "--overwrite"))
                finally:
                    signal.signal(signal.SIGINT, previous_sigint)
                self.assertEqual(code, expected, err)
                log = self.log(exp_id)
                self.assertEqual((log["status"], log["epochs"]), ("stopped", []))
                left = os.listdir(os.path.join(self.logs, exp_id))
                self.assertFalse({"last.pt", "best.pt", ".replaced"} & set(left), left)

    @slow
    def test_sigterm_during_epoch_two(self):
        # Three epochs: with two, only epoch 2 less the 0.3 s sleep (some 0.35 s) was left for the
        # signal to arrive before the run finished.
        self.interrupt_and_resume(signal.SIGTERM, 143, wait_epochs=1, epochs=3)

    @slow
    def test_sigint_in_the_first_epoch(self):
        self.interrupt_and_resume(signal.SIGINT, 130, wait_epochs=0)

    @slow
    def test_kill_nine_is_recognised(self):
        write_long_epoch(self.data)
        process = popen(self.command("k9", "lstm", "--epochs", 3), env=subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: len(self.log("k9")["epochs"]) >= 1)
        process.kill()
        process.wait(timeout=60)
        self.assertEqual(self.log("k9")["status"], "running")
        code, _, err = run_main(*self.args("k9", "lstm", "--epochs", 3))
        self.assertIn("already holds a run whose process died", self.one_line(code, err, 2))
        code, _, err = run_main(*self.args("k9", "lstm", "--epochs", 3, "--resume"))
        self.assertEqual(code, 0, err)
        self.assertIn("the previous run died", err)
        self.assertEqual(self.log("k9")["status"], "finished")


class DamagedLogTest(SafetyCase):
    def test_resume_and_overwrite_work_past_a_damaged_log(self):
        self.assertEqual(run_main(*self.args("l", "lstm", "--epochs", 1))[0], 0)
        log_path = os.path.join(self.logs, "l", "log.json")
        with open(log_path, "w") as file:
            file.write("{ not json")
        code, _, err = run_main(*self.args("l", "lstm", "--epochs", 2, "--resume"))
        self.assertEqual(code, 0, err)
        self.assertEqual([e["epoch"] for e in self.log("l")["epochs"]], [1, 2])
        with open(log_path, "w") as file:
            file.write("{ not json")
        code, _, err = run_main(*self.args("l", "lstm", "--epochs", 1, "--overwrite"))
        self.assertEqual(code, 0, err)
        self.assertEqual(self.log("l")["status"], "finished")


class ListTest(SafetyCase):
    def test_a_list_goes_on_past_a_run_that_cannot_continue(self):
        self.assertEqual(run_main(*self.args("a", "lstm", "--epochs", 1))[0], 0)
        os.remove(os.path.join(self.logs, "a", "last.pt"))
        os.remove(os.path.join(self.logs, "a", "best.pt"))
        with open(os.path.join(self.logs, "a", "log.json")) as file:
            log = json.load(file)
        log["status"] = "stopped"
        with open(os.path.join(self.logs, "a", "log.json"), "w") as file:
            json.dump(log, file)
        code, out, err = run_main(*self.args("a,b", "lstm", "--epochs", 1))
        self.assertEqual(code, 2, err)
        self.assertIn("no checkpoint to resume from", err)
        self.assertEqual(self.log("b")["status"], "finished")
        self.assertRegex(out, r"\na +failed ")
        self.assertRegex(out, r"\nb +finished ")


class FileSystemTest(SafetyCase):
    def test_log_dir_or_run_folder_that_is_a_file(self):
        path = os.path.join(self.logs, "afile")
        with open(path, "w") as file:
            file.write("x")
        args = self.args("f", "lstm", "--log_dir", path, "--data_folder", "/nonexistent")
        self.assertIn("is a file, not a folder", self.one_line(*run_main(*args)[::2], 2))
        args = self.args("afile", "lstm", "--data_folder", "/nonexistent")
        self.assertIn("is a file, not a folder", self.one_line(*run_main(*args)[::2], 2))

    def test_read_only_folder_and_full_disk_before_training(self):
        refuse = OSError(errno.EROFS, "Read-only file system")
        with mock.patch("utils.files.open", side_effect=refuse, create=True):
            code, _, err = run_main(*self.args("ro", "lstm", "--data_folder", "/nonexistent"))
        self.assertIn("Read-only file system", self.one_line(code, err, 2))
        full = OSError(errno.ENOSPC, "No space left on device")
        with mock.patch("utils.files.atomic_write_bytes", side_effect=full):
            code, _, err = run_main(*self.args("full", "lstm"))
        self.assertIn("No space left on device", self.one_line(code, err, 2))

    def test_full_disk_during_training_keeps_the_last_good_epoch(self):
        real = checkpoint.atomic_write_bytes
        calls = []

        def fill_up(path, data):
            calls.append(path)
            if len(calls) > 2:  # epoch 1's best.pt and last.pt are written, epoch 2's are not
                raise OSError(errno.ENOSPC, "No space left on device", path)
            real(path, data)

        with mock.patch.object(checkpoint, "atomic_write_bytes", side_effect=fill_up):
            code, _, err = run_main(*self.args("fd", "lstm", "--epochs", 3))
        line = self.one_line(code, err, 1)
        self.assertIn("No space left on device", line)
        self.assertIn("best.pt", line)  # the file that could not be written
        self.assertIn("the files of epoch 1 are kept", line)
        log = self.log("fd")
        self.assertEqual(log["status"], "failed")
        self.assertEqual(len(log["epochs"]), 1)  # the log claims no epoch that last.pt lacks
        self.assertEqual(read_checkpoint(os.path.join(self.logs, "fd", "last.pt"))["epoch"], 1)
        code, _, err = run_main(*self.args("fd", "lstm", "--epochs", 3, "--resume"))
        self.assertEqual(code, 0, err)

    def test_an_id_longer_than_a_file_name(self):
        code, _, err = run_main(*self.args("x" * 300, "lstm"))
        self.assertIn("at most 200 bytes", self.one_line(code, err, 2))

    def test_empty_split(self):
        np.savez(os.path.join(self.data, "wiki.test.npz"), tokens=np.zeros(0, np.uint16), sizes=np.zeros(0, np.int64))
        code, _, err = run_main(*self.args("e", "lstm"))
        self.assertIn("the test split", self.one_line(code, err, 2))
        self.assertFalse(os.path.exists(os.path.join(self.logs, "e")))  # no folder left for a run never started

    def test_temporaries_are_removed(self):
        self.assertEqual(run_main(*self.args("t", "lstm", "--epochs", 1))[0], 0)
        stale = os.path.join(self.logs, "t", ".tmp-abc123last.pt")
        with open(stale, "wb") as file:
            file.write(b"half a checkpoint")
        self.assertEqual(run_main(*self.args("t", "lstm", "--epochs", 2, "--resume"))[0], 0)
        self.assertFalse(os.path.exists(stale))
        # A signal inside a write removes the write's own temporary.
        with mock.patch("os.fsync", side_effect=experiment.Interrupted(signal.SIGTERM)), \
                self.assertRaises(experiment.Interrupted):
            checkpoint.atomic_write_bytes(os.path.join(self.logs, "t", "x.pt"), b"data")
        self.assertEqual([n for n in os.listdir(os.path.join(self.logs, "t")) if n.startswith(".tmp-")], [])

    def test_modes_follow_the_umask(self):
        previous = os.umask(0o022)
        self.addCleanup(os.umask, previous)
        self.assertEqual(run_main(*self.args("m", "lstm", "--epochs", 1))[0], 0)
        for name in ("log.json", "last.pt", "best.pt"):
            self.assertEqual(os.stat(os.path.join(self.logs, "m", name)).st_mode & 0o777, 0o644, name)


class DataChecksTest(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)

    def test_fractions_are_refused_whole_floats_accepted(self):
        np.savez(os.path.join(self.folder, "wiki.train.npz"), tokens=np.array([1.5, 2, 3]), sizes=np.array([3]))
        with self.assertRaisesRegex(ValueError, "'tokens' holds numbers that are not whole"):
            read_split(self.folder, "train")
        np.savez(os.path.join(self.folder, "wiki.train.npz"), tokens=np.array([1, 2, 3]), sizes=np.array([2.5, 0.5]))
        with self.assertRaisesRegex(ValueError, "'sizes' holds numbers that are not whole"):
            read_split(self.folder, "train")
        np.savez(os.path.join(self.folder, "wiki.train.npz"), tokens=np.array([1.0, 2.0, 3.0]), sizes=np.array([3.0]))
        self.assertEqual(read_split(self.folder, "train")[0].tolist(), [1, 2, 3])

    def test_declared_sizes_are_checked_before_inflating(self):
        path = os.path.join(self.folder, "wiki.train.npz")
        header = {"descr": "<u2", "fortran_order": False, "shape": (3_000_000_000,)}
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            with archive.open("tokens.npy", "w") as member:
                np.lib.format.write_array_header_1_0(member, header)
                member.write(b"\0" * 1024)
            with archive.open("sizes.npy", "w") as member:
                np.lib.format.write_array(member, np.array([3], np.int64))
        with self.assertRaisesRegex(ValueError, "declares 3,000,000,000 elements"):
            read_split(self.folder, "train")


class LstmPromptTest(unittest.TestCase):
    def test_a_long_prompt_builds_one_row_of_outputs(self):
        import torch

        model = tiny_lstm().eval()
        prompt = torch.randint(1, TINY["vocabulary_size"], (1, 5000))
        shapes = []
        model.classifier[2].register_forward_hook(lambda module, inputs, output: shapes.append(output.shape))
        with torch.no_grad():
            log_probas, _ = model.step(prompt)
            full, _ = model(prompt, model.initial_states(1))
        self.assertEqual(shapes[0], (1, TINY["vocabulary_size"]))  # not (1, 5000, V)
        torch.testing.assert_close(log_probas, full[:, -1])


class ConfigTest(SafetyCase):
    def test_resumed_configuration_is_what_it_ran(self):
        self.assertEqual(run_main(*self.args("r", "lstm", "--epochs", 2))[0], 0)
        code, _, err = run_main(*self.args("r", "lstm", "--epochs", 1, "--resume"))
        self.assertEqual(code, 0, err)
        log = self.log("r")
        self.assertEqual((log["config"]["epochs"], len(log["epochs"])), (2, 2))

    def test_a_precision_the_cpu_cannot_run_is_refused_in_one_line_before_any_file(self):
        # The probe forced to fail: the refusal is tested on every machine, whatever its CPU can do.
        refusal = "this CPU (a test CPU) cannot run the lstm under bf16 autocast with this PyTorch (no kernel)"
        with mock.patch("utils.training.cpu_autocast_refusal", return_value=refusal) as probe:
            code, _, err = run_main(*self.args("h", "lstm", "--precision", "bf16"))
        probe.assert_called_once_with("bf16", "lstm")
        self.assertEqual(self.one_line(code, err, 2), f"run_exp.py: error: --precision bf16: {refusal}; "
                                                      "use --precision fp32")
        self.assertFalse(os.path.exists(os.path.join(self.logs, "h")))
        with mock.patch("utils.training.cpu_autocast_refusal", return_value=refusal) as probe:
            code, _, err = run_main(*self.args("h", "lstm", "--precision", "auto", "--epochs", 1))
        self.assertEqual(code, 0, err)
        probe.assert_not_called()  # auto is fp32 on the CPU: nothing to ask

    def test_a_scheduled_run_keeps_its_length_on_resume(self):
        args = ("--scheduler", "cosine", "--lr", "0.01")
        self.assertEqual(run_main(*self.args("cos", "lstm", "--epochs", 2, *args))[0], 0)
        code, _, err = run_main(*self.args("cos", "lstm", "--epochs", 4, *args, "--resume"))
        self.assertIn("fixes the run's length, so --resume cannot change it (epochs: 2 -> 4)",
                      self.one_line(code, err, 2))
        self.assertEqual(run_main(*self.args("cos", "lstm", "--epochs", 2, *args, "--resume"))[0], 0)

    def test_an_unexpected_error_leaves_a_failed_log(self):
        with mock.patch.object(training.Trainer, "test", side_effect=RuntimeError("boom\nmore")), \
                self.assertRaises(RuntimeError):
            run_main(*self.args("u", "lstm", "--epochs", 1))
        log = self.log("u")
        self.assertEqual((log["status"], log["message"]), ("failed", "RuntimeError: boom"))

    def test_ids(self):
        code, _, err = run_main("--exp_id", "all,3", "--print_config")
        self.assertIn("mixes 'all' into a list", self.one_line(code, err, 2))
        code, _, err = run_main("--exp_id", "two\nlines", "--print_config")
        self.assertIn("printable characters", self.one_line(code, err, 2))


if __name__ == "__main__":
    unittest.main()
