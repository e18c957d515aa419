"""Rebuild the course's data from its public sources: `python -m utils.prepare_data`.

    python -m utils.prepare_data [--data_folder data] [--mirror URL_OR_DIR] [--skip_embeddings]
                                 [--verify] [--force]

makes `wiki.{train,validation,test}.npz`, `vocab.json`, `merges.txt` and `embeddings.npz` in
`--data_folder` (utils/data_folder.py) from pinned remote files: WikiText-2 raw, and GPT-1's
tokenizer and embeddings (`DEFAULT_SOURCES`; where each comes from, the Hugging Face cache, mirrors
and offline use: data/README.md). The fetching is utils/download.py; this module is its border,
where a download that fails becomes one DataUnavailableError line saying how to get the files.
`--verify` compares the arrays with the sha256 of the course's official arrays; a build runs the
same check at its end.
"""
import contextlib
import dataclasses
import hashlib
import importlib.util
import itertools
import os
import sys
import time
import zipfile

import numpy as np
from huggingface_hub import constants

from utils.cli import OneLineParser, UsageError, fail
from utils.data_folder import DATA_FILES, EMBEDDINGS_FILE, SPLITS
from utils.download import (DownloadError, DownloadPolicy, Fetcher, HubFile, RemoteFile, fetch_file,
                            fetch_into, read_safetensors_rows)
from utils.files import StorageError, atomic_write, check_writable_folder, storage_error
from utils.tokenization import GPT1_REPO, GPT1_REVISION, TOKENIZER_FILES, GPT1Tokenizer

class DataUnavailableError(UsageError):
    """The data could not be fetched, built or written; the message is one line saying what to do."""


SOURCES_FOLDER = "sources"
PROG = "python -m utils.prepare_data"
POSITION_ROWS = 256  # the course kept GPT-1's first 256 of 512 position embeddings

# sha256 of the course's official `tokens` arrays (as little-endian uint16 bytes); see
# ../shared/README.md. A rebuild that matches these is the course's data, id for id.
OFFICIAL_TOKENS_SHA256 = {
    "train": "196d2b1f60239c70d0a1729782e699230c19b565cf89e2bbec98345519947c94",
    "validation": "9332ed428a20bb9738951dc9555fefb7f1404263cba05335f312a1ffb663b0ca",
    "test": "51fa7ca22536de4c5af0ef2d7d3c2a09edca675c73ba836bd2fd158c43014a0c",
}


@dataclasses.dataclass(frozen=True)
class ZipText:
    """WikiText-2 raw as one zip archive holding one text file per split."""
    archive: object  # HubFile or RemoteFile
    members: dict  # split -> member path in the archive

    @property
    def files(self):
        return (self.archive,)


@dataclasses.dataclass(frozen=True)
class ParquetText:
    """WikiText-2 raw as Hugging Face parquet files, one per split, a `text` row per line."""
    parquet: dict  # split -> HubFile or RemoteFile

    @property
    def files(self):
        return tuple(self.parquet.values())


@dataclasses.dataclass(frozen=True)
class Sources:
    """Every remote file the data is made from (each a HubFile or a RemoteFile); tests swap in
    their own."""
    wikitext: tuple  # ZipText / ParquetText, tried in order
    vocab: object
    merges: object
    checkpoint: object
    token_tensor: str = "tokens_embed.weight"
    position_tensor: str = "positions_embed.weight"


# Where the pins come from. model.safetensors' sha256 (its LFS object id) was read from the
# hub's pages, at the tokenizer's revision (utils/tokenization.py). The zip's sha256 and size are
# the ones several public projects pin for the original S3 file, its wikitext.smerity.com copy and
# the ggml-org/ci copy alike; the parquet files' come from projects pinning Salesforce/wikitext
# b08601e.
_WIKITEXT_ZIP_SHA256 = "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"
_WIKITEXT_MEMBERS = {"train": "wikitext-2-raw/wiki.train.raw",
                     "validation": "wikitext-2-raw/wiki.valid.raw",
                     "test": "wikitext-2-raw/wiki.test.raw"}
