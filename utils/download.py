"""Pinned remote files, fetched and checked; rows of tensors read out of a remote safetensors file.

    Fetcher(mirror, policy, progress)                    where files come from, and how hard to try
    fetch_file(fetcher, remote, folder)                  the path of a checked copy
    fetch_into(fetcher, remote, folder)                  a checked copy at folder/NAME
    read_safetensors_rows(fetcher, remote, folder, rows) rows of some tensors, by range requests

A HubFile (a Hub repository's file at a pinned commit) comes through huggingface_hub, its cache and
its settings (HF_ENDPOINT, HF_TOKEN, HF_HOME, HF_HUB_OFFLINE); a RemoteFile (a plain URL) is
downloaded to `folder/NAME.part`, retried and resumed after a failure that may pass. Every file is
checked against its pinned size and sha256 before use; one that fails is deleted, never used.
Errors: DownloadError (one file, one place, why) and StorageError (a folder that cannot be
written); utils/prepare_data.py turns them into what the user reads. Details: data/README.md.
"""
import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import posixpath
import shutil
import socket
import sys
import time
from typing import Optional

import numpy as np
from huggingface_hub import (cached_assets_path, constants, hf_hub_download, hf_hub_url,
                             try_to_load_from_cache)
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
# huggingface_hub's HTTP module (httpx, or httpx2 from huggingface_hub 2.0 on) and its client.
from huggingface_hub.utils import build_hf_headers, get_session, httpx
from huggingface_hub.utils import tqdm as hub_tqdm
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_safetensors
from tqdm import tqdm

from utils.files import StorageError, atomic_write, atomic_write_bytes, storage_error


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A file at a plain URL (not on the Hub): its name (the key in a mirror) and what to check."""
    name: str
    url: str
    sha256: str = None
    size: int = None


@dataclasses.dataclass(frozen=True)
class HubFile:
    """A file of a Hugging Face Hub repository at a pinned commit, and what to check."""
    repo_id: str
    filename: str  # its path in the repository
    revision: str  # a commit hash, so that a cached copy is used without asking the Hub
    sha256: str = None
    size: int = None
    repo_type: str = "model"

    @property
    def name(self):
        """The file's name: its key in a mirror."""
        return posixpath.basename(self.filename)

    @property
    def url(self):
        """Its URL on the Hub (HF_ENDPOINT)."""
        return hf_hub_url(self.repo_id, self.filename, repo_type=self.repo_type,
                          revision=self.revision)


@dataclasses.dataclass(frozen=True)
class DownloadPolicy:
    """How hard to try a plain download or a range: `retries` more tries after a failure,
    waiting backoff_s, 2*backoff_s... (the Hub client retries its own requests)."""
    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 30.0
    chunk_bytes: int = 1 << 20


class DownloadError(RuntimeError):
    """One file could not be fetched from one place; the message names the place and why."""


class ChecksumError(DownloadError):
    """A fetched file is not the pinned one; it has been deleted."""


class _RangeUnsupported(Exception):
    """The server answered a range request with the whole file."""


class _NoProgressBar(hub_tqdm):
    """huggingface_hub's progress bar, switched off."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)
_RETRYABLE_STATUS = (408, 425, 429, 500, 502, 503, 504)


def _warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _discard(path):
    """Delete a file that failed its check; in the Hub cache, the snapshot's link and its blob."""
    for name in {path, os.path.realpath(path)}:
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


# ---------------------------------------------------------------------------------------------
# Where a file comes from, and how hard to try


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


@dataclasses.dataclass(frozen=True)
class Fetcher:
    """Where pinned files come from and how: `mirror` (a folder holding them by name, a base URL
    serving them, or None for each file's own home), the retry `policy`, and `progress` (bars and
    messages on stderr). A `mirror` that is neither a folder nor a URL is a ValueError naming it."""

    mirror: Optional[str] = None
    policy: DownloadPolicy = DownloadPolicy()
    progress: bool = True

    def __post_init__(self):
        _mirror_kind(self.mirror)

    @property
    def mirror_kind(self):
        """"dir", "url" or None."""
        return _mirror_kind(self.mirror)

    def location(self, remote):
        """The URL or local path `remote` is read from: its own URL unless a mirror is given."""
        if self.mirror_kind == "dir":
            return os.path.join(self.mirror, remote.name)
        if self.mirror_kind == "url":
            return self.mirror.rstrip("/") + "/" + remote.name
        return remote.url

    def from_hub(self, remote):
        """Whether `remote` comes through huggingface_hub (a HubFile, no mirror)."""
        return self.mirror is None and isinstance(remote, HubFile)

    def say(self, message):
        """Print `message` on stderr when progress is on."""
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    def discard(self, path):
        """Delete a fetched file that proved unusable, unless it is the mirror folder's (the user's)."""
        if self.mirror_kind != "dir":
            _discard(path)


