"""Rebuild the course's data from its public sources: `python -m utils.prepare_data`.

    python -m utils.prepare_data [--data_folder data] [--mirror URL_OR_DIR] [--skip_embeddings]
                                 [--verify] [--force]

What it makes in `--data_folder` (see `data/README.md`):

    wiki.{train,validation,test}.npz   `tokens` uint16 (GPT-1 id + 1), `sizes` int64 (tokens per
                                       non-empty line of WikiText-2 raw)
    vocab.json, merges.txt             the GPT-1 tokenizer (generation decodes with it)
    embeddings.npz                     `tokens` (40479, 768) = zero row + GPT-1's token
                                       embeddings, `position` (256, 768), float32
    sources/                           downloaded sources and partial downloads (`*.part`)

and from where (every remote file is pinned: URL at a fixed revision, file name, sha256):

    WikiText-2 raw   wikitext-2-raw-v1.zip (Hugging Face mirror, then wikitext.smerity.com),
                     then the parquet files of Salesforce/wikitext (only if pyarrow is installed)
    tokenizer        vocab.json, merges.txt of openai-community/openai-gpt
    embeddings       two tensors of openai-community/openai-gpt's model.safetensors, fetched with
                     HTTP range requests (about 125 MB of its 479 MB), the whole file otherwise

`--mirror DIR` takes every file by its name from a local folder, `--mirror URL` from
`URL/<name>`. A download is written to `<name>.part`, resumed from there after a failure,
checked, and only then renamed: an interrupted run leaves the previous state or a complete,
checked file. A file that fails its check is deleted (never used) and reported.

`--verify` compares the arrays in `--data_folder` with the sha256 of the course's official
arrays; a build runs the same check at its end.
"""
import argparse
import contextlib
import dataclasses
import errno
import hashlib
import http.client
import importlib.util
import itertools
import json
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
from tqdm import tqdm

from utils.tokenization import MERGES_FILE, VOCAB_FILE, GPT1Tokenizer

SPLITS = ("train", "validation", "test")
DATA_FILES = ("wiki.train.npz", "wiki.validation.npz", "wiki.test.npz")
EMBEDDINGS_FILE = "embeddings.npz"
SOURCES_FOLDER = "sources"
POSITION_ROWS = 256  # the course kept GPT-1's first 256 of 512 position embeddings

