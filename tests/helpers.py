"""The fixtures the test modules share; no test module imports another.

- Models: the tiny sizes (`TINY`, `tiny_lstm`, `tiny_gpt`) and `skip_unless_cpu_autocast`.
- Data: the real-data locator (`shared_data_dir`, `real_wikitext2_dir`), tiny data folders
  (`write_tiny_data`, its streams, `write_long_epoch`, `write_split`, `write_documents`) and a tiny
  GPT-1-format tokenizer (`write_tiny_tokenizer`).
- Command lines: a `main(argv)` in this process (`run_cli`, `run_main` for run_exp.py), a child
  process (`popen` and `run_command`: warm ones, tests/warm.py), run_exp.py in one (`RUN_EXP`,
  `run_exp_command`, `subprocess_env`, `children_take_sigint`, `wait_for`), `--jobs` workers
  started warm (`warm_workers`) and `TinyRunCase`, a tiny data folder and log folder per test.
- The loopback Hub: `FixtureServer`, `HubClientMixin`, `hub_client`, `FAST`, `REVISION`, `UNREACHABLE`.
- The report's tables: `markdown_rows`, `assert_shown`, `check_results_csv`, `latex_cells`.
- `slow`, the mark `python -m unittest tests.fast` leaves out (tests/fast.py).

Importing it sets PyTorch to one thread in this process (see below).
"""
import collections
import contextlib
import csv
import hashlib
import http.server
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest
import urllib.parse
from unittest import mock

import numpy as np
import torch
from huggingface_hub import constants, file_download
from huggingface_hub.utils import _cache_assets, _http
from safetensors.numpy import save_file

from gpt1_solution_template import MiniGPT1
from tests import warm
from lstm_solution import LSTM
from utils import download as dl
from utils.cli import shared_data_path
from utils.data_folder import SPLITS, split_file, split_path
from utils.report.tables import REFERENCE_FIELDS, RESULT_FIELDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests' models and batches are tiny: extra threads only add overhead, and on a busy machine
# OpenMP threads fighting other processes for the cores made steps 10 to 80 times slower. Every
# test module imports this one, so the whole test process computes on one thread, as the child
# runs do (`subprocess_env`).
torch.set_num_threads(1)


def slow(test):
    """Mark a test method or class as slow (child processes, notebooks, long waits):
    `python -m unittest tests.fast` leaves it out; the full suite runs it."""
    test.slow = True
    return test


# Models ---------------------------------------------------------------------------------------

# One tiny configuration for the value tests: vocabulary 97, width 32, 4 heads, 16 positions.
TINY = {"vocabulary_size": 97, "embedding_size": 32, "hidden_size": 24, "num_heads": 4,
        "sequence_length": 16, "num_layers": 2}


def tiny_lstm(learn_embeddings=False, seed=0):
    torch.manual_seed(seed)
    return LSTM(TINY["vocabulary_size"], TINY["embedding_size"], TINY["hidden_size"],
                TINY["num_layers"], learn_embeddings)


def tiny_gpt(learn_embeddings=False, seed=0):
    torch.manual_seed(seed)
    return MiniGPT1(TINY["vocabulary_size"], TINY["embedding_size"], TINY["sequence_length"],
                    TINY["num_heads"], TINY["num_layers"], learn_embeddings)


# Data -----------------------------------------------------------------------------------------

def shared_data_dir(*parts):
    """`$SHARED_DATA_DIR/parts...` when it exists; otherwise the test is skipped with the reason."""
    root = shared_data_path()
    if not root:
        raise unittest.SkipTest("SHARED_DATA_DIR is not set (CI points it at ../shared/data)")
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        raise unittest.SkipTest(f"{path} does not exist")
    return path


def real_wikitext2_dir():
    folder = shared_data_dir("wikitext2")
    for split in SPLITS:
        if not os.path.isfile(split_path(folder, split)):
            raise unittest.SkipTest(f"{folder} lacks {split_file(split)}")
    return folder


def write_split(folder, split, tokens, sizes, **extra):
    """`wiki.<split>.npz` as utils.prepare_data writes it: the ids as uint16, the document sizes
    as int64, and any `extra` arrays."""
    np.savez(split_path(folder, split), tokens=np.asarray(tokens, np.uint16),
             sizes=np.asarray(sizes, np.int64), **extra)


