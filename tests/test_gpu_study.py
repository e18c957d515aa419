"""`python -m utils.gpu_study`: the device run's archive holds what finished, a step past its
budget is stopped and named, and an OUT with files in it is refused."""
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout

from utils import gpu_study


class GpuStudyTest(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder, True)

    def test_the_archive_holds_every_log_and_output_and_nothing_else(self):
        for run in ("1", "12"):
            os.makedirs(os.path.join(self.folder, "logs", run))
            for name in ("log.json", "output.txt", "last.pt"):
                with open(os.path.join(self.folder, "logs", run, name), "w") as file:
                    file.write(f"{run}/{name}")
        archive = os.path.join(self.folder, "study-logs.tar.gz")
        gpu_study.pack_logs([os.path.join(self.folder, "logs"), os.path.join(self.folder, "absent")], archive)
        with tarfile.open(archive) as tar:
            names = sorted(tar.getnames())
            self.assertEqual(tar.extractfile("logs/12/log.json").read(), b"12/log.json")
        self.assertEqual(names, ["logs/1/log.json", "logs/1/output.txt", "logs/12/log.json", "logs/12/output.txt"])

    def test_a_step_past_its_budget_is_stopped_and_named(self):
        log_file = os.path.join(self.folder, "out.txt")
        ticks = []
        with redirect_stdout(io.StringIO()):
            record = gpu_study.run_step("sleep", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                                        1, log_file, on_tick=lambda: ticks.append(1))
        self.assertTrue(record["cut_short"])
        self.assertLess(record["seconds"], 30)
        self.assertNotEqual(record["exit_code"], 0)
        self.assertGreaterEqual(len(ticks), 1)
        with open(log_file, encoding="utf-8") as file:
            self.assertIn("up", file.read())

    def test_an_out_with_files_is_refused_in_one_line(self):
        with open(os.path.join(self.folder, "keep.txt"), "w") as file:
            file.write("mine")
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            code = gpu_study.main([self.folder, "--skip", "study,precision,benchmark"])
        self.assertEqual(code, 2)
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1, err.getvalue())
        self.assertIn("not empty", err.getvalue())
        self.assertEqual(os.listdir(self.folder), ["keep.txt"])

    def test_nothing_asked_writes_the_summary_only(self):
        out = os.path.join(self.folder, "out")
        with redirect_stdout(io.StringIO()):
            self.assertEqual(gpu_study.main([out, "--skip", "study,precision,benchmark"]), 0)
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as file:
            self.assertEqual(json.load(file)["steps"], [])
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            self.assertEqual(gpu_study.main([os.path.join(self.folder, "o2"), "--skip", "tests"]), 2)
        self.assertIn("--skip", err.getvalue())


if __name__ == "__main__":
    unittest.main()