# sha256 of the course's official `tokens` arrays (as little-endian uint16 bytes); see
# ../shared/README.md. A rebuild that matches these is the course's data, id for id.
OFFICIAL_TOKENS_SHA256 = {
    "train": "196d2b1f60239c70d0a1729782e699230c19b565cf89e2bbec98345519947c94",
    "validation": "9332ed428a20bb9738951dc9555fefb7f1404263cba05335f312a1ffb663b0ca",
    "test": "51fa7ca22536de4c5af0ef2d7d3c2a09edca675c73ba836bd2fd158c43014a0c",
}


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: its pinned URL, its name (the key in a mirror) and what to check."""
    name: str
    url: str
    sha256: str = None
    size: int = None


@dataclasses.dataclass(frozen=True)
class ZipText:
    """WikiText-2 raw as one zip archive holding one text file per split."""
    archive: RemoteFile
    members: dict  # split -> member path in the archive

    @property
    def files(self):
        return (self.archive,)


@dataclasses.dataclass(frozen=True)
class ParquetText:
    """WikiText-2 raw as Hugging Face parquet files, one per split, a `text` row per line."""
    parquet: dict  # split -> RemoteFile

    @property
    def files(self):
        return tuple(self.parquet.values())


@dataclasses.dataclass(frozen=True)
class Sources:
    """Every remote file the data is made from; tests swap in their own."""
    wikitext: tuple  # ZipText / ParquetText, tried in order
    vocab: RemoteFile
    merges: RemoteFile
    checkpoint: RemoteFile
    token_tensor: str = "tokens_embed.weight"
    position_tensor: str = "positions_embed.weight"


@dataclasses.dataclass(frozen=True)
class DownloadPolicy:
    """How hard to try: `retries` more tries after a failure, waiting backoff_s, 2*backoff_s..."""
    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 30.0
    chunk_bytes: int = 1 << 20


# Where the pins come from. openai-community/openai-gpt 1e0d4f3 is the commit that added
# tokenizer_config.json (#6), after the safetensors variant (adacbec, #3), read from the hub's
# pages, as is model.safetensors' sha256 (its LFS object id). The zip's sha256 and size are the
# ones several public projects pin for the original S3 file, its wikitext.smerity.com copy and the
# ggml-org/ci copy alike; the parquet files' come from projects pinning Salesforce/wikitext b08601e.
_GPT1 = ("https://huggingface.co/openai-community/openai-gpt/resolve/"
         "1e0d4f3028acbffb47fe933cea64619c5ec1a002")
_WIKITEXT_ZIP_SHA256 = "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"
_WIKITEXT_MEMBERS = {"train": "wikitext-2-raw/wiki.train.raw",
                     "validation": "wikitext-2-raw/wiki.valid.raw",
                     "test": "wikitext-2-raw/wiki.test.raw"}
_PARQUET = ("https://huggingface.co/datasets/Salesforce/wikitext/resolve/"
            "b08601e04326c79dfdd32d625aee71d232d685c3/wikitext-2-raw-v1/")
_PARQUET_FILES = {
    "train": ("train-00000-of-00001.parquet", 6357543,
              "e83889baabc497075506f91975be5fac0d45c5290b6b20582c8cd1e853d0c9f7"),
    "validation": ("validation-00000-of-00001.parquet", 657209,
                   "204929b7ff9d6184953f867dedb860e40aa69c078fc1e54b3baaa8fb28511c4c"),
    "test": ("test-00000-of-00001.parquet", 732610,
             "5f1bea067869d04849c0f975a2b29c4ff47d867f484f5010ea5e861eab246d91"),
}

DEFAULT_SOURCES = Sources(
    wikitext=(
        ZipText(RemoteFile("wikitext-2-raw-v1.zip",
                           "https://huggingface.co/datasets/ggml-org/ci/resolve/"
                           "927b3642933080f1b0e811e2f916e14c292992f9/wikitext-2-raw-v1.zip",
                           _WIKITEXT_ZIP_SHA256, 4721645),
                _WIKITEXT_MEMBERS),
        ZipText(RemoteFile("wikitext-2-raw-v1.zip",
                           "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
                           _WIKITEXT_ZIP_SHA256, 4721645),
                _WIKITEXT_MEMBERS),
        ParquetText({split: RemoteFile(name, _PARQUET + name, sha256, size)
                     for split, (name, size, sha256) in _PARQUET_FILES.items()}),
    ),
    vocab=RemoteFile(VOCAB_FILE, f"{_GPT1}/{VOCAB_FILE}",
                     "fdf49b19e7de236852091da09b84a7a3cd5e7b0e79916376cf45f6b8127b8078", 815973),
    merges=RemoteFile(MERGES_FILE, f"{_GPT1}/{MERGES_FILE}",
                      "0ea9b51ae695073cd871e0358f7016311d671a7ff3963e367d5236522f294725", 458495),
    checkpoint=RemoteFile("model.safetensors", f"{_GPT1}/model.safetensors",
                          "25c82cdf1844d2d93e9120b3b628fc6c2b4fcc7801a1297f58465ba67d45deb3"),
)


class DataUnavailableError(RuntimeError):
    """The data could not be obtained; the message is one line saying how to get it."""


class DownloadError(RuntimeError):
    """One file could not be fetched from one place; the message names the place and why."""


class ChecksumError(DownloadError):
    """A fetched file is not the pinned one; it has been deleted."""


class StorageError(OSError):
    """The data folder cannot be written (permission, full disk...); the message says which."""


class _RangeUnsupported(Exception):
    """The server answered a range request with the whole file."""


# ---------------------------------------------------------------------------------------------
# Where a file comes from


def _mirror_kind(mirror):
    """"dir", "url" or None for `mirror`; ValueError naming a value that is neither."""
    if mirror is None:
        return None
    if mirror.startswith(("http://", "https://")):
        return "url"
    if os.path.isdir(mirror):
        return "dir"
    raise ValueError(f"--mirror {mirror!r} is neither an existing folder nor an http(s):// URL; "
                     "give a folder holding the files by name, or a base URL serving them")


def _location(remote, mirror):
    """The URL or local path `remote` is read from: its pinned URL unless a mirror is given."""
    kind = _mirror_kind(mirror)
    if kind == "dir":
        return os.path.join(mirror, remote.name)
    if kind == "url":
        return mirror.rstrip("/") + "/" + remote.name
    return remote.url


def _is_url(location):
    return location.startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------------
# Downloads


def _describe(error, policy):
    """One short phrase for a network failure."""
    reason = getattr(error, "reason", error)
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"timed out after {policy.timeout_s:g} s"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name, no network? ({reason.strerror})"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or type(reason).__name__


def _retryable(error):
    """Whether trying again may help: server or connection trouble, not a 404 or an unknown host."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (408, 425, 429, 500, 502, 503, 504)
    reason = getattr(error, "reason", None)
    return not (isinstance(reason, socket.gaierror) and reason.errno == socket.EAI_NONAME)