_PARQUET_FILES = {
    "train": ("wikitext-2-raw-v1/train-00000-of-00001.parquet", 6357543,
              "e83889baabc497075506f91975be5fac0d45c5290b6b20582c8cd1e853d0c9f7"),
    "validation": ("wikitext-2-raw-v1/validation-00000-of-00001.parquet", 657209,
                   "204929b7ff9d6184953f867dedb860e40aa69c078fc1e54b3baaa8fb28511c4c"),
    "test": ("wikitext-2-raw-v1/test-00000-of-00001.parquet", 732610,
             "5f1bea067869d04849c0f975a2b29c4ff47d867f484f5010ea5e861eab246d91"),
}

DEFAULT_SOURCES = Sources(
    wikitext=(
        ZipText(HubFile("ggml-org/ci", "wikitext-2-raw-v1.zip",
                        "927b3642933080f1b0e811e2f916e14c292992f9", _WIKITEXT_ZIP_SHA256, 4721645,
                        repo_type="dataset"),
                _WIKITEXT_MEMBERS),
        ZipText(RemoteFile("wikitext-2-raw-v1.zip",
                           "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
                           _WIKITEXT_ZIP_SHA256, 4721645),
                _WIKITEXT_MEMBERS),
        ParquetText({split: HubFile("Salesforce/wikitext", filename,
                                    "b08601e04326c79dfdd32d625aee71d232d685c3", sha256, size,
                                    repo_type="dataset")
                     for split, (filename, size, sha256) in _PARQUET_FILES.items()}),
    ),
    vocab=TOKENIZER_FILES[0],
    merges=TOKENIZER_FILES[1],
    checkpoint=HubFile(GPT1_REPO, "model.safetensors", GPT1_REVISION,
                       "25c82cdf1844d2d93e9120b3b628fc6c2b4fcc7801a1297f58465ba67d45deb3"),
)


# ---------------------------------------------------------------------------------------------
# WikiText-2 raw


def document_lines(text):
    """The non-empty lines of a split, each one document (line ends as Python's text files)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [line for line in lines if line.strip()]


def _zip_splits(source, path):
    """split -> documents of a WikiText zip; DownloadError for an archive not laid out as expected."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {split: document_lines(archive.read(source.members[split]).decode("utf-8"))
                    for split in SPLITS}
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as error:
        raise DownloadError(f"{path}: not a WikiText-2 raw archive ({error})") from error


def _parquet_splits(paths):
    """split -> documents of WikiText parquet files (one `text` row per line of the raw file)."""
    import pyarrow.parquet  # optional: only this fallback source needs it

    return {split: [row for row in pyarrow.parquet.read_table(path, columns=["text"])
                    .column("text").to_pylist() if row and row.strip()]
            for split, path in paths.items()}


def _fetch_wikitext(fetcher, source, folder):
    """split -> documents from one WikiText source (DownloadError when it fails)."""
    if isinstance(source, ZipText):
        path = fetch_file(fetcher, source.archive, folder)
        try:
            return _zip_splits(source, path)
        except DownloadError:
            fetcher.discard(path)  # never to be used again
            raise
    if importlib.util.find_spec("pyarrow") is None:  # known before downloading the files for nothing
        raise DownloadError("parquet source skipped: it needs pyarrow (pip install pyarrow)")
    paths = {split: fetch_file(fetcher, remote, folder) for split, remote in source.parquet.items()}
    return _parquet_splits(paths)


def read_wikitext(folder, sources=DEFAULT_SOURCES, fetcher=Fetcher()):
    """split -> non-empty lines of WikiText-2 raw, from the first source that works.

    Plain downloads go to `folder`, Hub files to the Hub cache. Returns (documents, used,
    failures): `used` names the file(s) read, `failures` says why each earlier source failed.
    Raises DownloadError, naming every source and why it failed, when none works.
    """
    failures, tried = [], set()
    for source in sources.wikitext:
        locations = tuple(fetcher.location(remote) for remote in source.files)
        if locations in tried:  # two homes of one file name read from the same mirror
            continue
        tried.add(locations)
        try:
            documents = _fetch_wikitext(fetcher, source, folder)
            return documents, ", ".join(locations), failures
        except DownloadError as error:
            failures.append(str(error))
    raise DownloadError("; ".join(failures))


