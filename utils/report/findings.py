"""The course's questions 3-8 answered with numbers from the logs: a small table or two each.

Each question is a pure function of the report's `LoggedRun`s that returns a `Finding`: the runs it
needs, those missing from the logs, and tables whose rows are records of plain values (what
`findings.json` holds) shown through `tables.Column`s (what REPORT.md shows). A question shows the
rows of its runs that are present and names the missing ones. How each figure is defined (gap,
time to a level, mean improvement, seconds per epoch, onset of overfitting, model state) is in
docs/FORMATS.md and in the function that computes it.
"""
import itertools
import statistics
from dataclasses import dataclass, field

from utils.report.tables import (Column, Table, duration, fixed, identity_columns, identity_record,
                                 integer, percent, ppl, render_rows, shows_dropout, to_markdown,
                                 whole)

FINDINGS_FORMAT = "wikitext2-lm-findings/1"
# fp32 values the optimizer keeps per learnable parameter: Adam's two moments, SGD's velocity.
OPTIMIZER_STATE = {"adam": 2, "adamw": 2, "momentum": 1, "sgd": 0}
BYTES_PER_VALUE = 4
LEVELS = (2.0, 1.1)  # Q3: multiples of the best validation perplexity of all runs
MIB = 2 ** 20


@dataclass
class FindingTable:
    """One table of a finding: `rows` are dicts of plain values under the `columns`' keys."""

    number: int
    caption: str  # one sentence: what was computed
    columns: list  # tables.Column
    rows: list

    def table(self):
        return Table(self.number, [c.header for c in self.columns],
                     "".join(c.align for c in self.columns), render_rows(self.columns, self.rows),
                     self.caption)

    def to_json(self):
        columns = []
        for column in self.columns:
            entry = {"key": column.key, "header": column.header.replace("\n", " ")}
            if column.note is not None:
                entry["note"] = column.note
            columns.append(entry)
        return {"number": self.number, "caption": self.caption, "columns": columns,
                "rows": self.rows}


@dataclass
class Finding:
    """The answer to one question: its tables over the runs present, and what is missing."""

    question: str  # "Q3"
    title: str
    needs: tuple  # the exp ids it compares; () for every run of the report
    missing: list  # ids of `needs` not in the logs
    notes: list = field(default_factory=list)  # one line each, e.g. runs without GPU memory
    tables: list = field(default_factory=list)

    @property
    def missing_line(self):
        if not self.missing:
            return None
        return (f"{self.question} needs runs {and_list(self.needs)}; missing: "
                f"{', '.join(self.missing)}.")

    def to_json(self):
        return {"question": self.question, "title": self.title, "needs": list(self.needs),
                "missing": self.missing, "notes": self.notes,
                "tables": [table.to_json() for table in self.tables]}


def and_list(items):
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def per_epoch(run, name):
    """{epoch: value} over the epochs where `name` is a finite number."""
    epochs, values = run.curve("epoch", name)
    return {int(epoch): value for epoch, value in zip(epochs, values)}


def ratio(numerator, denominator):
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def gap_at(run, epoch):
    """valid_ppl / train_ppl of `epoch`, or None."""
    if epoch is None:
        return None
    return ratio(per_epoch(run, "valid_ppl").get(epoch), per_epoch(run, "train_ppl").get(epoch))


def time_to_level(run, level):
    """(epoch, seconds): the first epoch whose valid_ppl <= `level` and its cumulative_seconds.

    (None, None) when no epoch reaches it; seconds is None when that epoch has no time.
    """
    for epoch, value in sorted(per_epoch(run, "valid_ppl").items()):
        if value <= level:
            return epoch, per_epoch(run, "cumulative_seconds").get(epoch)
    return None, None


def mean_improvement(run):
    """(valid_ppl of epoch 1 - best valid_ppl) / (best epoch - 1), or None (best at epoch 1)."""
    m = run.metrics
    first = per_epoch(run, "valid_ppl").get(1)
    if first is None or m["best_epoch"] is None or m["best_epoch"] <= 1:
        return None
    return (first - m["best_valid_ppl"]) / (m["best_epoch"] - 1)


