"""The report's figures: perplexity against epochs and against wall-clock time, one colour per run.

Figures are built on `matplotlib.figure.Figure` (the Agg canvas, no pyplot state), and saved with
their dates and version strings left out, so the same logs give the same bytes.
"""
import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter, MaxNLocator

FORMATS = ("png", "pdf", "svg")
# No timestamps or tool versions in the files: same data, same bytes.
SAVE_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None},
                 "svg": {"Date": None, "Creator": None}}
RC = {"svg.hashsalt": "wikitext2-report", "svg.fonttype": "none", "pdf.fonttype": 42,
      "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}
DPI = 150
REFERENCE_STYLE = {"color": "0.55", "linewidth": 0.8}

# Presets 1..12 keep their colour in every figure; custom runs take the rest in order.
PRESET_PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                  "tab:pink", "black", "tab:olive", "tab:cyan", "navy", "goldenrod")
EXTRA_PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#a6761d", "#e6194b",
                 "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


def experiment_colours(labels):
    """{label: colour}: preset ids "1".."12" a fixed colour, other labels the next free ones."""
    colours, extra = {}, 0
    for label in labels:
        if label.isdecimal() and 1 <= int(label) <= len(PRESET_PALETTE):
            colours[label] = PRESET_PALETTE[int(label) - 1]
    for label in labels:
        if label not in colours:
            colours[label] = EXTRA_PALETTE[extra % len(EXTRA_PALETTE)]
            extra += 1
    return colours


class PlainLogFormatter(LogFormatter):
    """Log-axis labels as plain numbers ("300", "20,000"), on the ticks LogFormatter would label."""

    def __call__(self, x, pos=None):
        return f"{x:,.0f}" if x >= 1 and super().__call__(x, pos) else ""


def time_unit(max_seconds):
    """(divisor, name) so that the time axis reads in s, min or h."""
    if max_seconds > 3 * 3600:
        return 3600.0, "h"
    if max_seconds > 180:
        return 60.0, "min"
    return 1.0, "s"


def _draw(ax, xs, train, valid, colour, best=None, marker="o"):
    ax.plot(xs[0], train, color=colour, linestyle="-", marker=marker, markersize=2.5, linewidth=1.4)
    ax.plot(xs[1], valid, color=colour, linestyle="--", marker=marker, markersize=2.5, linewidth=1.4)
    if best is not None:
        ax.plot([best[0]], [best[1]], linestyle="none", marker="*", markersize=11, color=colour,
                markeredgecolor="black", markeredgewidth=0.6, zorder=5)


def _draw_reference(ax, xs, curves, name):
    ax.plot(xs, curves["train_ppl"], linestyle="-", **REFERENCE_STYLE)
    ax.plot(xs, curves["valid_ppl"], linestyle="--", **REFERENCE_STYLE)
    ax.annotate(f"ref {name}", (xs[-1], curves["valid_ppl"][-1]), xytext=(3, 0),
                textcoords="offset points", fontsize=7, color=REFERENCE_STYLE["color"], va="center")


def plot_runs(runs, stem, formats, title, colours, reference=False):
    """Draw `runs` (report `LoggedRun`s) in one figure of two panels; returns the written paths.

    Left: perplexity against epochs; right: against cumulative wall-clock seconds (in s, min or h).
    Train solid, validation dashed, best validation epoch starred; with `reference`, the published
    run of each preset as thin grey lines.
    """
    references = [(run.label, run.reference()) for run in runs] if reference else []
    references = [(label, curves) for label, curves in references if curves is not None]
    seconds = [s for run in runs for s in run.curve("epoch", "cumulative_seconds")[1]]
    seconds += [s for _, curves in references for s in curves["cumulative_seconds"] or []]
    divisor, unit = time_unit(max(seconds, default=0.0))

    with matplotlib.rc_context(RC):
        # A fixed layout (legend in the right quarter): constrained layout would double the cost.
        figure = Figure(figsize=(12, 4.4))
        figure.subplots_adjust(left=0.07, right=0.735, bottom=0.12, top=0.84, wspace=0.25)
        by_epoch, by_time = figure.subplots(1, 2)
        handles = []
        for run in runs:
            colour = colours[run.label]
            best = run.best
            train_epochs, train = run.curve("epoch", "train_ppl")
            valid_epochs, valid = run.curve("epoch", "valid_ppl")
            best_point = (best["epoch"], best["valid_ppl"]) if best else None
            _draw(by_epoch, (train_epochs, valid_epochs), train, valid, colour, best_point)

            train_t, train_at = run.curve("cumulative_seconds", "train_ppl")
            valid_t, valid_at = run.curve("cumulative_seconds", "valid_ppl")
            time_to_best = run.metrics["time_to_best"]
            best_time = (time_to_best / divisor, best["valid_ppl"]) if time_to_best is not None else None
            _draw(by_time, ([t / divisor for t in train_t], [t / divisor for t in valid_t]),
                  train_at, valid_at, colour, best_time)
            suffix = "" if run.status == "finished" else f" ({run.status})"
            handles.append(Line2D([], [], color=colour, linewidth=2,
                                  label=f"{run.label}: {run.description}{suffix}"))
        for label, curves in references:
            _draw_reference(by_epoch, curves["epochs"], curves, label)
            if curves["cumulative_seconds"]:
                _draw_reference(by_time, [s / divisor for s in curves["cumulative_seconds"]],
                                curves, label)

        for ax in (by_epoch, by_time):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(PlainLogFormatter())
            ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
            ax.set_ylabel("perplexity (log scale)")
        by_epoch.set_xlabel("epoch")
        by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
        by_epoch.set_title("against epochs")
        by_time.set_xlabel(f"wall-clock time ({unit})")
        by_time.set_title("against wall-clock time")
        handles += [Line2D([], [], color="0.2", linestyle="-", label="train"),
                    Line2D([], [], color="0.2", linestyle="--", label="validation"),
                    Line2D([], [], color="0.2", linestyle="none", marker="*", markersize=10,
                           markeredgecolor="black", label="best validation epoch")]
        if references:
            handles.append(Line2D([], [], linestyle="-", label="published 2021 (ref. A)",
                                  **REFERENCE_STYLE))
        figure.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.745, 0.86), fontsize=8,
                      frameon=False)
        figure.suptitle(title)
        paths = []
        for extension in formats:
            path = f"{stem}.{extension}"
            figure.savefig(path, format=extension, dpi=DPI, metadata=SAVE_METADATA[extension])
            paths.append(path)
    return paths

