"""Tests of `python -m utils.report` on logs written by the project's own `write_log`.

The logs are synthetic but shaped like real runs (SGD starting in the tens of thousands, a GPT run
that overfits after epoch 5, a CPU run without GPU memory, a custom exp id).
"""
import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

from tests.helpers import (check_results_csv, csv_rows, latex_cells, markdown_rows, run_cli,
                           shared_data_dir, slow)
from utils.config import EXPERIMENTS, ExperimentConfig
from utils.data_utils import write_log
from utils.report import ReportError, main, make_report
from utils.report.tables import RESULT_FIELDS
from utils.report.published import (PUBLISHED_RUNS_PATH, published_runs, reference_best,
                                    reference_curves)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (start, floor, rate) of train and valid perplexity per optimizer; GPT adds overfitting.
CURVE_SHAPES = {"adam": ((720, 80, 0.55), (370, 145, 0.6)), "adamw": ((725, 82, 0.55), (375, 144, 0.6)),
                "sgd": ((34500, 2300, 0.35), (29800, 2170, 0.35)),
                "momentum": ((8100, 1740, 1.2), (2290, 1650, 0.9))}
PRESET_GPU_MB = {"lstm": 4935.0, "gpt1": 5237.0}


def synthetic_log(config, epochs=None, status="finished", gpu=True, seconds_per_epoch=80.0):
    """A log dict in the project's format for `config`, with `epochs` epochs (default: all)."""
    epochs = config.epochs if epochs is None else epochs
    (t0, t1, tr), (v0, v1, vr) = CURVE_SHAPES[config.optimizer]
    slow = 1.0 + 0.15 * (config.layers - 1)
    entries, cumulative = [], 0.0
    for epoch in range(1, epochs + 1):
        train_ppl = t1 + (t0 - t1) * math.exp(-tr * (epoch - 1))
        valid_ppl = v1 + (v0 - v1) * math.exp(-vr * (epoch - 1))
        if config.model == "gpt1":
            train_ppl *= 0.75
            valid_ppl *= 1.0 + 0.02 * max(0, epoch - 5) ** 2
        train_seconds, valid_seconds = seconds_per_epoch * slow, 3.5 * slow
        cumulative += train_seconds + valid_seconds
        memory = {"steady": PRESET_GPU_MB[config.model] + 60 * config.layers,
                  "peak_allocated": 3000.0 + epoch, "peak_reserved": 3500.0} if gpu else None
        entries.append({
            "epoch": epoch, "steps": 1300 * epoch, "train_loss": math.log(train_ppl),
            "train_ppl": train_ppl, "valid_loss": math.log(valid_ppl), "valid_ppl": valid_ppl,
            "train_seconds": train_seconds, "valid_seconds": valid_seconds,
            "cumulative_seconds": cumulative, "train_tokens": 2_300_000,
            "train_tokens_per_second": 2_300_000 / train_seconds,
            "valid_tokens_per_second": 240_000 / valid_seconds, "lr": config.lr,
            "gpu_memory_mb": memory, "cpu_rss_mb": 2100.0 + epoch})
    best = min(entries, key=lambda e: e["valid_ppl"]) if entries else None
    finished = status == "finished"
    return {
        "exp_id": config.exp_id, "status": status, "message": None, "config": config.to_dict(),
        "environment": {"python": "3.11", "torch": "2.13", "device": "cuda" if gpu else "cpu",
                        "device_name": "NVIDIA H100 80GB HBM3" if gpu else "x86_64",
                        "world_size": 1},
        "parameters": {"total": 40_000_000 + 3_000_000 * config.layers,
                       "learnable": 9_000_000 + 3_000_000 * config.layers},
        "epochs": entries,
        "best": best and {"epoch": best["epoch"], "valid_loss": best["valid_loss"],
                          "valid_ppl": best["valid_ppl"]},
        "test": {"epoch": best["epoch"], "loss": best["valid_loss"] - 0.05,
                 "ppl": best["valid_ppl"] * math.exp(-0.05)} if finished and best else None,
    }


def write_run(log_dir, config, **options):
    log = synthetic_log(config, **options)
    write_log(os.path.join(log_dir, config.exp_id, "log.json"), log)
    return log


CUSTOM = ExperimentConfig(exp_id="tiny_gpt", model="gpt1", layers=2, optimizer="adamw", epochs=6)
MAIN_RUNS = ("1", "2", "3", "9", "5", "7")  # no 6, 11, 12: the GPT depth comparison is skipped
MAIN_ORDER = ["1", "2", "3", "9", "5", "7", "tiny_gpt"]  # LSTM by layers then optimizer, then GPT