def write_documents(folder, split, documents, **extra):
    """`wiki.<split>.npz` holding `documents`, lists of ids, one after the other; `extra` arrays
    are added, or replace `tokens` or `sizes` as they are (a bad array for a test of the reader)."""
    tokens = np.concatenate([np.asarray(d, np.uint16) for d in documents]) if documents else np.zeros(0, np.uint16)
    arrays = {"tokens": tokens, "sizes": np.array([len(d) for d in documents], np.int64), **extra}
    np.savez(split_path(folder, split), **arrays)


def chain_stream(generator, split, vocabulary_size):
    """600, 120 and 120 ids in documents of 1 to 29: each id fixes the next (7 x + 3), so that
    a model can learn the stream."""
    length = {"train": 600, "validation": 120, "test": 120}[split]
    stream = [int(generator.integers(1, vocabulary_size))]
    while len(stream) < length:
        stream.append((7 * stream[-1] + 3) % (vocabulary_size - 1) + 1)
    sizes, left = [], length
    while left:
        sizes.append(min(left, int(generator.integers(1, 30))))
        left -= sizes[-1]
    return stream, sizes


def repeat_stream(generator, split, vocabulary_size):
    """40, 12 and 12 documents of 5 to 59 ids in 1..31: 7 t mod 29, plus noise of 0 to 2, so
    that a few steps already lower the loss."""
    sizes = generator.integers(5, 60, size={"train": 40, "validation": 12, "test": 12}[split])
    tokens = np.arange(sizes.sum()) * 7 % 29 + 1 + generator.integers(0, 3, sizes.sum())
    return tokens, sizes


def random_stream(generator, split, vocabulary_size):
    """30, 8 and 8 documents of 5 to 39 ids drawn uniformly from 1..vocabulary_size - 1."""
    sizes = generator.integers(5, 40, size={"train": 30, "validation": 8, "test": 8}[split])
    return generator.integers(1, vocabulary_size, size=int(sizes.sum())), sizes


STREAMS = {"chain": chain_stream, "repeat": repeat_stream, "random": random_stream}
# The tiny data of the run_exp.py tests (TinyRunCase): vocabulary 61, width 16, 32 positions.
RUN_DATA = dict(stream="repeat", vocabulary_size=61, width=16, positions=32, scales=(0.3, 0.1))


def write_tiny_data(folder, vocabulary_size=50, width=16, positions=16, seed=0, stream="chain",
                    scales=(1.0, 1.0), embeddings=True):
    """Three splits of `stream` (a name of STREAMS) and, unless `embeddings` is false, an
    embeddings.npz of `vocabulary_size` x `width` token and `positions` x `width` position rows,
    normal times `scales`; return the embeddings' path."""
    generator = np.random.default_rng(seed)
    for split in SPLITS:
        write_split(folder, split, *STREAMS[stream](generator, split, vocabulary_size))
    if not embeddings:
        return None
    path = os.path.join(folder, "embeddings.npz")
    np.savez(path, tokens=(generator.normal(size=(vocabulary_size, width)) * scales[0]).astype(np.float32),
             position=(generator.normal(size=(positions, width)) * scales[1]).astype(np.float32))
    return path


def write_long_epoch(folder, documents=1500):
    """Replace the training split by `documents` documents of 5 to 59 ids (t mod 29): an epoch
    long enough for a test to signal or kill a run in it, while the epoch is still running."""
    sizes = np.random.default_rng(1).integers(5, 60, size=documents)
    write_split(folder, "train", np.arange(sizes.sum()) % 29 + 1, sizes)


# The tiny tokenizer's symbols and merges: `write_tiny_tokenizer`'s default, and test_generate's,
# whose words (the cat sat on the mat) are whole tokens.
TOKENIZER_SYMBOLS = tuple("abcdefghijklmnopqrstuvwxyz.,='")
TOKENIZER_MERGES = (("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"))
SENTENCE_MERGES = TOKENIZER_MERGES + (("s", "a"), ("sa", "t</w>"), ("o", "n</w>"), ("m", "a"), ("ma", "t</w>"))


