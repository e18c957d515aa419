"""From run logs to a report: learning curves, the results table, memory and speed.

    python -m utils.report [LOG_DIR ...] [--out report] [--format png,pdf] [--reference]

reads every `LOG_DIR/EXP_ID/log.json` (default LOG_DIR: `logs`) and writes REPORT.md, the
figures, the tables (Markdown, LaTeX, CSV) and findings.json into `--out` (each file:
docs/FORMATS.md). A log that cannot be read, a run still going, a run with fewer epochs or a
missing field each give one `warning: ...` line and the report still comes out; no log folder or
no log at all is one error line and exit code 2. The same logs give the same bytes.
"""
import argparse
import functools
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Optional

from utils.cli import OneLineParser, fail
from utils.config import EXPERIMENTS, MODELS, NO_EMBEDDINGS, OPTIMIZERS
from utils.data_utils import EPOCH_FIELDS, read_logs
from utils.files import json_text
from utils.report.figures import FORMATS, experiment_colours, plot_runs
from utils.report.findings import answer_questions, findings_json, findings_markdown
from utils.report.published import published_runs, reference_best, reference_curves
from utils.report.tables import (ARCHITECTURE_NAMES, REFERENCE_FIELDS, RESULT_FIELDS,
                                 memory_speed_table, published_table, result_records,
                                 results_table, tables_document, to_csv, to_latex, to_markdown)

PROG = "python -m utils.report"
OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "momentum": "momentum"}

# The course's questions: (file name, title, experiment ids).
COMPARISONS = (
    ("optimizers_lstm", "Optimizers, LSTM (1 layer)", ("1", "2", "3", "4")),
    ("optimizers_gpt1", "Optimizers, GPT-1 (1 layer)", ("5", "6", "7", "8")),
    ("depth_lstm", "Depth, LSTM with AdamW (1, 2, 4 layers)", ("2", "9", "10")),
    ("depth_gpt1", "Depth, GPT-1 with AdamW (1, 2, 4 layers)", ("6", "11", "12")),
    ("lstm_vs_gpt1", "LSTM vs GPT-1 (1 layer, Adam)", ("1", "5")),
)


# Fields that make a run comparable with the published one (paths and epochs aside).
COMPARABLE_FIELDS = ("batch_size", "lr", "momentum", "weight_decay", "embedding_size",
                     "hidden_size", "num_heads", "sequence_length", "scheduler", "clip_grad_norm",
                     "limit_batches", "max_steps")
MEASURED_FIELDS = tuple(name for name in EPOCH_FIELDS if name != "epoch")


class ReportError(ValueError):
    """Nothing to report on (no folder, no readable log); `warnings` holds the problems met."""

    def __init__(self, message, warnings=()):
        super().__init__(message)
        self.warnings = list(warnings)


