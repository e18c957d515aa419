"""The GPT-1 tokenizer of the course's data: text <-> the ids stored in `wiki.*.npz`.

How a line of WikiText-2 raw becomes ids (what the course did, reproduced with Hugging Face
`tokenizers` from OpenAI's two files `vocab.json` and `merges.txt`, pinned in `TOKENIZER_FILES`):

    " = Robert Boulter = "                        a non-empty line of the raw text
      | BERT normalizer: lowercase, strip accents (NFD, drop marks), drop control characters
      | BERT pre-tokenizer: split on whitespace and around every punctuation character
    ["=", "robert", "boulter", "="]
      | BPE with OpenAI's merges, "</w>" marking the end of each word;
      | a character outside the vocabulary becomes "<unk>"
    ["=</w>", "robert</w>", "boul", "ter</w>", "=</w>"]
      | vocabulary ids + 1, so that 0 is free for padding
    [304, 4731, 8406, 614, 304]
"""
import json
import os

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from utils.download import HubFile

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
# openai-community/openai-gpt 1e0d4f3 is the commit that added tokenizer_config.json (#6), after
# the safetensors variant (adacbec, #3), read from the hub's pages; GPT-1's embeddings come from
# the same revision.
GPT1_REPO = "openai-community/openai-gpt"
GPT1_REVISION = "1e0d4f3028acbffb47fe933cea64619c5ec1a002"
TOKENIZER_FILES = (  # (vocab.json, merges.txt)
    HubFile(GPT1_REPO, VOCAB_FILE, GPT1_REVISION,
            "fdf49b19e7de236852091da09b84a7a3cd5e7b0e79916376cf45f6b8127b8078", 815973),
    HubFile(GPT1_REPO, MERGES_FILE, GPT1_REVISION,
            "0ea9b51ae695073cd871e0358f7016311d671a7ff3963e367d5236522f294725", 458495),
)
UNK_TOKEN = "<unk>"
END_OF_WORD = "</w>"
PADDING_ID = 0
# Stored ids are vocabulary ids + ID_OFFSET, so that id 0 can mean padding.
ID_OFFSET = 1


class GPT1Tokenizer:
    """OpenAI GPT-1 BPE tokenizer giving the course's ids (vocabulary id + 1; 0 is padding).

    Args:
        vocab_path: OpenAI's `vocab.json` (token -> vocabulary id, `"<unk>"` among them).
        merges_path: OpenAI's `merges.txt` (a version line, then one merge per line).
    """

    def __init__(self, vocab_path, merges_path):
        vocab_path, merges_path = os.fspath(vocab_path), os.fspath(merges_path)
        vocab = _read_vocab(vocab_path)
        try:
            model = models.BPE.from_file(vocab_path, merges_path, unk_token=UNK_TOKEN,
                                         end_of_word_suffix=END_OF_WORD)
        except Exception as error:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"cannot read the BPE merges {merges_path}: {error}") from error
        self._tokenizer = Tokenizer(model)
        # strip_accents=None follows lowercase (accents stripped), as BERT's basic tokenizer does.
        self._tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
        self._tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._pieces = _decoding_pieces(vocab)

    @classmethod
    def from_folder(cls, folder):
        """Load `vocab.json` and `merges.txt` from `folder`.

        Raises FileNotFoundError naming the missing file and the command that fetches it.
        """
        paths = [os.path.join(os.fspath(folder), name) for name in (VOCAB_FILE, MERGES_FILE)]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"tokenizer file not found: {path} (fetch it with "
                    f"`python -m utils.prepare_data --data_folder {folder}`)")
        return cls(*paths)

    @property
    def vocabulary_size(self):
        """Number of ids, padding included: len(vocab.json) + 1 (40,479 for GPT-1)."""
        return len(self._pieces)

    def encode(self, text):
        """Ids (vocabulary id + 1) of one document, e.g. one line of WikiText-2."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [index + ID_OFFSET for index in ids]

    def encode_lines(self, lines):
        """Ids of each of `lines`, encoded in parallel: one list of ids per line."""
        encodings = self._tokenizer.encode_batch(list(lines), add_special_tokens=False)
        return [[index + ID_OFFSET for index in encoding.ids] for encoding in encodings]

    def decode(self, ids):
        """Readable text of `ids` (a list, array or tensor of ints).

        Padding (0) is skipped, words are separated by single spaces (also around punctuation)
        and an unknown character reads `<unk>`. It reverses the table look-up only: lowercasing,
        accents and the spacing around punctuation are lost, so `decode(encode("The cat, sat."))`
        is "the cat , sat .", as in the course's data. Raises ValueError naming an id out of range.
        """
        ids = np.asarray(ids, dtype=np.int64).ravel()
        bad = ids[(ids < 0) | (ids >= len(self._pieces))]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is out of range: ids go from 0 (padding) "
                             f"to {len(self._pieces) - 1}")
        return "".join(self._pieces[index] for index in ids.tolist()).rstrip(" ")


def _read_vocab(vocab_path):
    """Token -> vocabulary id of OpenAI's `vocab.json`, checked for what encoding relies on."""
    try:
        with open(vocab_path, encoding="utf-8") as file:
            vocab = json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the vocabulary {vocab_path}: {error}") from error
    if not isinstance(vocab, dict) or UNK_TOKEN not in vocab:
        raise ValueError(f"vocabulary {vocab_path} is not a token -> id object with {UNK_TOKEN!r}")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"vocabulary {vocab_path} does not number its tokens 0..{len(vocab) - 1}")
    return vocab


def _decoding_pieces(vocab):
    """Text of each stored id: "" for padding, end-of-word marks turned into spaces.

    `<unk>` gets a trailing space because it replaced a character of unknown place in its word;
    without the space it would glue to the next word.
    """
    pieces = [""] * (len(vocab) + ID_OFFSET)
    for token, index in vocab.items():
        piece = token + END_OF_WORD if token == UNK_TOKEN else token
        pieces[index + ID_OFFSET] = piece.replace(END_OF_WORD, " ")
    return pieces