def seconds_per_epoch(run):
    """The mean of train_seconds + valid_seconds over the epochs that have both, or None."""
    train, valid = per_epoch(run, "train_seconds"), per_epoch(run, "valid_seconds")
    both = [train[epoch] + valid[epoch] for epoch in train if epoch in valid]
    return statistics.fmean(both) if both else None


def overfitting_onset(run):
    """The first epoch e with valid_ppl[e+1] > valid_ppl[e] and train_ppl[e+1] < train_ppl[e]."""
    train, valid = per_epoch(run, "train_ppl"), per_epoch(run, "valid_ppl")
    for epoch in sorted(valid):
        following = epoch + 1
        if (following in valid and epoch in train and following in train
                and valid[following] > valid[epoch] and train[following] < train[epoch]):
            return epoch
    return None


def model_state_mib(run):
    """MiB of parameters, gradients and optimizer state in fp32 (see the module docstring)."""
    m = run.metrics
    state = OPTIMIZER_STATE.get(run.optimizer)
    if m["total_parameters"] is None or m["learnable_parameters"] is None or state is None:
        return None
    values = m["total_parameters"] + (1 + state) * m["learnable_parameters"]
    return BYTES_PER_VALUE * values / MIB


BEST = Column("best_valid_ppl", "best valid\nppl (epoch)", ppl, note="best_epoch")
TRAINING_COLUMNS = (
    BEST,
    Column("valid_ppl_epoch_1", "valid ppl\nepoch 1", ppl),
    Column("mean_improvement_per_epoch", "mean improvement\nper epoch", fixed),
)
SIZE_COLUMNS = (
    Column("learnable_parameters", "learnable\nparameters", integer),
    Column("seconds_per_epoch", "s/epoch\ntrain + valid", fixed),
)
TRAINING_FIGURES = (
    "the best validation perplexity (its epoch)", "the validation perplexity after epoch 1",
    "the mean improvement per epoch = (valid ppl of epoch 1 - best valid ppl) / (best epoch - 1) in "
    "perplexity points per epoch (– when the best is epoch 1)")


def training_record(run):
    m = run.metrics
    return {"best_valid_ppl": m["best_valid_ppl"], "best_epoch": m["best_epoch"],
            "valid_ppl_epoch_1": per_epoch(run, "valid_ppl").get(1),
            "mean_improvement_per_epoch": mean_improvement(run)}


def size_record(run):
    return {"learnable_parameters": whole(run.metrics["learnable_parameters"]),
            "seconds_per_epoch": seconds_per_epoch(run)}


def _chosen(runs, ids):
    """The runs whose exp id is in `ids` (in the runs' order) and the ids not found."""
    chosen = [run for run in runs if run.exp_id in ids]
    present = {run.exp_id for run in chosen}
    return chosen, [exp_id for exp_id in ids if exp_id not in present]


def _comparison(question, title, ids, runs, numbers, dropout, columns, record, sentence):
    chosen, missing = _chosen(runs, ids)
    finding = Finding(question, title, ids, missing)
    if chosen:
        rows = [dict(identity_record(run), **record(run)) for run in chosen]
        finding.tables.append(FindingTable(next(numbers), sentence,
                                           identity_columns(dropout) + list(columns), rows))
    return finding


