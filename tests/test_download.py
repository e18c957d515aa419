"""Tests of utils.download, all offline: an HTTP server on 127.0.0.1 serves fixture files well or
badly, both as a plain web server and as the Hugging Face Hub answers huggingface_hub
(tests/test_prepare_data.py serves its own files with it).

The server (tests/helpers.py: FixtureServer) answers plain and Hub paths in the modes its
docstring lists.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, when imported: in this process
`hub_client` sets the constants they set; tests/test_prepare_data.py also runs the command line in
a child process with the variables themselves.
"""
import contextlib
import dataclasses
import errno
import io
import json
import os
import socket
import tempfile
import unittest
from unittest import mock

import numpy as np
from huggingface_hub import file_download
from huggingface_hub.utils import httpx
from safetensors.numpy import save_file

from tests.helpers import (FAST, REVISION, UNREACHABLE, FixtureServer, HubClientMixin, cache_files,
                           quiet, read_folder, sha256, write_tiny_checkpoint)
from utils import download as dl

TENSOR_ROWS = {"tokens_embed.weight": None, "positions_embed.weight": 256}


def make_fixture_files(folder):
    """Write the served files in `folder`; return (name -> bytes, the checkpoint's arrays).

    small.json and blob.bin (256 KiB, several chunks of FAST) are plain files; model.safetensors
    holds two embedding tensors and one tensor that is never asked for.
    """
    with open(os.path.join(folder, "small.json"), "w", encoding="utf-8") as file:
        json.dump({f"token{index}": index for index in range(100)}, file)
    with open(os.path.join(folder, "blob.bin"), "wb") as file:
        file.write(bytes(range(256)) * 1024)
    arrays = write_tiny_checkpoint(folder, rows=60, width=4)
    return read_folder(folder), arrays


class ServerCase(HubClientMixin, unittest.TestCase):
    """The fixture files on disk and on a loopback server, huggingface_hub pointed at it with an
    empty cache, and an empty download folder per test."""

    @classmethod
    def setUpClass(cls):
        cls.fixture_dir = tempfile.TemporaryDirectory()
        cls.files, cls.arrays = make_fixture_files(cls.fixture_dir.name)
        cls.server = FixtureServer(cls.files)

    def setUp(self):
        super().setUp()
        self.folder = os.path.join(self.work.name, "downloads")
        os.makedirs(self.folder)


    def remote(self, name, mode):
        """`name` at a plain URL, pinned to its fixture bytes, served in `mode`."""
        return dl.RemoteFile(name, f"{self.server.base}/{mode}/{name}", sha256(self.files[name]),
                             len(self.files[name]))

    def hub_file(self, name, mode="ok", repo_type="model"):
        """`name` in the Hub repository `mode`/fixtures, pinned to its fixture bytes."""
        return dl.HubFile(f"{mode}/fixtures", name, REVISION, sha256(self.files[name]),
                          len(self.files[name]), repo_type)

    def fetch(self, name, mode, policy=FAST):
        return dl.fetch_file(quiet(policy=policy), self.remote(name, mode), self.folder)

    def fetch_hub(self, name, mode="ok", policy=FAST):
        return dl.fetch_file(quiet(policy=policy), self.hub_file(name, mode), self.folder)

    def assert_fetched(self, path, name):
        with open(path, "rb") as file:
            self.assertEqual(file.read(), self.files[name])