@contextlib.contextmanager
def obtaining(what, sources, folder):
    """The border with utils/download.py: what fetching, building or writing `what` raised becomes
    the one DataUnavailableError the user reads (a DownloadError with the two ways to get the files)."""
    try:
        yield
    except DownloadError as error:
        names = [remote.name for remote in sources.wikitext[0].files]
        names += [sources.vocab.name, sources.merges.name, sources.checkpoint.name]
        command = f"{PROG} --data_folder {folder}"
        if constants.HF_HUB_OFFLINE:
            command = f"HF_HUB_OFFLINE=0 {command}"
        raise DataUnavailableError(
            f"cannot get {what}: {error}. Run `{command}` with network access, or put "
            f"{', '.join(names)} in a folder and add `--mirror FOLDER`") from error
    except StorageError as error:  # its message names the file and what to do
        raise DataUnavailableError(str(error)) from error
    except ValueError as error:  # source files that are not what their pins promise
        raise DataUnavailableError(f"cannot build {what} in {folder}: {error}") from error


# ---------------------------------------------------------------------------------------------
# GPT-1 embeddings from model.safetensors


def read_checkpoint_tensors(folder, sources=DEFAULT_SOURCES, fetcher=Fetcher()):
    """(token rows, first POSITION_ROWS position rows) of GPT-1's checkpoint as float32.

    Read from the whole checkpoint where it is at hand (the Hub cache, a mirror folder, checked
    against its sha256), else from the rows kept by an earlier run, else fetched by range
    requests (see utils.download.read_safetensors_rows).
    """
    rows_by_name = {sources.token_tensor: None, sources.position_tensor: POSITION_ROWS}
    arrays = read_safetensors_rows(fetcher, sources.checkpoint, folder, rows_by_name)
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


def _save_npz(path, arrays, compress):
    """Write an npz through `atomic_write` (StorageError, saying what to do, when it cannot)."""
    try:
        with atomic_write(path) as file:
            (np.savez_compressed if compress else np.savez)(file, **arrays)
    except OSError as error:
        raise storage_error(error, path) from error


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


def fetch_tokenizer(folder, fetcher=Fetcher(), sources=None):
    """The GPT-1 tokenizer, its vocab.json and merges.txt fetched into `folder` when missing
    (DataUnavailableError, saying how to get them, when they cannot be had)."""
    sources = sources or DEFAULT_SOURCES
    with obtaining("the GPT-1 tokenizer", sources, folder):
        for remote in (sources.vocab, sources.merges):
            fetch_into(fetcher, remote, folder)
        return GPT1Tokenizer.from_folder(folder)


def _build_splits(folder, tokenizer, sources, fetcher, report):
    """Fetch WikiText-2 raw, tokenize it and write the three npz files."""
    documents, used, failures = read_wikitext(os.path.join(folder, SOURCES_FOLDER), sources, fetcher)
    report["wikitext"] = {"source": used, "failed_sources": failures}
    for split, name in zip(SPLITS, DATA_FILES):
        start = time.perf_counter()
        arrays = tokenize_documents(tokenizer, documents[split])
        _save_npz(os.path.join(folder, name), arrays, compress=True)
        report["splits"][split] = {"documents": int(arrays["sizes"].size),
                                   "tokens": int(arrays["tokens"].size)}
        fetcher.say(f"{split}: {arrays['sizes'].size:,} documents, {arrays['tokens'].size:,} tokens "
                    f"in {time.perf_counter() - start:.1f} s -> {name}")


def _build_embeddings(folder, path, tokenizer, sources, fetcher, report):
    """Fetch GPT-1's embeddings and write the course's embeddings.npz at `path`."""
    token_rows, position_rows = read_checkpoint_tensors(os.path.join(folder, SOURCES_FOLDER),
                                                        sources, fetcher)
    arrays = build_embeddings(token_rows, position_rows, tokenizer.vocabulary_size)
    _save_npz(path, arrays, compress=False)
    report["embeddings"] = {"path": path, "tokens": list(arrays["tokens"].shape),
                            "position": list(arrays["position"].shape)}
    fetcher.say(f"embeddings: tokens {arrays['tokens'].shape}, position "
                f"{arrays['position'].shape} -> {path}")


