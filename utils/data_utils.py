"""The one JSON log format of a run, `LOG_DIR/EXP_ID/log.json`: its writer and the reader every
consumer uses; and `save_logs`, the course's own text logs.

The fields of both are in docs/FORMATS.md. Losses are per-token mean NLL in nats; a perplexity is
exp(summed NLL / number of real tokens).
"""
import json
import os

from utils.files import atomic_write_bytes, write_json

LOG_FORMAT = "wikitext2-lm-log/1"
LOG_NAME = "log.json"
EPOCH_FIELDS = ("epoch", "train_loss", "train_ppl", "valid_loss", "valid_ppl", "train_seconds",
                "valid_seconds", "cumulative_seconds")


class LogError(ValueError):
    """A log file that cannot be read or does not follow the format; the message names the file."""


def course_lists(log):
    """The course's flat per-epoch lists, derived from `log["epochs"]`."""
    epochs = log.get("epochs") or []
    test = log.get("test") or {}
    return {
        "train_losses": [e.get("train_loss") for e in epochs],
        "valid_losses": [e.get("valid_loss") for e in epochs],
        "train_ppls": [e.get("train_ppl") for e in epochs],
        "valid_ppls": [e.get("valid_ppl") for e in epochs],
        "train_times": [e.get("train_seconds") for e in epochs],
        "valid_times": [e.get("valid_seconds") for e in epochs],
        "test_loss": test.get("loss"),
        "test_ppl": test.get("ppl"),
    }


def write_log(path, log):
    """Atomically write a run's log (a dict as described above) to `path` as JSON."""
    log = dict(log, format=LOG_FORMAT)
    log.update(course_lists(log))
    write_json(path, log)


def read_log(path):
    """Read and check one log; raises LogError naming the file and the problem.

    Returns the dict with `epochs` sorted by epoch number. Fields beyond the required ones may be
    missing (older or partial runs); consumers use `.get`.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            log = json.load(file)
    except FileNotFoundError:
        raise LogError(f"{path}: no such log file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LogError(f"{path}: not a readable JSON log ({error})") from None
    if not isinstance(log, dict) or not isinstance(log.get("config"), dict):
        raise LogError(f"{path}: not a run log (no 'config' object)")
    epochs = log.get("epochs")
    if not isinstance(epochs, list) or not all(isinstance(e, dict) for e in epochs):
        raise LogError(f"{path}: 'epochs' must be a list of objects")
    for entry in epochs:
        if not isinstance(entry.get("epoch"), int):
            raise LogError(f"{path}: an epoch entry has no integer 'epoch' field")
    log["epochs"] = sorted(epochs, key=lambda e: e["epoch"])
    log.setdefault("exp_id", str(log["config"].get("exp_id", os.path.basename(os.path.dirname(path)))))
    log["exp_id"] = str(log["exp_id"])
    log.setdefault("status", "unknown")
    return log


def find_log_files(log_dirs):
    """All `log.json` files under the given folders (a folder may itself be one run's folder)."""
    found = []
    for log_dir in log_dirs:
        for folder, _, files in sorted(os.walk(log_dir)):
            if LOG_NAME in files:
                found.append(os.path.join(folder, LOG_NAME))
    return sorted(found)


def read_logs(log_dirs):
    """Read every log under `log_dirs`; returns `(logs, problems)` with one line per bad file."""
    logs, problems = [], []
    for path in find_log_files(log_dirs):
        try:
            log = read_log(path)
        except LogError as error:
            problems.append(str(error))
            continue
        log["path"] = path
        logs.append(log)
    return logs, problems


COURSE_EPOCH_FILES = ("train_loss", "train_ppl", "train_time", "valid_loss", "valid_ppl", "valid_time")
COURSE_TEST_FILES = ("test_loss", "test_ppl", "test_time")


def save_logs(args, train_losses, train_ppls, train_times, valid_losses, valid_ppls, valid_times,
              test_loss, test_ppl, test_time):
    """Write the course's text logs (docs/FORMATS.md) for the course's `run_exp.py`.

    `args` is the script's argparse Namespace (or the notebook's dataclass): any object whose
    attributes include `log_dir` and `exp_id`; all its attributes go to `args.json`. Returns the
    run's folder, `LOG_DIR/EXP_ID`.
    """
    arguments = dict(vars(args))
    missing = [name for name in ("log_dir", "exp_id") if name not in arguments]
    if missing:
        raise ValueError(f"save_logs needs args with attributes log_dir and exp_id; "
                         f"{type(args).__name__} lacks {', '.join(missing)}")
    folder = os.path.join(os.fspath(arguments["log_dir"]), str(arguments["exp_id"]))
    # default=str: a value JSON cannot hold (a torch.device, a Path) is written as its text.
    atomic_write_bytes(os.path.join(folder, "args.json"),
                       json.dumps(arguments, indent=2, default=str).encode("utf-8"))
    epoch_lists = (train_losses, train_ppls, train_times, valid_losses, valid_ppls, valid_times)
    for name, values in zip(COURSE_EPOCH_FILES, epoch_lists):
        text = "\n".join(str(value) for value in values)
        atomic_write_bytes(os.path.join(folder, f"{name}.txt"), text.encode("utf-8"))
    for name, value in zip(COURSE_TEST_FILES, (test_loss, test_ppl, test_time)):
        atomic_write_bytes(os.path.join(folder, f"{name}.txt"), f"{value}\n".encode("utf-8"))
    return folder
