"""The Wikitext-2 dataset of the course, read from `wiki.{split}.npz` (GPT-1 BPE ids + 1).

Each `.npz` holds `tokens` (uint16, one flat array, 0 reserved for padding) and `sizes` (int64, the
number of tokens of each document, i.e. each non-empty line of WikiText-2). How the flat stream
becomes examples of `max_length` inputs, with break_mode="none" and max_length=4:

    tokens   a b c d e f g h i j k
    chunks   [a b c d e] [e f g h i] [i j k]        (max_length + 1 tokens, overlapping by one)
    source   a b c d      e f g h     i j 0 0       (chunk[:-1], zero-padded on the right)
    target   b c d e      f g h i     j k 0 0       (chunk[1:])
    mask     1 1 1 1      1 1 1 1     1 1 0 0

"lines" chunks every document on its own, the same way. "complete" (the course's definition) takes
the chunks of "lines", drops those of at most `min_length` tokens, then walks the rest in order and
merges consecutive chunks while their lengths add up to at most max_length + 1. With max_length=4
and min_length=1:

    documents  [a b c d e f g] [h i] [j] [k l m]
    lines      [a b c d e] [e f g] [h i] [j] [k l m]     ([j] is then dropped)
    complete   [a b c d e] [e f g h i] [k l m]           ([j] dropped before merging)

A full chunk (max_length + 1 tokens) is always an example of its own, but the tail of a long
document shares its example with the short documents after it. A merged example is the stretch
of the stream that starts where its first chunk starts and is as long as its chunks' lengths
added up, so a dropped chunk between two merged ones lies inside it and its last chunk loses as
many tokens at the end:

    documents  [a b] [c] [d e]   ->   complete  [a b c d]    (min_length=1: [c] in, e out)

In every mode an example of at most `min_length` tokens is dropped (too few targets to learn from).
"""
import os
import zipfile

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.data_folder import SPLITS, split_path

BREAK_MODES = ("none", "lines", "complete")
GPT1_VOCABULARY_SIZE = 40479  # 40,478 BPE tokens + the padding id 0


# Far above WikiText-2's largest split (2.4 M tokens), far below what would exhaust memory: an npz
# is checked against it before anything is inflated, since a small file can declare huge arrays.
MAX_SPLIT_TOKENS = 1 << 27


def check_declared_sizes(path):
    """Raise ValueError when an array of the npz declares more elements than a split can hold.

    Reads only each member's `.npy` header, so nothing is inflated beyond it.
    """
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            try:
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(stream)
            except (ValueError, EOFError) as error:
                raise ValueError(f"data file {path} is not a readable .npz: {member}: {error}") from None
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if count > MAX_SPLIT_TOKENS:
                raise ValueError(f"data file {path}: array {member} declares {count:,} elements of "
                                 f"{dtype}, more than a WikiText split holds ({MAX_SPLIT_TOKENS:,}); "
                                 "the file is damaged or not a data split")


def read_npz_arrays(path, keys, what, remedy, check_sizes=False):
    """The arrays named `keys` that the `.npz` at `path` holds (those it lacks are left out).

    `what` names the file in errors ("data file PATH"), `remedy` says how to get a good one.
    Raises ValueError for a file that is not an npz, an array of Python objects (a pickle, never
    loaded since unpickling runs code) and, with `check_sizes`, one declaring more elements than
    a split holds (`check_declared_sizes`).
    """
    try:
        if check_sizes:
            check_declared_sizes(path)
        # An open file of our own: np.load leaks its handle when the zip cannot be read.
        with open(path, "rb") as file, np.load(file) as archive:
            arrays = {}
            for key in keys:
                if key not in archive.files:
                    continue
                try:
                    arrays[key] = archive[key]
                except ValueError as error:
                    if "allow_pickle" not in str(error):
                        raise
                    raise ValueError(f"{what}: array '{key}' holds Python objects (a pickle), which "
                                     f"are never loaded; {remedy}") from None
    except ValueError as error:
        if str(error).startswith(what):
            raise
        raise ValueError(f"{what} is not a readable .npz ({error}); {remedy}") from error
    except Exception as error:  # zipfile.BadZipFile, EOFError, OSError...
        raise ValueError(f"{what} is not a readable .npz ({error}); {remedy}") from error
    return arrays


def whole_numbers(array, key, path):
    """`array` as int64, flat; a float array holding fractions is refused, never truncated."""
    array = np.asarray(array).ravel()
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise ValueError(f"data file {path}: '{key}' holds numbers that are not whole "
                             f"({array.dtype}); token ids and sizes are integers")
    elif array.dtype.kind not in "iub":
        raise ValueError(f"data file {path}: '{key}' is of type {array.dtype}, not integers")
    return array.astype(np.int64)


