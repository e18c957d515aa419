"""What the course's own starter `run_exp.py` takes from this package, used the way it uses it.

That script (IFT6135 H2021, assignment 2) imports `LSTM`, `MiniGPT1`, `utils.wikitext2.Wikitext2`,
`utils.torch_utils.seed_experiment, to_device` and `utils.data_utils.save_logs`; `course_main`
below follows its `main()` step by step, shrunk by a few extra arguments so it runs on tiny data.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import unittest

import numpy as np
import torch
from torch.utils.data import DataLoader

from gpt1_solution_template import MiniGPT1
from lstm_solution import LSTM
from tests.helpers import write_tiny_data
from utils.data_utils import save_logs
from utils.torch_utils import seed_experiment, to_device
from utils.wikitext2 import Wikitext2

COURSE_LOG_FILES = sorted(["args.json", "train_loss.txt", "train_ppl.txt", "train_time.txt",
                           "valid_loss.txt", "valid_ppl.txt", "valid_time.txt", "test_loss.txt",
                           "test_ppl.txt", "test_time.txt"])


def course_args(**overrides):
    """The course script's flags and defaults, plus the knobs that shrink a run (last line)."""
    values = dict(data_folder="./data", batch_size=2, model="lstm", embeddings="./data/embeddings.npz",
                  layers=1, epochs=3, optimizer="adamw", lr=1e-3, momentum=0.9, weight_decay=5e-4,
                  exp_id="debug", log=True, log_dir="logs", seed=42, num_workers=0, device="cpu",
                  progress_bar=False, print_every=10,
                  max_length=256, hidden_size=512, num_heads=12, max_steps=None)
    values.update(overrides)
    return argparse.Namespace(**values)


def forward(model, batch, args):
    # The course's script branches on the model here: only the LSTM takes states.
    if args.model == "lstm":
        hidden_states = model.initial_states(batch["source"].shape[0])
        log_probas, _ = model(batch["source"], hidden_states)
        return log_probas
    return model(batch["source"])


def run_epoch(model, dataloader, args, optimizer=None):
    """One pass as the course's train()/evaluate(): `(mean loss, perplexity, seconds, step losses)`.

    The course's figure: the sum over batches of loss x real tokens, averaged over batches and
    divided by batch_size x max_length.
    """
    model.train(optimizer is not None)
    weighted, step_losses, start = [], [], time.time()
    with torch.set_grad_enabled(optimizer is not None):
        for index, batch in enumerate(dataloader):
            if args.max_steps is not None and index == args.max_steps:
                break
            batch = to_device(batch, args.device)
            if optimizer is not None:
                optimizer.zero_grad()
            loss = model.loss(forward(model, batch, args), batch["target"], batch["mask"])
            if optimizer is not None:
                loss.backward()
                optimizer.step()
            step_losses.append(loss.item())
            weighted.append(loss.item() * batch["mask"].sum().item())
    mean_loss = np.mean(weighted) / (args.batch_size * dataloader.dataset.max_length)
    return mean_loss, math.exp(mean_loss), time.time() - start, step_losses


def course_main(args):
    """The course's main(): returns the nine values save_logs takes, and every training step's loss."""
    seed_experiment(args.seed)
    loaders = {}
    for split in ("train", "validation", "test"):
        dataset = Wikitext2(args.data_folder, split=split, max_length=args.max_length)
        loaders[split] = DataLoader(dataset, batch_size=args.batch_size, shuffle=split == "train",
                                    num_workers=args.num_workers)
    if args.model == "lstm":
        model = LSTM.load_embeddings_from(args.embeddings, hidden_size=args.hidden_size,
                                          num_layers=args.layers)
    else:
        model = MiniGPT1.load_embeddings_from(args.embeddings, num_heads=args.num_heads,
                                              num_layers=args.layers)
    model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    train, valid, step_losses = [], [], []  # (loss, ppl, seconds) of each epoch
    for _ in range(args.epochs):
        *figures, steps = run_epoch(model, loaders["train"], args, optimizer)
        train.append(figures)
        step_losses.extend(steps)
        *figures, _ = run_epoch(model, loaders["validation"], args)
        valid.append(figures)
    test_loss, test_ppl, test_time, _ = run_epoch(model, loaders["test"], args)
    train_losses, train_ppls, train_times = (list(column) for column in zip(*train))
    valid_losses, valid_ppls, valid_times = (list(column) for column in zip(*valid))
    logs = (train_losses, train_ppls, train_times, valid_losses, valid_ppls, valid_times,
            test_loss, test_ppl, test_time)
    return logs, step_losses


