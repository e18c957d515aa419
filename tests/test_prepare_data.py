"""Tests of utils.prepare_data, all offline: the loopback HTTP server of tests/test_download.py
(its docstring lists how it can answer) serves a tiny WikiText-2 raw zip, a tiny tokenizer and a
tiny safetensors checkpoint. How each download fails or resumes is tested there; here, what
data preparation makes of it.

Tests that read the course's official arrays find them through $SHARED_DATA_DIR and are
skipped, saying so, when it is not set.
"""
import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import zipfile
from unittest import mock

import numpy as np
from safetensors.numpy import save_file

from tests.test_download import FAST, UNREACHABLE, FixtureServer, sha256
from tests.test_tokenization import write_tiny_tokenizer
from utils import prepare_data as pd
from utils.cli import shared_data_path
from utils.download import RemoteFile
from utils.tokenization import GPT1Tokenizer

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
    arrays = {"tokens_embed.weight": np.arange(len(vocab) * WIDTH, dtype=np.float32).reshape(-1, WIDTH),
              "positions_embed.weight": -np.arange(300 * WIDTH, dtype=np.float32).reshape(-1, WIDTH),
              "h.0.mlp.c_fc.weight": np.ones((3, 5), dtype=np.float32)}
    save_file(arrays, os.path.join(folder, "model.safetensors"))
    files = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as file:
            files[name] = file.read()
    return files, arrays, vocab


def fixture_sources(files, base, modes=None):
    """Sources pinned to the fixture files, each URL at `base/MODE/NAME` (mode "ok" unless
    `modes` says otherwise for that name)."""
    modes = modes or {}

    def remote(name):
        return RemoteFile(name, f"{base}/{modes.get(name, 'ok')}/{name}", sha256(files[name]),
                             len(files[name]))

    zip_text = pd.ZipText(remote("wikitext-2-raw-v1.zip"), MEMBERS)
    return pd.Sources(wikitext=(zip_text,), vocab=remote("vocab.json"), merges=remote("merges.txt"),
                      checkpoint=remote("model.safetensors"))


def unreachable_default_sources():
    """The real pinned sources with every host swapped for a closed port on 127.0.0.1."""
    def move(remote):
        path = remote.url.split("/", 3)[3]
        return dataclasses.replace(remote, url=f"{UNREACHABLE}/{path}")

    wikitext = tuple(dataclasses.replace(source, archive=move(source.archive))
                     if isinstance(source, pd.ZipText)
                     else pd.ParquetText({k: move(v) for k, v in source.parquet.items()})
                     for source in pd.DEFAULT_SOURCES.wikitext)
    default = pd.DEFAULT_SOURCES
    return dataclasses.replace(default, wikitext=wikitext, vocab=move(default.vocab),
                               merges=move(default.merges), checkpoint=move(default.checkpoint))


class LoopbackCase(unittest.TestCase):
    """Fixture files on disk and on a loopback server, and a fresh data folder per test."""

    @classmethod
    def setUpClass(cls):
        cls.fixture_dir = tempfile.TemporaryDirectory()
        cls.files, cls.arrays, cls.vocab = make_fixture_files(cls.fixture_dir.name)
        cls.server = FixtureServer(cls.files)
        cls.tokenizer = GPT1Tokenizer.from_folder(cls.fixture_dir.name)

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.fixture_dir.cleanup()

    def setUp(self):
        self.work = tempfile.TemporaryDirectory()
        self.data = os.path.join(self.work.name, "data")
        self.server.log.clear()
        self.server.seen.clear()

    def tearDown(self):
        self.work.cleanup()

    def sources(self, modes=None):
        """Fixture sources served by the loopback server; `modes`: file name -> server mode."""
        return fixture_sources(self.files, self.server.base, modes)

    def prepare(self, **options):
        """prepare_data into the test's data folder: quiet, fast retries, fixture sources."""
        options = {"progress": False, "policy": FAST, "sources": self.sources(), **options}
        return pd.prepare_data(self.data, **options)

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
        sources = fixture_sources(self.files, UNREACHABLE)  # only the mirror can answer
        report = self.prepare(mirror=f"{self.server.base}/ok/", sources=sources)
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
        self.assertTrue(requests and all(entry[2] for entry in requests), requests)
        self.assertEqual(os.listdir(os.path.join(self.data, "sources")), ["wikitext-2-raw-v1.zip"])

    def test_run_exp_trains_on_what_was_built(self):
        import run_exp
        from utils.data_utils import read_log

        self.prepare(mirror=f"{self.server.base}/ok/", sources=fixture_sources(self.files, UNREACHABLE))
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
        sources = fixture_sources(self.files, UNREACHABLE)
        report = self.prepare(mirror=self.fixture_dir.name, sources=sources)
        self.assert_splits_built(self.data)
        self.assert_embeddings_built(os.path.join(self.data, "embeddings.npz"))
        self.assertEqual(report["wikitext"]["source"],
                         os.path.join(self.fixture_dir.name, "wikitext-2-raw-v1.zip"))
        self.assertEqual(self.server.log, [])

    def test_cli_with_mirror_folder(self):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = pd.main(["--data_folder", self.data, "--mirror", self.fixture_dir.name, "--quiet"],
                           sources=fixture_sources(self.files, UNREACHABLE), policy=FAST)
        self.assertEqual(code, 0)
        self.assertIn("verify test: mismatch", out.getvalue())
        self.assert_splits_built(self.data)

    def test_existing_files_are_kept_without_force(self):
        self.prepare(skip_embeddings=True)
        self.server.log.clear()
        report = self.prepare(skip_embeddings=True)
        self.assertIsNone(report["wikitext"])
        self.assertEqual(self.server.log, [])