# ---------------------------------------------------------------------------------------------
# Why a request failed


def _os_cause(error):
    """The first OSError with a reason (refused, unknown host...) behind a network error."""
    while error is not None and not (isinstance(error, OSError) and error.strerror):
        error = error.__cause__ or error.__context__
    return error


def _describe(error, policy=None):
    """One short phrase for a network failure."""
    if isinstance(error, OfflineModeIsEnabled):
        return "not downloaded: HF_HUB_OFFLINE is set"
    if isinstance(error, (httpx.HTTPStatusError, HfHubHTTPError)) and error.response is not None:
        return f"HTTP {error.response.status_code} {error.response.reason_phrase}"
    if isinstance(error, httpx.TimeoutException):
        return f"timed out after {policy.timeout_s:g} s" if policy else "timed out"
    if isinstance(error, httpx.RemoteProtocolError):
        return "connection closed before the end of the file"
    cause = _os_cause(error)
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve the host name, no network? ({cause.strerror})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if cause is not None:
        return cause.strerror.lower()
    return str(error).split("\n")[0] or type(error).__name__


def _retryable(error):
    """Whether trying again may help: server or connection trouble, not a 404, an unknown host
    or offline mode."""
    if isinstance(error, OfflineModeIsEnabled):
        return False
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code in _RETRYABLE_STATUS
    cause = _os_cause(error)
    return not (isinstance(cause, socket.gaierror) and cause.errno == socket.EAI_NONAME)


# ---------------------------------------------------------------------------------------------
# Plain HTTP, on huggingface_hub's client (so HF_HUB_OFFLINE stops it too)


def _open_for_append(path):
    """Open a partial download for appending (a seam tests use to simulate a full disk)."""
    return open(path, "ab")


def _get_once(fetcher, url, sink, headers, byte_range, desc):
    """One GET of `url` (or of `byte_range`), appended to what `sink` already holds.

    Raises _RangeUnsupported when a byte range was asked for and the server sent everything,
    DownloadError when the body ended early.
    """
    have = sink.tell()
    start, end = byte_range or (0, None)
    if have or byte_range:
        headers = {**headers, "Range": f"bytes={start + have}-{'' if end is None else end - 1}"}
    with get_session().stream("GET", url, headers=headers, timeout=fetcher.policy.timeout_s) as response:
        if response.status_code == 416 and have and not byte_range:
            return  # nothing left to send: the part is whole; the caller checks it
        response.raise_for_status()
        if response.status_code == 200 and byte_range:
            raise _RangeUnsupported(url)
        if response.status_code == 200 and have:  # the server ignored our resume: start over
            sink.seek(0)
            sink.truncate()
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc, disable=not (fetcher.progress and desc), leave=False) as progress_bar:
            try:
                for chunk in response.iter_bytes(fetcher.policy.chunk_bytes):
                    try:
                        sink.write(chunk)
                    except OSError as error:
                        raise storage_error(error, sink.name) from error
                    progress_bar.update(len(chunk))
            except httpx.RemoteProtocolError as error:  # fewer bytes than its Content-Length
                expected = "" if total is None else f" of {total:,}"
                raise DownloadError(f"connection closed after {sink.tell():,}{expected} "
                                    "bytes") from error