def number(value):
    """`value` as a float if it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class LoggedRun:
    """One run's log, reduced to what the figures and tables show. Epochs are numbered from 1."""

    label: str  # the exp id, made unique when two logs share one
    exp_id: str
    path: str
    status: str
    model: Optional[str]
    layers: Optional[int]
    optimizer: Optional[str]
    planned_epochs: Optional[int]
    epochs: list  # the log's epoch entries, sorted
    log: dict = field(repr=False)

    @property
    def architecture(self):
        return ARCHITECTURE_NAMES.get(self.model, self.model)

    @property
    def dropout(self):
        """The config's dropout probability; 0 for logs written before the field existed."""
        return number(self.log["config"].get("dropout")) or 0.0

    @property
    def description(self):
        """"LSTM, 1 layer, Adam" (what is known of it), with ", dropout 0.2" when it has some."""
        parts = [self.architecture or "unknown model"]
        if self.layers is not None:
            parts.append(f"{self.layers} layer" + ("s" if self.layers != 1 else ""))
        if self.optimizer is not None:
            parts.append(OPTIMIZER_NAMES.get(self.optimizer, self.optimizer))
        if self.dropout:
            parts.append(f"dropout {self.dropout:g}")
        return ", ".join(parts)

    def curve(self, x_field, y_field):
        """(xs, ys) over the epochs where both fields are finite numbers."""
        points = [(number(e.get(x_field)), number(e.get(y_field))) for e in self.epochs]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        return [x for x, _ in points], [y for _, y in points]

    @property
    def best(self):
        """The epoch entry with the lowest validation perplexity, or None."""
        scored = [e for e in self.epochs if number(e.get("valid_ppl")) is not None]
        return min(scored, key=lambda e: (e["valid_ppl"], e["epoch"])) if scored else None

    @functools.cached_property
    def metrics(self):
        """The figures of the tables, None where the log does not have them."""
        def section(name):
            return self.log.get(name) if isinstance(self.log.get(name), dict) else {}

        best = self.best or {}
        test, parameters, environment = section("test"), section("parameters"), section("environment")

        def values(name, key=None):
            found = []
            for entry in self.epochs:
                value = entry.get(name)
                if key is not None:
                    value = value.get(key) if isinstance(value, dict) else None
                if number(value) is not None:
                    found.append(number(value))
            return found

        def median(found):
            return statistics.median(found) if found else None

        train_seconds = values("train_seconds")
        return {
            "train_ppl_at_best": number(best.get("train_ppl")),
            "best_valid_ppl": number(best.get("valid_ppl")),
            "best_epoch": best.get("epoch"),
            "test_ppl": number(test.get("ppl")),
            "seconds_per_epoch": statistics.fmean(train_seconds) if train_seconds else None,
            "time_to_best": number(best.get("cumulative_seconds")),
            "learnable_parameters": number(parameters.get("learnable")),
            "total_parameters": number(parameters.get("total")),
            "gpu_steady_mb": median(values("gpu_memory_mb", "steady")),
            "gpu_peak_allocated_mb": max(values("gpu_memory_mb", "peak_allocated"), default=None),
            "gpu_peak_reserved_mb": max(values("gpu_memory_mb", "peak_reserved"), default=None),
            "cpu_rss_mb": max(values("cpu_rss_mb"), default=None),
            "train_tokens_per_second": median(values("train_tokens_per_second")),
            "valid_tokens_per_second": median(values("valid_tokens_per_second")),
            "device_name": environment.get("device_name") or environment.get("device"),
        }

    def reference(self):
        """The published run of the same preset (same model, layers, optimizer), or None."""
        curves = reference_curves(self.exp_id)
        if curves is None or (curves["model"], curves["layers"], curves["optimizer"]) != (
                self.model, self.layers, self.optimizer):
            return None
        return curves

    def reference_best(self):
        return reference_best(self.exp_id) if self.reference() is not None else None

    def preset_changes(self):
        """Config fields that change the numbers and differ from the preset (an empty list if none)."""
        preset = EXPERIMENTS.get(self.exp_id)
        if preset is None:
            return []
        config, expected = self.log["config"], preset.to_dict()
        changed = [name for name in COMPARABLE_FIELDS if config.get(name) != expected[name]]
        if (config.get("embeddings") == NO_EMBEDDINGS) != preset.learn_embeddings:
            changed.append("embeddings")
        if self.dropout != preset.dropout:
            changed.append("dropout")
        return changed


def sort_key(run):
    """Architecture (in MODELS order), then layers, then optimizer (in OPTIMIZERS order), then id."""
    def rank(value, order):
        return order.index(value) if value in order else len(order)

    exp_id = run.exp_id
    return (rank(run.model, MODELS), run.model or "", math.inf if run.layers is None else run.layers,
            rank(run.optimizer, OPTIMIZERS), run.optimizer or "",
            (0, int(exp_id), "") if exp_id.isdecimal() else (1, 0, exp_id), run.label)


def make_run(log, label):
    config = log["config"]

    def text(key):
        return config.get(key) if isinstance(config.get(key), str) else None

    def whole(key):
        value = config.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return LoggedRun(label=label, exp_id=log["exp_id"], path=log.get("path", "?"),
               status=str(log.get("status")), model=text("model"), layers=whole("layers"),
               optimizer=text("optimizer"), planned_epochs=whole("epochs"), epochs=log["epochs"],
               log=log)


def check_run(run):
    """One line per problem of a readable log that the report works around."""
    name = f"exp {run.label} ({run.path})"
    problems = []
    done, planned = len(run.epochs), run.planned_epochs
    of_planned = f"{done} of {planned}" if planned is not None else f"{done}"
    if run.status == "running":
        problems.append(f"{name}: still running, {of_planned} epochs so far; shown as it stands")
    elif run.status != "finished":
        message = run.log.get("message")
        problems.append(f"{name}: status '{run.status}'" + (f" ({message})" if message else "")
                        + f" after {of_planned} epochs")
    elif planned is not None and done < planned:
        problems.append(f"{name}: only {done} of {planned} epochs")
    for key in ("model", "layers", "optimizer"):
        if getattr(run, key) is None:
            problems.append(f"{name}: the config has no valid '{key}'")
    for field_name in MEASURED_FIELDS:
        lacking = [str(e["epoch"]) for e in run.epochs if number(e.get(field_name)) is None]
        if lacking:
            problems.append(f"{name}: '{field_name}' missing or not a number in epoch(s) "
                            + ", ".join(lacking))
    if run.status == "finished" and not isinstance(run.log.get("test"), dict):
        problems.append(f"{name}: finished but has no test result")
    if not isinstance(run.log.get("parameters"), dict):
        problems.append(f"{name}: no parameter count")
    return problems


