"""Pinned remote files, fetched checked and resumable; tensors read out of a remote safetensors file.

    fetch_file(remote, folder, mirror, policy)                  a checked copy at folder/NAME
    read_safetensors_rows(remote, folder, rows_by_name, ...)    rows of some tensors, by ranges

A download is written to `NAME.part`, resumed from there after a failure (a Range request for
the rest), checked (size and sha256, where pinned) and only then renamed: an interrupted run
leaves the previous state or a complete, checked file. A file that fails its check is deleted.
A failure that may pass (5xx, timeout, reset, early end) is retried, waiting longer each time.

`--mirror DIR` takes every file by its name from a local folder, `--mirror URL` from
`URL/<name>`; without a mirror each file comes from its pinned URL.
"""
import contextlib
import dataclasses
import errno
import hashlib
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: its pinned URL, its name (the key in a mirror) and what to check."""
    name: str
    url: str
    sha256: str = None
    size: int = None


@dataclasses.dataclass(frozen=True)
class DownloadPolicy:
    """How hard to try: `retries` more tries after a failure, waiting backoff_s, 2*backoff_s..."""
    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 30.0
    chunk_bytes: int = 1 << 20


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


def report_progress(progress, message):
    """Print `message` on stderr when `progress` is on."""
    if progress:
        print(message, file=sys.stderr, flush=True)


def storage_error(error, path):
    """A StorageError saying what went wrong writing `path` and how to fix it."""
    folder = os.path.dirname(os.path.abspath(path))
    if error.errno == errno.ENOSPC:
        return StorageError(f"disk full while writing {path}: free some space in {folder} "
                            "or pick another --data_folder, then run again to resume")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {path}: {error.strerror.lower()}; "
                            "pick a writable --data_folder")
    return StorageError(f"cannot write {path}: {error.strerror or error}")


# ---------------------------------------------------------------------------------------------
# Where a file comes from


def mirror_kind(mirror):
    """"dir", "url" or None for `mirror`; ValueError naming a value that is neither."""
    if mirror is None:
        return None
    if mirror.startswith(("http://", "https://")):
        return "url"
    if os.path.isdir(mirror):
        return "dir"
    raise ValueError(f"--mirror {mirror!r} is neither an existing folder nor an http(s):// URL; "
                     "give a folder holding the files by name, or a base URL serving them")


def remote_location(remote, mirror):
    """The URL or local path `remote` is read from: its pinned URL unless a mirror is given."""
    kind = mirror_kind(mirror)
    if kind == "dir":
        return os.path.join(mirror, remote.name)
    if kind == "url":
        return mirror.rstrip("/") + "/" + remote.name
    return remote.url


def _is_url(location):
    return location.startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------------
# HTTP


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
        raise storage_error(error, part) from error
    try:
        while expected is None or received < expected:
            chunk = response.read(policy.chunk_bytes if expected is None
                                  else min(policy.chunk_bytes, expected - received))
            if not chunk:
                break
            try:
                file.write(chunk)
            except OSError as error:
                raise storage_error(error, part) from error
            received += len(chunk)
            progress_bar.update(len(chunk))
        try:
            file.flush()
            os.fsync(file.fileno())
        except OSError as error:
            raise storage_error(error, part) from error
    finally:
        with contextlib.suppress(OSError):  # a failed flush was reported above
            file.close()
    return received


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


# ---------------------------------------------------------------------------------------------
# Checked files


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
            raise storage_error(error, part) from error


def fetch_file(remote, folder, mirror=None, policy=DownloadPolicy(), progress=True):
    """A checked copy of `remote` at `folder/remote.name`, fetched unless already there.

    Raises DownloadError (ChecksumError for a file that is not the pinned one, which is then
    deleted) and StorageError.
    """
    target = os.path.join(folder, remote.name)
    if os.path.exists(target) and _check(remote, target) is None:
        return target
    location = remote_location(remote, mirror)
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
    report_progress(progress, f"fetched {remote.name} ({os.path.getsize(target):,} bytes) "
                              f"from {location}")
    return target


# ---------------------------------------------------------------------------------------------
# Tensors of a safetensors file: 8 bytes of header length, a JSON header, then the raw tensors


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


def _read_tensors_ranged(url, work, stem, rows_by_name, policy, progress):
    """name -> float32 rows, fetching only the header and those rows (_RangeUnsupported if not)."""
    length = _header_length(_fetch_range(url, work, f"{stem}.length", (0, 8), policy, False), url)
    header = _fetch_range(url, work, f"{stem}.header", (8, 8 + length), policy, False)
    arrays = {}
    for name, dtype, shape, byte_range in _tensor_plan(header, rows_by_name, url):
        data = _fetch_range(url, work, f"{stem}.{name}", byte_range, policy, progress)
        arrays[name] = _as_float32(data, dtype, shape)
    return arrays


def read_safetensors_rows(remote, folder, rows_by_name, mirror=None, policy=DownloadPolicy(),
                          progress=True):
    """name -> float32 array of the first `rows` rows of each 2-D tensor of `rows_by_name`.

    `rows_by_name` maps a tensor's name (also found under a prefix such as "transformer.") to
    the number of rows wanted, None for all. Over HTTP only those rows' bytes are fetched (range
    requests, resumable through parts in `folder`); a server that ignores ranges gets the whole
    file downloaded, checked against its sha256, read, and deleted. A mirror folder's file is
    checked in place. Raises DownloadError (ChecksumError for a file that is not the pinned one).
    """
    location = remote_location(remote, mirror)
    if not _is_url(location):
        if not os.path.isfile(location):
            raise DownloadError(f"{location}: no such file in the mirror folder")
        problem = _check(remote, location, progress)
        if problem is not None:
            raise ChecksumError(f"{location}: not the pinned {remote.name} ({problem}); not used")
        return _read_tensors_local(location, rows_by_name)
    try:
        return _read_tensors_ranged(location, folder, remote.name, rows_by_name, policy, progress)
    except _RangeUnsupported:
        path = fetch_file(remote, folder, mirror, policy, progress)
        try:
            return _read_tensors_local(path, rows_by_name)
        finally:
            os.remove(path)  # the whole checkpoint (479 MB for GPT-1), no longer needed