def _download(fetcher, url, sink, desc, headers=None, byte_range=None):
    """Fill `sink` with the body of `url` (or its `byte_range`), retrying and resuming.

    A failure that may pass is retried after waiting backoff_s, 2*backoff_s...; the bytes already
    in `sink` are kept and the next try asks for the rest only. Raises DownloadError naming the
    URL and the last reason.
    """
    headers = {"Accept-Encoding": "identity", **(headers or {})}  # byte counts of the file itself
    policy = fetcher.policy
    for attempt in range(policy.retries + 1):
        try:
            _get_once(fetcher, url, sink, headers, byte_range, desc)
            return
        except (StorageError, _RangeUnsupported):
            raise
        except (httpx.HTTPError, OSError, DownloadError) as error:
            failure = error
        reason = str(failure) if isinstance(failure, DownloadError) else _describe(failure, policy)
        if not _retryable(failure) or attempt == policy.retries:
            tries = f" (tried {attempt + 1} times)" if attempt else ""
            raise DownloadError(f"{url}: {reason}{tries}") from failure
        time.sleep(policy.backoff_s * 2 ** attempt)


def _download_to_part(fetcher, url, part, desc):
    """Fill the file `part` with `url`, resuming from what it holds (StorageError if unwritable)."""
    try:
        sink = _open_for_append(part)
    except OSError as error:
        raise storage_error(error, part) from error
    try:
        _download(fetcher, url, sink, desc)
        try:
            sink.flush()
            os.fsync(sink.fileno())
        except OSError as error:
            raise storage_error(error, part) from error
    finally:
        with contextlib.suppress(OSError):  # a failed flush was reported above
            sink.close()


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


def _hub_cached(remote, progress):
    """Path of the checked copy of `remote` in the Hub cache, or None; a copy that fails its check
    is deleted, with a warning."""
    path = try_to_load_from_cache(remote.repo_id, remote.filename, revision=remote.revision,
                                  repo_type=remote.repo_type)
    if not isinstance(path, str):
        return None
    problem = _check(remote, path, progress)
    if problem is None:
        return path
    _discard(path)
    _warn(f"{path}: not the pinned {remote.name} ({problem}); deleted from the Hugging Face cache")
    return None


def _hub_error(error, remote):
    """The DownloadError or StorageError to raise for what hf_hub_download raised."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return storage_error(error, error.filename or constants.HF_HUB_CACHE, "HF_HOME")
    if isinstance(error, LocalEntryNotFoundError) and error.__cause__ is not None:
        error = error.__cause__  # the request's failure: the file was not in the cache either
    if isinstance(error, OfflineModeIsEnabled):
        return DownloadError(f"{remote.url}: not in the Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set")
    return DownloadError(f"{remote.url}: {_describe(error)}")


def _fetch_from_hub(fetcher, remote):
    """Path of a checked copy of `remote` in the Hub cache, downloaded there when missing."""
    path = _hub_cached(remote, fetcher.progress)
    if path is not None:
        return path
    try:
        path = hf_hub_download(remote.repo_id, remote.filename, revision=remote.revision,
                               repo_type=remote.repo_type, etag_timeout=fetcher.policy.timeout_s,
                               tqdm_class=None if fetcher.progress else _NoProgressBar)
    except (OSError, httpx.HTTPError) as error:
        raise _hub_error(error, remote) from error
    problem = _check(remote, path, fetcher.progress)
    if problem is not None:
        _discard(path)
        raise ChecksumError(f"{remote.url}: not the pinned {remote.name} ({problem}); deleted")
    fetcher.say(f"fetched {remote.name} from {remote.url} into {path}")
    return path


def fetch_file(fetcher, remote, folder):
    """Path of a checked copy of `remote`: in the Hub cache for a HubFile, in the mirror folder
    for a folder mirror, else at `folder/remote.name` (a plain download, kept there).

    Raises DownloadError (ChecksumError for a file that is not the pinned one, which is then
    deleted, or left unused in a mirror folder) and StorageError.
    """
    location = fetcher.location(remote)
    if fetcher.mirror_kind == "dir":
        if not os.path.isfile(location):
            raise DownloadError(f"{location}: no such file in the mirror folder")
        problem = _check(remote, location, fetcher.progress)
        if problem is not None:
            raise ChecksumError(f"{location}: not the pinned {remote.name} ({problem}); not used")
        return location
    if fetcher.from_hub(remote):
        return _fetch_from_hub(fetcher, remote)
    target = os.path.join(folder, remote.name)
    if os.path.exists(target) and _check(remote, target) is None:
        return target
    part = target + ".part"
    _download_to_part(fetcher, location, part, remote.name)
    problem = _check(remote, part, fetcher.progress)
    if problem is not None:
        os.remove(part)
        raise ChecksumError(f"{location}: not the pinned {remote.name} ({problem}); deleted")
    os.replace(part, target)
    fetcher.say(f"fetched {remote.name} ({os.path.getsize(target):,} bytes) from {location}")
    return target


def fetch_into(fetcher, remote, folder):
    """A checked copy of `remote` at `folder/remote.name` (a file the folder itself must hold,
    such as the tokenizer's), copied from where `fetch_file` put it."""
    target = os.path.join(folder, remote.name)
    if os.path.exists(target) and _check(remote, target) is None:
        return target
    path = fetch_file(fetcher, remote, folder)
    if path != target:
        try:
            with open(path, "rb") as source, atomic_write(target) as copy:
                shutil.copyfileobj(source, copy)
        except OSError as error:
            raise storage_error(error, target) from error
    return target


# ---------------------------------------------------------------------------------------------
# Tensors of a safetensors file: 8 bytes of header length, a JSON header, then the raw tensors


_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit; a bigger "length" means another file
_FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
                 "F64": np.dtype("<f8")}