class FailureTest(ServerCase):
    """Each way a plain server can fail, and what the user gets."""

    def test_404_is_reported_once_with_url(self):
        with self.assertRaises(dl.DownloadError) as caught:
            self.fetch("small.json", "404")
        self.assertEqual(str(caught.exception), f"{self.server.base}/404/small.json: HTTP 404 Not Found")
        self.assertEqual(len(self.server.requests("404", "small.json")), 1)

    def test_500_is_retried_then_reported(self):
        with self.assertRaisesRegex(dl.DownloadError,
                                    r"HTTP 500 Internal Server Error \(tried 3 times\)$"):
            self.fetch("small.json", "500")
        self.assertEqual(len(self.server.requests("500", "small.json")), FAST.retries + 1)

    def test_passing_500_is_retried_and_succeeds(self):
        self.assert_fetched(self.fetch("small.json", "flaky"), "small.json")
        self.assertEqual(len(self.server.requests("flaky", "small.json")), 2)

    def test_truncated_body_is_retried_then_reported_and_not_kept(self):
        size = len(self.files["blob.bin"])
        expected = rf"connection closed after {size // 2:,} of {size:,} bytes \(tried 3 times\)$"
        with self.assertRaisesRegex(dl.DownloadError, expected):
            self.fetch("blob.bin", "truncated")
        self.assertFalse(os.path.exists(os.path.join(self.folder, "blob.bin")))

    def test_dropped_connection_resumes_with_range(self):
        self.assert_fetched(self.fetch("blob.bin", "drop"), "blob.bin")
        half = len(self.files["blob.bin"]) // 2
        ranges = [entry.range for entry in self.server.requests("drop", "blob.bin")]
        self.assertEqual(ranges, [None, f"bytes={half}-"])

    def test_wrong_checksum_is_deleted_and_reported(self):
        with self.assertRaisesRegex(dl.ChecksumError,
                                    r"not the pinned blob.bin \(sha256 .*\); deleted$"):
            self.fetch("blob.bin", "badsum")
        self.assertEqual(os.listdir(self.folder), [])

    def test_timeout_is_reported(self):
        policy = dataclasses.replace(FAST, timeout_s=0.2, retries=0)
        with self.assertRaisesRegex(dl.DownloadError, r"/hang/small.json: timed out after 0.2 s$"):
            self.fetch("small.json", "hang", policy)

    def test_refused_connection_is_retried_then_reported(self):
        remote = dl.RemoteFile("small.json", f"{UNREACHABLE}/small.json")
        with self.assertRaises(dl.DownloadError) as caught:
            dl.fetch_file(quiet(), remote, self.folder)
        self.assertEqual(str(caught.exception),
                         f"{UNREACHABLE}/small.json: connection refused (tried 3 times)")

    def test_unknown_host_is_not_retried(self):
        unknown = httpx.ConnectError("[Errno -2] Name or service not known")
        unknown.__cause__ = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        session = mock.Mock()
        session.stream.side_effect = unknown
        with mock.patch.object(dl, "get_session", return_value=session):
            with self.assertRaises(dl.DownloadError) as caught:
                self.fetch("small.json", "ok")
        self.assertEqual(session.stream.call_count, 1)
        self.assertTrue(str(caught.exception).endswith(
            "/ok/small.json: cannot resolve the host name, no network? (Name or service not known)"))

    def test_offline_mode_stops_plain_downloads_too(self):
        self.hub(self.server.base, offline=True)
        with self.assertRaisesRegex(dl.DownloadError,
                                    r"/ok/small.json: not downloaded: HF_HUB_OFFLINE is set$"):
            self.fetch("small.json", "ok")
        self.assertEqual(self.server.log, [])

    @unittest.skipUnless(os.path.exists("/dev/full"), "needs /dev/full to simulate a full disk")
    def test_full_disk_is_one_clear_error(self):
        with mock.patch.object(dl, "_open_for_append", lambda path: open("/dev/full", "ab")):
            with self.assertRaisesRegex(dl.StorageError,
                                        r"^disk full while writing .*small.json.part: free some space"):
                self.fetch("small.json", "ok")

    def test_unwritable_folder_is_one_clear_error(self):
        # Mocked, as permissions do not stop root: what `open` raises in a read-only folder.
        refused = PermissionError(errno.EACCES, "Permission denied")
        with mock.patch.object(dl, "_open_for_append", side_effect=refused):
            with self.assertRaises(dl.StorageError) as caught:
                self.fetch("small.json", "ok")
        part = os.path.join(self.folder, "small.json.part")
        self.assertEqual(str(caught.exception),
                         f"cannot write {part}: permission denied; pick a writable --data_folder")


