"""Several configurations at once: `run_exp.py --exp_id a,b,c --jobs K` (utils/study.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

from tests.helpers import (RUN_EXP, TinyRunCase, children_take_sigint, popen, run_main, slow, subprocess_env,
                           wait_for, warm_workers, write_long_epoch)
from utils.data_utils import read_log
from utils.study import Outcome, exit_code, summary_table, worker_command_line

KEYS = ("epoch", "steps", "train_loss", "train_ppl", "valid_loss", "valid_ppl", "train_tokens")


class StudyCase(TinyRunCase):
    def setUp(self):
        super().setUp()
        patch = mock.patch.dict(os.environ, OMP_NUM_THREADS="1")  # workers: one core each
        patch.start()
        self.addCleanup(patch.stop)
        self.enterContext(warm_workers())  # the workers of the studies run in this process
        self.addCleanup(shutil.rmtree, self.data, True)
        self.addCleanup(shutil.rmtree, self.logs, True)

    def log(self, exp_id, log_dir=None):
        return read_log(os.path.join(log_dir or self.logs, exp_id, "log.json"))

    def numbers(self, log):
        return [{key: entry[key] for key in KEYS} for entry in log["epochs"]], log["test"]


class ParallelTest(StudyCase):
    @slow
    def test_workers_equal_their_configuration_run_alone(self):
        alone = {}  # each configuration run alone, once, in this process
        for exp_id in ("p1", "p2", "p3"):
            alone_logs = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, alone_logs, True)
            self.assertEqual(run_main(*[a if a != self.logs else alone_logs
                                        for a in self.args(exp_id, "gpt1", "--epochs", 2)])[0], 0)
            alone[exp_id] = self.numbers(self.log(exp_id, alone_logs))
        for jobs in (2, 3):
            with self.subTest(jobs=jobs):
                logs = tempfile.mkdtemp()
                self.addCleanup(shutil.rmtree, logs, True)
                ids = "p1,p2,p3"
                args = [a if a != self.logs else logs for a in self.args(ids, "gpt1", "--epochs", 2, "--jobs", jobs)]
                code, out, err = run_main(*args)
                self.assertEqual(code, 0, err + out)
                self.assertRegex(out, r"exp p2: epoch 2/2: train ppl")  # progress, one line per epoch
                self.assertIn("3 configuration(s) in", out)
                for exp_id in ids.split(","):
                    self.assertRegex(out, rf"\n{exp_id} +finished +\d")
                    self.assertEqual(self.numbers(self.log(exp_id, logs)), alone[exp_id])

    @slow
    def test_a_failing_configuration_leaves_the_others_finishing(self):
        self.assertEqual(run_main(*self.args("bad", "lstm", "--epochs", 1))[0], 0)
        for name in ("last.pt", "best.pt"):  # a run that cannot continue: a log, no checkpoint
            os.remove(os.path.join(self.logs, "bad", name))
        path = os.path.join(self.logs, "bad", "log.json")
        with open(path) as file:
            log = json.load(file)
        with open(path, "w") as file:
            json.dump(dict(log, status="stopped"), file)
        with open(os.path.join(self.logs, "afile"), "w") as file:  # a run folder that is a file
            file.write("x")
        code, out, err = run_main(*self.args("bad,ok1,afile,ok2", "lstm", "--epochs", 1, "--jobs", 2))
        self.assertEqual(code, 2, out + err)
        self.assertRegex(out, r"\nbad +failed .*no checkpoint to resume from")
        self.assertRegex(out, r"\nafile +failed .*afile is a file, not a folder")
        for exp_id in ("ok1", "ok2"):
            self.assertEqual(self.log(exp_id)["status"], "finished")
            self.assertRegex(out, rf"\n{exp_id} +finished")

    @slow
    def test_sigint_stops_every_worker_and_resume_completes_the_set(self):
        write_long_epoch(self.data)
        children_take_sigint(self)
        # Three epochs: i1 must still be running when i2, started with it but maybe seconds later
        # on a busy machine, has written its first log (else i1 finishes and i3 starts).
        command = [sys.executable, RUN_EXP, *[str(a) for a in self.args("i1,i2,i3", "lstm", "--epochs", 3,
                                                                         "--jobs", 2)]]
        parent = popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: all(os.path.isfile(os.path.join(self.logs, i, "log.json")) for i in ("i1", "i2")))
        parent.send_signal(signal.SIGINT)
        out, err = parent.communicate(timeout=120)
        self.assertEqual(parent.returncode, 130, out + err)
        self.assertIn("stopping every worker", err)
        for exp_id in ("i1", "i2"):
            self.assertEqual(self.log(exp_id)["status"], "stopped")
        self.assertRegex(out, r"\ni3 +not started")
        # Resumed from this process (its workers are children still): no parent process to start.
        code, out, err = run_main(*self.args("i1,i2,i3", "lstm", "--epochs", 3, "--jobs", 2, "--resume"))
        self.assertEqual(code, 0, out + err)
        for exp_id in ("i1", "i2", "i3"):
            log = self.log(exp_id)
            self.assertEqual((log["status"], len(log["epochs"])), ("finished", 3))

    def test_jobs_with_one_configuration_runs_as_today(self):
        code, out, err = run_main(*self.args("solo", "lstm", "--epochs", 1, "--jobs", 4))
        self.assertEqual(code, 0, err)
        self.assertNotIn("configuration(s) in", out)  # no summary: one run, in this process
        self.assertIn("test ppl", out)
        self.assertFalse(os.path.exists(os.path.join(self.logs, "solo", "output.txt")))

    @slow
    def test_finished_runs_are_skipped_unless_asked_otherwise(self):
        self.assertEqual(run_main(*self.args("f1", "lstm", "--epochs", 1))[0], 0)
        code, out, err = run_main(*self.args("f1,f2", "lstm", "--epochs", 1, "--jobs", 2))
        self.assertEqual(code, 0, err)
        self.assertIn("exp f1: finished already, skipped", out)
        self.assertRegex(out, r"\nf1 +skipped")
        first = self.log("f1")["epochs"][0]["train_seconds"]
        code, out, err = run_main(*self.args("f1,f2", "lstm", "--epochs", 1, "--overwrite"))
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"\nf1 +finished")
        self.assertNotEqual(self.log("f1")["epochs"][0]["train_seconds"], first)  # run again
        code, out, err = run_main(*self.args("f1,f2", "lstm", "--epochs", 1, "--lr", "0.5"))
        self.assertEqual(code, 2, out + err)
        self.assertRegex(out, r"\nf1 +failed .*lr: 0.001 -> 0.5")
        code, out, err = run_main(*self.args("f1,f2", "lstm", "--epochs", 2))
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.log("f2")["epochs"]), 2)  # more epochs: continued, not skipped

    def test_ids_listed_twice_are_refused(self):
        code, _, err = run_main(*self.args("c,c", "lstm", "--jobs", 2))
        self.assertEqual(code, 2)
        self.assertIn("names c more than once", err)


class PiecesTest(unittest.TestCase):
    def test_worker_command_line(self):
        argv = ["--exp_id", "1,2", "--jobs", "2", "--lr", "0.1", "--jobs=3", "--exp_id=4", "--overwrite"]
        command = worker_command_line(argv, "2", resume=True)
        self.assertEqual(command[1:], [RUN_EXP, "--lr", "0.1", "--overwrite", "--exp_id", "2",
                                       "--no_progress_bar", "--resume"])
        self.assertEqual(worker_command_line(["--resume"], "5", resume=True)[2:],
                         ["--resume", "--exp_id", "5", "--no_progress_bar"])

    def test_summary_and_exit_code(self):
        outcomes = [Outcome("1", "finished", 12.34, log={"best": {"valid_ppl": 123.456}, "test": {"ppl": 130.0}}),
                    Outcome("2", "failed", 1.0, "no data\nmore", 2),
                    Outcome("3", "stopped", 2.0, "stopped", 130)]
        table = summary_table(outcomes).splitlines()
        self.assertEqual(table[0].split(), ["exp", "status", "best", "valid", "ppl", "test", "ppl", "wall",
                                            "time", "note"])
        self.assertEqual(table[2].split(), ["1", "finished", "123.46", "130.00", "12.3", "s"])
        self.assertEqual(table[3].split(), ["2", "failed", "-", "-", "1.0", "s", "no", "data"])
        self.assertEqual(exit_code(outcomes), 2)
        self.assertEqual(exit_code(outcomes[:1]), 0)


if __name__ == "__main__":
    unittest.main()