def _tensor_key(names, name, where):
    """The key of tensor `name` among `names`, also found under a prefix such as "transformer."."""
    matches = [key for key in names if key == name or key.endswith("." + name)]
    if not matches:
        tensors = sorted(key for key in names if key != "__metadata__")
        raise DownloadError(f"{where}: no tensor {name!r}; it has {tensors[:5]}...")
    return matches[0]


def _rows_to_read(where, name, dtype, shape, rows):
    """The number of rows to read of tensor `name` (all for None); DownloadError unless it is a
    2-D float tensor with that many."""
    if dtype not in _FLOAT_DTYPES or len(shape) != 2:
        raise DownloadError(f"{where}: tensor {name!r} is {dtype} {list(shape)}, "
                            "expected a 2-D float tensor")
    if rows is not None and shape[0] < rows:
        raise DownloadError(f"{where}: tensor {name!r} has {shape[0]} rows, need {rows}")
    return shape[0] if rows is None else rows


def _read_tensors_local(path, rows_by_name):
    """name -> float32 rows of the tensors of a local safetensors file."""
    arrays = {}
    try:
        with safe_open(path, framework="pt") as file:  # torch: it reads bfloat16 too
            names = list(file.keys())
            for name, rows in rows_by_name.items():
                tensor = file.get_slice(_tensor_key(names, name, path))
                rows = _rows_to_read(path, name, tensor.get_dtype(), tensor.get_shape(), rows)
                arrays[name] = tensor[:rows].float().numpy()
    except SafetensorError as error:
        raise DownloadError(f"{path}: not a safetensors file ({error})") from error
    return arrays


def _as_float32(data, dtype, shape):
    """float32 array of raw little-endian tensor bytes."""
    array = np.frombuffer(data, dtype=_FLOAT_DTYPES[dtype])
    if dtype == "BF16":  # bfloat16 is the upper half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32).reshape(shape)


def _read_tensors_ranged(fetcher, url, headers, rows_by_name):
    """name -> float32 rows, fetching only the header and those rows (_RangeUnsupported if the
    server sends whole files)."""
    def fetch(start, end, desc=None):
        sink = io.BytesIO()
        _download(fetcher, url, sink, desc, headers, (start, end))
        if sink.tell() != end - start:
            raise DownloadError(f"{url}: got {sink.tell():,} bytes of range {start}-{end}")
        return sink.getvalue()

    length = int.from_bytes(fetch(0, 8), "little")
    if not 2 <= length <= _MAX_HEADER_BYTES:
        raise DownloadError(f"{url}: not a safetensors file (header length {length})")
    try:
        header = json.loads(fetch(8, 8 + length))
    except ValueError as error:
        raise DownloadError(f"{url}: not a safetensors file ({error})") from error
    arrays = {}
    for name, rows in rows_by_name.items():
        entry = header[_tensor_key(header, name, url)]
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        rows = _rows_to_read(url, name, dtype, shape, rows)
        row_bytes = shape[1] * _FLOAT_DTYPES[dtype].itemsize
        if end - start != shape[0] * row_bytes:
            raise DownloadError(f"{url}: tensor {name!r} spans {end - start} bytes, not {shape}")
        first = 8 + length + start
        arrays[name] = _as_float32(fetch(first, first + rows * row_bytes, name), dtype,
                                   (rows, shape[1]))
    return arrays