def _open_for_append(path):
    """Open a partial download for appending (a seam tests use to simulate a full disk)."""
    return open(path, "ab")


def _write_chunks(response, part, expected, progress_bar, policy):
    """Append the response body to `part`; returns the number of bytes received.

    Network errors propagate as they are (they may be retried); write errors become StorageError.
    """
    received = 0
    try:
        file = _open_for_append(part)
    except OSError as error:
        raise _storage_error(error, part) from error
    try:
        while expected is None or received < expected:
            chunk = response.read(policy.chunk_bytes if expected is None
                                  else min(policy.chunk_bytes, expected - received))
            if not chunk:
                break
            try:
                file.write(chunk)
            except OSError as error:
                raise _storage_error(error, part) from error
            received += len(chunk)
            progress_bar.update(len(chunk))
        try:
            file.flush()
            os.fsync(file.fileno())
        except OSError as error:
            raise _storage_error(error, part) from error
    finally:
        with contextlib.suppress(OSError):  # a failed flush was reported above
            file.close()
    return received


def _storage_error(error, path):
    """A StorageError saying what went wrong writing `path` and how to fix it."""
    folder = os.path.dirname(os.path.abspath(path))
    if error.errno == errno.ENOSPC:
        return StorageError(f"disk full while writing {path}: free some space in {folder} "
                            "or pick another --data_folder, then run again to resume")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {path}: {error.strerror.lower()}; "
                            "pick a writable --data_folder")
    return StorageError(f"cannot write {path}: {error.strerror or error}")


def _request_once(url, part, policy, progress, desc, byte_range):
    """One HTTP GET of `url` (or of `byte_range`), appended to what `part` already holds.

    Raises _RangeUnsupported when a byte range was asked for and the server sent everything,
    DownloadError (a retryable one) when the body ended early.
    """
    have = os.path.getsize(part) if os.path.exists(part) else 0
    start, end = byte_range if byte_range else (0, None)
    request = urllib.request.Request(url, headers={"User-Agent": "utils.prepare_data (urllib)"})
    if have or byte_range:
        last = "" if end is None else str(end - 1)
        request.add_header("Range", f"bytes={start + have}-{last}")
    with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
        if response.status == 200 and byte_range:
            raise _RangeUnsupported(url)
        if response.status == 200 and have:  # the server ignored our resume: start over
            open(part, "wb").close()
            have = 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        total = have + expected if expected is not None else None
        with tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc, disable=not progress, leave=False) as progress_bar:
            received = _write_chunks(response, part, expected, progress_bar, policy)
    if expected is not None and received < expected:
        raise DownloadError(f"connection closed after {have + received:,} of {total:,} bytes")


def _http_to_file(url, part, policy, progress, desc, byte_range=None):
    """Fill `part` with the body of `url` (or its `byte_range`), retrying and resuming.

    A failure that may pass (5xx, timeout, reset, early end) is retried after waiting
    backoff_s, 2*backoff_s...; the bytes already in `part` are kept and the next try asks for
    the rest only. Raises DownloadError naming the URL and the last reason.
    """
    for attempt in range(policy.retries + 1):
        try:
            _request_once(url, part, policy, progress, desc, byte_range)
            return
        except (StorageError, _RangeUnsupported):
            raise
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 416 and os.path.exists(part):
                return  # nothing left to send: `part` is whole; the caller checks it
            failure = error
        except (urllib.error.URLError, http.client.HTTPException, OSError, DownloadError) as error:
            failure = error
        reason = str(failure) if isinstance(failure, DownloadError) else _describe(failure, policy)
        if not _retryable(failure) or attempt == policy.retries:
            tries = f" (tried {attempt + 1} times)" if attempt else ""
            raise DownloadError(f"{url}: {reason}{tries}") from failure
        time.sleep(policy.backoff_s * 2 ** attempt)