def collect_runs(log_dirs):
    """Read the logs under `log_dirs`; returns `(runs sorted for the table, warnings)`.

    Raises ReportError when a folder does not exist or no log can be read.
    """
    for log_dir in log_dirs:
        if not os.path.isdir(log_dir):
            raise ReportError(f"log folder '{log_dir}' does not exist (run run_exp.py first, "
                              "or name the folder its --log_dir wrote to)")
    logs, problems = read_logs(log_dirs)
    warnings = [f"{problem}; skipped" for problem in problems]
    if not logs:
        raise ReportError("no readable log.json under " + ", ".join(f"'{d}'" for d in log_dirs),
                          warnings)
    runs, seen = [], {}
    for log in logs:
        seen[log["exp_id"]] = seen.get(log["exp_id"], 0) + 1
        label = log["exp_id"] + ("" if seen[log["exp_id"]] == 1 else f"#{seen[log['exp_id']]}")
        if label != log["exp_id"]:
            warnings.append(f"exp {log['exp_id']} has more than one log; {log['path']} is shown "
                            f"as '{label}'")
        runs.append(make_run(log, label))
    for run in runs:
        warnings.extend(check_run(run))
    return sorted(runs, key=sort_key), [" ".join(w.split()) for w in warnings]


def figure_caption(index, what, reference):
    text = (f"**Figure {index}.** {what} Training (solid) and validation (dashed) perplexity on a "
            "log scale, against epochs (left) and against wall-clock time since the start of "
            "training, validation included (right); ★ marks each run's best validation epoch.")
    if reference:
        text += (" Thin grey lines: the published 2021 run of the same experiment (reference A; "
                 "its perplexity divides by the padded token count).")
    return text


def check_formats(formats):
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"figure format(s) {', '.join(map(repr, unknown)) or '(none)'} not "
                         f"supported: choose from {', '.join(FORMATS)}")
    return formats


def file_stems(runs):
    """{label: "exp_LABEL"} with characters unsafe in file names replaced, made unique."""
    stems, used = {}, set()
    for run in runs:
        stem = "exp_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in run.label)
        while stem in used:
            stem += "_"
        used.add(stem)
        stems[run.label] = stem
    return stems


class _Figures:
    """Draws figures into `out/figures`, numbering their captions for REPORT.md."""

    def __init__(self, out, formats, runs, reference):
        self.out, self.formats, self.reference = out, formats, reference
        self.colours = experiment_colours([run.label for run in runs])
        self.files, self.count = [], 0

    def draw(self, stem, title, runs, what):
        """Draw `runs`; returns the Markdown that shows the figure with its caption."""
        paths = plot_runs(runs, os.path.join(self.out, "figures", stem), self.formats, title,
                          self.colours, reference=self.reference)
        self.files.extend(paths)
        self.count += 1
        path = os.path.relpath(paths[0], self.out)
        name = os.path.basename(path)
        link = f"![{name}]({path})" if path.endswith((".png", ".svg")) else f"[{name}]({path})"
        return f"{link}\n\n{figure_caption(self.count, what, self.reference)}\n"