class ResumeTest(ServerCase):
    """A run stopped at any moment leaves the previous state or a complete, checked file."""

    def test_interrupted_download_keeps_partial_aside_then_resumes(self):
        policy = dataclasses.replace(FAST, chunk_bytes=1024)

        def interrupted(path):
            """The part file, with Ctrl-C arriving once two chunks are written."""
            file = open(path, "ab")
            original_write = file.write

            def write(chunk):
                if file.tell() >= 2 * 1024:
                    raise KeyboardInterrupt
                return original_write(chunk)
            file.write = write
            return file

        with mock.patch.object(dl, "_open_for_append", interrupted):
            with self.assertRaises(KeyboardInterrupt):
                self.fetch("blob.bin", "ok", policy)
        self.assertEqual(os.listdir(self.folder), ["blob.bin.part"])
        self.assert_fetched(self.fetch("blob.bin", "ok", policy), "blob.bin")
        self.assertEqual(self.server.requests("ok", "blob.bin")[-1].range, f"bytes={2 * 1024}-")
        self.assertEqual(os.listdir(self.folder), ["blob.bin"])

    def test_complete_part_is_checked_and_kept_when_nothing_is_left_to_send(self):
        with open(os.path.join(self.folder, "small.json.part"), "wb") as file:
            file.write(self.files["small.json"])
        self.assert_fetched(self.fetch("small.json", "ok"), "small.json")
        size = len(self.files["small.json"])
        self.assertEqual([entry.range for entry in self.server.requests("ok", "small.json")],
                         [f"bytes={size}-"])  # answered 416: nothing left to send

    def test_checked_file_already_there_is_not_fetched_again(self):
        self.fetch("small.json", "ok")
        self.server.clear()
        self.assert_fetched(self.fetch("small.json", "ok"), "small.json")
        self.assertEqual(self.server.log, [])


class HubTest(ServerCase):
    """Files on the Hub, fetched by huggingface_hub into its cache or taken from there."""

    def test_first_fetch_fills_the_cache_and_the_next_makes_no_request(self):
        path = self.fetch_hub("small.json")
        self.assert_fetched(path, "small.json")
        self.assertEqual(path, os.path.join(self.home, "hub", "models--ok--fixtures", "snapshots",
                                            REVISION, "small.json"))
        self.assertEqual([entry.method for entry in self.server.log], ["HEAD", "GET"])
        self.server.clear()
        self.assertEqual(self.fetch_hub("small.json"), path)
        self.assertEqual(self.server.log, [])

    def test_dataset_repository_and_its_cache_folder(self):
        remote = self.hub_file("small.json", repo_type="dataset")
        path = dl.fetch_file(quiet(), remote, self.folder)
        self.assertIn(f"/datasets--ok--fixtures/snapshots/{REVISION}/", path)
        self.assertEqual(self.server.paths[-1],
                         f"/datasets/ok/fixtures/resolve/{REVISION}/small.json")
        self.assertEqual(remote.url, f"{self.server.base}/datasets/ok/fixtures/resolve/"
                                     f"{REVISION}/small.json")

    def test_offline_with_a_warm_cache_makes_no_request(self):
        path = self.fetch_hub("small.json")
        self.server.clear()
        self.hub(UNREACHABLE, offline=True)
        self.assertEqual(self.fetch_hub("small.json"), path)
        self.assertEqual(self.server.log, [])

    def test_offline_with_a_cold_cache_says_so_in_one_line(self):
        self.hub(self.server.base, offline=True)
        with self.assertRaises(dl.DownloadError) as caught:
            self.fetch_hub("small.json")
        self.assertEqual(str(caught.exception),
                         f"{self.server.base}/ok/fixtures/resolve/{REVISION}/small.json: not in the "
                         f"Hugging Face cache ({self.home}/hub), and HF_HUB_OFFLINE is set")
        self.assertEqual(self.server.log, [])

    def test_corrupt_cached_file_is_deleted_and_fetched_again(self):
        path = self.fetch_hub("blob.bin")
        with open(os.path.realpath(path), "r+b") as file:
            file.write(b"\xff")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assert_fetched(self.fetch_hub("blob.bin"), "blob.bin")
        self.assertRegex(err.getvalue(), r"^warning: .*/blob.bin: not the pinned blob.bin \(sha256 "
                                         r".*\); deleted from the Hugging Face cache\n$")
        self.assertEqual([entry.method for entry in self.server.requests("ok", "blob.bin", "GET")],
                         ["GET", "GET"])

    def test_token_of_hf_token_is_sent(self):
        with mock.patch.dict(os.environ, {"HF_TOKEN": "hf_fixture"}):
            self.fetch_hub("small.json")
        self.assertEqual({entry.authorization for entry in self.server.log}, {"Bearer hf_fixture"})

    def test_mirror_folder_is_used_instead_of_the_hub(self):
        path = dl.fetch_file(quiet(self.fixture_dir.name), self.hub_file("small.json"), self.folder)
        self.assertEqual(path, os.path.join(self.fixture_dir.name, "small.json"))
        self.assertEqual(self.server.log, [])

    def test_fetch_into_copies_from_the_cache(self):
        target = dl.fetch_into(quiet(), self.hub_file("small.json"), self.folder)
        self.assertEqual(target, os.path.join(self.folder, "small.json"))
        self.assertFalse(os.path.islink(target))
        self.assert_fetched(target, "small.json")
        self.server.clear()
        dl.fetch_into(quiet(), self.hub_file("small.json"), self.folder)
        self.assertEqual(self.server.log, [])