def _kept_rows_path(remote):
    """Where rows read by ranges from a Hub checkpoint are kept (the Hugging Face assets cache),
    or None, with a warning, when that folder cannot be made."""
    try:
        folder = cached_assets_path("ift6135", namespace=remote.repo_id.replace("/", "--"),
                                    subfolder=remote.revision)
    except OSError as error:
        _warn(f"{storage_error(error, error.filename or constants.HF_ASSETS_CACHE, 'HF_HOME')} "
              "(rows read now are not kept)")
        return None
    return os.path.join(folder, remote.name)


def _rows_metadata(arrays, rows_by_name):
    """What a file of kept rows records, to be checked on reading: the rows, their sha256."""
    digests = {name: hashlib.sha256(array.tobytes()).hexdigest() for name, array in arrays.items()}
    return {"rows": json.dumps(rows_by_name, sort_keys=True),
            "sha256": json.dumps(digests, sort_keys=True)}


def _kept_rows(path, rows_by_name):
    """The rows kept at `path`, or None; a file that fails its check is deleted, with a warning."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="numpy") as file:
            metadata, arrays = file.metadata(), {name: file.get_tensor(name) for name in file.keys()}
        if metadata == _rows_metadata(arrays, rows_by_name):
            return arrays
    except SafetensorError:
        pass
    _discard(path)
    _warn(f"{path}: kept tensor rows that fail their check; deleted")
    return None


def _keep_rows(path, arrays, rows_by_name):
    """Keep rows read by ranges at `path` for later runs (a warning if it cannot be written)."""
    try:
        atomic_write_bytes(path, save_safetensors(arrays, metadata=_rows_metadata(arrays, rows_by_name)))
    except OSError as error:
        _warn(f"{storage_error(error, path, 'HF_HOME')} (rows read now are not kept)")


def read_safetensors_rows(fetcher, remote, folder, rows_by_name):
    """name -> float32 array of the first `rows` rows of each 2-D tensor of `rows_by_name`.

    `rows_by_name` maps a tensor's name (also found under a prefix such as "transformer.") to
    the number of rows wanted, None for all. A whole file at hand (the Hub cache, a mirror folder)
    is checked and read. Otherwise only those rows' bytes are fetched, by range requests; rows of
    a Hub file are then kept in the assets cache. A server that ignores ranges gets the whole file
    fetched (into the Hub cache, or into `folder`, deleted after reading). Raises DownloadError
    (ChecksumError for a file that is not the pinned one).
    """
    kept = None
    if fetcher.from_hub(remote):
        path = _hub_cached(remote, fetcher.progress)
        if path is not None:
            return _read_tensors_local(path, rows_by_name)
        kept = _kept_rows_path(remote)
        arrays = _kept_rows(kept, rows_by_name)
        if arrays is not None:
            return arrays
        if constants.HF_HUB_OFFLINE:
            raise DownloadError(f"{remote.url}: neither it nor the rows read from it are in the "
                                "Hugging Face cache, and HF_HUB_OFFLINE is set")
        url, headers = remote.url, build_hf_headers()
    elif fetcher.mirror_kind == "dir":
        return _read_tensors_local(fetch_file(fetcher, remote, folder), rows_by_name)
    else:
        url, headers = fetcher.location(remote), {}
    try:
        arrays = _read_tensors_ranged(fetcher, url, headers, rows_by_name)
    except _RangeUnsupported:
        fetcher.say(f"{url} ignores range requests: fetching the whole file")
        path = fetch_file(fetcher, remote, folder)
        try:
            return _read_tensors_local(path, rows_by_name)
        finally:
            if not fetcher.from_hub(remote):
                os.remove(path)  # the whole checkpoint, no longer needed
    if kept is not None:
        _keep_rows(kept, arrays, rows_by_name)
    return arrays