def _sha256_of(path, progress=False):
    """sha256 of a file, with a progress bar for the big ones."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as file, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                        desc=f"checking {os.path.basename(path)}", leave=False,
                                        disable=not progress or size < 64 << 20) as progress_bar:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
            progress_bar.update(len(block))
    return digest.hexdigest()


def _check(remote, path, progress=False):
    """None when `path` is the pinned file (size and sha256, where known), else why not."""
    size = os.path.getsize(path)
    if remote.size is not None and size != remote.size:
        return f"size {size:,} bytes, expected {remote.size:,}"
    if remote.sha256 is not None:
        digest = _sha256_of(path, progress)
        if digest != remote.sha256:
            return f"sha256 {digest}, expected {remote.sha256}"
    return None


def _copy_local(source, part, progress):
    """Copy a mirror file into `part` (DownloadError if it cannot be read, StorageError if
    `part` cannot be written)."""
    try:
        reader = open(source, "rb")
    except OSError as error:
        raise DownloadError(f"{source}: {(error.strerror or str(error)).lower()}") from error
    with reader, tqdm(total=os.path.getsize(source), unit="B", unit_scale=True, unit_divisor=1024,
                      desc=os.path.basename(source), disable=not progress, leave=False) as bar:
        try:
            with open(part, "wb") as writer:
                for block in iter(lambda: reader.read(1 << 20), b""):
                    writer.write(block)
                    bar.update(len(block))
        except OSError as error:
            raise _storage_error(error, part) from error


def fetch_file(remote, folder, mirror=None, policy=DownloadPolicy(), progress=True):
    """A checked copy of `remote` at `folder/remote.name`, fetched unless already there.

    Raises DownloadError (ChecksumError for a file that is not the pinned one, which is then
    deleted) and StorageError.
    """
    target = os.path.join(folder, remote.name)
    if os.path.exists(target) and _check(remote, target) is None:
        return target
    location = _location(remote, mirror)
    part = target + ".part"
    if _is_url(location):
        _http_to_file(location, part, policy, progress, remote.name)
    elif os.path.isfile(location):
        _copy_local(location, part, progress)
    else:
        raise DownloadError(f"{location}: no such file in the mirror folder")
    problem = _check(remote, part, progress)
    if problem is not None:
        os.remove(part)
        raise ChecksumError(f"{location}: not the pinned {remote.name} ({problem}); deleted")
    os.replace(part, target)
    _log(progress, f"fetched {remote.name} ({os.path.getsize(target):,} bytes) from {location}")
    return target


# ---------------------------------------------------------------------------------------------
# WikiText-2 raw


def _document_lines(text):
    """The non-empty lines of a split, each one document (line ends as Python's text files)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [line for line in lines if line.strip()]


def _zip_splits(source, path):
    """split -> documents of a WikiText zip; DownloadError for an archive not laid out as expected."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {split: _document_lines(archive.read(source.members[split]).decode("utf-8"))
                    for split in SPLITS}
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as error:
        raise DownloadError(f"{path}: not a WikiText-2 raw archive ({error})") from error


def _parquet_splits(paths):
    """split -> documents of WikiText parquet files (one `text` row per line of the raw file)."""
    import pyarrow.parquet  # optional: only this fallback source needs it

    return {split: [row for row in pyarrow.parquet.read_table(path, columns=["text"])
                    .column("text").to_pylist() if row and row.strip()]
            for split, path in paths.items()}


def _fetch_wikitext(source, folder, mirror, policy, progress):
    """split -> documents from one WikiText source (DownloadError when it fails)."""
    if isinstance(source, ZipText):
        path = fetch_file(source.archive, folder, mirror, policy, progress)
        try:
            return _zip_splits(source, path)
        except DownloadError:
            os.remove(path)  # a file that fails its check is never used again
            raise
    if importlib.util.find_spec("pyarrow") is None:  # known before downloading 8 MB for nothing
        raise DownloadError("parquet source skipped: it needs pyarrow (pip install pyarrow)")
    paths = {split: fetch_file(remote, folder, mirror, policy, progress)
             for split, remote in source.parquet.items()}
    return _parquet_splits(paths)


def read_wikitext(folder, sources=DEFAULT_SOURCES, mirror=None, policy=DownloadPolicy(),
                  progress=True):
    """split -> non-empty lines of WikiText-2 raw, from the first source that works.

    Downloads go to `folder`. Returns (documents, used, failures): `used` names the file(s)
    read, `failures` says why each earlier source failed. Raises DownloadError, naming every
    source and why it failed, when none works.
    """
    failures, tried = [], set()
    for source in sources.wikitext:
        locations = tuple(_location(remote, mirror) for remote in source.files)
        if locations in tried:  # two homes of one file name read from the same mirror
            continue
        tried.add(locations)
        try:
            documents = _fetch_wikitext(source, folder, mirror, policy, progress)
            return documents, ", ".join(locations), failures
        except DownloadError as error:
            failures.append(str(error))
    raise DownloadError("; ".join(failures))


def _unavailable_message(what, failures, sources, folder):
    """One line: what failed and why, and the two ways to get the files."""
    names = [remote.name for remote in sources.wikitext[0].files]
    names += [sources.vocab.name, sources.merges.name, sources.checkpoint.name]
    return (f"cannot get {what}: {'; '.join(failures)}. Run `python -m utils.prepare_data "
            f"--data_folder {folder}` with internet access, or put {', '.join(names)} in a folder "
            "and add `--mirror FOLDER`")


# ---------------------------------------------------------------------------------------------
# GPT-1 embeddings from model.safetensors


_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit; a bigger "length" means another file
_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
                       "F64": np.dtype("<f8")}


def _find_tensor(header, name, where):
    """(dtype, shape, (start, end)) of tensor `name`, also found under a "transformer." prefix."""
    matches = [key for key in header if key == name or key.endswith("." + name)]
    if not matches:
        tensors = sorted(key for key in header if key != "__metadata__")
        raise DownloadError(f"{where}: no tensor {name!r}; it has {tensors[:5]}...")
    entry = header[matches[0]]
    if entry["dtype"] not in _SAFETENSORS_DTYPES or len(entry["shape"]) != 2:
        raise DownloadError(f"{where}: tensor {name!r} is {entry['dtype']} {entry['shape']}, "
                            "expected a 2-D float tensor")
    return entry["dtype"], tuple(entry["shape"]), tuple(entry["data_offsets"])


def _as_float32(data, dtype, shape):
    """float32 array of raw little-endian tensor bytes."""
    array = np.frombuffer(data, dtype=_SAFETENSORS_DTYPES[dtype])
    if dtype == "BF16":  # bfloat16 is the upper half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32).reshape(shape)


def _header_length(first_bytes, where):
    """Length of a safetensors JSON header from the file's first 8 bytes (DownloadError if absurd)."""
    length = int.from_bytes(first_bytes, "little")
    if len(first_bytes) != 8 or not 2 <= length <= _MAX_HEADER_BYTES:
        raise DownloadError(f"{where}: not a safetensors file (header length {length})")
    return length


def _tensor_plan(header_bytes, rows_by_name, where):
    """(name, dtype, shape, absolute byte range) of the rows of each tensor we need."""
    header_length = len(header_bytes)
    try:
        header = json.loads(header_bytes)
        entries = {name: _find_tensor(header, name, where) for name in rows_by_name}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DownloadError(f"{where}: not a safetensors file ({error!r})") from error
    plan = []
    for name, rows in rows_by_name.items():
        dtype, shape, (start, end) = entries[name]
        rows = shape[0] if rows is None else rows
        if shape[0] < rows:
            raise DownloadError(f"{where}: tensor {name!r} has {shape[0]} rows, need {rows}")
        row_bytes = shape[1] * _SAFETENSORS_DTYPES[dtype].itemsize
        if end - start != shape[0] * row_bytes:
            raise DownloadError(f"{where}: tensor {name!r} spans {end - start} bytes, not {shape}")
        first = 8 + header_length + start
        plan.append((name, dtype, (rows, shape[1]), (first, first + rows * row_bytes)))
    return plan


def _read_tensors_local(path, rows_by_name):
    """name -> float32 rows of the tensors of a local safetensors file."""
    with open(path, "rb") as file:
        header_length = _header_length(file.read(8), path)
        plan = _tensor_plan(file.read(header_length), rows_by_name, path)
        arrays = {}
        for name, dtype, shape, (start, end) in plan:
            file.seek(start)
            arrays[name] = _as_float32(file.read(end - start), dtype, shape)
    return arrays


def _fetch_range(url, work, name, byte_range, policy, progress):
    """Bytes `byte_range` of `url`, through a resumable `work/name.part`."""
    part = os.path.join(work, name + ".part")
    try:
        _http_to_file(url, part, policy, progress, name, byte_range)
        with open(part, "rb") as file:
            data = file.read()
    finally:
        if os.path.exists(part) and os.path.getsize(part) >= byte_range[1] - byte_range[0]:
            os.remove(part)  # complete: nothing to resume; incomplete parts stay for next time
    if len(data) != byte_range[1] - byte_range[0]:
        raise DownloadError(f"{url}: got {len(data):,} bytes of range {byte_range}")
    return data


def _read_tensors_ranged(url, work, sources, rows_by_name, policy, progress):
    """name -> float32 rows, fetching only the header and those rows (_RangeUnsupported if not)."""
    stem = sources.checkpoint.name
    length = _header_length(_fetch_range(url, work, f"{stem}.length", (0, 8), policy, False), url)
    header = _fetch_range(url, work, f"{stem}.header", (8, 8 + length), policy, False)
    arrays = {}
    for name, dtype, shape, byte_range in _tensor_plan(header, rows_by_name, url):
        data = _fetch_range(url, work, f"{stem}.{name}", byte_range, policy, progress)
        arrays[name] = _as_float32(data, dtype, shape)
    return arrays


def read_checkpoint_tensors(folder, sources=DEFAULT_SOURCES, mirror=None, policy=DownloadPolicy(),
                            progress=True):
    """(token rows, first POSITION_ROWS position rows) of GPT-1's checkpoint as float32.

    Over HTTP only the tensors' bytes are fetched (range requests, resumable); a server that
    ignores ranges gets the whole file downloaded, checked against its sha256, read, and
    deleted. A mirror folder's file is checked in place.
    """
    remote = sources.checkpoint
    rows_by_name = {sources.token_tensor: None, sources.position_tensor: POSITION_ROWS}
    location = _location(remote, mirror)
    if not _is_url(location):
        if not os.path.isfile(location):
            raise DownloadError(f"{location}: no such file in the mirror folder")
        problem = _check(remote, location, progress)
        if problem is not None:
            raise ChecksumError(f"{location}: not the pinned {remote.name} ({problem}); not used")
        arrays = _read_tensors_local(location, rows_by_name)
    else:
        try:
            arrays = _read_tensors_ranged(location, folder, sources, rows_by_name, policy, progress)
        except _RangeUnsupported:
            path = fetch_file(remote, folder, mirror, policy, progress)
            try:
                arrays = _read_tensors_local(path, rows_by_name)
            finally:
                os.remove(path)  # 479 MB we no longer need
    return arrays[sources.token_tensor], arrays[sources.position_tensor]


def build_embeddings(token_rows, position_rows, vocabulary_size):
    """The course's embeddings arrays: a zero padding row on top of the token embeddings."""
    if token_rows.shape[0] + 1 != vocabulary_size:
        raise ValueError(f"checkpoint has {token_rows.shape[0]} token embeddings, the vocabulary "
                         f"{vocabulary_size - 1} tokens")
    if token_rows.shape[1] != position_rows.shape[1]:
        raise ValueError(f"token embeddings are {token_rows.shape[1]} wide, position embeddings "
                         f"{position_rows.shape[1]}")
    padding = np.zeros((1, token_rows.shape[1]), dtype=np.float32)
    return {"tokens": np.concatenate([padding, token_rows]).astype(np.float32),
            "position": position_rows[:POSITION_ROWS].astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# Writing and checking the arrays


def _save_npz_atomic(path, arrays, compress):
    """Write an npz through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    # Named by process so that two runs cannot write into one file; `open` keeps the umask's mode.
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(temporary, "wb") as file:
            (np.savez_compressed if compress else np.savez)(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise _storage_error(error, path) from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def tokenize_documents(tokenizer, documents):
    """The course's arrays of one split: `tokens` uint16 (all documents end to end), `sizes`."""
    encoded = tokenizer.encode_lines(documents)
    sizes = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64,
                         count=int(sizes.sum()))
    if tokens.size and tokens.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"token id {tokens.max()} does not fit the uint16 arrays")
    return {"tokens": tokens.astype(np.uint16), "sizes": sizes}