def read_split(root, split, vocabulary_size=GPT1_VOCABULARY_SIZE):
    """Load and check `root/wiki.{split}.npz`; returns `(tokens int64, sizes int64)` arrays."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
    path = split_path(root, split)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path} (make it with "
                                f"`python -m utils.prepare_data --data_folder {root}`)")
    arrays = read_npz_arrays(path, ("tokens", "sizes"), f"data file {path}",
                             f"prepare the data again with `python -m utils.prepare_data --data_folder "
                             f"{root} --force`", check_sizes=True)
    if len(arrays) != 2:
        raise ValueError(f"data file {path} must hold arrays 'tokens' and 'sizes'; "
                         f"it holds {sorted(arrays)}")
    tokens, sizes = (whole_numbers(arrays[key], key, path) for key in ("tokens", "sizes"))
    if sizes.sum() != tokens.size or (sizes < 0).any():
        raise ValueError(f"data file {path}: 'sizes' add up to {int(sizes.sum())} but 'tokens' "
                         f"holds {tokens.size} ids; the file is damaged, prepare the data again")
    if tokens.size and (tokens.min() < 1 or tokens.max() >= vocabulary_size):
        raise ValueError(f"data file {path}: token ids span {int(tokens.min())}..{int(tokens.max())} "
                         f"but must lie in 1..{vocabulary_size - 1} (vocabulary_size={vocabulary_size})")
    return tokens, sizes


def chunk_bounds(start, end, max_length):
    """`(begin, end)` pairs cutting `[start, end)` into pieces of `max_length + 1` overlapping by one."""
    begins = np.arange(start, max(end - 1, start + 1), max_length)
    return [(int(b), int(min(b + max_length + 1, end))) for b in begins]


class Wikitext2(Dataset):
    """`torch.utils.data.Dataset` of `{"source", "target", "mask"}` examples of one split.

    Parameters
    ----------
    root : folder holding `wiki.{train,validation,test}.npz`.
    split : "train", "validation" or "test".
    break_mode : "none", "lines" or "complete" (see the module docstring).
    max_length : number of input positions of an example.
    min_length : chunks of at most this many tokens are dropped.
    vocabulary_size : ids must lie below it (GPT-1's 40,479 by default).

    Each item: `source` LongTensor `(max_length,)`, `target` LongTensor `(max_length,)` (source
    shifted left by one), `mask` FloatTensor `(max_length,)` (1 for real targets, 0 for padding).

    Where the course's text and its code disagree, the text is followed: in the course's code the
    last chunk of a document longer than `max_length + 1` tokens starts one token late (one target
    is never predicted) and can run past the document's end into the next document. Here every
    chunk starts on the previous chunk's last token and ends with its document, as the course
    describes "lines", so no example predicts across a boundary that the mode promises to keep.
    """

    def __init__(self, root, split="train", break_mode="none", max_length=256, min_length=1,
                 vocabulary_size=GPT1_VOCABULARY_SIZE):
        if break_mode not in BREAK_MODES:
            raise ValueError(f"unknown break_mode {break_mode!r}; valid break modes are "
                             f"{', '.join(BREAK_MODES)}")
        if max_length < 1:
            raise ValueError(f"max_length={max_length} must be at least 1")
        self.root = root
        self.split = split
        self.break_mode = break_mode
        self.max_length = max_length
        self.min_length = min_length
        self.tokens, self.sizes = read_split(root, split, vocabulary_size)
        bounds = self._bounds()
        self.bounds = [(b, e) for b, e in bounds if e - b > min_length]

    def _bounds(self):
        if self.break_mode == "none":
            return chunk_bounds(0, self.tokens.size, self.max_length)
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        documents = [(int(offsets[i]), int(offsets[i + 1])) for i in range(len(self.sizes))
                     if self.sizes[i] > 0]
        chunks = [c for b, e in documents for c in chunk_bounds(b, e, self.max_length)]
        if self.break_mode == "lines":
            return chunks
        examples = []  # "complete": [begin, length] of each merged example
        for begin, end in chunks:
            length = end - begin
            if length <= self.min_length:
                continue
            if examples and examples[-1][1] + length <= self.max_length + 1:
                examples[-1][1] += length
            else:
                examples.append([begin, length])
        return [(begin, begin + length) for begin, length in examples]

    @property
    def num_tokens(self):
        """Number of tokens of the split, padding aside (the course's dataset has it)."""
        return int(self.tokens.size)

    @property
    def num_lines(self):
        """Number of documents + 1, as the course counts them: its offsets array, leading 0 included."""
        return len(self.sizes) + 1

    def __len__(self):
        return len(self.bounds)

    def __getitem__(self, index):
        begin, end = self.bounds[index]
        chunk = torch.from_numpy(self.tokens[begin:end])  # (n,), n <= max_length + 1
        length = chunk.numel() - 1
        source = torch.zeros(self.max_length, dtype=torch.long)
        target = torch.zeros(self.max_length, dtype=torch.long)
        mask = torch.zeros(self.max_length, dtype=torch.float)
        source[:length] = chunk[:-1]
        target[:length] = chunk[1:]
        mask[:length] = 1.0
        return {"source": source, "target": target, "mask": mask}

    def tensors(self):
        """The whole split as one batch: `{"source", "target", "mask"}` each `(N, max_length)`,
        equal to stacking every item.

        The training loop indexes these directly, which is faster than collating items and can
        live on the GPU. They are cut from the stream in one vectorised step: item by item, a
        split of very short examples (`max_length=1`) would take minutes and gigabytes.
        """
        count, width = len(self.bounds), self.max_length
        bounds = np.array(self.bounds, dtype=np.int64).reshape(count, 2)  # (N, 2): begin, end
        lengths = bounds[:, 1] - bounds[:, 0] - 1  # (N,) targets of each example
        offsets = np.arange(width)  # (L,)
        real = offsets[None, :] < lengths[:, None]  # (N, L)
        last = max(self.tokens.size - 1, 0)
        positions = np.minimum(bounds[:, :1] + offsets[None, :], last)  # (N, L), clipped past the end
        tokens = self.tokens if self.tokens.size else np.zeros(1, dtype=np.int64)
        source = np.where(real, tokens[positions], 0)  # (N, L)
        target = np.where(real, tokens[np.minimum(positions + 1, last)], 0)  # (N, L)
        return {"source": torch.from_numpy(source.astype(np.int64)),
                "target": torch.from_numpy(target.astype(np.int64)),
                "mask": torch.from_numpy(real.astype(np.float32))}
