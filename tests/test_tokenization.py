"""Tests of utils.tokenization (and its benchmark, utils.bench_tokenizer): a tiny made-up
vocabulary, then fidelity to the course's data.

The fidelity test reads the official arrays from $SHARED_DATA_DIR (../shared/data) and is
skipped, saying so, when that is not set or lacks the files.
"""
import json
import lzma
import os
import sys
import tempfile
import unittest
from unittest import mock

import numpy as np

from tests.helpers import run_cli, slow, write_tiny_tokenizer
from utils import bench_tokenizer
from utils.cli import shared_data_path
from utils.data_folder import SPLITS, split_file
from utils.tokenization import GPT1Tokenizer

SHARED_DATA_DIR = shared_data_path()
# Written where the course wrote <unk>: a character outside GPT-1's vocabulary.
UNK_STANDIN = "\u2013"


class TinyVocabularyTest(unittest.TestCase):
    """Behaviour that does not need the real files."""

    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.TemporaryDirectory()
        cls.vocab = write_tiny_tokenizer(cls.folder.name)
        cls.tokenizer = GPT1Tokenizer.from_folder(cls.folder.name)

    @classmethod
    def tearDownClass(cls):
        cls.folder.cleanup()

    def ids(self, *tokens):
        """Stored ids (vocabulary id + 1) of `tokens`."""
        return [self.vocab[token] + 1 for token in tokens]

    def test_vocabulary_size_counts_padding(self):
        self.assertEqual(self.tokenizer.vocabulary_size, len(self.vocab) + 1)

    def test_encode_applies_merges_and_shifts_ids(self):
        self.assertEqual(self.tokenizer.encode("the cat"), self.ids("the</w>", "cat</w>"))
        self.assertEqual(self.tokenizer.encode("at"), self.ids("a", "t</w>"))

    def test_encode_lowercases_strips_accents_and_splits_punctuation(self):
        self.assertEqual(self.tokenizer.encode("  The  CAFÉ,cat. "),
                         self.ids("the</w>", "ca", "f", "e</w>", ",</w>", "cat</w>", ".</w>"))

    def test_unknown_character_is_unk_id_1(self):
        self.assertEqual(self.tokenizer.encode("cat !"), self.ids("cat</w>") + [1])

    def test_encode_lines_matches_encode(self):
        lines = ["the cat .", "", " = a = ", "cat ! the"]
        self.assertEqual(self.tokenizer.encode_lines(lines),
                         [self.tokenizer.encode(line) for line in lines])

    def test_decode_joins_words_skips_padding_and_shows_unk(self):
        ids = [0] + self.tokenizer.encode("The cat, at !") + [0, 0]
        self.assertEqual(self.tokenizer.decode(ids), "the cat , at <unk>")
        self.assertEqual(self.tokenizer.decode(np.array(ids)), "the cat , at <unk>")

    def test_decode_rejects_out_of_range_id(self):
        with self.assertRaisesRegex(ValueError, "token id 999 is out of range"):
            self.tokenizer.decode([3, 999])

    def test_missing_file_names_path_and_fix(self):
        with tempfile.TemporaryDirectory() as empty:
            with self.assertRaises(FileNotFoundError) as caught:
                GPT1Tokenizer.from_folder(empty)
        message = str(caught.exception)
        self.assertIn(os.path.join(empty, "vocab.json"), message)
        self.assertIn("python -m utils.prepare_data", message)

    def test_vocabulary_without_unk_is_refused(self):
        with tempfile.TemporaryDirectory() as folder:
            write_tiny_tokenizer(folder)
            with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as file:
                json.dump({"a": 0, "a</w>": 1}, file)
            with self.assertRaisesRegex(ValueError, "<unk>"):
                GPT1Tokenizer.from_folder(folder)