def read_bytes(path):
    with open(path, "rb") as file:
        return file.read()


@slow
class ReportTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="report-test-")
        cls.log_dir = os.path.join(cls.tmp, "logs")
        for exp_id in MAIN_RUNS:
            write_run(cls.log_dir, EXPERIMENTS[exp_id], gpu=exp_id != "3")
        write_run(cls.log_dir, CUSTOM, gpu=False, seconds_per_epoch=20.0)
        cls.out = os.path.join(cls.tmp, "report")
        cls.result = make_report([cls.log_dir], cls.out, formats=("png", "pdf"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def test_every_expected_file_exists_and_is_valid(self):
        stems = [f"exp_{exp_id}" for exp_id in MAIN_ORDER] + [
            "optimizers_lstm", "optimizers_gpt1", "depth_lstm", "lstm_vs_gpt1", "all_runs"]
        expected = {self.path("figures", f"{stem}.{ext}") for stem in stems for ext in ("png", "pdf")}
        expected |= {self.path("tables", name) for name in (
            "results.md", "results.tex", "results.csv", "memory_speed.md", "memory_speed.tex",
            "tables.tex")}
        expected |= {self.path("REPORT.md"), self.path("findings.json")}
        self.assertEqual(set(self.result["files"]), expected)
        for path in expected:
            data = read_bytes(path)
            if path.endswith(".png"):
                self.assertTrue(data.startswith(PNG_SIGNATURE), path)
            elif path.endswith(".pdf"):
                self.assertTrue(data.startswith(b"%PDF-"), path)
                self.assertTrue(data.rstrip().endswith(b"%%EOF"), path)
            else:
                self.assertGreater(len(data), 100, path)
        self.assertEqual(self.result["runs"], MAIN_ORDER)

    def test_skipped_and_partial_comparisons_are_noted(self):
        self.assertEqual(self.result["skipped"], ["depth_gpt1"])
        self.assertFalse(os.path.exists(self.path("figures", "depth_gpt1.png")))
        with open(self.path("REPORT.md"), encoding="utf-8") as file:
            report = file.read()
        self.assertIn("*Depth, GPT-1 with AdamW (1, 2, 4 layers)* (experiments 6, 11, 12): skipped",
                      report)
        self.assertIn("Optimizers, LSTM (1 layer), experiments 1, 2, 3, 4. Not in the logs: 4.", report)
        for stem in ("optimizers_lstm", "all_runs", "exp_tiny_gpt"):
            self.assertIn(f"(figures/{stem}.png)", report)

    def test_markdown_table_is_sorted(self):
        header, rows = markdown_rows(self.path("tables", "results.md"))
        self.assertEqual(header[:4], ["exp", "arch.", "layers", "optimizer"])
        self.assertEqual([row[0].replace("\\", "") for row in rows], MAIN_ORDER)
        architecture_rank = {"LSTM": 0, "GPT-1": 1}
        optimizer_rank = {"adam": 0, "adamw": 1, "sgd": 2, "momentum": 3}
        keys = [(architecture_rank[r[1]], int(r[2]), optimizer_rank[r[3]]) for r in rows]
        self.assertEqual(keys, sorted(keys))
        self.assertEqual(len({len(row) for row in rows} | {len(header)}), 1)

    def test_one_bold_best_validation_per_architecture(self):
        header, rows = markdown_rows(self.path("tables", "results.md"))
        column = header.index("best valid ppl (epoch)")
        bold = {}
        for row in rows:
            for index, cell in enumerate(row):
                if "**" in cell:
                    self.assertEqual(index, column, f"bold outside the validation column: {row}")
                    bold.setdefault(row[1], []).append(row)
        self.assertEqual(sorted(bold), ["GPT-1", "LSTM"])
        for architecture, marked in bold.items():
            self.assertEqual(len(marked), 1, architecture)
            value = float(re.match(r"\*\*([\d,.]+)\*\*", marked[0][column]).group(1).replace(",", ""))
            others = [float(row[column].split()[0].strip("*").replace(",", ""))
                      for row in rows if row[1] == architecture]
            self.assertEqual(value, min(others))
        # The GPT runs overfit: their best epoch is 6, not the last one.
        self.assertTrue(any(row[0] == "5" and row[column].endswith("(6)") for row in rows))

    def test_results_csv_matches_the_markdown_table_row_for_row(self):
        check_results_csv(self, self.out)
        rows = csv_rows(self.path("tables", "results.csv"))
        self.assertEqual(list(rows[0]), list(RESULT_FIELDS))
        by_id = {row["exp"]: row for row in rows}
        # Plain numbers: no thousands separators, no units, the full value.
        self.assertEqual(by_id["1"]["learnable_parameters"], "12000000")
        self.assertEqual(by_id["1"]["time_to_best"], "835.0")
        self.assertEqual(by_id["1"]["gpu_steady_mb"], "4995.0")
        self.assertEqual(by_id["3"]["gpu_steady_mb"], "")  # a CPU run
        self.assertEqual(by_id["1"]["dropout"], "0.0")
        # The full value, not the table's rounding: it reads back as the log's float.
        best = min(e["valid_ppl"] for e in synthetic_log(EXPERIMENTS["5"])["epochs"])
        self.assertEqual(float(by_id["5"]["best_valid_ppl"]), best)

    def test_latex_tables_are_balanced_with_the_right_column_count(self):
        for name in ("results.tex", "memory_speed.tex"):
            with open(self.path("tables", name), encoding="utf-8") as file:
                text = file.read()
            for environment in ("table", "tabular"):
                self.assertEqual(text.count(f"\\begin{{{environment}}}"), 1, name)
                self.assertEqual(text.count(f"\\end{{{environment}}}"), 1, name)
            self.assertLess(text.index("\\toprule"), text.index("\\midrule"))
            self.assertLess(text.index("\\midrule"), text.index("\\bottomrule"))
            columns = len(re.search(r"\\begin\{tabular\}\{([lrc]+)\}", text).group(1))
            header = text[text.index("\\toprule"):text.index("\\midrule")].splitlines()[1:]
            body = text[text.index("\\midrule"):text.index("\\bottomrule")].splitlines()[1:]
            self.assertEqual(len(body), len(MAIN_ORDER), name)
            self.assertIn(len(header), (1, 2), name)
            for line in header + body:
                self.assertTrue(line.endswith("\\\\"), line)
                self.assertEqual(len(latex_cells(line)), columns, line)
            self.assertIn("tiny\\_gpt", text)
            self.assertIsNone(re.search(r"(?<!\\)[_%#]", text.split("\n", 1)[1]), name)
            self.assertEqual(text.count("{"), text.count("}"), name)

    @unittest.skipUnless(shutil.which("pdflatex"), "pdflatex is not installed")
    def test_latex_document_compiles(self):
        folder = os.path.join(self.tmp, "latex")
        shutil.copytree(self.path("tables"), folder)
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "tables.tex"],
                              cwd=folder, capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stdout[-2000:])

    def test_memory_table_has_device_and_speed(self):
        header, rows = markdown_rows(self.path("tables", "memory_speed.md"))
        by_id = {row[0].replace("\\", ""): dict(zip(header, row)) for row in rows}
        self.assertEqual(by_id["1"]["device"], "NVIDIA H100 80GB HBM3")
        self.assertEqual(by_id["1"]["GPU MB steady"], "4,995")
        self.assertEqual(by_id["1"]["GPU MB peak alloc."], "3,010")
        self.assertEqual(by_id["1"]["train tokens/s"], "28,750")
        self.assertEqual(by_id["3"]["GPU MB steady"], "–")  # a CPU run
        self.assertEqual(by_id["3"]["device"], "x86_64")