class SaveLogsTest(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)

    def read(self, *parts):
        with open(os.path.join(self.folder, *parts), encoding="utf-8") as file:
            return file.read()

    def test_writes_the_course_files(self):
        args = course_args(log_dir=self.folder, exp_id="07", lr=0.0005)
        run = save_logs(args, [6.5, 5.25], [665.1, 190.5], [12.0, 11.5], [6.0, 5.5], [403.4, 244.7],
                        [1.25, 1.5], 5.375, 216.0, 1.75)
        self.assertEqual(run, os.path.join(self.folder, "07"))
        self.assertEqual(sorted(os.listdir(run)), COURSE_LOG_FILES)
        self.assertEqual(self.read("07", "train_loss.txt"), "6.5\n5.25")  # no final newline
        self.assertEqual(self.read("07", "train_ppl.txt"), "665.1\n190.5")
        self.assertEqual(self.read("07", "train_time.txt"), "12.0\n11.5")
        self.assertEqual(self.read("07", "valid_loss.txt"), "6.0\n5.5")
        self.assertEqual(self.read("07", "valid_ppl.txt"), "403.4\n244.7")
        self.assertEqual(self.read("07", "valid_time.txt"), "1.25\n1.5")
        self.assertEqual(self.read("07", "test_loss.txt"), "5.375\n")  # one value, then a newline
        self.assertEqual(self.read("07", "test_ppl.txt"), "216.0\n")
        self.assertEqual(self.read("07", "test_time.txt"), "1.75\n")
        text = self.read("07", "args.json")
        self.assertEqual(json.loads(text), vars(args))
        self.assertTrue(text.startswith('{\n  "data_folder": "./data",\n  "batch_size": 2,'), text)

    def test_notebook_dataclass_and_bad_args(self):
        @dataclasses.dataclass
        class Arguments:  # the course notebook's way of passing arguments
            exp_id: int = 3
            log_dir: str = self.folder
            device: torch.device = torch.device("cpu")

        save_logs(Arguments(), [], [], [], [], [], [], 1.0, 2.0, 3.0)
        self.assertEqual(self.read("3", "train_loss.txt"), "")
        self.assertEqual(json.loads(self.read("3", "args.json"))["device"], "cpu")
        with self.assertRaisesRegex(ValueError, "lacks log_dir"):
            save_logs(argparse.Namespace(exp_id="x"), [], [], [], [], [], [], 1.0, 2.0, 3.0)


class CourseScriptTest(unittest.TestCase):
    """A few epochs of the course's main() on tiny data, for each model, then its save_logs."""

    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.mkdtemp()
        cls.addClassCleanup(shutil.rmtree, cls.folder)
        cls.embeddings = write_tiny_data(cls.folder)

    def check_run(self, **overrides):
        settings = dict(data_folder=self.folder, embeddings=self.embeddings, log_dir=self.folder,
                        batch_size=4, epochs=3, lr=1e-2, max_length=16, hidden_size=32, num_heads=4)
        args = course_args(**dict(settings, **overrides))
        logs, step_losses = course_main(args)
        self.assertTrue(all(math.isfinite(loss) for loss in step_losses), step_losses)
        train_losses, valid_losses = logs[0], logs[3]
        self.assertLess(step_losses[-1], 0.5 * step_losses[0], step_losses)
        self.assertLess(train_losses[-1], train_losses[0] - 0.1, train_losses)
        self.assertTrue(all(math.isfinite(loss) for loss in valid_losses), valid_losses)
        run = save_logs(args, *logs)
        self.assertEqual(sorted(os.listdir(run)), COURSE_LOG_FILES)
        for name in ("train_loss", "train_ppl", "train_time", "valid_loss", "valid_ppl", "valid_time"):
            with open(os.path.join(run, f"{name}.txt"), encoding="utf-8") as file:
                self.assertEqual(len(file.read().split("\n")), args.epochs, name)
        with open(os.path.join(run, "test_ppl.txt"), encoding="utf-8") as file:
            self.assertAlmostEqual(float(file.read()), logs[7])
        return step_losses

    def test_lstm(self):
        self.check_run(model="lstm", exp_id="lstm")

    def test_gpt1(self):
        self.check_run(model="gpt1", exp_id="gpt1", layers=2)

    def test_seeded_runs_repeat(self):
        first = self.check_run(model="lstm", exp_id="again", epochs=2)
        self.assertEqual(first, self.check_run(model="lstm", exp_id="again", epochs=2))


if __name__ == "__main__":
    unittest.main()