class HubFailureTest(ServerCase):
    """Each way the Hub (or its mirror) can fail, now handled by huggingface_hub: one line, and
    no damaged file in its cache."""

    def assert_cache_clean(self, name):
        self.assertEqual([path for path in cache_files(self.home) if name in path or "blobs" in path],
                         [])

    def test_404(self):
        with self.assertRaises(dl.DownloadError) as caught:
            self.fetch_hub("small.json", "404")
        url = f"{self.server.base}/404/fixtures/resolve/{REVISION}/small.json"
        self.assertEqual(str(caught.exception), f"{url}: HTTP 404 Not Found")
        self.assertEqual(len(self.server.log), 1)  # a missing file is not asked for again

    def test_500_is_retried_by_the_hub_client_then_reported(self):
        with self.assertRaisesRegex(dl.DownloadError, r"/500/fixtures/resolve/.*/small.json: "
                                                      r"HTTP 500 Internal Server Error$"):
            self.fetch_hub("small.json", "500")
        self.assertGreater(len(self.server.requests("500", "small.json", "HEAD")), 2)
        self.assert_cache_clean("small.json")

    def test_passing_500_is_retried_and_succeeds(self):
        self.assert_fetched(self.fetch_hub("small.json", "flaky"), "small.json")
        self.assertEqual([entry.method for entry in self.server.log], ["HEAD", "HEAD", "GET"])

    def test_truncated_body_is_reported_and_not_kept(self):
        size = len(self.files["blob.bin"])
        with self.assertRaisesRegex(dl.DownloadError, rf"/truncated/fixtures/resolve/.*/blob.bin: "
                                                      rf"Consistency check failed: file should be "
                                                      rf"of size {size} but has size {size // 2} "):
            self.fetch_hub("blob.bin", "truncated")
        self.assert_cache_clean("blob.bin")

    def test_dropped_connection_resumes_with_range(self):
        self.assert_fetched(self.fetch_hub("blob.bin", "drop"), "blob.bin")
        half = len(self.files["blob.bin"]) // 2
        self.assertEqual([entry.range for entry in self.server.requests("drop", "blob.bin")],
                         [None, f"bytes={half}-"])

    def test_wrong_checksum_is_deleted_and_reported(self):
        with self.assertRaisesRegex(dl.ChecksumError,
                                    r"/badsum/.*/blob.bin: not the pinned blob.bin \(sha256 .*\); "
                                    r"deleted$"):
            self.fetch_hub("blob.bin", "badsum")
        self.assert_cache_clean("blob.bin")

    def test_timeout_is_reported(self):
        policy = dataclasses.replace(FAST, timeout_s=0.2)
        with mock.patch.object(file_download, "_ETAG_RETRY_TIMEOUT", 0.2):
            with self.assertRaisesRegex(dl.DownloadError, r"/hang/.*/small.json: timed out$"):
                self.fetch_hub("small.json", "hang", policy)

    def test_refused_connection_is_reported(self):
        self.hub(UNREACHABLE)
        with self.assertRaises(dl.DownloadError) as caught:
            self.fetch_hub("small.json")
        self.assertEqual(str(caught.exception), f"{UNREACHABLE}/ok/fixtures/resolve/{REVISION}/"
                                                "small.json: connection refused")

    @unittest.skipUnless(os.path.exists("/dev/full"), "needs /dev/full to simulate a full disk")
    def test_full_disk_is_one_clear_error(self):
        def to_full_disk(url, temp_file, **options):  # the cache's disk fills while downloading
            with open("/dev/full", "wb", buffering=0) as full:
                real_http_get(url, full, **options)

        real_http_get = file_download.http_get
        with mock.patch.object(file_download, "http_get", to_full_disk):
            with self.assertRaisesRegex(dl.StorageError, r"^disk full while writing .*: free some "
                                                         r"space in .* or pick another HF_HOME"):
                self.fetch_hub("blob.bin")
        self.assert_cache_clean("blob.bin")

    def test_unwritable_cache_is_one_clear_error(self):
        open(self.home, "w").close()  # HF_HOME is a file: no folder can be made in it
        with self.assertRaisesRegex(dl.StorageError, r"^cannot write .*: not a directory; pick "
                                                     r"another HF_HOME$"):
            self.fetch_hub("small.json")

    def test_interrupted_download_leaves_nothing_then_fetches_again(self):
        class Interrupting(io.RawIOBase):
            def write(self, data):
                raise KeyboardInterrupt

        def interrupted(url, temp_file, **options):
            real_http_get(url, Interrupting(), **options)

        real_http_get = file_download.http_get
        with mock.patch.object(file_download, "http_get", interrupted):
            with self.assertRaises(KeyboardInterrupt):
                self.fetch_hub("blob.bin")
        self.assert_cache_clean("blob.bin")
        self.assert_fetched(self.fetch_hub("blob.bin"), "blob.bin")


