"""Tests of utils.download, all offline: an HTTP server on 127.0.0.1 serves fixture files well or
badly (tests/test_prepare_data.py serves its own files with it).

Server paths are /MODE/NAME; MODE says how it answers:

    ok         the file, honouring Range (206)       norange    the whole file, Range ignored
    404, 500   that status                           flaky      500 the first time, then ok
    truncated  half the body, always (no Range)      badsum     the file with one byte changed
    drop       half the body, then the connection closes, the first time; ok (with Range) after
    hang       nothing for 1 s (the client's timeout is shorter)
"""
import dataclasses
import errno
import hashlib
import http.server
import json
import os
import socket
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
from unittest import mock

import numpy as np
from safetensors.numpy import save_file

from utils import download as dl

FAST = dl.DownloadPolicy(retries=2, backoff_s=0.01, timeout_s=2.0, chunk_bytes=64 * 1024)
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused
TENSOR_ROWS = {"tokens_embed.weight": None, "positions_embed.weight": 256}


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def make_fixture_files(folder):
    """Write the served files in `folder`; return (name -> bytes, the checkpoint's arrays).

    small.json and blob.bin (256 KiB, several chunks of FAST) are plain files; model.safetensors
    holds two embedding tensors and one tensor that is never asked for.
    """
    with open(os.path.join(folder, "small.json"), "w", encoding="utf-8") as file:
        json.dump({f"token{index}": index for index in range(100)}, file)
    with open(os.path.join(folder, "blob.bin"), "wb") as file:
        file.write(bytes(range(256)) * 1024)
    arrays = {"tokens_embed.weight": np.arange(60 * 4, dtype=np.float32).reshape(-1, 4),
              "positions_embed.weight": -np.arange(300 * 4, dtype=np.float32).reshape(-1, 4),
              "h.0.mlp.c_fc.weight": np.ones((3, 5), dtype=np.float32)}
    save_file(arrays, os.path.join(folder, "model.safetensors"))
    files = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as file:
            files[name] = file.read()
    return files, arrays


