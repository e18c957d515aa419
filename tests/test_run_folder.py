"""`--overwrite`'s replacement of a run as a transaction: whatever interrupts it, and however often,
the next `recover` keeps either the whole old run or the new run's log, never a mixture."""
import hashlib
import os
import shutil
import tempfile
import unittest
from unittest import mock

from utils import run_folder
from utils.run_folder import REPLACED_NAME, drop_replaced, move_aside, put_back, recover


def contents(folder):
    """{name: sha256} of the files directly in `folder`."""
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as file:
                found[name] = hashlib.sha256(file.read()).hexdigest()
    return found


class InterruptAfter:
    """An `os.replace` that does `calls` real moves, then raises KeyboardInterrupt (a Ctrl-C). The
    state file's atomic writes are renames too, so they are interrupted as well."""

    def __init__(self, calls):
        self.calls, self.real = calls, os.replace

    def __call__(self, source, destination):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        self.real(source, destination)


class ReplaceTransactionTest(unittest.TestCase):
    def setUp(self):
        self.run = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.run)
        for name, data in (("log.json", b'{"status": "finished"}'), ("last.pt", b"last"), ("best.pt", b"best")):
            with open(os.path.join(self.run, name), "wb") as file:
                file.write(data)
        self.old = contents(self.run)

    def interrupted(self, step, moves):
        with mock.patch.object(run_folder.os, "replace", InterruptAfter(moves)):
            with self.assertRaises(KeyboardInterrupt):
                step(self.run)

    def test_a_put_back_cut_short_is_finished_by_the_next_recovery(self):
        move_aside(self.run)  # an --overwrite killed (-9) before its first log: the old run aside
        self.assertEqual(contents(self.run), {})
        self.interrupted(recover, moves=2)  # the state, then log.json: Ctrl-C before the checkpoints
        self.assertEqual(sorted(contents(self.run)), ["log.json"])
        recover(self.run)
        self.assertEqual(contents(self.run), self.old)
        self.assertFalse(os.path.exists(os.path.join(self.run, REPLACED_NAME)))

    def test_every_interruption_of_every_step_recovers_a_whole_run(self):
        for moves in range(4):
            for name, step in (("move_aside", move_aside), ("put_back", put_back)):
                with self.subTest(step=name, moves=moves):
                    if name == "put_back":
                        move_aside(self.run)
                    self.interrupted(step, moves)
                    recover(self.run)
                    self.assertEqual(contents(self.run), self.old)
                    self.assertFalse({REPLACED_NAME, REPLACED_NAME + ".dropped"} & set(os.listdir(self.run)))

    def test_the_new_runs_log_wins_once_written(self):
        move_aside(self.run)
        with open(os.path.join(self.run, "log.json"), "wb") as file:
            file.write(b'{"status": "running"}')
        new = contents(self.run)
        self.interrupted(drop_replaced, moves=0)  # Ctrl-C before the old run is renamed for deletion
        recover(self.run)
        self.assertEqual(contents(self.run), new)
        self.assertEqual(os.listdir(self.run), ["log.json"])


if __name__ == "__main__":
    unittest.main()