class MirrorTest(ServerCase):

    def test_mirror_folder_is_read_by_name_offline(self):
        remote = dl.RemoteFile("small.json", f"{UNREACHABLE}/small.json", sha256(self.files["small.json"]))
        path = dl.fetch_file(quiet(self.fixture_dir.name), remote, self.folder)
        self.assert_fetched(path, "small.json")
        self.assertEqual(quiet(self.fixture_dir.name).location(remote),
                         os.path.join(self.fixture_dir.name, "small.json"))

    def test_mirror_url_serves_the_file_by_name(self):
        remote = dl.RemoteFile("small.json", f"{UNREACHABLE}/pinned/small.json")
        mirror = f"{self.server.base}/ok/"
        self.assertEqual(quiet(mirror).location(remote), f"{self.server.base}/ok/small.json")
        self.assertEqual(quiet().location(remote), remote.url)
        self.assert_fetched(dl.fetch_file(quiet(mirror), remote, self.folder),
                            "small.json")

    def test_mirror_url_serves_hub_files_by_name_without_token(self):
        with mock.patch.dict(os.environ, {"HF_TOKEN": "hf_fixture"}):
            path = dl.fetch_file(quiet(f"{self.server.base}/ok/"), self.hub_file("small.json"),
                                 self.folder)
        self.assertEqual(path, os.path.join(self.folder, "small.json"))
        self.assertEqual([(entry.hub, entry.authorization) for entry in self.server.log],
                         [(False, None)])

    def test_file_missing_from_the_mirror_folder(self):
        remote = dl.RemoteFile("absent.bin", f"{UNREACHABLE}/absent.bin")
        with self.assertRaisesRegex(dl.DownloadError, "absent.bin: no such file in the mirror folder$"):
            dl.fetch_file(quiet(self.fixture_dir.name), remote, self.folder)

    def test_mirror_file_failing_its_check_is_not_used(self):
        remote = dl.RemoteFile("small.json", f"{UNREACHABLE}/small.json", sha256(b"other"))
        with self.assertRaisesRegex(dl.ChecksumError, r"small.json: not the pinned small.json "
                                                      r"\(sha256 .*\); not used$"):
            dl.fetch_file(quiet(self.fixture_dir.name), remote, self.folder)
        self.assertTrue(os.path.exists(os.path.join(self.fixture_dir.name, "small.json")))

    def test_bad_mirror_value_names_it_and_the_fix(self):
        self.assertIsNone(quiet().mirror_kind)
        self.assertEqual(quiet("https://host/path").mirror_kind, "url")
        self.assertEqual(quiet(self.fixture_dir.name).mirror_kind, "dir")
        with self.assertRaisesRegex(ValueError, r"^--mirror '/no/such/folder' is neither an existing "
                                                r"folder nor an http\(s\):// URL"):
            dl.Fetcher("/no/such/folder")