def tokens_sha256(tokens):
    """sha256 of a `tokens` array as little-endian uint16 bytes (the README's checksums)."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<u2").tobytes()).hexdigest()


def _verify_one(path, expected):
    """{status: match|mismatch|missing|unreadable, sha256, expected, detail} of one npz."""
    result = {"path": path, "status": "missing", "sha256": None, "expected": expected, "detail": ""}
    if not os.path.isfile(path):
        return result
    try:
        with np.load(path) as archive:
            tokens, sizes = archive["tokens"], archive["sizes"]
    except Exception as error:  # BadZipFile, KeyError, ValueError, OSError...
        return dict(result, status="unreadable", detail=str(error))
    digest = tokens_sha256(tokens)
    detail = ""
    if int(sizes.sum()) != tokens.size:
        detail = f"sizes sum to {int(sizes.sum())}, not {tokens.size}"
    if tokens.dtype != np.uint16:
        detail = f"tokens are {tokens.dtype}, expected uint16"
    status = "match" if digest == expected and not detail else "mismatch"
    return dict(result, status=status, sha256=digest, detail=detail)


def verify(data_folder):
    """split -> {status, sha256, expected, path, detail}: are the arrays the course's official ones?"""
    return {split: _verify_one(os.path.join(data_folder, name), OFFICIAL_TOKENS_SHA256[split])
            for split, name in zip(SPLITS, DATA_FILES)}


