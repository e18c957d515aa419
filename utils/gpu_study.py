"""The study on a lent GPU, as one command: `python -m utils.gpu_study OUT --data_folder D`.

1. the 12 presets, 10 epochs, learned embeddings (`--embeddings none`: the pretrained file cannot
   be had on the lent machines), `--jobs K` at once; every finished run's log is packed into
   `OUT/study-logs.tar.gz` as it ends, so a command cut short still brings back what finished;
2. configuration 6 for one epoch in fp16 and in bf16 (loss, tokens/s, memory: `OUT/precision.json`);
3. `python -m utils.benchmark --gpu-check` (`OUT/gpu_check.json`).

Each step gets what is left of `--budget_s`, so the whole fits a device's time limit; what a step
did not finish is named in `OUT/summary.json`. Flags after `--` go to every `run_exp.py` call
(the CPU rehearsal: `-- --device cpu --limit_batches 2 --epochs 1 ...`).
"""
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time

from utils.cli import OneLineParser, UsageError, fail, positive_int
from utils.files import atomic_write_bytes, check_writable_folder, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_EVERY_S = 15


def say(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def pack_logs(folders, archive):
    """Every `log.json` and `output.txt` under `folders` into the tar.gz `archive` (atomically)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for folder in folders:
            for parent, _, names in sorted(os.walk(folder)):
                for name in sorted(names):
                    if name in ("log.json", "output.txt"):
                        path = os.path.join(parent, name)
                        tar.add(path, arcname=os.path.relpath(path, os.path.dirname(archive)))
    atomic_write_bytes(archive, buffer.getvalue())


def run_step(name, command, budget_s, log_file, on_tick=None):
    """Run `command` for at most `budget_s` seconds, its output appended to `log_file`; `on_tick`
    every PACK_EVERY_S seconds. Returns the step's record."""
    say(f"{name}: {' '.join(command)} (at most {budget_s:.0f} s)")
    started = time.perf_counter()
    with open(log_file, "a", encoding="utf-8") as output:
        output.write(f"\n## {name}: {' '.join(command)}\n")
        output.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        while process.poll() is None:
            if time.perf_counter() - started > budget_s:
                process.terminate()  # SIGTERM: the runs record "stopped" and can be resumed
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                break
            if on_tick is not None:
                on_tick()
            try:
                process.wait(timeout=max(0.1, min(PACK_EVERY_S, started + budget_s - time.perf_counter())))
            except subprocess.TimeoutExpired:
                pass
    seconds = time.perf_counter() - started
    record = {"step": name, "command": command, "exit_code": process.returncode, "seconds": round(seconds, 1),
              "cut_short": seconds > budget_s}
    say(f"{name}: exit {process.returncode} after {seconds:.0f} s")
    return record


def precision_figures(log_dir, precision):
    """Loss after the epoch, tokens/s and GPU memory of the one-epoch run in `log_dir`."""
    path = os.path.join(log_dir, "6", "log.json")
    if not os.path.isfile(path):
        return {"precision": precision, "missing": path}
    with open(path, encoding="utf-8") as file:
        log = json.load(file)
    epoch = log["epochs"][-1] if log.get("epochs") else {}
    return {"precision": precision, "status": log.get("status"), "train_loss": epoch.get("train_loss"),
            "valid_loss": epoch.get("valid_loss"), "valid_ppl": epoch.get("valid_ppl"),
            "train_tokens_per_second": epoch.get("train_tokens_per_second"),
            "gpu_memory_mb": epoch.get("gpu_memory_mb"), "autocast": log.get("environment", {}).get("autocast")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = OneLineParser(prog="python -m utils.gpu_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", metavar="OUT", help="a new or empty folder for the archive and the figures")
    parser.add_argument("--data_folder", default="data", help="folder with wiki.{train,validation,test}.npz")
    parser.add_argument("--jobs", type=positive_int, default=4, help="presets trained at once (default: 4)")
    parser.add_argument("--exp_id", default="all", help="the presets (default: all)")
    parser.add_argument("--budget_s", type=positive_int, default=540, help="seconds for all three steps")
    parser.add_argument("--skip", default="", help="steps to leave out: study,precision,benchmark")
    args = parser.parse_args(argv)
    try:
        if os.path.isdir(args.out) and os.listdir(args.out):
            raise UsageError(f"{args.out} is not empty: choose a new or empty OUT (nothing is overwritten)")
        os.makedirs(args.out, exist_ok=True)
        check_writable_folder(args.out, "OUT")
        skip = {step for step in args.skip.split(",") if step}
        if skip - {"study", "precision", "benchmark"}:
            raise UsageError(f"--skip {args.skip!r}: expected steps among study,precision,benchmark")
    except UsageError as error:
        return fail(parser.prog, error)

    deadline = time.perf_counter() + args.budget_s
    log_file = os.path.join(args.out, "gpu_study.txt")
    archive = os.path.join(args.out, "study-logs.tar.gz")
    study_logs, precision_logs = os.path.join(args.out, "logs"), os.path.join(args.out, "precision")
    run_exp = [sys.executable, os.path.join(ROOT, "run_exp.py"), "--data_folder", args.data_folder,
               "--embeddings", "none", "--no_progress_bar"]
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": argv, "extra": extra, "steps": []}
    pack = lambda: pack_logs([study_logs, precision_logs], archive)  # noqa: E731
    if "study" not in skip:
        # Most of the budget: the precision runs and the benchmark take about two minutes together.
        budget = max(60.0, deadline - time.perf_counter() - (0 if skip >= {"precision", "benchmark"} else 150))
        summary["steps"].append(run_step(
            "study", run_exp + ["--exp_id", args.exp_id, "--jobs", str(args.jobs), "--log_dir", study_logs, *extra],
            budget, log_file, on_tick=pack))
        pack()
    if "precision" not in skip:
        figures = []
        for precision in ("fp16", "bf16"):
            folder = os.path.join(precision_logs, precision)
            left = deadline - time.perf_counter() - (60 if "benchmark" not in skip else 0)
            if left < 30:
                figures.append({"precision": precision, "missing": "no time left"})
                continue
            summary["steps"].append(run_step(
                f"precision {precision}", run_exp + ["--exp_id", "6", "--epochs", "1", "--precision", precision,
                                                     "--log_dir", folder, *extra], left / 2 if precision == "fp16" else left,
                log_file))
            figures.append(precision_figures(folder, precision))
        write_json(os.path.join(args.out, "precision.json"), figures)
        pack()
    if "benchmark" not in skip:
        left = deadline - time.perf_counter()
        if left >= 30:
            summary["steps"].append(run_step(
                "benchmark", [sys.executable, "-m", "utils.benchmark", "--gpu-check", "--data_folder", args.data_folder,
                              "--json", os.path.join(args.out, "gpu_check.json")], left, log_file))
        else:
            summary["steps"].append({"step": "benchmark", "missing": "no time left"})
    summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write_json(os.path.join(args.out, "summary.json"), summary)
    say(f"wrote {args.out}: {', '.join(sorted(name for name in os.listdir(args.out) if not os.path.isdir(os.path.join(args.out, name))))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