@slow
class ReferenceTest(unittest.TestCase):
    def test_reference_columns_and_curves(self):
        with tempfile.TemporaryDirectory() as tmp:
            for config in (EXPERIMENTS["1"], EXPERIMENTS["5"], CUSTOM):
                write_run(tmp, config)
            changed = EXPERIMENTS["2"].replace(layers=3)  # not the preset any more: no reference
            write_run(tmp, changed)
            write_run(tmp, EXPERIMENTS["3"].replace(hidden_size=128, limit_batches=20))
            out = os.path.join(tmp, "out")
            result = make_report([tmp], out, formats=("svg",), reference=True)
            check_results_csv(self, out)
            header, rows = markdown_rows(os.path.join(out, "tables", "results.md"))
            by_id = {row[0].replace("\\", ""): dict(zip(header, row)) for row in rows}
            self.assertEqual(by_id["1"]["ref. A valid ppl (epoch)"], "146.3 (10)")
            self.assertEqual(by_id["1"]["ref. B valid ppl"], "145.8")
            self.assertEqual(by_id["1"]["ref. GPU MB A / B"], "4,935 / 4,193")
            self.assertEqual(by_id["5"]["ref. A valid ppl (epoch)"], "146.9 (6)")
            for exp_id in ("tiny_gpt", "2"):
                self.assertEqual(by_id[exp_id]["ref. A valid ppl (epoch)"], "–")
            with open(os.path.join(out, "REPORT.md"), encoding="utf-8") as file:
                report = file.read()
            self.assertIn("## Published 2021 results", report)
            self.assertIn("padding included", report)
            self.assertIn("not directly comparable: 3 (hidden_size, limit_batches).", report)
            with open(os.path.join(out, "figures", "exp_1.svg"), encoding="utf-8") as file:
                figure = file.read()
            self.assertIn("published 2021 (ref. A)", figure)
            self.assertIn("ref 1", figure)
            with open(os.path.join(out, "figures", "all_runs.svg"), encoding="utf-8") as file:
                figure = file.read()
            self.assertIn("tiny_gpt: GPT-1, 2 layers, AdamW", figure)
            self.assertNotIn("ref tiny_gpt", figure)
            self.assertNotIn("ref 2", figure)
            self.assertTrue(result["files"])

    def test_reference_epochs_are_shifted_to_count_from_one(self):
        curves = reference_curves("1")
        self.assertEqual(curves["epochs"][0], 1)
        self.assertEqual(reference_best("1")["a_epoch"], 10)
        self.assertAlmostEqual(curves["cumulative_seconds"][0], 78.92 + 3.55)
        self.assertIsNone(reference_curves("10")["cumulative_seconds"])
        self.assertIsNone(reference_curves("custom"))

    def test_reference_data_is_the_published_file(self):
        path = shared_data_dir("..", "reference", "published-runs.json")
        with open(path, encoding="utf-8") as file:
            published = json.load(file)
        with open(PUBLISHED_RUNS_PATH, encoding="utf-8") as file:
            self.assertEqual(json.load(file), published)
        self.assertEqual(published_runs(), published)

    def test_data_file_gives_the_values_of_the_former_literals(self):
        # Pinned from utils/reference_runs.py, the Python literals the JSON file replaced.
        data = published_runs()
        self.assertIs(published_runs(), data)  # read once
        self.assertEqual(sorted(data), ["note", "reference_a", "reference_b"])
        for key in ("reference_a", "reference_b"):
            self.assertEqual(sorted(data[key]["runs"], key=int), [str(k) for k in range(1, 13)])
        self.assertEqual(reference_best("5"), {
            "a_valid_ppl": 146.87, "a_epoch": 6, "a_train_ppl": 71.26, "a_seconds_per_epoch": 78.79,
            "a_gpu_memory_mb": 5237, "b_valid_ppl": 144.47, "b_train_ppl": 61.95,
            "b_gpu_memory_mb": 4489})
        self.assertEqual(reference_best("9"), {
            "a_valid_ppl": 139.61, "a_epoch": 7, "a_train_ppl": 82.35, "a_seconds_per_epoch": None,
            "a_gpu_memory_mb": 4999, "b_valid_ppl": 138.54, "b_train_ppl": 82.52,
            "b_gpu_memory_mb": 4318})
        self.assertEqual(set(reference_best("custom").values()), {None})
        curves = reference_curves("6")
        self.assertEqual({k: v for k, v in curves.items() if k != "cumulative_seconds"}, {
            "model": "gpt1", "layers": 1, "optimizer": "adamw", "epochs": [1, 2, 3, 4, 5, 6, 7],
            "train_ppl": [836.02, 225.37, 141.73, 105.67, 85.12, 71.18, 60.83],
            "valid_ppl": [330.57, 207.08, 166.49, 152.97, 148.1, 148.47, 150.49],
            "train_seconds_per_epoch": 78.73, "gpu_memory_mb": 5237})
        for got, expected in zip(curves["cumulative_seconds"],
                                 [82.23, 164.46, 246.69, 328.92, 411.15, 493.38, 575.61], strict=True):
            self.assertAlmostEqual(got, expected)
        self.assertEqual(reference_curves("10")["valid_ppl"][-2:], [159.45, 159.76])


