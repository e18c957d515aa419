"""What the course's own files take from this package, used the way they use it.

The course's starter `run_exp.py` (IFT6135 H2021, assignment 2) imports `LSTM`, `MiniGPT1` (from
`gpt1_solution`), `utils.wikitext2.Wikitext2`, `utils.torch_utils.seed_experiment, to_device` and
`utils.data_utils.save_logs`; `course_main` below follows its `main()` step by step, shrunk by a
few extra arguments so it runs on tiny data. The course's notebook instead imports `train` and
`evaluate` from `run_exp`: `notebook_main` is such a driver, over the notebook's `Arguments`.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import gpt1_solution_template
import run_exp
from gpt1_solution import Block, LayerNorm, MiniGPT1, MultiHeadedAttention
from lstm_solution import LSTM
from tests.helpers import ROOT, write_tiny_data
from utils.config import ExperimentConfig
from utils.data_utils import save_logs
from utils.batch_loss import BatchLoss
from utils.training import Processes, TrainingState, evaluate, train_epoch
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



@dataclasses.dataclass
class Arguments:
    """The course notebook's way of passing arguments, its fields and defaults; the last line holds
    the knobs that shrink a run (the tiny data's sizes and a cap on examples)."""

    data_folder: str = "./data"
    batch_size: int = 16
    model: str = "lstm"
    embeddings: str = "./data/embeddings.npz"
    layers: int = 1
    optimizer: str = "adamw"
    epochs: int = 10
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    exp_id: str = "debug"
    log: bool = True
    log_dir: str = "logs"
    seed: int = 42
    num_workers: int = 0
    device: str = "cpu"
    progress_bar: bool = False
    print_every: int = 10
    max_length: int = 256; hidden_size: int = 512; num_heads: int = 12; examples: Optional[int] = None  # noqa: E702


class Recorded(torch.utils.data.Dataset):
    """A dataset that notes the index of every example read, in order."""

    def __init__(self, dataset):
        self.dataset, self.indices = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.indices.append(index)
        return self.dataset[index]


def notebook_loaders(args):
    """The notebook's three DataLoaders; the training one shuffles with a generator seeded by
    `args.seed`, and its dataset records the order it was read in (`loaders["train"].dataset`)."""
    loaders = {}
    for split in ("train", "validation", "test"):
        dataset = Wikitext2(args.data_folder, split=split, max_length=args.max_length)
        if args.examples is not None:
            dataset = Subset(dataset, range(min(args.examples, len(dataset))))
        if split == "train":
            dataset = Recorded(dataset)
        generator = torch.Generator().manual_seed(args.seed) if split == "train" else None
        loaders[split] = DataLoader(dataset, batch_size=args.batch_size, shuffle=split == "train",
                                    generator=generator, num_workers=args.num_workers)
    return loaders


def notebook_model(args):
    if args.model == "lstm":
        return LSTM.load_embeddings_from(args.embeddings, hidden_size=args.hidden_size, num_layers=args.layers)
    return MiniGPT1.load_embeddings_from(args.embeddings, num_heads=args.num_heads, num_layers=args.layers)


def notebook_main(args):
    """The course notebook's `main(args)` on `run_exp.train` / `run_exp.evaluate`; returns the
    nine lists and values it gives `save_logs`, the run's folder and the training examples' order."""
    seed_experiment(args.seed)
    loaders = notebook_loaders(args)
    model = notebook_model(args).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    columns = {name: [] for name in ("train_losses", "train_ppls", "train_times",
                                     "valid_losses", "valid_ppls", "valid_times")}
    for epoch in range(args.epochs):
        for prefix, figures in (("train", run_exp.train(epoch, model, loaders["train"], optimizer, args)),
                                ("valid", run_exp.evaluate(epoch, model, loaders["validation"], args))):
            for name, value in zip(("losses", "ppls", "times"), figures):
                columns[f"{prefix}_{name}"].append(value)
    test_loss, test_ppl, test_time = run_exp.evaluate(args.epochs, model, loaders["test"], args, mode="test")
    logs = (*columns.values(), test_loss, test_ppl, test_time)
    return logs, save_logs(args, *logs), loaders["train"].dataset.indices


class NotebookDriverTest(unittest.TestCase):
    """The course's notebook driver over `run_exp.train` / `run_exp.evaluate`, for both models:
    its numbers are the package's own loop's on the same batches."""

    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.mkdtemp()
        cls.addClassCleanup(shutil.rmtree, cls.folder)
        cls.embeddings = write_tiny_data(cls.folder)

    def arguments(self, **overrides):
        return Arguments(**dict(dict(data_folder=self.folder, embeddings=self.embeddings, log_dir=self.folder,
                                     batch_size=4, epochs=1, lr=1e-2, max_length=16, hidden_size=32,
                                     num_heads=4, print_every=0), **overrides))

    def package_loop(self, args, order):
        """One epoch of `utils.training`'s loop over the examples in `order`, from the same start."""
        seed_experiment(args.seed)
        model = notebook_model(args)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        config = ExperimentConfig(model=args.model, batch_size=args.batch_size, sequence_length=args.max_length)
        state = TrainingState(config=config, model=model, optimizer=optimizer,
                              scaler=torch.amp.GradScaler("cpu", enabled=False))
        processes = Processes("cpu")
        batch_loss = BatchLoss(model)
        splits = {split: Wikitext2(args.data_folder, split, max_length=args.max_length)
                  for split in ("train", "validation", "test")}
        batches = [(batch, batch) for batch in torch.tensor(order).split(args.batch_size)]
        trained = train_epoch(batch_loss, state, splits["train"].tensors(), batches, processes=processes)
        validated, tested = (evaluate(batch_loss, splits[split].tensors(), processes=processes,
                                      batch_size=args.batch_size) for split in ("validation", "test"))
        return trained, validated, tested, model

    def check_model(self, model_name, layers):
        args = self.arguments(model=model_name, layers=layers, exp_id=model_name)
        logs, run, order = notebook_main(args)
        self.assertEqual(sorted(order), list(range(len(order))))  # one epoch: each example once
        self.assertNotEqual(order, sorted(order))  # shuffled, as the notebook does
        trained, validated, tested, model = self.package_loop(args, order)
        (train_loss,), (train_ppl,), _, (valid_loss,), (valid_ppl,), _, test_loss, test_ppl, _ = logs
        self.assertEqual((train_loss, train_ppl), (trained["loss"], trained["ppl"]))
        self.assertEqual((valid_loss, valid_ppl), (validated["loss"], validated["ppl"]))
        self.assertEqual((test_loss, test_ppl), (tested["loss"], tested["ppl"]))
        self.assertAlmostEqual(train_ppl, math.exp(train_loss), places=9)
        self.assertGreater(train_loss, 0)
        with open(os.path.join(run, "valid_ppl.txt"), encoding="utf-8") as file:
            self.assertEqual(float(file.read()), valid_ppl)
        self.assertEqual(sorted(os.listdir(run)), COURSE_LOG_FILES)
        # The same weights after the epoch: the same steps, not only the same figures.
        seed_experiment(args.seed)
        again = notebook_model(args)
        optimizer = torch.optim.AdamW(again.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        run_exp.train(0, again, notebook_loaders(args)["train"], optimizer, args)
        for (name, mine), theirs in zip(again.state_dict().items(), model.state_dict().values()):
            self.assertTrue(torch.equal(mine, theirs), name)

    def test_lstm(self):
        self.check_model("lstm", layers=1)

    def test_gpt1(self):
        self.check_model("gpt1", layers=2)

    def test_exact_perplexity_differs_from_the_course_scripts_where_batches_hold_padding(self):
        args = self.arguments(model="lstm", max_length=16, batch_size=3)
        seed_experiment(args.seed)
        model = notebook_model(args)
        loader = notebook_loaders(args)["test"]
        loss, ppl, seconds = run_exp.evaluate(0, model, loader, args, mode="test")
        # By hand: summed NLL over the real targets / their number, from the model's own loss.
        nll, count = 0.0, 0
        with torch.no_grad():
            for batch in loader:
                log_probas = model.predict(batch["source"])
                picked = -log_probas.gather(2, batch["target"].unsqueeze(2)).squeeze(2)
                nll += float((picked * batch["mask"]).sum())
                count += int(batch["mask"].sum())
        self.assertAlmostEqual(loss, nll / count, places=5)
        course_args_ = course_args(batch_size=3, max_steps=None, device="cpu")
        course_loss = run_epoch(model, loader, course_args_)[0]  # divides by batch_size x max_length
        self.assertLess(course_loss, loss - 1e-3)
        self.assertGreaterEqual(seconds, 0)

    def test_args_without_the_optional_fields_and_a_torch_device(self):
        @dataclasses.dataclass
        class Bare:  # neither progress_bar nor print_every: the course's defaults apply
            device: torch.device = torch.device("cpu")

        args = self.arguments(model="gpt1", layers=1)
        seed_experiment(args.seed)
        model = notebook_model(args)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            loss, ppl, _ = run_exp.evaluate(0, model, notebook_loaders(args)["validation"], Bare())
        self.assertTrue(math.isfinite(loss) and ppl > 1, (loss, ppl))
        self.assertIn("[VAL] epoch 0, step 0: loss", printed.getvalue())  # print_every: 10

    def test_prints_every_print_every_steps(self):
        args = self.arguments(model="lstm", print_every=2, examples=20, batch_size=4)  # 5 batches
        seed_experiment(args.seed)
        model = notebook_model(args)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            run_exp.train(3, model, notebook_loaders(args)["train"], optimizer, args)
        steps = [line for line in printed.getvalue().splitlines() if line.startswith("[TRAIN]")]
        self.assertEqual([line.split("step ")[1].split(":")[0] for line in steps], ["0", "2", "4"])
        self.assertIn("epoch 3: perplexity", printed.getvalue())

    def test_a_model_without_the_interface_is_refused(self):
        args = self.arguments()
        with self.assertRaisesRegex(TypeError, "Linear lacks the package's interface"):
            run_exp.evaluate(0, torch.nn.Linear(2, 2), notebook_loaders(args)["test"], args)

    def test_an_empty_loader_is_refused(self):
        args = self.arguments()
        seed_experiment(args.seed)
        empty = DataLoader(Subset(Wikitext2(self.folder, "test", max_length=16), []), batch_size=4)
        with self.assertRaisesRegex(ValueError, "gave no batch with a real target token in epoch 0"):
            run_exp.evaluate(0, notebook_model(args), empty, args)


class CourseNamesTest(unittest.TestCase):
    """The course's module name and attributes."""

    def test_gpt1_solution_is_the_template_module(self):
        import gpt1_solution
        self.assertIs(gpt1_solution, gpt1_solution_template)
        self.assertIs(MiniGPT1, gpt1_solution_template.MiniGPT1)
        self.assertIs(LayerNorm, gpt1_solution_template.LayerNorm)

    def test_block_and_minigpt1_attributes(self):
        block = Block(8, 64, 4, 16)
        self.assertEqual((block.head_size, block.mlp_hidden_size, block.num_heads, block.sequence_length,
                          block.hidden_size), (8, 64, 4, 16, 32))
        model = MiniGPT1(vocabulary_size=50, embedding_size=48, sequence_length=16, num_heads=6, num_layers=1)
        self.assertEqual(model.head_size, 8)
        self.assertEqual(model.layers[0].head_size, 8)
        self.assertEqual(model.layers[0].mlp_hidden_size, 4 * 48)

    def test_importing_run_exp_has_no_side_effects(self):
        with tempfile.TemporaryDirectory() as folder:
            done = subprocess.run([sys.executable, "-c", "import run_exp, gpt1_solution; print(run_exp.train.__module__)"],
                                  cwd=folder, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                                  text=True, timeout=120)
            self.assertEqual((done.returncode, done.stdout, done.stderr), (0, "utils.course\n", ""))
            self.assertEqual(os.listdir(folder), [])

    def test_gradescope_decorators_import(self):
        # What the course's public tests import first (installed by requirements.txt).
        from gradescope_utils.autograder_utils.decorators import weight

        @weight(2)
        def graded():
            pass

        self.assertEqual(graded.__weight__, 2)


class SecondDerivativesTest(unittest.TestCase):
    """`gradgradcheck` in double precision: both paths of LayerNorm and of the attention."""

    def test_layer_norm_both_paths(self):
        torch.manual_seed(0)
        for fused in (True, False):
            norm = LayerNorm(6).double()
            norm.fused = fused
            weight = torch.randn(6, dtype=torch.double, requires_grad=True)
            bias = torch.randn(6, dtype=torch.double, requires_grad=True)
            inputs = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)

            def layer_norm(x, w, b):
                return torch.func.functional_call(norm, {"weight": w, "bias": b}, (x,))

            with self.subTest(fused=fused):
                self.assertTrue(torch.autograd.gradgradcheck(layer_norm, (inputs, weight, bias)))

    def test_attention_reference_path_and_fast_path_refusal(self):
        torch.manual_seed(0)
        attention = MultiHeadedAttention(3, 2, 5).double()
        attention.fused = False
        inputs = torch.randn(2, 4, 6, dtype=torch.double, requires_grad=True)
        self.assertTrue(torch.autograd.gradgradcheck(attention, (inputs,)))
        # PyTorch's fused attention kernels have no second derivative: it raises, never a wrong one.
        attention.fused = True
        (grad,) = torch.autograd.grad(attention(inputs).sum(), inputs, create_graph=True)
        with self.assertRaisesRegex(RuntimeError, "not implemented"):
            grad.sum().backward()


if __name__ == "__main__":
    unittest.main()