def write_tiny_tokenizer(folder, merges=TOKENIZER_MERGES, symbols=TOKENIZER_SYMBOLS):
    """Write a small OpenAI-format vocab.json + merges.txt in `folder`; return the vocabulary.

    "<unk>", each symbol alone and as a word end, then the merges' results. By default: letters
    and a few punctuation marks, the merges t+h, th+e</w>, c+a, ca+t</w>; "!" is left out so that
    it becomes <unk>.
    """
    tokens = ["<unk>", *symbols, *(symbol + "</w>" for symbol in symbols), *(a + b for a, b in merges)]
    vocab = {token: index for index, token in enumerate(tokens)}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as file:
        json.dump(vocab, file)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as file:
        file.write("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges))
    return vocab


def skip_unless_cpu_autocast(precision, *models):
    """Skip a test where this CPU cannot run `models` under `precision` autocast, with the probe's
    reason (utils/cpu_autocast.py): CPUs differ, and the test follows the machine it runs on."""
    from utils.cpu_autocast import cpu_autocast_refusal

    refusals = [cpu_autocast_refusal(precision, model) for model in models]
    refusal = next((reason for reason in refusals if reason), None)
    return unittest.skipIf(refusal is not None, refusal or "")


# Command lines --------------------------------------------------------------------------------

RUN_EXP = os.path.join(ROOT, "run_exp.py")


def run_cli(main, argv):
    """`main(argv)` in this process: `(exit code, stdout, stderr)`; argparse's own exit on a bad
    flag gives its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue(), err.getvalue()


def run_main(*argv):
    """`run_exp.main(argv)` in this process: `(exit code, stdout, stderr)`."""
    import run_exp

    return run_cli(run_exp.main, argv)


# A child `python ...` that finds torch imported already (tests/warm.py): `subprocess.Popen` and
# `subprocess.run` with their arguments; TESTS_COLD=1 makes them fresh interpreters.
popen, run_command = warm.start, warm.run


@contextlib.contextmanager
def warm_workers():
    """Start the `--jobs` workers of a study run in this process as warm children. Their parent is
    the warm server, so that is the parent they watch (utils.study.die_with_parent)."""
    from utils import study

    def start(args, env=None, **kwargs):
        if not warm.cold() and env and env.get(study.PARENT_ENV) == str(os.getpid()):
            env = dict(env, **{study.PARENT_ENV: str(warm.Server.pid())})
        return warm.start(args, env=env, **kwargs)

    class Subprocess:  # utils.study's view of subprocess: only its Popen is replaced
        Popen = staticmethod(start)

        def __getattr__(self, name):
            return getattr(subprocess, name)

    with mock.patch.object(study, "subprocess", Subprocess()):
        yield


def run_exp_command(*argv):
    """The command line of run_exp.py in a child process."""
    return [sys.executable, RUN_EXP, *[str(a) for a in argv]]


def subprocess_env():
    """This environment for a child run: one thread, this checkout first, no torchrun variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    return env


def children_take_sigint(test):
    """Let the child processes `test` starts be stopped by SIGINT.

    A test run started in the background by a non-interactive shell (`python -m unittest &`)
    ignores SIGINT, its children inherit that, and run_exp.py keeps an ignored SIGINT ignored, as
    `command &` asks. A handler here (not SIG_IGN) makes exec give the children the default."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        test.addCleanup(signal.signal, signal.SIGINT, signal.SIG_IGN)


def wait_for(predicate, timeout=120, poll_s=0.02):
    """Poll `predicate` until it is true (an exception, e.g. a file not written yet, counts as
    false); AssertionError after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return True
        except Exception:
            pass
        time.sleep(poll_s)
    raise AssertionError("timed out")


class TinyRunCase(unittest.TestCase):
    """Per test, a tiny data folder (RUN_DATA) in `self.data` and a log folder in `self.logs`;
    `args` gives run_exp.py's flags of a run of a few seconds on them."""

    def setUp(self):
        self.data = tempfile.mkdtemp()
        write_tiny_data(self.data, **RUN_DATA)
        self.logs = tempfile.mkdtemp()

    def args(self, exp_id, model="lstm", *extra):
        return ["--exp_id", exp_id, "--model", model, "--data_folder", self.data,
                "--embeddings", os.path.join(self.data, "embeddings.npz"), "--sequence_length", 16,
                "--hidden_size", 24, "--num_heads", 2, "--batch_size", 4, "--epochs", 2,
                "--log_dir", self.logs, "--device", "cpu", "--print_every", 0, *extra]


# The loopback Hub -----------------------------------------------------------------------------

# Fast retries; a generous timeout, which only a "hang" test (with a policy of its own) reaches: a
# loaded machine that kept the server thread waiting 2 s made an extra, retried request.
FAST = dl.DownloadPolicy(retries=2, backoff_s=0.01, timeout_s=30.0, chunk_bytes=64 * 1024)
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused
MODES = ("ok", "norange", "404", "500", "flaky", "truncated", "badsum", "drop", "hang")
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the pins hold


def quiet(mirror=None, policy=FAST):
    """A Fetcher without progress output, fast retries unless `policy` says otherwise."""
    return dl.Fetcher(mirror, policy, progress=False)


Request = collections.namedtuple("Request", "method mode name range sent hub authorization")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def write_tiny_checkpoint(folder, rows, width):
    """A GPT-1-like `model.safetensors`: the two embedding tensors and one never asked for."""
    arrays = {"tokens_embed.weight": np.arange(rows * width, dtype=np.float32).reshape(-1, width),
              "positions_embed.weight": -np.arange(300 * width, dtype=np.float32).reshape(-1, width),
              "h.0.mlp.c_fc.weight": np.ones((3, 5), dtype=np.float32)}
    save_file(arrays, os.path.join(folder, "model.safetensors"))
    return arrays


def read_folder(folder):
    """Every file of `folder`: name -> bytes."""
    files = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as file:
            files[name] = file.read()
    return files


@contextlib.contextmanager
def hub_client(endpoint, home, offline=False):
    """huggingface_hub as HF_ENDPOINT=endpoint, HF_HOME=home and HF_HUB_OFFLINE set it up when
    imported; its retries not waiting, its retry warnings kept quiet, and without the agent
    registry its user agent fetches once a process (telemetry, a request no test counts on)."""
    no_wait = types.SimpleNamespace(sleep=lambda seconds: None)
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with mock.patch.multiple(constants, ENDPOINT=endpoint, HF_HUB_OFFLINE=offline,
                                 HUGGINGFACE_CO_URL_TEMPLATE=endpoint + "/{repo_id}/resolve/"
                                                                        "{revision}/{filename}",
                                 HF_HUB_CACHE=os.path.join(home, "hub"),
                                 DOWNLOAD_CHUNK_SIZE=64 * 1024,  # several chunks per fixture
                                 HF_ASSETS_CACHE=os.path.join(home, "assets"),
                                 AGENT_HARNESSES_PATH=os.path.join(home, ".agent_harnesses.json"),
                                 HF_HUB_DISABLE_TELEMETRY=True), \
                mock.patch.object(_cache_assets, "HF_ASSETS_CACHE", os.path.join(home, "assets")), \
                mock.patch.object(_http, "time", no_wait), \
                mock.patch.object(file_download, "time", no_wait):
            yield
    finally:
        logger.setLevel(level)


def hub_route(path):
    """(mode, name, revision) of a request path; revision is None for a plain path."""
    parts = urllib.parse.unquote(path.split("?")[0]).strip("/").split("/")
    if "resolve" not in parts:
        return parts[0], "/".join(parts[1:]), None
    owner = parts[1] if parts[0] == "datasets" else parts[0]
    return (owner if owner in MODES else "ok"), parts[-1], parts[parts.index("resolve") + 1]


class FixtureServer:
    """Serves `files` on 127.0.0.1, well or badly, both as a plain web server and as the Hugging
    Face Hub answers huggingface_hub; logs every request.

    Plain paths are /MODE/NAME. Hub paths are [/datasets]/OWNER/REPO/resolve/REVISION/NAME,
    answered to HEAD and GET with the headers hf_hub_download needs (X-Repo-Commit, ETag,
    Content-Length), in the mode OWNER names when it names one ("ok" otherwise, e.g. for
    openai-community/openai-gpt). MODE says how the server answers:

        ok         the file, honouring Range (206)       norange    the whole file, Range ignored
        404, 500   that status                           flaky      500 the first time, then ok
        truncated  half the body, always (no Range); on a Hub path, with a Content-Length to match
        badsum     the file with one byte changed
        drop       half the body of the first GET, then the connection closes; ok (with Range) after
        hang       nothing for 1 s (the client's timeout is shorter)
    """

    def __init__(self, files):
        self.files = files
        self.log = []  # Request entries
        self.paths = []  # the path of each request, in order
        self.seen = set()  # (mode, name) pairs already answered once
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"fixture": self})
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def first_time(self, mode, name):
        with self.lock:
            first = (mode, name) not in self.seen
            self.seen.add((mode, name))
            return first

    def requests(self, mode, name, method="GET"):
        return [entry for entry in self.log if entry[:3] == (method, mode, name)]

    def clear(self):
        self.log.clear()
        self.paths.clear()
        self.seen.clear()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietServer(http.server.ThreadingHTTPServer):
    """A threaded server that takes clients hanging up (timeouts, Ctrl-C tests) in its stride."""
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    fixture = None

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self.respond()

    def do_GET(self):
        self.respond()

    def respond(self):
        mode, name, revision = hub_route(self.path)
        range_header = self.headers.get("Range")
        code, headers, payload = self.answer(mode, name, self.fixture.files.get(name), range_header,
                                             revision is not None)
        if revision is not None:
            headers["X-Repo-Commit"] = revision
        body = payload if self.command == "GET" else b""
        # Logged before sending, so that a client that has its answer finds it in the log.
        self.fixture.log.append(Request(self.command, mode, name, range_header, len(body),
                                        revision is not None, self.headers.get("Authorization")))
        self.fixture.paths.append(self.path)
        if mode == "hang":
            time.sleep(1.0)
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def answer(self, mode, name, data, range_header, hub):
        """(status, headers, body) for `mode`; a body shorter than its Content-Length is cut."""
        if data is None or mode == "404":
            return 404, {"Content-Length": "0", "X-Error-Code": "EntryNotFound"}, b""
        if mode in ("500", "hang") or (mode == "flaky" and self.fixture.first_time(mode, name)):
            return 500, {"Content-Length": "0"}, b""
        if mode == "badsum":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {"Content-Length": str(len(data)), "ETag": f'"{sha256(data)}"'}
        if mode != "norange":
            headers["Accept-Ranges"] = "bytes"
        if self.command == "HEAD":
            return 200, headers, data
        if mode == "truncated" and hub:  # a short body that looks whole, as a bad proxy sends
            return 200, dict(headers, **{"Content-Length": str(len(data) // 2)}), data[:len(data) // 2]
        if mode == "truncated" or (mode == "drop" and self.fixture.first_time(mode, name)):
            return 200, headers, data[:len(data) // 2]
        if range_header and mode in ("ok", "drop", "flaky"):
            start, end = range_header.split("=")[1].split("-")
            start, end = int(start), int(end) + 1 if end else len(data)
            if start >= len(data):
                return 416, {"Content-Length": "0"}, b""
            headers.update({"Content-Length": str(end - start),
                            "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})
            return 206, headers, data[start:end]
        return 200, headers, data


def cache_files(home):
    """Every file under the Hub cache of `home` (blobs, links, partial downloads), relative."""
    root = os.path.join(home, "hub")
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, _, names in os.walk(root) for name in names
                  if not folder.startswith(os.path.join(root, ".locks")) and name != "CACHEDIR.TAG")


class HubClientMixin:
    """The class's fixture server (`cls.server`, closed after the class) and, per test, a work
    folder (`self.work`) and huggingface_hub pointed at the server with an empty cache in
    `self.home`; `hub()` points it elsewhere for the rest of the test."""

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.fixture_dir.cleanup()

    def setUp(self):
        self.work = tempfile.TemporaryDirectory()
        self.home = os.path.join(self.work.name, "hf_home")
        self.server.clear()
        self.hub(self.server.base)

    def tearDown(self):
        self.work.cleanup()

    def hub(self, endpoint, offline=False):
        context = hub_client(endpoint, self.home, offline)
        context.__enter__()
        self.addCleanup(context.__exit__, None, None, None)


# The report's tables --------------------------------------------------------------------------

def markdown_rows(path):
    """The body rows of the first Markdown table of `path`, as lists of cell strings."""
    with open(path, encoding="utf-8") as file:
        lines = [line for line in file.read().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return header, rows


def csv_rows(path):
    with open(path, encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


# A unit a shown number may carry, and what it multiplies the number by.
UNITS = ((" min", 60.0), (" s", 1.0), (" h", 3600.0), ("%", 0.01), ("M", 1e6), ("k", 1e3))


def shown_number(text):
    """(value, half of the last shown digit) of a table's "1,234.5", "13.9 min", "6.0%", "12.00M"."""
    text, scale = text.strip("*"), 1.0
    for unit, factor in UNITS:
        if text.endswith(unit):
            text, scale = text[:-len(unit)], factor
            break
    digits = len(text.split(".")[1]) if "." in text else 0
    return float(text.replace(",", "")) * scale, 0.5 * 10 ** -digits * scale


def assert_shown(test, text, value, where=""):
    """`text`, a table's cell, shows `value`: "–" for None, else the number rounded as shown."""
    if value is None or value == "":
        test.assertEqual(text, "–", where)
        return
    if isinstance(value, str) and not re.fullmatch(r"-?[\d.e+-]+", value):
        test.assertEqual(text.replace("\\", ""), value, where)
        return
    shown, tolerance = shown_number(text)
    test.assertLessEqual(abs(float(value) - shown), tolerance * (1 + 1e-9) + 1e-9,
                         f"{where}: {text!r} does not show {value!r}")


def split_note(text):
    """"146.0 (10)" -> ("146.0", "10"); a cell without a bracketed note -> (text, None)."""
    match = re.fullmatch(r"(.*) \((.*)\)", text)
    return (match.group(1), match.group(2)) if match else (text, None)


# The results table's columns and the results.csv fields each shows (two for "value (note)" or
# "A / B" cells).
RESULT_COLUMNS = {
    "exp": ("exp",), "arch.": ("architecture",), "layers": ("layers",),
    "optimizer": ("optimizer",), "dropout": ("dropout",), "train ppl @ best": ("train_ppl_at_best",),
    "best valid ppl (epoch)": ("best_valid_ppl", "best_epoch"), "test ppl": ("test_ppl",),
    "s/epoch": ("seconds_per_epoch",), "time to best": ("time_to_best",),
    "params learnable / total": ("learnable_parameters", "total_parameters"),
    "GPU MB steady": ("gpu_steady_mb",),
    "ref. A valid ppl (epoch)": ("ref_a_valid_ppl", "ref_a_epoch"),
    "ref. B valid ppl": ("ref_b_valid_ppl",), "ref. A s/epoch": ("ref_a_seconds_per_epoch",),
    "ref. GPU MB A / B": ("ref_a_gpu_memory_mb", "ref_b_gpu_memory_mb")}


def check_results_csv(test, out):
    """results.csv has the runs of results.md in the same order, each cell showing its values."""
    header, rows = markdown_rows(os.path.join(out, "tables", "results.md"))
    records = csv_rows(os.path.join(out, "tables", "results.csv"))
    test.assertEqual([r["exp"] for r in records], [row[0].replace("\\", "") for row in rows])
    reference = "ref. B valid ppl" in header
    test.assertEqual(list(records[0]), list(RESULT_FIELDS + (REFERENCE_FIELDS if reference else ())))
    shown = set()
    for row, record in zip(rows, records, strict=True):
        for name, text in zip(header, row, strict=True):
            fields = RESULT_COLUMNS[name]
            shown.update(fields)
            if len(fields) == 1:
                assert_shown(test, text, record[fields[0]], f"exp {record['exp']}, {name}")
                continue
            if text == "–":
                parts = ["–", "–"]
            elif " / " in text:
                parts = text.split(" / ")
            else:
                value, note = split_note(text)
                parts = [value, "–" if note is None else note]
            for field, part in zip(fields, parts, strict=True):
                assert_shown(test, part, record[field], f"exp {record['exp']}, {name}")
    # Every CSV field is shown by the table, save dropout when no run has any.
    test.assertEqual(set(records[0]) - shown, set() if "dropout" in header else {"dropout"})


def latex_cells(line):
    return re.split(r"(?<!\\)&", line.rstrip().removesuffix("\\\\"))