def wall_clock(runs, numbers, dropout):
    """Q3: time to the best and to given levels per run; the fastest to each; the best run."""
    finding = Finding("Q3", "Wall-clock time and generalisation", (), [])
    bests = [run.metrics["best_valid_ppl"] for run in runs if run.metrics["best_valid_ppl"] is not None]
    if not bests:
        finding.notes.append("Q3 needs a run with a validation perplexity; none has one.")
        return finding
    best = min(bests)
    levels = [(factor, factor * best) for factor in LEVELS]
    keys = [f"{factor:g}x".replace(".", "_") for factor, _ in levels]
    rows = []
    for run in runs:
        m = run.metrics
        row = dict(identity_record(run), best_valid_ppl=m["best_valid_ppl"],
                   best_epoch=m["best_epoch"], seconds_to_best=m["time_to_best"])
        for key, (_, level) in zip(keys, levels):
            epoch, time = time_to_level(run, level)
            row[f"seconds_to_{key}_best"], row[f"epoch_to_{key}_best"] = time, epoch
        row["gap_at_best"] = gap_at(run, m["best_epoch"])
        rows.append(row)
    columns = identity_columns(dropout) + [BEST, Column("seconds_to_best", "time to\nbest", duration)]
    columns += [Column(f"seconds_to_{key}_best", f"time to {factor:g}x\nbest (epoch)", duration,
                       note=f"epoch_to_{key}_best", missing="never")
                for key, (factor, _) in zip(keys, levels)]
    columns.append(Column("gap_at_best", "valid/train\nat best", lambda value: f"{value:.2f}"))
    finding.tables.append(FindingTable(
        next(numbers),
        f"Per run: wall-clock time (cumulative_seconds, validation included) to its best "
        f"validation perplexity and to the first epoch at or below "
        f"{' and '.join(f'{factor:g}x' for factor in LEVELS)} the best validation perplexity of "
        f"all runs ({', '.join(ppl(level) for _, level in levels)}), and the gap valid ppl / "
        f"train ppl at its best epoch.", columns, rows))

    summary = []
    for key, (factor, level) in zip(keys, levels):
        reached = [row for row in rows if row[f"seconds_to_{key}_best"] is not None]
        fastest = min(reached, key=lambda row: row[f"seconds_to_{key}_best"], default={})
        summary.append({"criterion": f"fastest to {factor:g}x best valid ppl", "valid_ppl": level,
                        "exp": fastest.get("exp"), "seconds": fastest.get(f"seconds_to_{key}_best"),
                        "epoch": fastest.get(f"epoch_to_{key}_best")})
    winner = min((row for row in rows if row["best_valid_ppl"] is not None),
                 key=lambda row: row["best_valid_ppl"])
    summary.append({"criterion": "lowest valid ppl", "valid_ppl": winner["best_valid_ppl"],
                    "exp": winner["exp"], "seconds": winner["seconds_to_best"],
                    "epoch": winner["best_epoch"]})
    finding.tables.append(FindingTable(
        next(numbers),
        "The run that first reaches each level in wall-clock time (ties: the earlier row above), "
        "and the run with the lowest validation perplexity, with its time and epoch.",
        [Column("criterion", "criterion", align="l"), Column("valid_ppl", "valid ppl", ppl),
         Column("exp", "exp", align="l"), Column("seconds", "time (epoch)", duration, note="epoch")],
        summary))
    return finding


def optimizers(runs, numbers, dropout):
    """Q4: the four optimizers, LSTM (1-4) and GPT-1 (5-8)."""
    return _comparison("Q4", "Optimizers", ("1", "2", "3", "4", "5", "6", "7", "8"), runs, numbers,
                       dropout, TRAINING_COLUMNS, training_record,
                       "Runs 1-4 (LSTM) and 5-8 (GPT-1), one optimizer each: "
                       + and_list(TRAINING_FIGURES) + ".")


def sized(run):
    return dict(training_record(run), **size_record(run))


SIZE_SENTENCE = "Per run: " + and_list(TRAINING_FIGURES + (
    "the learnable parameters", "the seconds per epoch = the mean over epochs of train_seconds + "
    "valid_seconds")) + "."


def lstm_vs_gpt(runs, numbers, dropout):
    """Q5: the LSTM (1) against GPT-1 (5), both 1 layer with Adam."""
    return _comparison("Q5", "LSTM vs GPT-1", ("1", "5"), runs, numbers, dropout,
                       TRAINING_COLUMNS + SIZE_COLUMNS, sized, SIZE_SENTENCE)


def transformers(runs, numbers, dropout):
    """Q6: the GPT-1 runs: optimizers (5-8) and depth (6, 11, 12)."""
    return _comparison("Q6", "GPT-1 runs", ("5", "6", "7", "8", "11", "12"), runs, numbers,
                       dropout, TRAINING_COLUMNS + SIZE_COLUMNS, sized, SIZE_SENTENCE)