def prepare_data(data_folder="data", fetcher=Fetcher(), *, skip_embeddings=False,
                 embeddings_path=None, force=False, sources=None):
    """Make the course's data in `data_folder`; files already there are kept unless `force`.

    `fetcher` says where the remote files come from (utils/download.py); `sources` are the remote
    files to use (DEFAULT_SOURCES, read when called, unless given).

    Returns a report: {"data_folder", "wikitext": {"source", "failed_sources"} or None,
    "splits": {split: {"documents", "tokens"}}, "embeddings": {...} or None, "verify": verify()}.
    Raises DataUnavailableError (a UsageError: one line saying what to do) when the data cannot be
    fetched, built or written.
    """
    sources = sources or DEFAULT_SOURCES
    embeddings_path = embeddings_path or os.path.join(data_folder, EMBEDDINGS_FILE)
    for folder in (data_folder, os.path.join(data_folder, SOURCES_FOLDER)):
        check_writable_folder(folder, "--data_folder")
    report = {"data_folder": data_folder, "wikitext": None, "splits": {}, "embeddings": None}
    tokenizer = fetch_tokenizer(data_folder, fetcher, sources)
    if force or not all(os.path.isfile(os.path.join(data_folder, name)) for name in DATA_FILES):
        with obtaining("WikiText-2 raw", sources, data_folder):
            _build_splits(data_folder, tokenizer, sources, fetcher, report)
    if not skip_embeddings and (force or not os.path.isfile(embeddings_path)):
        with obtaining("the GPT-1 embeddings", sources, data_folder):
            _build_embeddings(data_folder, embeddings_path, tokenizer, sources, fetcher, report)
    report["verify"] = verify(data_folder)
    return report


def ensure_data(data_folder, need_embeddings=False, embeddings_path=None, fetcher=Fetcher(), *,
                sources=None):
    """Make sure the three npz (and the embeddings, if needed) are in `data_folder`.

    Does nothing when they are there; otherwise prepares what is missing (DataUnavailableError,
    one line saying how to get the data, when it cannot).
    """
    embeddings_path = embeddings_path or os.path.join(data_folder, EMBEDDINGS_FILE)
    needed = [os.path.join(data_folder, name) for name in DATA_FILES]
    needed += [embeddings_path] if need_embeddings else []
    if all(os.path.isfile(path) for path in needed):
        return None
    return prepare_data(data_folder, fetcher, skip_embeddings=not need_embeddings,
                        embeddings_path=embeddings_path, sources=sources)


# ---------------------------------------------------------------------------------------------
# Command line


def _parser():
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_folder", default="data", help="where to write the data")
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


def main(argv=None, *, sources=None, policy=DownloadPolicy()):
    """Command-line entry point; returns the exit code (0 ok, 1 verification failed, 2 error)."""
    args = _parser().parse_args(argv)
    try:
        if args.verify:
            result = verify(args.data_folder)
            _print_verification(result, sys.stdout)
            return 0 if all(entry["status"] == "match" for entry in result.values()) else 1
        fetcher = Fetcher(args.mirror, policy, progress=not args.quiet)  # ValueError: a bad --mirror
        report = prepare_data(args.data_folder, fetcher, skip_embeddings=args.skip_embeddings,
                              force=args.force, sources=sources)
    except (UsageError, ValueError) as error:
        return fail(PROG, error, 2)
    except KeyboardInterrupt:
        return fail(PROG, "interrupted; run the same command again to resume", 130)
    if report["wikitext"]:
        print(f"WikiText-2 raw from {report['wikitext']['source']}")
    _print_verification(report["verify"], sys.stdout)
    if any(entry["status"] != "match" for entry in report["verify"].values()):
        print("warning: the arrays differ from the course's official ones", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
