"""The published 2021 results of the course's 12 experiments, read from `published_runs.json`.

The data file is a verbatim copy of the published numbers (two student reports of IFT6135 H2021
assignment 2), in the layout of `published-runs.json`: `"reference_a"` has per-epoch curves,
`"reference_b"` the best validation epoch only. Their perplexities use the course's padded
denominator (see its `"note"`).
"""
import functools
import json
import os

PUBLISHED_RUNS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published_runs.json")

# The published reports number their first epoch 0, this package 1: reference epoch k is k + 1 here.
REFERENCE_EPOCH_OFFSET = 1


@functools.lru_cache(maxsize=None)
def published_runs():
    """The content of `published_runs.json`, read once; shared between callers, so not to be changed.

    {"note": str, "reference_a": {"source": str, "runs": {exp_id: {"model", "layers", "optimizer",
    "train_ppl": [...], "valid_ppl": [...], "gpu_memory_mb"[, "train_seconds_per_epoch",
    "valid_seconds_per_epoch"]}}}, "reference_b": {"source": str, "runs": {exp_id:
    {"best_valid_ppl", "train_ppl_at_best", "gpu_memory_mb"}}}}
    """
    with open(PUBLISHED_RUNS_PATH, encoding="utf-8") as file:
        return json.load(file)


def reference_curves(exp_id):
    """Reference A's run of preset `exp_id` with epochs renumbered from 1, or None.

    Returns {"model", "layers", "optimizer", "epochs", "train_ppl", "valid_ppl",
    "cumulative_seconds" (None where the report gave no timing), "train_seconds_per_epoch",
    "gpu_memory_mb"}.
    """
    run = published_runs()["reference_a"]["runs"].get(str(exp_id))
    if run is None:
        return None
    count = len(run["valid_ppl"])
    epochs = [k + REFERENCE_EPOCH_OFFSET for k in range(count)]
    seconds = None
    if "train_seconds_per_epoch" in run and "valid_seconds_per_epoch" in run:
        per_epoch = run["train_seconds_per_epoch"] + run["valid_seconds_per_epoch"]
        seconds = [per_epoch * (k + 1) for k in range(count)]
    return {"model": run["model"], "layers": run["layers"], "optimizer": run["optimizer"],
            "epochs": epochs, "train_ppl": run["train_ppl"], "valid_ppl": run["valid_ppl"],
            "cumulative_seconds": seconds, "train_seconds_per_epoch": run.get("train_seconds_per_epoch"),
            "gpu_memory_mb": run.get("gpu_memory_mb")}


def reference_best(exp_id):
    """The best validation figures of preset `exp_id` in both references (None where absent).

    Returns {"a_valid_ppl", "a_epoch", "a_train_ppl", "a_seconds_per_epoch", "a_gpu_memory_mb",
    "b_valid_ppl", "b_train_ppl", "b_gpu_memory_mb"}; epochs numbered from 1.
    """
    best = dict.fromkeys(("a_valid_ppl", "a_epoch", "a_train_ppl", "a_seconds_per_epoch",
                          "a_gpu_memory_mb", "b_valid_ppl", "b_train_ppl", "b_gpu_memory_mb"))
    curves = reference_curves(exp_id)
    if curves is not None:
        index = min(range(len(curves["valid_ppl"])), key=curves["valid_ppl"].__getitem__)
        best.update(a_valid_ppl=curves["valid_ppl"][index], a_epoch=curves["epochs"][index],
                    a_train_ppl=curves["train_ppl"][index],
                    a_seconds_per_epoch=curves["train_seconds_per_epoch"],
                    a_gpu_memory_mb=curves["gpu_memory_mb"])
    run_b = published_runs()["reference_b"]["runs"].get(str(exp_id))
    if run_b is not None:
        best.update(b_valid_ppl=run_b["best_valid_ppl"], b_train_ppl=run_b["train_ppl_at_best"],
                    b_gpu_memory_mb=run_b["gpu_memory_mb"])
    return best