def memory(runs, numbers, dropout):
    """Q7: GPU memory per run and the share of it that the model state accounts for."""
    finding = Finding("Q7", "GPU memory", (), [])
    rows = []
    for run in runs:
        m = run.metrics
        state = model_state_mib(run)
        rows.append(dict(identity_record(run), gpu_steady_mb=m["gpu_steady_mb"],
                         gpu_peak_reserved_mb=m["gpu_peak_reserved_mb"],
                         optimizer_state_per_parameter=OPTIMIZER_STATE.get(run.optimizer),
                         model_state_mb=state,
                         share_of_steady=ratio(state, m["gpu_steady_mb"]),
                         share_of_peak_reserved=ratio(state, m["gpu_peak_reserved_mb"])))
    without = [row["exp"] for row in rows
               if row["gpu_steady_mb"] is None and row["gpu_peak_reserved_mb"] is None]
    if without:
        finding.notes.append(f"No GPU memory in the logs of runs {', '.join(without)} (CPU runs).")

    def mib(value):
        return fixed(value, 0)

    columns = identity_columns(dropout) + [
        Column("gpu_steady_mb", "GPU MiB\nsteady", mib),
        Column("gpu_peak_reserved_mb", "GPU MiB\npeak reserved", mib),
        Column("optimizer_state_per_parameter", "k", str),
        Column("model_state_mb", "model state\nMiB", fixed),
        Column("share_of_steady", "share of\nsteady", percent),
        Column("share_of_peak_reserved", "share of\npeak reserved", percent)]
    finding.tables.append(FindingTable(
        next(numbers),
        "Per run: GPU memory (median steady and peak reserved over the epochs, MiB) and the model "
        "state = 4 bytes x (total parameters + learnable parameters (gradients) + k x learnable "
        "parameters (optimizer state)) / 2^20 MiB, k = 2 for adam and adamw, 1 for momentum, 0 for "
        "sgd, as a share of each.", columns, rows))
    return finding


def overfitting(runs, numbers, dropout):
    """Q8: onset of overfitting and the final gap by capacity, LSTM (2, 9, 10), GPT-1 (6, 11, 12)."""
    def record(run):
        last = max(per_epoch(run, "valid_ppl"), default=None)
        return {"learnable_parameters": whole(run.metrics["learnable_parameters"]),
                "epochs": len(run.epochs), "overfitting_onset": overfitting_onset(run),
                "gap_at_last": gap_at(run, last)}

    columns = (Column("learnable_parameters", "learnable\nparameters", integer),
               Column("epochs", "epochs"),
               Column("overfitting_onset", "overfitting\nonset", missing="none"),
               Column("gap_at_last", "valid/train\nat last epoch", lambda value: f"{value:.2f}"))
    return _comparison(
        "Q8", "Overfitting by capacity", ("2", "9", "10", "6", "11", "12"), runs, numbers, dropout,
        columns, record,
        "Per run: the onset of overfitting, the first epoch e after which validation perplexity "
        "rises while training perplexity falls (valid_ppl[e+1] > valid_ppl[e] and "
        "train_ppl[e+1] < train_ppl[e]; none if never), and the gap valid ppl / train ppl at the "
        "last epoch.")


QUESTIONS = (wall_clock, optimizers, lstm_vs_gpt, transformers, memory, overfitting)


def answer_questions(runs, first_table=1):
    """The findings of Q3-Q8 over `runs` (in the report's order), tables numbered from `first_table`."""
    # One counter through all questions: tables are numbered in the order they appear.
    numbers, dropout = itertools.count(first_table), shows_dropout(runs)
    return [question(runs, numbers, dropout) for question in QUESTIONS]


def findings_markdown(findings):
    """REPORT.md's findings: a section per question, its missing runs, notes and tables."""
    parts = []
    for finding in findings:
        parts.append(f"### {finding.question}. {finding.title}\n")
        lines = ([finding.missing_line] if finding.missing_line else []) + finding.notes
        if lines:
            parts.append("\n".join(lines) + "\n")
        parts += [to_markdown(table.table()) for table in finding.tables]
    return parts


def findings_json(findings, runs):
    """findings.json's content: the same numbers as the tables, as plain values."""
    return {"format": FINDINGS_FORMAT, "runs": [run.label for run in runs],
            "questions": [finding.to_json() for finding in findings]}
