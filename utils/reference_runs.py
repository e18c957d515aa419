"""The published 2021 results of the course's 12 experiments, carried as data for `--reference`.

A verbatim copy of the published numbers (two student reports of IFT6135 H2021 assignment 2), in
the layout of `published-runs.json`: `PUBLISHED_RUNS["reference_a"]` has per-epoch curves,
`PUBLISHED_RUNS["reference_b"]` the best validation epoch only. Their first epoch is epoch 0; this
package numbers epochs from 1, so reference epoch k is epoch k + 1 here (`REFERENCE_EPOCH_OFFSET`).
Their perplexities use the course's padded denominator (see `PUBLISHED_RUNS["note"]`).
"""

REFERENCE_EPOCH_OFFSET = 1

PUBLISHED_RUNS = {
    "note": (
        "Published results of the course assignment, for comparison in reports. The perplexities "
        "were computed by the course script, which divided the summed NLL by batch_size*256 "
        "(padding included), so they are slightly optimistic relative to an exact per-token "
        "perplexity."
    ),
    "reference_a": {
        "source": (
            "Published report of a student run of the course assignment (IFT6135 H2021, assignment "
            "2), tables 1-15; frozen pretrained GPT-1 embeddings; batch 16; 10 epochs; GPU of "
            "Google Colab (model not stated). Epoch 0 is the first epoch. Tables 5 and 6 of that "
            "report are incomplete (9 and 7 epochs)."
        ),
        "runs": {
            "1": {
                "model": "lstm",
                "layers": 1,
                "optimizer": "adam",
                "train_ppl": [
                    723.06, 301.68, 214.87, 170.05, 141.59, 122.21, 108.25, 97.63, 89.29, 82.34
                ],
                "valid_ppl": [
                    374.27, 253.21, 208.93, 184.24, 169.48, 159.27, 153.02, 149.43, 147.38, 146.26
                ],
                "train_seconds_per_epoch": 78.92,
                "valid_seconds_per_epoch": 3.55,
                "gpu_memory_mb": 4935,
            },
            "2": {
                "model": "lstm",
                "layers": 1,
                "optimizer": "adamw",
                "train_ppl": [
                    726.91, 303.14, 214.34, 169.16, 141.0, 121.56, 107.32, 96.75, 88.63, 82.02
                ],
                "valid_ppl": [
                    378.03, 252.86, 207.41, 181.91, 167.55, 156.93, 150.66, 147.57, 145.35, 144.95
                ],
                "train_seconds_per_epoch": 78.94,
                "valid_seconds_per_epoch": 3.53,
                "gpu_memory_mb": 4935,
            },
            "3": {
                "model": "lstm",
                "layers": 1,
                "optimizer": "sgd",
                "train_ppl": [
                    34523.8, 26930.79, 20691.21, 14553.46, 8201.14, 3813.03, 2953.36, 2691.21,
                    2485.51, 2322.14
                ],
                "valid_ppl": [
                    29826.84, 23370.83, 17407.69, 11314.85, 5339.16, 3056.15, 2738.58, 2504.77,
                    2318.17, 2173.8
                ],
                "train_seconds_per_epoch": 78.26,
                "valid_seconds_per_epoch": 3.51,
                "gpu_memory_mb": 4935,
            },
            "4": {
                "model": "lstm",
                "layers": 1,
                "optimizer": "momentum",
                "train_ppl": [
                    8137.55, 2057.55, 1919.38, 1884.44, 1864.31, 1845.66, 1824.29, 1801.27,
                    1774.78, 1745.27
                ],
                "valid_ppl": [
                    2291.14, 1865.03, 1814.58, 1790.0, 1774.68, 1754.01, 1731.1, 1708.45, 1681.99,
                    1652.1
                ],
                "train_seconds_per_epoch": 78.78,
                "valid_seconds_per_epoch": 3.54,
                "gpu_memory_mb": 4935,
            },
            "5": {
                "model": "gpt1",
                "layers": 1,
                "optimizer": "adam",
                "train_ppl": [833.89, 225.45, 141.78, 106.04, 85.37, 71.26, 60.8, 52.67, 46.11],
                "valid_ppl": [
                    332.17, 206.87, 167.15, 153.88, 149.03, 146.87, 149.96, 155.9, 167.34
                ],
                "train_seconds_per_epoch": 78.79,
                "valid_seconds_per_epoch": 3.51,
                "gpu_memory_mb": 5237,
            },
            "6": {
                "model": "gpt1",
                "layers": 1,
                "optimizer": "adamw",
                "train_ppl": [836.02, 225.37, 141.73, 105.67, 85.12, 71.18, 60.83],
                "valid_ppl": [330.57, 207.08, 166.49, 152.97, 148.1, 148.47, 150.49],
                "train_seconds_per_epoch": 78.73,
                "valid_seconds_per_epoch": 3.5,
                "gpu_memory_mb": 5237,
            },
            "7": {
                "model": "gpt1",
                "layers": 1,
                "optimizer": "sgd",
                "train_ppl": [
                    841608.5, 3471.33, 2673.92, 2327.34, 2116.48, 1968.12, 1854.4, 1762.16,
                    1684.35, 1616.81
                ],
                "valid_ppl": [
                    4160.56, 2762.0, 2312.97, 2070.15, 1909.67, 1791.6, 1699.05, 1622.24, 1555.91,
                    1497.76
                ],
                "train_seconds_per_epoch": 78.18,
                "valid_seconds_per_epoch": 3.5,
                "gpu_memory_mb": 5237,
            },
            "8": {
                "model": "gpt1",
                "layers": 1,
                "optimizer": "momentum",
                "train_ppl": [
                    7560.73, 1488.78, 1185.55, 1027.77, 931.69, 863.24, 811.51, 771.86, 740.24,
                    714.36
                ],
                "valid_ppl": [
                    1639.98, 1236.79, 1038.03, 929.75, 854.4, 799.44, 760.65, 727.04, 699.13,
                    677.34
                ],
                "train_seconds_per_epoch": 78.27,
                "valid_seconds_per_epoch": 3.5,
                "gpu_memory_mb": 5237,
            },
            "9": {
                "model": "lstm",
                "layers": 2,
                "optimizer": "adamw",
                "train_ppl": [
                    657.76, 263.66, 181.59, 138.34, 112.42, 95.11, 82.35, 72.6, 64.68, 58.18
                ],
                "valid_ppl": [
                    338.76, 219.37, 178.22, 157.78, 146.57, 142.18, 139.61, 140.58, 142.99, 147.96
                ],
                "gpu_memory_mb": 4999,
            },
            "10": {
                "model": "lstm",
                "layers": 4,
                "optimizer": "adamw",
                "train_ppl": [
                    1110.68, 411.41, 280.12, 216.35, 176.82, 149.34, 128.7, 112.63, 99.4, 88.22
                ],
                "valid_ppl": [
                    532.15, 325.65, 249.16, 209.82, 189.0, 175.09, 166.68, 163.75, 159.45, 159.76
                ],
                "gpu_memory_mb": 5137,
            },
            "11": {
                "model": "gpt1",
                "layers": 2,
                "optimizer": "adamw",
                "train_ppl": [
                    2020.08, 947.5, 727.15, 602.71, 531.64, 492.47, 461.34, 425.27, 389.5, 356.15
                ],
                "valid_ppl": [
                    1160.27, 779.69, 665.94, 551.3, 504.25, 474.03, 451.23, 426.83, 401.09, 375.12
                ],
                "gpu_memory_mb": 5593,
            },
            "12": {
                "model": "gpt1",
                "layers": 4,
                "optimizer": "adamw",
                "train_ppl": [
                    1939.57, 1618.11, 1595.45, 1575.95, 1562.47, 1556.82, 1554.82, 1552.99,
                    1553.51, 1552.49
                ],
                "valid_ppl": [
                    1556.55, 1534.06, 1514.13, 1505.48, 1496.5, 1488.02, 1489.2, 1485.95, 1481.77,
                    1478.53
                ],
                "gpu_memory_mb": 6327,
            },
        },
    },
    "reference_b": {
        "source": (
            "Published report of another student run of the same assignment (IFT6135 H2021): best "
            "validation perplexity over 10 epochs, training perplexity at that epoch, average "
            "steady-state GPU memory (MB); TITAN RTX / Quadro RTX 8000 / V100 GPUs."
        ),
        "runs": {
            "1": {
                "best_valid_ppl": 145.81,
                "train_ppl_at_best": 81.86,
                "gpu_memory_mb": 4193,
            },
            "2": {
                "best_valid_ppl": 144.46,
                "train_ppl_at_best": 87.28,
                "gpu_memory_mb": 4193,
            },
            "3": {
                "best_valid_ppl": 2174.07,
                "train_ppl_at_best": 2322.51,
                "gpu_memory_mb": 4193,
            },
            "4": {
                "best_valid_ppl": 1653.52,
                "train_ppl_at_best": 1748.55,
                "gpu_memory_mb": 4193,
            },
            "5": {
                "best_valid_ppl": 144.47,
                "train_ppl_at_best": 61.95,
                "gpu_memory_mb": 4489,
            },
            "6": {
                "best_valid_ppl": 144.44,
                "train_ppl_at_best": 61.96,
                "gpu_memory_mb": 4489,
            },
            "7": {
                "best_valid_ppl": 2081.28,
                "train_ppl_at_best": 2214.83,
                "gpu_memory_mb": 4489,
            },
            "8": {
                "best_valid_ppl": 933.77,
                "train_ppl_at_best": 978.67,
                "gpu_memory_mb": 4489,
            },
            "9": {
                "best_valid_ppl": 138.54,
                "train_ppl_at_best": 82.52,
                "gpu_memory_mb": 4318,
            },
            "10": {
                "best_valid_ppl": 157.7,
                "train_ppl_at_best": 96.21,
                "gpu_memory_mb": 4389,
            },
            "11": {
                "best_valid_ppl": 413.68,
                "train_ppl_at_best": 398.86,
                "gpu_memory_mb": 4916,
            },
            "12": {
                "best_valid_ppl": 1488.04,
                "train_ppl_at_best": 1553.22,
                "gpu_memory_mb": 5791,
            },
        },
    },
}


def reference_curves(exp_id):
    """Reference A's run of preset `exp_id` with epochs renumbered from 1, or None.

    Returns {"model", "layers", "optimizer", "epochs", "train_ppl", "valid_ppl",
    "cumulative_seconds" (None where the report gave no timing), "gpu_memory_mb"}.
    """
    run = PUBLISHED_RUNS["reference_a"]["runs"].get(str(exp_id))
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
    run_b = PUBLISHED_RUNS["reference_b"]["runs"].get(str(exp_id))
    if run_b is not None:
        best.update(b_valid_ppl=run_b["best_valid_ppl"], b_train_ppl=run_b["train_ppl_at_best"],
                    b_gpu_memory_mb=run_b["gpu_memory_mb"])
    return best