def make_report(log_dirs, out, formats=("png", "pdf"), reference=False):
    """Write the report of the logs under `log_dirs` into folder `out`.

    Returns {"files": paths written, "warnings": lines, "runs": labels in table order,
    "skipped": comparison figures left out because none of their runs is present}.
    Raises ReportError (no log folder, no readable log) and ValueError (unknown format).
    """
    formats = check_formats(formats)
    log_dirs = [os.fspath(d) for d in log_dirs]
    runs, warnings = collect_runs(log_dirs)
    for folder in ("figures", "tables"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    figures = _Figures(out, formats, runs, reference)

    comparisons, skipped = [], []
    for stem, title, ids in COMPARISONS:
        chosen = [run for exp_id in ids for run in runs if run.exp_id == exp_id]
        if not chosen:
            skipped.append(stem)
            comparisons.append(f"*{title}* (experiments {', '.join(ids)}): skipped, none of these "
                               "runs is in the logs.\n")
            continue
        what = f"{title}, experiments {', '.join(ids)}."
        absent = [exp_id for exp_id in ids if exp_id not in {run.exp_id for run in chosen}]
        if absent:
            what += f" Not in the logs: {', '.join(absent)}."
        comparisons.append(figures.draw(stem, title, chosen, what))
    comparisons.append(figures.draw("all_runs", "All runs", runs, "All runs."))
    stems = file_stems(runs)
    per_run = []
    for run in runs:
        title = f"Experiment {run.label}: {run.description}"
        per_run.append(figures.draw(stems[run.label], title, [run], f"{title} (status "
                                    f"{run.status}, {len(run.epochs)} epoch(s) logged)."))

    tables = {"results": results_table(runs, reference), "memory_speed": memory_speed_table(runs)}
    findings = answer_questions(runs, first_table=len(tables) + 1)
    texts = {}
    for stem, table in tables.items():
        texts[f"tables/{stem}.md"] = to_markdown(table)
        texts[f"tables/{stem}.tex"] = to_latex(table, "tab:" + stem.replace("_", "-"))
    texts["tables/tables.tex"] = tables_document([f"{stem}.tex" for stem in tables])
    texts["tables/results.csv"] = to_csv(result_records(runs, reference),
                                         RESULT_FIELDS + (REFERENCE_FIELDS if reference else ()))
    texts["findings.json"] = json_text(findings_json(findings, runs))
    texts["REPORT.md"] = report_markdown(log_dirs, runs, warnings, tables, findings, comparisons,
                                         per_run, reference)
    for name, text in texts.items():
        write_text(os.path.join(out, name), text)
    files = figures.files + [os.path.join(out, name) for name in texts]
    return {"files": files, "warnings": warnings, "runs": [run.label for run in runs],
            "skipped": skipped}


def report_markdown(log_dirs, runs, warnings, tables, findings, comparisons, per_run, reference):
    """REPORT.md: summary, problems, results, comparisons, memory and speed, findings, (published),
    runs."""
    devices = sorted({str(run.metrics["device_name"]) for run in runs if run.metrics["device_name"]})
    sections = ["# Wikitext-2 language models: report\n",
                f"{len(runs)} run(s) from {', '.join(f'`{d}`' for d in log_dirs)}: "
                f"{', '.join(run.label for run in runs)}. Device(s): {', '.join(devices) or '–'}.\n"]
    if warnings:
        sections.append("Problems met while reading the logs (the report works around them):\n\n"
                        + "".join(f"- {w}\n" for w in warnings))
    sections += ["## Results\n", to_markdown(tables["results"]),
                 "LaTeX: `tables/results.tex` (needs `\\usepackage{booktabs}`; `tables/tables.tex` "
                 "compiles on its own).\n",
                 "## Learning curves: the course's comparisons\n", *comparisons,
                 "## Memory and speed\n", to_markdown(tables["memory_speed"]),
                 "## Findings: the course's questions\n", *findings_markdown(findings)]
    if reference:
        published = published_runs()
        sections += ["## Published 2021 results\n", published["note"] + "\n"]
        changed = [f"{run.label} ({', '.join(run.preset_changes())})" for run in runs
                   if run.reference() is not None and run.preset_changes()]
        if changed:
            sections.append("Not the published setting, so not directly comparable: "
                            + "; ".join(changed) + ".\n")
        for key, name in (("reference_a", "A"), ("reference_b", "B")):
            sections.append(f"Reference {name}: {published[key]['source']}\n")
        sections.append(to_markdown(published_table(
            number=len(tables) + 1 + sum(len(finding.tables) for finding in findings))))
    sections += ["## Learning curves of each run\n", *per_run]
    return "\n".join(sections)


def write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="\n") as file:
        file.write(text)


def parse_formats(text):
    try:
        return check_formats(part.strip().lower() for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv=None):
    parser = OneLineParser(
        prog=PROG,
        description="Turn run logs (LOG_DIR/EXP_ID/log.json) into figures, tables and REPORT.md.")
    # The formatter adds "(default: ...)" to flags only, so the positional says its own.
    parser.add_argument("log_dirs", nargs="*", default=["logs"], metavar="LOG_DIR",
                        help="folders holding the runs' logs (default: logs)")
    parser.add_argument("--out", default="report", help="output folder")
    # argparse passes a string default through `type` too, and --help shows it as one would type it.
    parser.add_argument("--format", default="png,pdf", type=parse_formats,
                        help=f"figure formats, comma-separated, from {', '.join(FORMATS)}")
    parser.add_argument("--reference", action="store_true",
                        help="put the published 2021 results beside yours")
    args = parser.parse_args(argv)
    try:
        result = make_report(args.log_dirs, args.out, args.format, args.reference)
    except ReportError as error:
        for warning in error.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return fail(PROG, error, 2)
    except OSError as error:
        return fail(PROG, f"cannot write the report to '{args.out}': {error}", 2)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {len(result['files'])} files ({len(result['runs'])} runs):")
    for path in result["files"]:
        print(f"  {path}")
    return 0

