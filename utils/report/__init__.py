"""The report of a set of runs: `python -m utils.report [LOG_DIR ...] --out report [--reference]`.

- `build`: logs -> `LoggedRun`s -> REPORT.md, figures and tables (`make_report`), and the command line.
- `figures`, `tables`: how a figure is drawn and a table rendered (Markdown and LaTeX); results.csv.
- `findings`: the course's questions 3-8 answered with numbers (REPORT.md's findings, findings.json).
- `published`: the published 2021 runs, read from `published_runs.json`.
"""
from utils.report.build import COMPARISONS, LoggedRun, ReportError, collect_runs, main, make_report
from utils.report.figures import FORMATS
from utils.report.published import published_runs, reference_best, reference_curves

__all__ = ["COMPARISONS", "FORMATS", "LoggedRun", "ReportError", "collect_runs", "main", "make_report",
           "published_runs", "reference_best", "reference_curves"]
