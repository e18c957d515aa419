"""Tests of utils.prepare_data, all offline: the loopback HTTP server of tests/helpers.py
(FixtureServer's docstring lists how it can answer) serves a tiny WikiText-2 raw zip, a tiny tokenizer and a
tiny safetensors checkpoint, as the Hugging Face Hub and as a plain mirror. How each download
fails or resumes is tested there; here, what data preparation makes of it, with huggingface_hub's
cache and offline mode, in this process and in child processes given HF_ENDPOINT, HF_HOME,
HF_TOKEN and HF_HUB_OFFLINE themselves.

Tests that read the course's official arrays find them through $SHARED_DATA_DIR and are
skipped, saying so, when it is not set.
"""
import contextlib
import dataclasses
import importlib.util
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import zipfile
from unittest import mock

import numpy as np

from tests.helpers import (FAST, REVISION, UNREACHABLE, FixtureServer, HubClientMixin, cache_files, quiet,
                           read_folder, sha256, slow, write_tiny_checkpoint, write_tiny_tokenizer)
from utils import prepare_data as pd
from utils.cli import shared_data_path
from utils.download import HubFile, RemoteFile
from utils.tokenization import GPT1_REVISION, GPT1Tokenizer

SHARED_DATA_DIR = shared_data_path()
RAW_TEXT = {
    "train": " \n = Valkyria = \n \n The cat sat on the mat . \n Café , the end ! \n \n",
    "validation": " \n = Heading = \n \n The cat . \n",
    "test": " \n = Robert = \n \n the the cat \n",
}
MEMBERS = {"train": "wikitext-2-raw/wiki.train.raw", "validation": "wikitext-2-raw/wiki.valid.raw",
           "test": "wikitext-2-raw/wiki.test.raw"}