# ---------------------------------------------------------------------------------------------
# The whole job


def _prepare_folder(folder):
    """Create `folder` and check that files can be written there (StorageError otherwise)."""
    try:
        os.makedirs(os.path.join(folder, SOURCES_FOLDER), exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise StorageError(f"cannot write in data folder {folder}: {reason}; "
                           "pick another --data_folder") from error


def _log(progress, message):
    if progress:
        print(message, file=sys.stderr, flush=True)


def _fetch_tokenizer(folder, sources, mirror, policy, progress):
    """vocab.json and merges.txt in `folder` (DataUnavailableError when they cannot be had)."""
    for remote in (sources.vocab, sources.merges):
        try:
            fetch_file(remote, folder, mirror, policy, progress)
        except DownloadError as error:
            raise DataUnavailableError(_unavailable_message(
                "the GPT-1 tokenizer", [str(error)], sources, folder)) from error
    return GPT1Tokenizer.from_folder(folder)


def _build_splits(folder, tokenizer, sources, mirror, policy, progress, report):
    """Fetch WikiText-2 raw, tokenize it and write the three npz files."""
    try:
        documents, used, failures = read_wikitext(os.path.join(folder, SOURCES_FOLDER), sources,
                                                  mirror, policy, progress)
    except DownloadError as error:
        raise DataUnavailableError(_unavailable_message(
            "WikiText-2 raw", [str(error)], sources, folder)) from error
    report["wikitext"] = {"source": used, "failed_sources": failures}
    for split, name in zip(SPLITS, DATA_FILES):
        start = time.perf_counter()
        arrays = tokenize_documents(tokenizer, documents[split])
        _save_npz_atomic(os.path.join(folder, name), arrays, compress=True)
        report["splits"][split] = {"documents": int(arrays["sizes"].size),
                                   "tokens": int(arrays["tokens"].size)}
        _log(progress, f"{split}: {arrays['sizes'].size:,} documents, {arrays['tokens'].size:,} "
                       f"tokens in {time.perf_counter() - start:.1f} s -> {name}")


def _build_embeddings(folder, path, tokenizer, sources, mirror, policy, progress, report):
    """Fetch GPT-1's embeddings and write the course's embeddings.npz at `path`."""
    try:
        token_rows, position_rows = read_checkpoint_tensors(os.path.join(folder, SOURCES_FOLDER),
                                                            sources, mirror, policy, progress)
    except DownloadError as error:
        raise DataUnavailableError(_unavailable_message(
            "the GPT-1 embeddings", [str(error)], sources, folder)) from error
    arrays = build_embeddings(token_rows, position_rows, tokenizer.vocabulary_size)
    _save_npz_atomic(path, arrays, compress=False)
    report["embeddings"] = {"path": path, "tokens": list(arrays["tokens"].shape),
                            "position": list(arrays["position"].shape)}
    _log(progress, f"embeddings: tokens {arrays['tokens'].shape}, position "
                   f"{arrays['position'].shape} -> {path}")


def prepare_data(data_folder="data", mirror=None, skip_embeddings=False, progress=True, *,
                 embeddings_path=None, force=False, sources=DEFAULT_SOURCES, policy=DownloadPolicy()):
    """Make the course's data in `data_folder`; files already there are kept unless `force`.

    Returns a report: {"data_folder", "wikitext": {"source", "failed_sources"} or None,
    "splits": {split: {"documents", "tokens"}}, "embeddings": {...} or None, "verify": verify()}.
    Raises DataUnavailableError (one line saying how to get the data), StorageError for a
    folder that cannot be written, and ValueError for a bad `mirror`.
    """
    _mirror_kind(mirror)
    embeddings_path = embeddings_path or os.path.join(data_folder, EMBEDDINGS_FILE)
    _prepare_folder(data_folder)
    report = {"data_folder": data_folder, "wikitext": None, "splits": {}, "embeddings": None}
    tokenizer = _fetch_tokenizer(data_folder, sources, mirror, policy, progress)
    if force or not all(os.path.isfile(os.path.join(data_folder, name)) for name in DATA_FILES):
        _build_splits(data_folder, tokenizer, sources, mirror, policy, progress, report)
    if not skip_embeddings and (force or not os.path.isfile(embeddings_path)):
        _build_embeddings(data_folder, embeddings_path, tokenizer, sources, mirror, policy,
                          progress, report)
    report["verify"] = verify(data_folder)
    return report


def ensure_data(data_folder, need_embeddings=False, embeddings_path=None, mirror=None, progress=True,
                *, sources=DEFAULT_SOURCES, policy=DownloadPolicy()):
    """Make sure the three npz (and the embeddings, if needed) are in `data_folder`.

    Does nothing when they are there; otherwise prepares what is missing. Raises
    DataUnavailableError, with a one-line message saying how to get the data, when it cannot.
    """
    embeddings_path = embeddings_path or os.path.join(data_folder, EMBEDDINGS_FILE)
    needed = [os.path.join(data_folder, name) for name in DATA_FILES]
    needed += [embeddings_path] if need_embeddings else []
    if all(os.path.isfile(path) for path in needed):
        return None
    try:
        return prepare_data(data_folder, mirror, skip_embeddings=not need_embeddings,
                            progress=progress, embeddings_path=embeddings_path, sources=sources,
                            policy=policy)
    except (StorageError, ValueError) as error:
        raise DataUnavailableError(f"cannot prepare the data in {data_folder}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Command line


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one `error: ...` line (exit code 2)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _parser():
    parser = _OneLineParser(prog="python -m utils.prepare_data",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_folder", default="data",
                        help="where to write the data (default: data)")
    parser.add_argument("--mirror", default=None,
                        help="a folder holding the remote files by name, or a base URL serving them")
    parser.add_argument("--skip_embeddings", action="store_true",
                        help="do not fetch GPT-1's embeddings (embeddings.npz)")
    parser.add_argument("--verify", action="store_true",
                        help="only compare the npz files in --data_folder with the official sha256")
    parser.add_argument("--force", action="store_true", help="rebuild files that are already there")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    return parser


def _print_verification(result, out):
    """One line per split: match, or what is wrong."""
    for split, entry in result.items():
        line = f"verify {split}: {entry['status']}"
        detail = f"; {entry['detail']}" if entry["detail"] else ""
        if entry["status"] == "mismatch":
            line += f" (sha256 {entry['sha256']}, expected {entry['expected']}{detail})"
        elif entry["status"] != "match":
            line += f" ({entry['path']}{detail})"
        print(line, file=out)


def main(argv=None, *, sources=DEFAULT_SOURCES, policy=DownloadPolicy()):
    """Command-line entry point; returns the exit code (0 ok, 1 verification failed, 2 error)."""
    args = _parser().parse_args(argv)
    try:
        if args.verify:
            result = verify(args.data_folder)
            _print_verification(result, sys.stdout)
            return 0 if all(entry["status"] == "match" for entry in result.values()) else 1
        report = prepare_data(args.data_folder, args.mirror, args.skip_embeddings, not args.quiet,
                              force=args.force, sources=sources, policy=policy)
    except (DataUnavailableError, StorageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if report["wikitext"]:
        print(f"WikiText-2 raw from {report['wikitext']['source']}")
    _print_verification(report["verify"], sys.stdout)
    if any(entry["status"] != "match" for entry in report["verify"].values()):
        print("warning: the arrays differ from the course's official ones", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