def run_main(argv):
    return run_cli(main, argv)


@slow
class OddInputTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="report-odd-")
        self.addCleanup(shutil.rmtree, self.tmp)

    def test_partial_and_corrupt_logs_give_one_warning_each(self):
        logs = os.path.join(self.tmp, "logs")
        write_run(logs, EXPERIMENTS["1"])
        write_run(logs, EXPERIMENTS["5"], epochs=2, status="running")
        write_run(logs, EXPERIMENTS["2"], epochs=3)
        log = synthetic_log(EXPERIMENTS["6"])
        del log["epochs"][2]["cumulative_seconds"]
        del log["parameters"]
        del log["config"]["optimizer"]
        write_log(os.path.join(logs, "6", "log.json"), log)
        os.makedirs(os.path.join(logs, "7"))
        with open(os.path.join(logs, "7", "log.json"), "w") as file:
            file.write('{"exp_id": "7", "config": {"model": ')  # truncated mid-write
        code, stdout, stderr = run_main([logs, "--out", os.path.join(self.tmp, "out"),
                                         "--format", "png"])
        self.assertEqual(code, 0, stderr)
        lines = stderr.splitlines()
        self.assertTrue(all(line.startswith("warning: ") for line in lines), lines)
        expected = [
            ("7/log.json", "not a readable JSON log"),
            ("exp 5", "still running, 2 of 10 epochs so far"),
            ("exp 2", "only 3 of 10 epochs"),
            ("exp 6", "'cumulative_seconds' missing or not a number in epoch(s) 3"),
            ("exp 6", "no parameter count"),
            ("exp 6", "the config has no valid 'optimizer'"),
        ]
        for who, what in expected:
            self.assertEqual(sum(who in line and what in line for line in lines), 1, (who, what, lines))
        self.assertEqual(len(lines), len(expected), lines)
        self.assertIn("REPORT.md", stdout)
        header, rows = markdown_rows(os.path.join(self.tmp, "out", "tables", "results.md"))
        by_id = {row[0]: dict(zip(header, row)) for row in rows}
        self.assertEqual(sorted(by_id), ["1", "2", "5", "6"])
        self.assertEqual(by_id["5"]["test ppl"], "–")
        self.assertEqual(by_id["6"]["params learnable / total"], "–")
        self.assertEqual(by_id["6"]["optimizer"], "–")
        self.assertTrue(os.path.exists(os.path.join(self.tmp, "out", "figures", "exp_5.png")))

    def test_no_log_folder_or_no_logs_is_one_error_line_and_exit_2(self):
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(empty)
        for argv in ([os.path.join(self.tmp, "missing")], [empty]):
            code, stdout, stderr = run_main(argv + ["--out", os.path.join(self.tmp, "out")])
            self.assertEqual(code, 2)
            self.assertEqual(stdout, "")
            self.assertEqual(len(stderr.splitlines()), 1, stderr)
            self.assertTrue(stderr.startswith("python -m utils.report: error: "), stderr)
        with self.assertRaises(ReportError):
            make_report([empty], os.path.join(self.tmp, "out"))

    def test_unknown_format_is_refused(self):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as caught:
            main([self.tmp, "--format", "png,gif"])
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("png, pdf, svg", stderr.getvalue())
        self.assertEqual(len(stderr.getvalue().splitlines()), 1, stderr.getvalue())
        with self.assertRaises(ValueError):
            make_report([self.tmp], os.path.join(self.tmp, "out"), formats=("gif",))

    def test_module_runs_as_a_command(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run([sys.executable, "-m", "utils.report", os.path.join(self.tmp, "missing"),
                               "--out", os.path.join(self.tmp, "out")],
                              cwd=root, capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertEqual(done.stdout, "")
        self.assertRegex(done.stderr, r"^python -m utils\.report: error: log folder '.*missing' does not exist [^\n]*\n$")

    def test_same_logs_give_the_same_bytes(self):
        logs = os.path.join(self.tmp, "logs")
        write_run(logs, EXPERIMENTS["1"])
        write_run(logs, EXPERIMENTS["7"], epochs=4, status="running")
        outputs = []
        for name in ("a", "b"):
            out = os.path.join(self.tmp, name)
            result = make_report([logs], out, formats=("png", "pdf", "svg"), reference=True)
            outputs.append({os.path.relpath(p, out): read_bytes(p) for p in result["files"]})
        self.assertEqual(sorted(outputs[0]), sorted(outputs[1]))
        for name in outputs[0]:
            self.assertEqual(outputs[0][name], outputs[1][name], name)


if __name__ == "__main__":
    unittest.main()