WIDTH = 4
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def make_fixture_files(folder):
    """Write the fixture files in `folder`; return (name -> bytes, checkpoint arrays, vocabulary)."""
    vocab = write_tiny_tokenizer(folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for split, member in MEMBERS.items():
            archive.writestr(member, RAW_TEXT[split])
    with open(os.path.join(folder, "wikitext-2-raw-v1.zip"), "wb") as file:
        file.write(buffer.getvalue())
    arrays = write_tiny_checkpoint(folder, rows=len(vocab), width=WIDTH)
    return read_folder(folder), arrays, vocab


def fixture_sources(files, modes=None):
    """Sources pinned to the fixture files, on the Hub: the zip in the dataset MODE/ci, the rest in
    the model MODE/openai-gpt, MODE being the server's mode for that name ("ok" unless `modes` says
    otherwise)."""
    modes = modes or {}

    def hub(name, repo, repo_type="model"):
        return HubFile(f"{modes.get(name, 'ok')}/{repo}", name, REVISION, sha256(files[name]),
                       len(files[name]), repo_type)

    zip_text = pd.ZipText(hub("wikitext-2-raw-v1.zip", "ci", "dataset"), MEMBERS)
    return pd.Sources(wikitext=(zip_text,), vocab=hub("vocab.json", "openai-gpt"),
                      merges=hub("merges.txt", "openai-gpt"),
                      checkpoint=hub("model.safetensors", "openai-gpt"))


def unreachable_default_sources():
    """The real pinned sources, the plain URL's host swapped for a closed port on 127.0.0.1 (the
    Hub's are moved by pointing huggingface_hub there)."""
    def move(remote):
        if isinstance(remote, HubFile):
            return remote
        return dataclasses.replace(remote, url=f"{UNREACHABLE}/{remote.url.split('/', 3)[3]}")

    wikitext = tuple(dataclasses.replace(source, archive=move(source.archive))
                     if isinstance(source, pd.ZipText) else source
                     for source in pd.DEFAULT_SOURCES.wikitext)
    return dataclasses.replace(pd.DEFAULT_SOURCES, wikitext=wikitext)


class LoopbackCase(HubClientMixin, unittest.TestCase):
    """Fixture files on disk and on a loopback server, and a fresh data folder per test."""

    @classmethod
    def setUpClass(cls):
        cls.fixture_dir = tempfile.TemporaryDirectory()
        cls.files, cls.arrays, cls.vocab = make_fixture_files(cls.fixture_dir.name)
        cls.server = FixtureServer(cls.files)
        cls.tokenizer = GPT1Tokenizer.from_folder(cls.fixture_dir.name)

    def setUp(self):
        super().setUp()
        self.data = os.path.join(self.work.name, "data")

    def sources(self, modes=None):
        """Fixture sources on the loopback Hub; `modes`: file name -> server mode."""
        return fixture_sources(self.files, modes)

    def prepare(self, mirror=None, **options):
        """prepare_data into the test's data folder: quiet, fast retries, fixture sources."""
        return pd.prepare_data(self.data, quiet(mirror), **{"sources": self.sources(), **options})

    def remote(self, name, mode):
        return RemoteFile(name, f"{self.server.base}/{mode}/{name}", sha256(self.files[name]),
                          len(self.files[name]))

    def assert_splits_built(self, folder):
        """The three npz hold the fixture text's tokens, one document per non-empty line."""
        for split, name in zip(pd.SPLITS, pd.DATA_FILES):
            lines = [line for line in RAW_TEXT[split].split("\n") if line.strip()]
            encoded = self.tokenizer.encode_lines(lines)
            with np.load(os.path.join(folder, name)) as archive:
                self.assertEqual(archive["tokens"].dtype, np.uint16)
                self.assertEqual(archive["sizes"].dtype, np.int64)
                self.assertEqual(archive["sizes"].tolist(), [len(ids) for ids in encoded])
                self.assertEqual(archive["tokens"].tolist(), [i for ids in encoded for i in ids])

    def assert_embeddings_built(self, path):
        with np.load(path) as archive:
            tokens, position = archive["tokens"], archive["position"]
        expected_tokens = self.arrays["tokens_embed.weight"]
        self.assertEqual(tokens.dtype, np.float32)
        self.assertEqual(tokens.shape, (expected_tokens.shape[0] + 1, WIDTH))
        np.testing.assert_array_equal(tokens[0], np.zeros(WIDTH))
        np.testing.assert_array_equal(tokens[1:], expected_tokens)
        np.testing.assert_array_equal(position, self.arrays["positions_embed.weight"][:256])


class EndToEndTest(LoopbackCase):

    def test_http_mirror_builds_splits_tokenizer_and_embeddings(self):
        self.hub(UNREACHABLE)  # only the mirror can answer
        report = self.prepare(mirror=f"{self.server.base}/ok/")
        self.assert_splits_built(self.data)
        self.assert_embeddings_built(os.path.join(self.data, "embeddings.npz"))
        self.assertEqual(report["splits"]["test"], {"documents": 2, "tokens": 11})
        for name in ("vocab.json", "merges.txt"):
            with open(os.path.join(self.data, name), "rb") as file:
                self.assertEqual(file.read(), self.files[name])
        # Fixture text is not the course's: verification runs and says so.
        self.assertEqual({entry["status"] for entry in report["verify"].values()}, {"mismatch"})
        # The checkpoint's tensors came by ranges, and no partial download was left behind.
        requests = self.server.requests("ok", "model.safetensors")
        self.assertTrue(requests and all(entry.range for entry in requests), requests)
        self.assertEqual(os.listdir(os.path.join(self.data, "sources")), ["wikitext-2-raw-v1.zip"])

    def test_hub_fills_its_cache_and_keeps_no_copy_of_its_files_in_the_data_folder(self):
        report = self.prepare()
        self.assert_splits_built(self.data)
        self.assert_embeddings_built(os.path.join(self.data, "embeddings.npz"))
        self.assertEqual(report["wikitext"]["source"], f"{self.server.base}/datasets/ok/ci/resolve/"
                                                       f"{REVISION}/wikitext-2-raw-v1.zip")
        self.assertEqual(os.listdir(os.path.join(self.data, "sources")), [])
        snapshots = [path for path in cache_files(self.home) if "/snapshots/" in path]
        self.assertEqual(snapshots, [f"datasets--ok--ci/snapshots/{REVISION}/wikitext-2-raw-v1.zip",
                                     f"models--ok--openai-gpt/snapshots/{REVISION}/merges.txt",
                                     f"models--ok--openai-gpt/snapshots/{REVISION}/vocab.json"])
        # The checkpoint was read by ranges, never whole.
        requests = self.server.requests("ok", "model.safetensors")
        self.assertTrue(requests and all(entry.range for entry in requests), requests)

    def test_run_exp_trains_on_what_was_built(self):
        import run_exp
        from utils.data_utils import read_log

        self.prepare()
        logs = os.path.join(self.work.name, "logs")
        for model in ("lstm", "gpt1"):
            # The default --embeddings is DATA_FOLDER/embeddings.npz: the file just built.
            args = ["--exp_id", model, "--model", model, "--data_folder", self.data, "--num_heads", "2",
                    "--hidden_size", "8", "--sequence_length", "4", "--batch_size", "2", "--epochs", "2",
                    "--max_steps", "3", "--log_dir", logs, "--device", "cpu", "--print_every", "0"]
            with contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(run_exp.main(args), 0)
            log = read_log(os.path.join(logs, model, "log.json"))
            self.assertEqual((log["status"], log["epochs"][-1]["steps"]), ("finished", 3))
            self.assertEqual(log["parameters"]["total"] - log["parameters"]["learnable"],
                             (len(self.vocab) + 1) * WIDTH + (4 * WIDTH if model == "gpt1" else 0))

    def test_exact_ids_of_test_split(self):
        self.prepare(skip_embeddings=True)
        with np.load(os.path.join(self.data, "wiki.test.npz")) as archive:
            tokens = archive["tokens"].tolist()
        # " = Robert = " and " the the cat ", looked up by hand in the fixture vocabulary.
        pieces = ["=</w>", "r", "o", "b", "e", "r", "t</w>", "=</w>", "the</w>", "the</w>", "cat</w>"]
        self.assertEqual(tokens, [self.vocab[piece] + 1 for piece in pieces])

    def test_mirror_folder_works_offline(self):
        self.hub(UNREACHABLE, offline=True)
        report = self.prepare(mirror=self.fixture_dir.name)
        self.assert_splits_built(self.data)
        self.assert_embeddings_built(os.path.join(self.data, "embeddings.npz"))
        self.assertEqual(report["wikitext"]["source"],
                         os.path.join(self.fixture_dir.name, "wikitext-2-raw-v1.zip"))
        self.assertEqual(self.server.log, [])

    def test_cli_with_mirror_folder(self):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = pd.main(["--data_folder", self.data, "--mirror", self.fixture_dir.name, "--quiet"],
                           sources=self.sources(), policy=FAST)
        self.assertEqual(code, 0)
        self.assertIn("verify test: mismatch", out.getvalue())
        self.assert_splits_built(self.data)

    def test_existing_files_are_kept_without_force(self):
        self.prepare(skip_embeddings=True)
        self.server.clear()
        report = self.prepare(skip_embeddings=True)
        self.assertIsNone(report["wikitext"])
        self.assertEqual(self.server.log, [])


class HubCacheTest(LoopbackCase):
    """The Hub's files come from huggingface_hub's cache once there: no request, offline too."""

    def setUp(self):
        super().setUp()
        self.other = os.path.join(self.work.name, "other_data")

    def test_second_build_from_the_cache_makes_no_request(self):
        self.prepare()
        self.server.clear()
        pd.prepare_data(self.other, quiet(), sources=self.sources())
        self.assertEqual(self.server.log, [])
        self.assert_splits_built(self.other)
        self.assert_embeddings_built(os.path.join(self.other, "embeddings.npz"))

    def test_offline_with_a_warm_cache_builds_everything(self):
        self.prepare()
        self.server.clear()
        self.hub(UNREACHABLE, offline=True)
        pd.prepare_data(self.other, quiet(), sources=self.sources())
        self.assert_splits_built(self.other)
        self.assert_embeddings_built(os.path.join(self.other, "embeddings.npz"))
        self.assertEqual(self.server.log, [])

    def test_corrupt_cached_archive_is_deleted_and_fetched_again(self):
        self.prepare(skip_embeddings=True)
        [blob] = [path for path in cache_files(self.home) if path.startswith("datasets--ok--ci/blobs/")]
        with open(os.path.join(self.home, "hub", blob), "r+b") as file:
            file.write(b"XX")
        self.server.clear()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            pd.prepare_data(self.other, quiet(), skip_embeddings=True, sources=self.sources())
        self.assertRegex(err.getvalue(), r"^warning: .*/wikitext-2-raw-v1.zip: not the pinned "
                                         r"wikitext-2-raw-v1.zip \(sha256 [0-9a-f]+, expected "
                                         r"[0-9a-f]+\); deleted from the Hugging Face cache\n$")
        self.assertEqual([entry.method for entry in self.server.log], ["HEAD", "GET"])
        self.assert_splits_built(self.other)

    def test_run_exp_prepares_its_data_through_the_hub_then_offline(self):
        import run_exp

        logs = os.path.join(self.work.name, "logs")
        for data, offline in ((self.data, False), (self.other, True)):
            self.hub(UNREACHABLE if offline else self.server.base, offline)
            args = ["--exp_id", f"offline_{offline}", "--model", "lstm", "--embeddings", "none",
                    "--data_folder", data, "--hidden_size", "8", "--embedding_size", "8",
                    "--sequence_length", "4", "--batch_size", "2", "--epochs", "1",
                    "--max_steps", "2", "--log_dir", logs, "--device", "cpu", "--print_every", "0",
                    "--no_progress_bar"]
            err = io.StringIO()
            # ensure_data reads DEFAULT_SOURCES when called: the fixture pins stand in for them.
            with mock.patch.object(pd, "DEFAULT_SOURCES", self.sources()), \
                    contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                self.assertEqual(run_exp.main(args), 0, err.getvalue())
            self.assert_splits_built(data)


def run_in_child(args, env, sources=None, module="utils.prepare_data"):
    """Run `python -m module args` in a child process with the environment variables `env` (and
    no other HF_* variable): its exit code, stdout and stderr. `sources`, if given, replace
    DEFAULT_SOURCES there (pickled through a file), as the pins of the fixture files."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environ = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    environ.update(env)
    command = [sys.executable, "-m", module, *args]
    if sources is not None:
        path = env["HF_HOME"] + ".sources.pickle"
        with open(path, "wb") as file:
            pickle.dump(sources, file)
        command = [sys.executable, "-c", "import pickle, sys; import utils.prepare_data as pd; "
                   f"pd.DEFAULT_SOURCES = pickle.load(open({path!r}, 'rb')); "
                   f"from {module} import main; sys.exit(main(sys.argv[1:]))", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=root,
                            env=environ)
    return result.returncode, result.stdout, result.stderr


@slow
class HubEnvironmentTest(LoopbackCase):
    """The command line in child processes, huggingface_hub configured by the environment
    variables it reads when imported: HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_OFFLINE."""

    def test_first_run_fills_the_cache_the_next_make_no_request_offline_too(self):
        # The agent registry huggingface_hub's user agent asks for (/api/agent-harnesses), once a
        # day: cached in HF_HOME beforehand, so that no run asks for it. (Fetched by the first run
        # instead, a fetch slower than its 3 s timeout on a busy machine cached nothing, and the
        # second run asked again.) Served too, for a huggingface_hub that keeps it elsewhere.
        registry = b'{"standardEnvVars": [], "harnesses": {}}'
        os.makedirs(self.home, exist_ok=True)
        with open(os.path.join(self.home, ".agent_harnesses.json"), "wb") as file:
            file.write(registry)
        self.server.files = dict(self.files, **{"agent-harnesses": registry})
        self.addCleanup(setattr, self.server, "files", self.files)
        env = {"HF_ENDPOINT": self.server.base, "HF_HOME": self.home, "HF_TOKEN": "hf_fixture"}
        code, out, err = run_in_child(["--data_folder", self.data, "--quiet"], env, self.sources())
        self.assertEqual(code, 0, err)
        self.assertIn("verify test: mismatch", out)
        self.assert_splits_built(self.data)
        self.assert_embeddings_built(os.path.join(self.data, "embeddings.npz"))
        hub_requests = [entry for entry in self.server.log if entry.hub]
        self.assertEqual({entry.authorization for entry in hub_requests}, {"Bearer hf_fixture"})
        self.assertIn(f"datasets--ok--ci/snapshots/{REVISION}/wikitext-2-raw-v1.zip",
                      cache_files(self.home))
        for folder, extra in (("second", {}), ("offline", {"HF_HUB_OFFLINE": "1"})):
            with self.subTest(folder):
                self.server.clear()
                data = os.path.join(self.work.name, folder)
                code, out, err = run_in_child(["--data_folder", data, "--quiet"], {**env, **extra},
                                              self.sources())
                self.assertEqual(code, 0, err)
                self.assert_splits_built(data)
                self.assert_embeddings_built(os.path.join(data, "embeddings.npz"))
                self.assertEqual(self.server.log, [])

    def test_offline_with_a_cold_cache_is_one_line_and_exit_2(self):
        env = {"HF_ENDPOINT": self.server.base, "HF_HOME": self.home, "HF_HUB_OFFLINE": "1"}
        code, out, err = run_in_child(["--data_folder", self.data], env)  # the real pins
        self.assertEqual(code, 2)
        self.assertRegex(err, r"^python -m utils\.prepare_data: error: cannot get the GPT-1 tokenizer: .*/vocab.json: not in the "
                              r"Hugging Face cache \(.*\), and HF_HUB_OFFLINE is set\. Run "
                              rf"`HF_HUB_OFFLINE=0 python -m utils.prepare_data --data_folder "
                              rf"{re.escape(self.data)}` with network access, or put [^\n]*\n$")
        self.assertEqual(self.server.log, [])


class FailureTest(LoopbackCase):
    """What data preparation makes of a source that fails, and what the user gets."""

    def test_wrong_checksum_falls_back_to_next_source_and_is_never_used(self):
        good = self.sources()
        bad = self.sources({"wikitext-2-raw-v1.zip": "badsum"}).wikitext[0]
        plain = pd.ZipText(self.remote("wikitext-2-raw-v1.zip", "ok"), MEMBERS)
        sources = dataclasses.replace(good, wikitext=(bad, plain, good.wikitext[0]))
        report = self.prepare(skip_embeddings=True, sources=sources)
        self.assertEqual(report["wikitext"]["source"], plain.archive.url)
        [failure] = report["wikitext"]["failed_sources"]
        self.assertRegex(failure, "/badsum/ci/resolve/.*/wikitext-2-raw-v1.zip: not the pinned")
        self.assertFalse([path for path in cache_files(self.home) if "badsum" in path
                          and ("blobs/" in path or "snapshots/" in path)])
        self.assert_splits_built(self.data)

    def test_every_source_failing_raises_one_line_without_writing_data(self):
        sources = self.sources({"wikitext-2-raw-v1.zip": "badsum"})
        with self.assertRaises(pd.DataUnavailableError) as caught:
            self.prepare(skip_embeddings=True, sources=sources)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertRegex(message, r"^cannot get WikiText-2 raw: .*/badsum/ci/resolve/.*/"
                                  r"wikitext-2-raw-v1.zip: not the pinned")
        self.assertIn("--mirror FOLDER", message)
        self.assertFalse(any(os.path.exists(os.path.join(self.data, name)) for name in pd.DATA_FILES))

    def test_wrong_checkpoint_bytes_are_not_used(self):
        # The server ignores ranges ("badsum"): the whole file comes, fails its check, is deleted.
        sources = self.sources({"model.safetensors": "badsum"})
        with self.assertRaisesRegex(pd.DataUnavailableError,
                                    "the GPT-1 embeddings: .*not the pinned model.safetensors"):
            self.prepare(sources=sources)
        self.assertFalse(os.path.exists(os.path.join(self.data, "embeddings.npz")))
        self.assertFalse([path for path in cache_files(self.home) if "badsum" in path
                          and ("blobs/" in path or "snapshots/" in path)])

    def test_unwritable_folder_is_one_clear_error(self):
        blocker = os.path.join(self.work.name, "a_file")
        open(blocker, "w").close()
        folder = os.path.join(blocker, "data")  # a folder cannot be made inside a file
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = pd.main(["--data_folder", folder, "--quiet"], sources=self.sources(), policy=FAST)
        self.assertEqual(code, 2)
        self.assertEqual(err.getvalue(), f"python -m utils.prepare_data: error: cannot write in "
                                         f"{folder} (Not a directory): choose another --data_folder "
                                         "or free the disk\n")


class InterruptionTest(LoopbackCase):
    """A run stopped at any moment leaves the previous state or complete, checked files."""

    def test_interrupted_tokenization_leaves_only_complete_npz(self):
        calls = []
        original = GPT1Tokenizer.encode_lines

        def encode_then_stop(tokenizer, lines):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return original(tokenizer, lines)

        with mock.patch.object(GPT1Tokenizer, "encode_lines", encode_then_stop):
            with self.assertRaises(KeyboardInterrupt):
                self.prepare(skip_embeddings=True)
        written = sorted(name for name in os.listdir(self.data) if "npz" in name)
        self.assertEqual(written, ["wiki.train.npz"])  # complete, and no temporary file left
        self.prepare(skip_embeddings=True)
        self.assert_splits_built(self.data)


class EnsureDataTest(LoopbackCase):

    def test_does_nothing_when_files_are_present(self):
        os.makedirs(self.data)
        for name in pd.DATA_FILES:
            open(os.path.join(self.data, name), "wb").close()
        self.hub(UNREACHABLE, offline=True)
        self.assertIsNone(pd.ensure_data(self.data, fetcher=quiet(), sources=self.sources()))

    def test_prepares_what_is_missing(self):
        pd.ensure_data(self.data, need_embeddings=True, fetcher=quiet(), sources=self.sources())
        self.assert_splits_built(self.data)
        self.assert_embeddings_built(os.path.join(self.data, "embeddings.npz"))

    def test_embeddings_path_elsewhere(self):
        path = os.path.join(self.work.name, "elsewhere.npz")
        pd.ensure_data(self.data, need_embeddings=True, embeddings_path=path, fetcher=quiet(),
                       sources=self.sources())
        self.assert_embeddings_built(path)

    def test_no_network_raises_one_line(self):
        self.hub(UNREACHABLE)
        with self.assertRaises(pd.DataUnavailableError) as caught:
            pd.ensure_data(self.data, fetcher=quiet(), sources=unreachable_default_sources())
        self.assertNotIn("\n", str(caught.exception))
        self.assertIn("--mirror FOLDER", str(caught.exception))


class CommandLineTest(LoopbackCase):

    def test_no_network_message(self):
        self.hub(UNREACHABLE)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = pd.main(["--data_folder", self.data], sources=unreachable_default_sources(),
                           policy=FAST)
        print(f"\nno-network message: {err.getvalue()}", file=sys.stderr, end="")
        self.assertEqual(code, 2)
        url = f"{UNREACHABLE}/openai-community/openai-gpt/resolve/{GPT1_REVISION}/vocab.json"
        self.assertEqual(err.getvalue(), (
            f"python -m utils.prepare_data: error: cannot get the GPT-1 tokenizer: {url}: connection refused. "
            f"Run `python -m utils.prepare_data --data_folder {self.data}` with network access, "
            "or put wikitext-2-raw-v1.zip, vocab.json, merges.txt, model.safetensors in a folder "
            "and add `--mirror FOLDER`\n"))

    def test_offline_with_a_cold_cache_message(self):
        self.hub(self.server.base, offline=True)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = pd.main(["--data_folder", self.data], sources=unreachable_default_sources(),
                           policy=FAST)
        self.assertEqual(code, 2)
        url = f"{self.server.base}/openai-community/openai-gpt/resolve/{GPT1_REVISION}/vocab.json"
        self.assertEqual(err.getvalue(), (
            f"python -m utils.prepare_data: error: cannot get the GPT-1 tokenizer: {url}: not in the Hugging Face cache "
            f"({self.home}/hub), and HF_HUB_OFFLINE is set. Run `HF_HUB_OFFLINE=0 python -m "
            f"utils.prepare_data --data_folder {self.data}` with network access, or put "
            "wikitext-2-raw-v1.zip, vocab.json, merges.txt, model.safetensors in a folder and add "
            "`--mirror FOLDER`\n"))
        self.assertEqual(self.server.log, [])

    def test_bad_mirror_value(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = pd.main(["--data_folder", self.data, "--mirror", "/no/such/folder"])
        self.assertEqual(code, 2)
        self.assertEqual(err.getvalue(), "python -m utils.prepare_data: error: --mirror '/no/such/folder' is neither an existing "
                                         "folder nor an http(s):// URL; give a folder holding the "
                                         "files by name, or a base URL serving them\n")

    def test_errors_are_one_line_without_traceback_in_a_real_process(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # A bad value and a bad flag (argparse's error): both one line named by the program.
        prefix = "python -m utils.prepare_data: error: "
        for argv in (["--mirror", "/no/such/folder"], ["--bogus"]):
            with self.subTest(argv=argv):
                result = subprocess.run([sys.executable, "-m", "utils.prepare_data", *argv],
                                        capture_output=True, text=True, timeout=60, cwd=root)
                self.assertEqual(result.returncode, 2)
                self.assertRegex(result.stderr, "^" + re.escape(prefix) + r"[^\n]*\n$")

    def test_help_shows_the_default_once(self):
        text = " ".join(pd._parser().format_help().split())
        self.assertIn("--data_folder DATA_FOLDER where to write the data (default: data)", text)
        self.assertEqual(text.count("default"), 1)


def has_official_arrays():
    return bool(SHARED_DATA_DIR) and all(
        os.path.isfile(os.path.join(SHARED_DATA_DIR, "wikitext2", name)) for name in pd.DATA_FILES)


@unittest.skipUnless(has_official_arrays(), "SHARED_DATA_DIR is not set or lacks wikitext2/wiki.*.npz "
                                            "(the course's official arrays); set it to ../shared/data")
class VerifyTest(unittest.TestCase):

    def setUp(self):
        self.work = tempfile.TemporaryDirectory()
        for name in pd.DATA_FILES:
            shutil.copy(os.path.join(SHARED_DATA_DIR, "wikitext2", name), self.work.name)

    def tearDown(self):
        self.work.cleanup()

    def test_official_arrays_match(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = pd.main(["--verify", "--data_folder", self.work.name])
        self.assertEqual(code, 0)
        self.assertEqual(out.getvalue(),
                         "verify train: match\nverify validation: match\nverify test: match\n")

    def test_changed_or_missing_arrays_are_reported(self):
        path = os.path.join(self.work.name, "wiki.test.npz")
        with np.load(path) as archive:
            tokens, sizes = archive["tokens"].copy(), archive["sizes"]
        tokens[0] += 1
        np.savez(path, tokens=tokens, sizes=sizes)
        os.remove(os.path.join(self.work.name, "wiki.validation.npz"))
        result = pd.verify(self.work.name)
        self.assertEqual({split: entry["status"] for split, entry in result.items()},
                         {"train": "match", "validation": "missing", "test": "mismatch"})
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(pd.main(["--verify", "--data_folder", self.work.name]), 1)


class ParquetSourceTest(LoopbackCase):
    """The fallback source: Hugging Face's parquet files, one `text` row per line of the raw text."""

    def parquet_mirror(self, write_parquet):
        """(mirror folder, sources) for parquet files written by `write_parquet(path, rows)`."""
        mirror = os.path.join(self.work.name, "mirror")
        os.makedirs(mirror)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(self.fixture_dir.name, name), mirror)
        files = {}
        for split in pd.SPLITS:
            name = f"{split}-00000-of-00001.parquet"
            # Rows as Hugging Face stores them: each line with its "\n", blank lines as "".
            rows = [line + "\n" if line.strip() else "" for line in RAW_TEXT[split].split("\n")[:-1]]
            write_parquet(os.path.join(mirror, name), rows)
            with open(os.path.join(mirror, name), "rb") as file:
                files[split] = HubFile("ok/wikitext", f"wikitext-2-raw-v1/{name}", REVISION,
                                       sha256(file.read()), repo_type="dataset")
        sources = dataclasses.replace(self.sources(), wikitext=(pd.ParquetText(files),))
        return mirror, sources

    @unittest.skipUnless(HAS_PYARROW, "pyarrow is not installed (optional: only this source needs it)")
    def test_parquet_files_give_the_same_splits(self):
        import pyarrow
        import pyarrow.parquet

        def write_parquet(path, rows):
            pyarrow.parquet.write_table(pyarrow.table({"text": rows}), path)

        mirror, sources = self.parquet_mirror(write_parquet)
        self.prepare(mirror=mirror, skip_embeddings=True, sources=sources)
        self.assert_splits_built(self.data)

    @unittest.skipIf(HAS_PYARROW, "pyarrow is installed, so the parquet source is not skipped")
    def test_without_pyarrow_the_source_is_skipped_with_the_fix(self):
        def write_placeholder(path, rows):
            with open(path, "w", encoding="utf-8") as file:
                file.write("".join(rows))

        mirror, sources = self.parquet_mirror(write_placeholder)
        with self.assertRaisesRegex(pd.DataUnavailableError, r"needs pyarrow \(pip install pyarrow\)"):
            self.prepare(mirror=mirror, skip_embeddings=True, sources=sources)


class EmbeddingsTest(unittest.TestCase):

    def test_vocabulary_and_checkpoint_must_agree(self):
        with self.assertRaisesRegex(ValueError,
                                    "checkpoint has 3 token embeddings, the vocabulary 4 tokens"):
            pd.build_embeddings(np.zeros((3, 2), np.float32), np.zeros((256, 2), np.float32), 5)


if __name__ == "__main__":
    unittest.main()