class FailureTest(LoopbackCase):
    """What data preparation makes of a source that fails, and what the user gets."""

    def test_wrong_checksum_falls_back_to_next_source_and_is_never_used(self):
        good = self.sources()
        bad = pd.ZipText(self.remote("wikitext-2-raw-v1.zip", "badsum"), MEMBERS)
        sources = dataclasses.replace(good, wikitext=(bad, good.wikitext[0]))
        report = self.prepare(skip_embeddings=True, sources=sources)
        self.assertEqual(report["wikitext"]["source"], good.wikitext[0].archive.url)
        [failure] = report["wikitext"]["failed_sources"]
        self.assertIn("/badsum/wikitext-2-raw-v1.zip: not the pinned", failure)
        self.assert_splits_built(self.data)

    def test_every_source_failing_raises_one_line_without_writing_data(self):
        sources = self.sources({"wikitext-2-raw-v1.zip": "badsum"})
        with self.assertRaises(pd.DataUnavailableError) as caught:
            self.prepare(skip_embeddings=True, sources=sources)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertRegex(message,
                         r"^cannot get WikiText-2 raw: .*/badsum/wikitext-2-raw-v1.zip: not the pinned")
        self.assertIn("--mirror FOLDER", message)
        self.assertFalse(any(os.path.exists(os.path.join(self.data, name)) for name in pd.DATA_FILES))

    def test_wrong_checkpoint_bytes_are_not_used(self):
        sources = self.sources({"model.safetensors": "norange"})
        bad_url = sources.checkpoint.url.replace("norange", "badsum")
        checkpoint = dataclasses.replace(sources.checkpoint, url=bad_url)
        sources = dataclasses.replace(sources, checkpoint=checkpoint)
        with self.assertRaisesRegex(pd.DataUnavailableError,
                                    "the GPT-1 embeddings: .*not the pinned model.safetensors"):
            self.prepare(sources=sources)
        self.assertFalse(os.path.exists(os.path.join(self.data, "embeddings.npz")))
        self.assertEqual(os.listdir(os.path.join(self.data, "sources")), ["wikitext-2-raw-v1.zip"])

    def test_unwritable_folder_is_one_clear_error(self):
        blocker = os.path.join(self.work.name, "a_file")
        open(blocker, "w").close()
        folder = os.path.join(blocker, "data")  # a folder cannot be made inside a file
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = pd.main(["--data_folder", folder, "--quiet"], sources=self.sources(), policy=FAST)
        self.assertEqual(code, 2)
        self.assertEqual(err.getvalue(), f"error: cannot write in data folder {folder}: not a "
                                         "directory; pick another --data_folder\n")


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
        sources = fixture_sources(self.files, UNREACHABLE)
        self.assertIsNone(pd.ensure_data(self.data, progress=False, sources=sources))

    def test_prepares_what_is_missing(self):
        pd.ensure_data(self.data, need_embeddings=True, progress=False, sources=self.sources(),
                       policy=FAST)
        self.assert_splits_built(self.data)
        self.assert_embeddings_built(os.path.join(self.data, "embeddings.npz"))

    def test_embeddings_path_elsewhere(self):
        path = os.path.join(self.work.name, "elsewhere.npz")
        pd.ensure_data(self.data, need_embeddings=True, embeddings_path=path, progress=False,
                       sources=self.sources(), policy=FAST)
        self.assert_embeddings_built(path)

    def test_no_network_raises_one_line(self):
        with self.assertRaises(pd.DataUnavailableError) as caught:
            pd.ensure_data(self.data, progress=False, sources=unreachable_default_sources(),
                           policy=FAST)
        self.assertNotIn("\n", str(caught.exception))
        self.assertIn("--mirror FOLDER", str(caught.exception))


class CommandLineTest(LoopbackCase):

    def test_no_network_message(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = pd.main(["--data_folder", self.data], sources=unreachable_default_sources(),
                           policy=FAST)
        print(f"\nno-network message: {err.getvalue()}", file=sys.stderr, end="")
        self.assertEqual(code, 2)
        url = pd.DEFAULT_SOURCES.vocab.url.replace("https://huggingface.co", UNREACHABLE)
        self.assertEqual(err.getvalue(), (
            f"error: cannot get the GPT-1 tokenizer: {url}: connection refused (tried 3 times). "
            f"Run `python -m utils.prepare_data --data_folder {self.data}` with internet access, "
            "or put wikitext-2-raw-v1.zip, vocab.json, merges.txt, model.safetensors in a folder "
            "and add `--mirror FOLDER`\n"))

    def test_bad_mirror_value(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = pd.main(["--data_folder", self.data, "--mirror", "/no/such/folder"])
        self.assertEqual(code, 2)
        self.assertEqual(err.getvalue(), "error: --mirror '/no/such/folder' is neither an existing "
                                         "folder nor an http(s):// URL; give a folder holding the "
                                         "files by name, or a base URL serving them\n")

    def test_errors_are_one_line_without_traceback_in_a_real_process(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # A bad flag is argparse's error, named by the program (utils.cli.OneLineParser).
        for argv, prefix in ((["--mirror", "/no/such/folder"], "error: "),
                             (["--bogus"], "python -m utils.prepare_data: error: ")):
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
                files[split] = RemoteFile(name, f"{UNREACHABLE}/{name}", sha256(file.read()))
        sources = dataclasses.replace(fixture_sources(self.files, UNREACHABLE),
                                      wikitext=(pd.ParquetText(files),))
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