class FixtureServer:
    """Serves `files` on 127.0.0.1 in the modes of the module docstring; logs every request."""

    def __init__(self, files):
        self.files = files
        self.log = []  # (mode, name, Range header or None, bytes of body sent)
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

    def requests(self, mode, name):
        return [entry for entry in self.log if entry[:2] == (mode, name)]

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

    def do_GET(self):
        _, mode, name = self.path.split("/", 2)
        range_header = self.headers.get("Range")
        code, headers, payload = self.answer(mode, name, self.fixture.files.get(name), range_header)
        # Logged before sending, so that a client that has its answer finds it in the log.
        self.fixture.log.append((mode, name, range_header, len(payload)))
        if mode == "hang":
            time.sleep(1.0)
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def answer(self, mode, name, data, range_header):
        """(status, headers, body) for `mode`; a body shorter than its Content-Length is cut."""
        first = self.fixture.first_time(mode, name)
        if data is None or mode == "404":
            return 404, {"Content-Length": "0"}, b""
        if mode in ("500", "hang") or (mode == "flaky" and first):
            return 500, {"Content-Length": "0"}, b""
        if mode == "badsum":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {"Content-Length": str(len(data)), "Accept-Ranges": "bytes"}
        if mode == "truncated" or (mode == "drop" and first):
            return 200, headers, data[:len(data) // 2]
        if range_header and mode in ("ok", "drop", "flaky"):
            start, end = range_header.split("=")[1].split("-")
            start, end = int(start), int(end) + 1 if end else len(data)
            if start >= len(data):
                return 416, {"Content-Length": "0"}, b""
            headers = {"Content-Length": str(end - start),
                       "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
            return 206, headers, data[start:end]
        return 200, headers, data


class ServerCase(unittest.TestCase):
    """The fixture files on disk and on a loopback server, and an empty download folder per test."""

    @classmethod
    def setUpClass(cls):
        cls.fixture_dir = tempfile.TemporaryDirectory()
        cls.files, cls.arrays = make_fixture_files(cls.fixture_dir.name)
        cls.server = FixtureServer(cls.files)

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.fixture_dir.cleanup()

    def setUp(self):
        self.work = tempfile.TemporaryDirectory()
        self.folder = os.path.join(self.work.name, "downloads")
        os.makedirs(self.folder)
        self.server.log.clear()
        self.server.seen.clear()

    def tearDown(self):
        self.work.cleanup()

    def remote(self, name, mode):
        """`name` pinned to its fixture bytes, served in `mode`."""
        return dl.RemoteFile(name, f"{self.server.base}/{mode}/{name}", sha256(self.files[name]),
                             len(self.files[name]))

    def fetch(self, name, mode, policy=FAST, **options):
        return dl.fetch_file(self.remote(name, mode), self.folder, policy=policy, progress=False,
                             **options)

    def assert_fetched(self, path, name):
        with open(path, "rb") as file:
            self.assertEqual(file.read(), self.files[name])


class FailureTest(ServerCase):
    """Each way a server can fail, and what the user gets."""

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
        ranges = [entry[2] for entry in self.server.requests("drop", "blob.bin")]
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
            dl.fetch_file(remote, self.folder, policy=FAST, progress=False)
        self.assertEqual(str(caught.exception),
                         f"{UNREACHABLE}/small.json: connection refused (tried 3 times)")

    def test_unknown_host_is_not_retried(self):
        unknown = urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        with mock.patch.object(dl.urllib.request, "urlopen", side_effect=unknown) as urlopen:
            with self.assertRaises(dl.DownloadError) as caught:
                self.fetch("small.json", "ok")
        self.assertEqual(urlopen.call_count, 1)
        self.assertTrue(str(caught.exception).endswith(
            "/ok/small.json: cannot resolve the host name, no network? (Name or service not known)"))

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
        self.assertEqual(self.server.requests("ok", "blob.bin")[-1][2], f"bytes={2 * 1024}-")
        self.assertEqual(os.listdir(self.folder), ["blob.bin"])

    def test_complete_part_is_checked_and_kept_when_nothing_is_left_to_send(self):
        with open(os.path.join(self.folder, "small.json.part"), "wb") as file:
            file.write(self.files["small.json"])
        self.assert_fetched(self.fetch("small.json", "ok"), "small.json")
        size = len(self.files["small.json"])
        self.assertEqual([entry[2] for entry in self.server.requests("ok", "small.json")],
                         [f"bytes={size}-"])  # answered 416: nothing left to send

    def test_checked_file_already_there_is_not_fetched_again(self):
        self.fetch("small.json", "ok")
        self.server.log.clear()
        self.assert_fetched(self.fetch("small.json", "ok"), "small.json")
        self.assertEqual(self.server.log, [])


class MirrorTest(ServerCase):

    def test_mirror_folder_is_read_by_name_offline(self):
        remote = dl.RemoteFile("small.json", f"{UNREACHABLE}/small.json", sha256(self.files["small.json"]))
        path = dl.fetch_file(remote, self.folder, mirror=self.fixture_dir.name, progress=False)
        self.assert_fetched(path, "small.json")
        self.assertEqual(dl.remote_location(remote, self.fixture_dir.name),
                         os.path.join(self.fixture_dir.name, "small.json"))

    def test_mirror_url_serves_the_file_by_name(self):
        remote = dl.RemoteFile("small.json", f"{UNREACHABLE}/pinned/small.json")
        mirror = f"{self.server.base}/ok/"
        self.assertEqual(dl.remote_location(remote, mirror), f"{self.server.base}/ok/small.json")
        self.assertEqual(dl.remote_location(remote, None), remote.url)
        self.assert_fetched(dl.fetch_file(remote, self.folder, mirror, FAST, progress=False),
                            "small.json")

    def test_file_missing_from_the_mirror_folder(self):
        remote = dl.RemoteFile("absent.bin", f"{UNREACHABLE}/absent.bin")
        with self.assertRaisesRegex(dl.DownloadError, "absent.bin: no such file in the mirror folder$"):
            dl.fetch_file(remote, self.folder, mirror=self.fixture_dir.name, progress=False)

    def test_bad_mirror_value_names_it_and_the_fix(self):
        self.assertIsNone(dl.mirror_kind(None))
        self.assertEqual(dl.mirror_kind("https://host/path"), "url")
        self.assertEqual(dl.mirror_kind(self.fixture_dir.name), "dir")
        with self.assertRaisesRegex(ValueError, r"^--mirror '/no/such/folder' is neither an existing "
                                                r"folder nor an http\(s\):// URL"):
            dl.mirror_kind("/no/such/folder")


class SafetensorsTest(ServerCase):
    """Rows of some tensors of a safetensors file, by range requests where the server allows."""

    def assert_rows(self, arrays):
        np.testing.assert_array_equal(arrays["tokens_embed.weight"], self.arrays["tokens_embed.weight"])
        np.testing.assert_array_equal(arrays["positions_embed.weight"],
                                      self.arrays["positions_embed.weight"][:256])

    def test_rows_fetched_by_ranges_only(self):
        arrays = dl.read_safetensors_rows(self.remote("model.safetensors", "ok"), self.folder,
                                          TENSOR_ROWS, policy=FAST, progress=False)
        self.assert_rows(arrays)
        requests = self.server.requests("ok", "model.safetensors")
        self.assertTrue(requests and all(entry[2] for entry in requests), requests)
        served = sum(entry[3] for entry in requests)
        wanted = self.arrays["tokens_embed.weight"].nbytes + 256 * 4 * 4
        self.assertLess(served, len(self.files["model.safetensors"]))
        self.assertGreaterEqual(served, wanted)
        self.assertEqual(os.listdir(self.folder), [])  # no part left behind

    def test_server_without_ranges_gets_whole_checked_file(self):
        arrays = dl.read_safetensors_rows(self.remote("model.safetensors", "norange"), self.folder,
                                          TENSOR_ROWS, policy=FAST, progress=False)
        self.assert_rows(arrays)
        self.assertIn(len(self.files["model.safetensors"]),
                      [entry[3] for entry in self.server.requests("norange", "model.safetensors")])
        self.assertEqual(os.listdir(self.folder), [])  # read, then deleted

    def test_wrong_bytes_without_ranges_are_not_used(self):
        with self.assertRaisesRegex(dl.ChecksumError, r"not the pinned model.safetensors .*; deleted$"):
            dl.read_safetensors_rows(self.remote("model.safetensors", "badsum"), self.folder,
                                     TENSOR_ROWS, policy=FAST, progress=False)
        self.assertEqual(os.listdir(self.folder), [])

    def test_mirror_file_failing_its_check_is_not_used(self):
        mirror = os.path.join(self.work.name, "mirror")
        os.makedirs(mirror)
        save_file({"tokens_embed.weight": np.zeros((2, 4), np.float32)},
                  os.path.join(mirror, "model.safetensors"))
        with self.assertRaisesRegex(dl.ChecksumError, r"not the pinned model.safetensors .*; not used$"):
            dl.read_safetensors_rows(self.remote("model.safetensors", "ok"), self.folder, TENSOR_ROWS,
                                     mirror, FAST, progress=False)

    def test_prefixed_tensor_names_are_found(self):
        mirror = os.path.join(self.work.name, "mirror")
        os.makedirs(mirror)
        save_file({"transformer." + name: array for name, array in self.arrays.items()},
                  os.path.join(mirror, "model.safetensors"))
        remote = dl.RemoteFile("model.safetensors", f"{UNREACHABLE}/x")
        self.assert_rows(dl.read_safetensors_rows(remote, self.folder, TENSOR_ROWS, mirror, FAST,
                                                  progress=False))

    def test_half_precision_tensors_are_read_as_float32(self):
        values = np.array([[1.0, -2.0], [0.5, 3.25]], dtype=np.float32)
        # bfloat16 bytes written by hand (numpy has no bfloat16): the upper half of each float32.
        bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
        f16 = values.astype("<f2").tobytes()
        header = json.dumps({"b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
                             "h": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]}}).encode()
        mirror = os.path.join(self.work.name, "mirror")
        os.makedirs(mirror)
        with open(os.path.join(mirror, "half.safetensors"), "wb") as file:
            file.write(len(header).to_bytes(8, "little") + header + bf16 + f16)
        remote = dl.RemoteFile("half.safetensors", f"{UNREACHABLE}/half.safetensors")
        arrays = dl.read_safetensors_rows(remote, self.folder, {"b": None, "h": 1}, mirror,
                                          progress=False)
        self.assertEqual((arrays["b"].dtype, arrays["h"].dtype), (np.float32, np.float32))
        np.testing.assert_array_equal(arrays["b"], values)
        np.testing.assert_array_equal(arrays["h"], values[:1])

    def test_other_file_is_not_taken_for_a_checkpoint(self):
        remote = dl.RemoteFile("blob.bin", f"{UNREACHABLE}/blob.bin")
        with self.assertRaisesRegex(dl.DownloadError, r"blob.bin: not a safetensors file \(header length"):
            dl.read_safetensors_rows(remote, self.folder, TENSOR_ROWS, self.fixture_dir.name,
                                     progress=False)


if __name__ == "__main__":
    unittest.main()