class SafetensorsTest(ServerCase):
    """Rows of some tensors of a safetensors file: from the whole file where it is at hand, else
    by range requests where the server allows."""

    def assert_rows(self, arrays):
        np.testing.assert_array_equal(arrays["tokens_embed.weight"], self.arrays["tokens_embed.weight"])
        np.testing.assert_array_equal(arrays["positions_embed.weight"],
                                      self.arrays["positions_embed.weight"][:256])

    def read_hub(self, mode="ok"):
        return dl.read_safetensors_rows(quiet(), self.hub_file("model.safetensors", mode), self.folder,
                                        TENSOR_ROWS)

    def assert_ranges_only(self, mode):
        requests = self.server.requests(mode, "model.safetensors")
        self.assertTrue(requests and all(entry.range for entry in requests), requests)
        served = sum(entry.sent for entry in requests)
        wanted = self.arrays["tokens_embed.weight"].nbytes + 256 * 4 * 4
        self.assertLess(served, len(self.files["model.safetensors"]))
        self.assertGreaterEqual(served, wanted)

    def test_hub_rows_fetched_by_ranges_only_then_kept(self):
        with mock.patch.dict(os.environ, {"HF_TOKEN": "hf_fixture"}):
            self.assert_rows(self.read_hub())
        self.assert_ranges_only("ok")
        self.assertEqual({entry.authorization for entry in self.server.log}, {"Bearer hf_fixture"})
        self.assertEqual(cache_files(self.home), [])  # the whole file was not downloaded
        self.assertEqual(os.listdir(self.folder), [])
        # The rows are kept in the assets cache: a second read, offline too, asks for nothing.
        self.server.clear()
        self.hub(UNREACHABLE, offline=True)
        self.assert_rows(self.read_hub())
        self.assertEqual(self.server.log, [])

    def test_kept_rows_failing_their_check_are_not_used(self):
        self.read_hub()
        kept = os.path.join(self.home, "assets", "ift6135", "ok--fixtures", REVISION,
                            "model.safetensors")
        with open(kept, "r+b") as file:
            file.seek(-4, os.SEEK_END)
            file.write(b"\x01\x02\x03\x04")
        self.server.clear()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assert_rows(self.read_hub())
        self.assertRegex(err.getvalue(), r"^warning: .*model.safetensors: kept tensor rows that "
                                         r"fail their check; deleted\n$")
        self.assert_ranges_only("ok")

    def test_whole_checkpoint_in_the_hub_cache_is_read_with_no_request(self):
        self.fetch_hub("model.safetensors")
        self.server.clear()
        self.assert_rows(self.read_hub())
        self.assertEqual(self.server.log, [])

    def test_offline_without_the_checkpoint_or_its_rows_says_so(self):
        self.hub(self.server.base, offline=True)
        with self.assertRaisesRegex(dl.DownloadError, r"model.safetensors: neither it nor the rows "
                                                      r"read from it are in the Hugging Face "
                                                      r"cache, and HF_HUB_OFFLINE is set$"):
            self.read_hub()
        self.assertEqual(self.server.log, [])

    def test_hub_without_ranges_gets_the_whole_checked_file_into_its_cache(self):
        self.assert_rows(self.read_hub("norange"))
        self.assertIn(len(self.files["model.safetensors"]),
                      [entry.sent for entry in self.server.requests("norange", "model.safetensors")])
        self.assertIn(f"models--norange--fixtures/snapshots/{REVISION}/model.safetensors",
                      cache_files(self.home))
        self.server.clear()
        self.assert_rows(self.read_hub("norange"))
        self.assertEqual(self.server.log, [])

    def test_plain_rows_fetched_by_ranges_only(self):
        arrays = dl.read_safetensors_rows(quiet(), self.remote("model.safetensors", "ok"),
                                          self.folder, TENSOR_ROWS)
        self.assert_rows(arrays)
        self.assert_ranges_only("ok")
        self.assertEqual(os.listdir(self.folder), [])  # no part left behind

    def test_plain_server_without_ranges_gets_whole_checked_file(self):
        arrays = dl.read_safetensors_rows(quiet(), self.remote("model.safetensors", "norange"),
                                          self.folder, TENSOR_ROWS)
        self.assert_rows(arrays)
        self.assertIn(len(self.files["model.safetensors"]),
                      [entry.sent for entry in self.server.requests("norange", "model.safetensors")])
        self.assertEqual(os.listdir(self.folder), [])  # read, then deleted

    def test_wrong_bytes_without_ranges_are_not_used(self):
        with self.assertRaisesRegex(dl.ChecksumError, r"not the pinned model.safetensors .*; deleted$"):
            dl.read_safetensors_rows(quiet(), self.remote("model.safetensors", "badsum"), self.folder,
                                     TENSOR_ROWS)
        self.assertEqual(os.listdir(self.folder), [])

    def test_mirror_file_failing_its_check_is_not_used(self):
        mirror = os.path.join(self.work.name, "mirror")
        os.makedirs(mirror)
        save_file({"tokens_embed.weight": np.zeros((2, 4), np.float32)},
                  os.path.join(mirror, "model.safetensors"))
        with self.assertRaisesRegex(dl.ChecksumError, r"not the pinned model.safetensors .*; not used$"):
            dl.read_safetensors_rows(quiet(mirror), self.hub_file("model.safetensors"), self.folder,
                                     TENSOR_ROWS)

    def test_prefixed_tensor_names_are_found(self):
        mirror = os.path.join(self.work.name, "mirror")
        os.makedirs(mirror)
        save_file({"transformer." + name: array for name, array in self.arrays.items()},
                  os.path.join(mirror, "model.safetensors"))
        remote = dl.RemoteFile("model.safetensors", f"{UNREACHABLE}/x")
        self.assert_rows(dl.read_safetensors_rows(quiet(mirror), remote, self.folder, TENSOR_ROWS))

    def test_half_precision_tensors_are_read_as_float32(self):
        values = np.array([[1.0, -2.0], [0.5, 3.25]], dtype=np.float32)
        # bfloat16 bytes written by hand (numpy has no bfloat16): the upper half of each float32.
        bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
        f16 = values.astype("<f2").tobytes()
        header = json.dumps({"b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
                             "h": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]}}).encode()
        mirror = os.path.join(self.work.name, "mirror")
        os.makedirs(mirror)
        data = len(header).to_bytes(8, "little") + header + bf16 + f16
        with open(os.path.join(mirror, "half.safetensors"), "wb") as file:
            file.write(data)
        self.server.files["half.safetensors"] = data
        self.addCleanup(self.server.files.pop, "half.safetensors")
        for where in (mirror, f"{self.server.base}/ok/"):  # read whole, then by ranges
            with self.subTest(where=where):
                remote = dl.RemoteFile("half.safetensors", f"{UNREACHABLE}/half.safetensors")
                arrays = dl.read_safetensors_rows(quiet(where), remote, self.folder, {"b": None, "h": 1})
                self.assertEqual((arrays["b"].dtype, arrays["h"].dtype), (np.float32, np.float32))
                np.testing.assert_array_equal(arrays["b"], values)
                np.testing.assert_array_equal(arrays["h"], values[:1])

    def test_other_file_is_not_taken_for_a_checkpoint(self):
        remote = dl.RemoteFile("blob.bin", f"{UNREACHABLE}/blob.bin")
        for where in (self.fixture_dir.name, f"{self.server.base}/ok/"):
            with self.subTest(where=where):
                with self.assertRaisesRegex(dl.DownloadError, r"blob.bin: not a safetensors file"):
                    dl.read_safetensors_rows(quiet(where), remote, self.folder, TENSOR_ROWS)


if __name__ == "__main__":
    unittest.main()