class BenchTokenizerTest(unittest.TestCase):

    def run_main(self, argv, environ):
        with mock.patch.dict(os.environ, environ, clear=True):
            return run_cli(bench_tokenizer.main, argv)

    def test_counts_documents_and_tokens(self):
        with tempfile.TemporaryDirectory() as folder:
            write_tiny_tokenizer(folder)
            text = os.path.join(folder, "text.txt")
            with open(text, "w", encoding="utf-8") as file:
                file.write(" = the cat = \n\n the cat at . \n")
            code, out, err = self.run_main([text, "--tokenizer_folder", folder], {})
        self.assertEqual(code, 0, err)
        # "= the cat =" and "the cat a t .": "at" is no word of the tiny vocabulary.
        self.assertIn(f"{text}: 2 documents, 9 tokens;", out)

    def test_defaults_need_shared_data_dir(self):
        code, out, err = self.run_main([], {})
        self.assertEqual(code, 2)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("TEXT and --tokenizer_folder not given and $SHARED_DATA_DIR is not set", err)

    def test_defaults_come_from_shared_data_dir(self):
        with tempfile.TemporaryDirectory() as root:
            os.makedirs(os.path.join(root, "gpt1-bpe"))
            os.makedirs(os.path.join(root, "wikitext-2-tokens"))
            write_tiny_tokenizer(os.path.join(root, "gpt1-bpe"))
            with open(os.path.join(root, "wikitext-2-tokens", "train.txt.xz"), "wb") as file:
                file.write(lzma.compress("the cat\n".encode()))
            code, out, err = self.run_main([], {"SHARED_DATA_DIR": root})
        self.assertEqual(code, 0, err)
        self.assertIn("train.txt.xz: 1 documents, 2 tokens;", out)


def official_split(split):
    """(tokens, sizes) of an official npz in $SHARED_DATA_DIR/wikitext2."""
    with np.load(os.path.join(SHARED_DATA_DIR, "wikitext2", split_file(split))) as archive:
        return archive["tokens"].astype(np.int64), archive["sizes"]


def decoding_table(vocab_path):
    """Text of each stored id, built from vocab.json alone (independent of the tokenizer)."""
    with open(vocab_path, encoding="utf-8") as file:
        vocab = json.load(file)
    table = np.empty(len(vocab) + 1, dtype=object)
    table[0] = ""
    for token, index in vocab.items():
        table[index + 1] = (UNK_STANDIN + " ") if token == "<unk>" else token.replace("</w>", " ")
    return table


def has_shared_data():
    if not SHARED_DATA_DIR:
        return False
    needed = [os.path.join("wikitext2", split_file(split)) for split in SPLITS]
    needed += [os.path.join("gpt1-bpe", "vocab.json"), os.path.join("gpt1-bpe", "merges.txt")]
    return all(os.path.isfile(os.path.join(SHARED_DATA_DIR, path)) for path in needed)


@unittest.skipUnless(has_shared_data(), "SHARED_DATA_DIR is not set or lacks wikitext2/ and gpt1-bpe/ "
                                        "(the course's official arrays); set it to ../shared/data")
@slow
class OfficialDataFidelityTest(unittest.TestCase):
    """Decode each official split to text and re-encode it: every line without <unk> must
    give the official ids exactly."""

    @classmethod
    def setUpClass(cls):
        folder = os.path.join(SHARED_DATA_DIR, "gpt1-bpe")
        cls.tokenizer = GPT1Tokenizer.from_folder(folder)
        cls.table = decoding_table(os.path.join(folder, "vocab.json"))

    def test_real_vocabulary_size(self):
        self.assertEqual(self.tokenizer.vocabulary_size, 40479)

    def test_readme_example(self):
        self.assertEqual(self.tokenizer.encode(" = Robert Boulter = "), [304, 4731, 8406, 614, 304])

    def test_every_line_without_unk_reencodes_to_official_ids(self):
        for split in SPLITS:
            with self.subTest(split=split):
                checked, identical, first_difference = self.check_split(split)
                print(f"\nfidelity {split}: {checked} lines checked (no <unk>), {identical} identical",
                      file=sys.stderr)
                self.assertGreater(checked, 0)
                self.assertEqual(identical, checked, f"first differing line: {first_difference!r}")

    def test_decode_matches_independent_decoding(self):
        tokens, sizes = official_split("test")
        for ids in np.split(tokens, np.cumsum(sizes)[:-1])[:200]:
            expected = "".join(self.table[ids]).replace(UNK_STANDIN, "<unk>").rstrip(" ")
            self.assertEqual(self.tokenizer.decode(ids), expected)

    def check_split(self, split):
        """(lines checked, lines identical, first differing line) of one official split."""
        tokens, sizes = official_split(split)
        documents = np.split(tokens, np.cumsum(sizes)[:-1])
        kept = [ids for ids in documents if not (ids == 1).any()]
        lines = ["".join(self.table[ids]) for ids in kept]
        encoded = self.tokenizer.encode_lines(lines)
        differing = [line for line, ids, new in zip(lines, kept, encoded) if new != ids.tolist()]
        return len(kept), len(kept) - len(differing), differing[0] if differing else None


if __name__ == "__main__":
    unittest.main()
