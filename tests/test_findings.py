"""Tests of the report's findings (the course's questions 3-8) on hand-made curves.

Each run's curves are chosen by hand and written by the package's own `write_log`; the expected
figures below were worked out by hand from them (the comments show the arithmetic).
"""
import json
import math
import os
import re
import shutil
import tempfile
import unittest

from tests.helpers import (assert_shown, check_results_csv, latex_cells, markdown_rows, slow,
                           split_note)
from utils.config import EXPERIMENTS
from utils.data_utils import write_log
from utils.report import collect_runs, make_report
from utils.report.findings import (mean_improvement, model_state_mib, overfitting_onset,
                                   seconds_per_epoch, time_to_level)

MIB = 2 ** 20

# exp id: (train ppl per epoch, valid ppl per epoch, (train, valid) seconds of every epoch).
CURVES = {
    "1": ([400, 220, 160, 120], [300, 200, 180, 190], (20.0, 4.0)),  # overfits after epoch 3
    "2": ([420, 250, 180, 140], [320, 240, 200, 170], (20.0, 4.0)),  # the best of all: 170
    "3": ([9000, 8000, 7500, 7000], [5000, 6000, 7000, 8000], (10.0, 2.0)),  # best at epoch 1
    "4": ([800, 600, 500, 450], [700, 650, 600, 620], (20.0, 4.0)),
    "9": ([600, 400, 300, 250], [450, 340, 300, 280], (5.0, 1.0)),  # exactly 2 x 170 at epoch 2
    "5": ([450, 280, 200, 150], [350, 260, 245, 250], (8.0, 2.0)),
    "6": ([500, 300, 200, 150, 120], [400, 250, 260, 240, 300], (10.0, 2.0)),  # overfits after 2
    "11": ([500, 300, 320, 250], [400, 250, 260, 240], (15.0, 3.0)),  # valid and train rise: no
}
ORDER = ["1", "2", "3", "4", "9", "5", "6", "11"]  # the report's: LSTM, layers, optimizer
# (total, learnable) parameters; the rest have (1000, 1000).
PARAMETERS = {"1": (MIB, MIB // 2), "3": (MIB, MIB), "4": (MIB, MIB)}
# (steady, peak_reserved) MiB per epoch; the rest are CPU runs (null).
GPU = {"1": [(1000.0, 1200.0), (1010.0, 1300.0), (1020.0, 1250.0), (1030.0, 1280.0)],
       "4": [(2048.0, 4096.0)] * 4}


def hand_log(exp_id, dropout=0.0):
    """The log of `exp_id` with the curves, seconds, parameters and memory chosen above."""
    train, valid, (train_seconds, valid_seconds) = CURVES[exp_id]
    config = EXPERIMENTS[exp_id].replace(epochs=len(train), dropout=dropout)
    total, learnable = PARAMETERS.get(exp_id, (1000, 1000))
    gpu = GPU.get(exp_id, [None] * len(train))
    entries, cumulative = [], 0.0
    for epoch, (train_ppl, valid_ppl, memory) in enumerate(zip(train, valid, gpu, strict=True), 1):
        cumulative += train_seconds + valid_seconds
        entries.append({
            "epoch": epoch, "steps": 10 * epoch, "train_loss": math.log(train_ppl),
            "train_ppl": float(train_ppl), "valid_loss": math.log(valid_ppl),
            "valid_ppl": float(valid_ppl), "train_seconds": train_seconds,
            "valid_seconds": valid_seconds, "cumulative_seconds": cumulative, "train_tokens": 1000,
            "train_tokens_per_second": 1000 / train_seconds,
            "valid_tokens_per_second": 100 / valid_seconds, "lr": config.lr,
            "gpu_memory_mb": None if memory is None else {
                "steady": memory[0], "peak_allocated": memory[0], "peak_reserved": memory[1]},
            "cpu_rss_mb": 500.0})
    best = min(entries, key=lambda e: e["valid_ppl"])
    return {"exp_id": exp_id, "status": "finished", "message": None, "config": config.to_dict(),
            "environment": {"device": "cpu", "device_name": "x86_64"},
            "parameters": {"total": total, "learnable": learnable}, "epochs": entries,
            "best": {"epoch": best["epoch"], "valid_loss": best["valid_loss"],
                     "valid_ppl": best["valid_ppl"]},
            "test": {"epoch": best["epoch"], "loss": best["valid_loss"], "ppl": best["valid_ppl"]}}


def write_hand_logs(log_dir, exp_ids, dropout=None):
    """Write the hand logs of `exp_ids`; `dropout` {exp id: p} gives some runs dropout."""
    for exp_id in exp_ids:
        write_log(os.path.join(log_dir, exp_id, "log.json"),
                  hand_log(exp_id, (dropout or {}).get(exp_id, 0.0)))


def read_text(path):
    with open(path, encoding="utf-8") as file:
        return file.read()


def findings_section(report):
    """REPORT.md's findings: {"Q3": [lines of its section]}."""
    text = report.split("## Findings: the course's questions\n", 1)[1].split("\n## ", 1)[0]
    sections = {}
    for block in text.split("### ")[1:]:
        sections[block.split(".", 1)[0]] = block.splitlines()
    return sections


def markdown_tables(lines):
    """The tables among `lines`: [(header cells, body rows, "**Table N.** ..." caption line)]."""
    tables, current = [], []
    for index, line in enumerate(lines):
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif current:
            caption = next(text for text in lines[index:] if text.startswith("**Table"))
            tables.append((current[0], current[2:], caption))
            current = []
    return tables


def by_exp(table):
    return {row["exp"]: row for row in table["rows"]}


@slow
class FindingsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="findings-test-")
        cls.logs = os.path.join(cls.tmp, "logs")
        write_hand_logs(cls.logs, CURVES)
        cls.out = os.path.join(cls.tmp, "report")
        cls.result = make_report([cls.logs], cls.out, formats=("svg",))
        cls.report = read_text(os.path.join(cls.out, "REPORT.md"))
        with open(os.path.join(cls.out, "findings.json"), encoding="utf-8") as file:
            cls.json = json.load(file)
        cls.questions = {q["question"]: q for q in cls.json["questions"]}
        cls.runs = {run.exp_id: run for run in collect_runs([cls.logs])[0]}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def test_onset_of_overfitting(self):
        onsets = {exp_id: overfitting_onset(run) for exp_id, run in self.runs.items()}
        # 1: 190 > 180 and 120 < 160 after epoch 3; 3: valid rises from epoch 1 on while train
        # falls; 6: 260 > 250 and 200 < 300 after epoch 2; 11: valid rises after epoch 2 but so
        # does train (320 > 300), then valid falls: none.
        self.assertEqual(onsets, {"1": 3, "2": None, "3": 1, "4": 3, "9": None, "5": 3, "6": 2,
                                  "11": None})
        q8 = self.questions["Q8"]
        self.assertEqual(q8["needs"], ["2", "9", "10", "6", "11", "12"])
        self.assertEqual(q8["missing"], ["10", "12"])
        (table,) = q8["tables"]
        self.assertEqual([row["exp"] for row in table["rows"]], ["2", "9", "6", "11"])
        self.assertEqual([row["overfitting_onset"] for row in table["rows"]], [None, None, 2, None])
        self.assertEqual([row["epochs"] for row in table["rows"]], [4, 4, 5, 4])
        # The gap at the last epoch: 170/140, 280/250, 300/120, 240/250.
        for row, gap in zip(table["rows"], [170 / 140, 1.12, 2.5, 0.96], strict=True):
            self.assertAlmostEqual(row["gap_at_last"], gap)
        (header, rows, _), = markdown_tables(findings_section(self.report)["Q8"])
        self.assertEqual([(row[0], row[header.index("overfitting onset")],
                           row[header.index("valid/train at last epoch")]) for row in rows],
                         [("2", "none", "1.21"), ("9", "none", "1.12"), ("6", "2", "2.50"),
                          ("11", "none", "0.96")])

    def test_times_to_a_level(self):
        # The best validation perplexity of all runs is 170 (run 2): levels 340 and 187.
        self.assertEqual(time_to_level(self.runs["9"], 340.0), (2, 12.0))  # at the level counts
        self.assertEqual(time_to_level(self.runs["9"], 339.9), (3, 18.0))
        self.assertEqual(time_to_level(self.runs["3"], 340.0), (None, None))
        detail, summary = self.questions["Q3"]["tables"]
        rows = by_exp(detail)
        self.assertEqual([row["exp"] for row in detail["rows"]], ORDER)
        expected = {  # exp: (seconds to best, (seconds, epoch) to 340, (seconds, epoch) to 187)
            "1": (72.0, (24.0, 1), (72.0, 3)), "2": (96.0, (24.0, 1), (96.0, 4)),
            "3": (12.0, (None, None), (None, None)), "4": (72.0, (None, None), (None, None)),
            "9": (24.0, (12.0, 2), (None, None)), "5": (30.0, (20.0, 2), (None, None)),
            "6": (48.0, (24.0, 2), (None, None)), "11": (72.0, (36.0, 2), (None, None))}
        for exp_id, (to_best, to_double, to_near) in expected.items():
            row = rows[exp_id]
            self.assertEqual(row["seconds_to_best"], to_best, exp_id)
            self.assertEqual((row["seconds_to_2x_best"], row["epoch_to_2x_best"]), to_double, exp_id)
            self.assertEqual((row["seconds_to_1_1x_best"], row["epoch_to_1_1x_best"]), to_near,
                             exp_id)
        # The gap at the best epoch: 180/160, 5000/9000, 240/150.
        self.assertAlmostEqual(rows["1"]["gap_at_best"], 1.125)
        self.assertAlmostEqual(rows["3"]["gap_at_best"], 5000 / 9000)
        self.assertAlmostEqual(rows["6"]["gap_at_best"], 1.6)
        self.assertEqual([(r["criterion"], r["exp"], r["seconds"], r["epoch"])
                          for r in summary["rows"]],
                         [("fastest to 2x best valid ppl", "9", 12.0, 2),
                          ("fastest to 1.1x best valid ppl", "1", 72.0, 3),
                          ("lowest valid ppl", "2", 96.0, 4)])
        for row, level in zip(summary["rows"], [340.0, 187.0, 170.0], strict=True):
            self.assertAlmostEqual(row["valid_ppl"], level)
        (header, body, caption), (_, summary_body, _) = markdown_tables(
            findings_section(self.report)["Q3"])
        cells = {row[0]: dict(zip(header, row)) for row in body}
        self.assertEqual(cells["9"]["time to 2x best (epoch)"], "12.0 s (2)")
        self.assertEqual(cells["3"]["time to 2x best (epoch)"], "never")
        self.assertEqual(cells["2"]["time to 1.1x best (epoch)"], "96.0 s (4)")
        self.assertIn("(340.0, 187.0)", caption)
        self.assertEqual(summary_body[0], ["fastest to 2x best valid ppl", "340.0", "9", "12.0 s (2)"])

    def test_optimizer_table(self):
        q4 = self.questions["Q4"]
        self.assertEqual(q4["missing"], ["7", "8"])
        (table,) = q4["tables"]
        got = [(r["exp"], r["optimizer"], r["best_valid_ppl"], r["best_epoch"], r["valid_ppl_epoch_1"],
                r["mean_improvement_per_epoch"]) for r in table["rows"]]
        self.assertEqual(got, [
            ("1", "adam", 180.0, 3, 300.0, 60.0),  # (300 - 180) / (3 - 1)
            ("2", "adamw", 170.0, 4, 320.0, 50.0),  # (320 - 170) / (4 - 1)
            ("3", "sgd", 5000.0, 1, 5000.0, None),  # best at epoch 1: no improvement to average
            ("4", "momentum", 600.0, 3, 700.0, 50.0),  # (700 - 600) / (3 - 1)
            ("5", "adam", 245.0, 3, 350.0, 52.5),  # (350 - 245) / (3 - 1)
            ("6", "adamw", 240.0, 4, 400.0, 160 / 3),  # (400 - 240) / (4 - 1)
        ])
        self.assertEqual(mean_improvement(self.runs["6"]), 160 / 3)
        (header, rows, _), = markdown_tables(findings_section(self.report)["Q4"])
        column = header.index("mean improvement per epoch")
        self.assertEqual([row[column] for row in rows], ["60.0", "50.0", "–", "50.0", "52.5", "53.3"])
        self.assertEqual(rows[0][header.index("best valid ppl (epoch)")], "180.0 (3)")

    def test_sizes_speed_and_memory(self):
        q5 = by_exp(self.questions["Q5"]["tables"][0])
        self.assertEqual(self.questions["Q5"]["missing"], [])
        self.assertEqual((q5["1"]["learnable_parameters"], q5["1"]["seconds_per_epoch"]),
                         (MIB // 2, 24.0))  # 20 s train + 4 s valid
        self.assertEqual((q5["5"]["learnable_parameters"], q5["5"]["seconds_per_epoch"]),
                         (1000, 10.0))
        self.assertEqual(seconds_per_epoch(self.runs["11"]), 18.0)
        q6 = self.questions["Q6"]
        self.assertEqual(q6["missing"], ["7", "8", "12"])
        self.assertEqual([row["exp"] for row in q6["tables"][0]["rows"]], ["5", "6", "11"])

        q7 = self.questions["Q7"]
        memory = by_exp(q7["tables"][0])
        # 4 bytes x (total + learnable x (1 + k)) / 2^20: adam 4 x (1 + 1.5) / 1 = 10 MiB,
        # sgd 4 x (1 + 1) = 8 MiB, momentum 4 x (1 + 2) = 12 MiB.
        self.assertEqual(model_state_mib(self.runs["1"]), 10.0)
        self.assertEqual([memory[e]["model_state_mb"] for e in ("1", "3", "4")], [10.0, 8.0, 12.0])
        self.assertEqual([memory[e]["optimizer_state_per_parameter"] for e in ("1", "3", "4")],
                         [2, 0, 1])
        self.assertEqual((memory["1"]["gpu_steady_mb"], memory["1"]["gpu_peak_reserved_mb"]),
                         (1015.0, 1300.0))  # median of 1000..1030, largest peak
        self.assertAlmostEqual(memory["1"]["share_of_steady"], 10 / 1015)
        self.assertEqual(memory["4"]["share_of_peak_reserved"], 12 / 4096)
        self.assertIsNone(memory["3"]["share_of_steady"])
        self.assertEqual(q7["notes"],
                         ["No GPU memory in the logs of runs 2, 3, 9, 5, 6, 11 (CPU runs)."])
        lines = findings_section(self.report)["Q7"]
        self.assertIn(q7["notes"][0], lines)
        (header, rows, caption), = markdown_tables(lines)
        cells = {row[0]: dict(zip(header, row)) for row in rows}
        self.assertEqual((cells["4"]["share of steady"], cells["4"]["share of peak reserved"]),
                         ("0.6%", "0.3%"))
        self.assertEqual(cells["3"]["GPU MiB steady"], "–")
        self.assertIn("4 bytes x (total parameters + learnable parameters (gradients) + k x "
                      "learnable parameters (optimizer state))", caption)

    def test_findings_json_equals_the_tables(self):
        sections = findings_section(self.report)
        self.assertEqual(list(sections), ["Q3", "Q4", "Q5", "Q6", "Q7", "Q8"])
        self.assertEqual(self.json["runs"], ORDER)
        compared = 0
        for question in self.json["questions"]:
            lines = sections[question["question"]]
            self.assertEqual(lines[0], f"{question['question']}. {question['title']}")
            tables = markdown_tables(lines)
            self.assertEqual(len(tables), len(question["tables"]), question["question"])
            for (header, rows, caption), table in zip(tables, question["tables"]):
                self.assertEqual(caption, f"**Table {table['number']}.** {table['caption']}")
                self.assertEqual(header, [c["header"] for c in table["columns"]])
                self.assertEqual(len(rows), len(table["rows"]))
                for row, record in zip(rows, table["rows"]):
                    for text, column in zip(row, table["columns"], strict=True):
                        where = f"{question['question']} {record.get('exp')} {column['key']}"
                        value = record[column["key"]]
                        if "note" in column:
                            text, note = split_note(text)
                            self.assertEqual(note, None if record[column["note"]] is None
                                             else str(record[column["note"]]), where)
                        if text in ("never", "none"):
                            self.assertIsNone(value, where)
                        elif isinstance(value, str):
                            self.assertEqual(text, value, where)
                        else:
                            assert_shown(self, text, value, where)
                        compared += 1
        self.assertGreater(compared, 200)

    def test_tables_are_numbered_in_order(self):
        numbers = [int(n) for n in re.findall(r"^\*\*Table (\d+)\.\*\*", self.report, re.M)]
        self.assertEqual(numbers, list(range(1, len(numbers) + 1)))
        self.assertEqual(len(numbers), 2 + sum(len(q["tables"]) for q in self.json["questions"]))

    def test_results_csv_matches_the_markdown_table(self):
        check_results_csv(self, self.out)


class MissingRunsTest(unittest.TestCase):
    def test_missing_runs_are_named_and_absent_tables_left_out(self):
        with tempfile.TemporaryDirectory() as tmp:
            write_hand_logs(tmp, ["1", "9"])
            out = os.path.join(tmp, "report")
            make_report([tmp], out, formats=("svg",))
            sections = findings_section(read_text(os.path.join(out, "REPORT.md")))
            with open(os.path.join(out, "findings.json"), encoding="utf-8") as file:
                questions = {q["question"]: q for q in json.load(file)["questions"]}
        self.assertIn("Q5 needs runs 1 and 5; missing: 5.", sections["Q5"])
        self.assertIn("Q6 needs runs 5, 6, 7, 8, 11 and 12; missing: 5, 6, 7, 8, 11, 12.",
                      sections["Q6"])
        self.assertIn("Q4 needs runs 1, 2, 3, 4, 5, 6, 7 and 8; missing: 2, 3, 4, 5, 6, 7, 8.",
                      sections["Q4"])
        self.assertEqual(questions["Q6"]["tables"], [])
        self.assertEqual(markdown_tables(sections["Q6"]), [])
        self.assertEqual([row["exp"] for row in questions["Q5"]["tables"][0]["rows"]], ["1"])
        self.assertEqual([row["exp"] for row in questions["Q8"]["tables"][0]["rows"]], ["9"])
        self.assertEqual(questions["Q3"]["missing"], [])
        # Levels 2 x 180 = 360 (9 at 12 s beats 1 at 24 s) and 1.1 x 180 = 198 (only 1 gets there).
        self.assertEqual([(r["exp"], r["seconds"]) for r in questions["Q3"]["tables"][1]["rows"]],
                         [("9", 12.0), ("1", 72.0), ("1", 72.0)])


class DropoutTest(unittest.TestCase):
    def test_dropout_is_a_column_only_when_some_run_has_it(self):
        with tempfile.TemporaryDirectory() as tmp:
            plain, dropped = os.path.join(tmp, "plain"), os.path.join(tmp, "dropped")
            write_hand_logs(plain, ["1", "5"])
            write_hand_logs(dropped, ["1", "5"], dropout={"5": 0.25})
            outputs = {}
            for logs in (plain, dropped):
                out = os.path.join(tmp, "out-" + os.path.basename(logs))
                make_report([logs], out, formats=("svg",))
                outputs[os.path.basename(logs)] = out
            for table in ("results.md", "memory_speed.md"):
                header, _ = markdown_rows(os.path.join(outputs["plain"], "tables", table))
                self.assertNotIn("dropout", header)
                header, rows = markdown_rows(os.path.join(outputs["dropped"], "tables", table))
                self.assertEqual(header[:5], ["exp", "arch.", "layers", "optimizer", "dropout"])
                self.assertEqual([row[4] for row in rows], ["0", "0.25"])
                latex = read_text(os.path.join(outputs["dropped"], "tables",
                                               table.replace(".md", ".tex")))
                columns = re.search(r"\\begin\{tabular\}\{([lr]+)\}", latex).group(1)
                self.assertEqual(columns[:5], "llrlr")
                body = latex[latex.index("\\midrule"):latex.index("\\bottomrule")].splitlines()[1:]
                self.assertEqual([len(latex_cells(line)) for line in body], [len(columns)] * 2)
            for name in ("plain", "dropped"):
                check_results_csv(self, outputs[name])
            report = read_text(os.path.join(outputs["dropped"], "REPORT.md"))
            (header, rows, _), = markdown_tables(findings_section(report)["Q5"])
            self.assertEqual(header[4], "dropout")
            self.assertEqual(rows[1][4], "0.25")
            self.assertIn("dropout: the dropout probability", report)
            self.assertNotIn("dropout", read_text(os.path.join(outputs["plain"], "REPORT.md")))
            figure = read_text(os.path.join(outputs["dropped"], "figures", "exp_5.svg"))
            self.assertIn("5: GPT-1, 1 layer, Adam, dropout 0.25", figure)
            runs = {run.exp_id: run for run in collect_runs([dropped])[0]}
        # Not the preset any more, so not comparable with its published run.
        self.assertEqual((runs["1"].preset_changes(), runs["5"].preset_changes()), ([], ["dropout"]))


if __name__ == "__main__":
    unittest.main()
