"""The Wikitext2 dataset, GPT1Embedding and the small torch helpers."""
import hashlib
import os
import shutil
import tempfile
import unittest

import numpy as np
import torch

from gpt1_solution_template import MiniGPT1
from lstm_solution import LSTM
from tests.helpers import real_wikitext2_dir, write_documents
from utils.data_folder import SPLITS
from utils.embeddings import GPT1Embedding
from utils.torch_utils import seed_experiment, to_device
from utils.wikitext2 import Wikitext2


class SmallFileTest(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp()
        # Three documents: 3, 6 and 2 tokens; the stream is 1..11.
        self.documents = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11]]
        write_documents(self.folder, "train", self.documents)

    def items(self, **kwargs):
        dataset = Wikitext2(self.folder, "train", **kwargs)
        return [(item["source"].tolist(), item["target"].tolist(), item["mask"].tolist()) for item in dataset]

    def test_none_mode_overlapping_chunks(self):
        self.assertEqual(self.items(max_length=4), [
            ([1, 2, 3, 4], [2, 3, 4, 5], [1, 1, 1, 1]),
            ([5, 6, 7, 8], [6, 7, 8, 9], [1, 1, 1, 1]),
            ([9, 10, 0, 0], [10, 11, 0, 0], [1, 1, 0, 0]),
        ])

    def test_lines_mode_each_document_alone(self):
        self.assertEqual(self.items(break_mode="lines", max_length=4), [
            ([1, 2, 0, 0], [2, 3, 0, 0], [1, 1, 0, 0]),
            ([4, 5, 6, 7], [5, 6, 7, 8], [1, 1, 1, 1]),
            ([8, 0, 0, 0], [9, 0, 0, 0], [1, 0, 0, 0]),
            ([10, 0, 0, 0], [11, 0, 0, 0], [1, 0, 0, 0]),
        ])

    def test_complete_mode_packs_whole_documents(self):
        self.assertEqual(self.items(break_mode="complete", max_length=5), [
            ([1, 2, 0, 0, 0], [2, 3, 0, 0, 0], [1, 1, 0, 0, 0]),
            ([4, 5, 6, 7, 8], [5, 6, 7, 8, 9], [1, 1, 1, 1, 1]),
            ([10, 0, 0, 0, 0], [11, 0, 0, 0, 0], [1, 0, 0, 0, 0]),
        ])
        write_documents(self.folder, "train", [[1, 2], [3, 4], [5, 6, 7], [8]])
        self.assertEqual(self.items(break_mode="complete", max_length=4)[0][0], [1, 2, 3, 0])
        self.assertEqual(self.items(break_mode="complete", max_length=6)[0][0], [1, 2, 3, 4, 5, 6])

    def test_min_length_drops_short_chunks(self):
        self.assertEqual(len(self.items(break_mode="lines", max_length=4, min_length=2)), 2)

    def test_tensors_stack_the_items(self):
        dataset = Wikitext2(self.folder, "train", max_length=4)
        tensors = dataset.tensors()
        self.assertEqual(tensors["source"].shape, (3, 4))
        self.assertEqual(tensors["mask"].dtype, torch.float32)
        self.assertTrue(torch.equal(tensors["target"][2], dataset[2]["target"]))

    def test_tensors_equal_the_stacked_items_in_every_mode(self):
        generator = np.random.default_rng(1)
        write_documents(self.folder, "train", [list(generator.integers(1, 50, size=int(n)))
                                           for n in generator.integers(1, 12, size=40)])
        for mode in ("none", "lines", "complete"):
            for max_length, min_length in ((1, 0), (1, 1), (3, 0), (5, 1), (7, 2)):
                with self.subTest(mode=mode, max_length=max_length, min_length=min_length):
                    dataset = Wikitext2(self.folder, "train", break_mode=mode, max_length=max_length,
                                        min_length=min_length)
                    tensors = dataset.tensors()
                    for key in ("source", "target", "mask"):
                        stacked = torch.stack([dataset[i][key] for i in range(len(dataset))])
                        self.assertEqual(tensors[key].dtype, stacked.dtype, key)
                        self.assertTrue(torch.equal(tensors[key], stacked), key)

    def test_bad_split_and_break_mode(self):
        with self.assertRaisesRegex(ValueError, "train, validation, test"):
            Wikitext2(self.folder, "valid")
        with self.assertRaisesRegex(ValueError, "none, lines, complete"):
            Wikitext2(self.folder, "train", break_mode="eos")

    def test_missing_file_names_path_and_fix(self):
        with self.assertRaises(FileNotFoundError) as caught:
            Wikitext2(self.folder, "test")
        self.assertIn(os.path.join(self.folder, "wiki.test.npz"), str(caught.exception))
        self.assertIn("utils.prepare_data", str(caught.exception))

    def test_damaged_files(self):
        path = os.path.join(self.folder, "wiki.validation.npz")
        np.savez(path, tokens=np.arange(1, 5, dtype=np.uint16))
        with self.assertRaisesRegex(ValueError, "must hold arrays 'tokens' and 'sizes'"):
            Wikitext2(self.folder, "validation")
        np.savez(path, tokens=np.arange(1, 5, dtype=np.uint16), sizes=np.array([3], dtype=np.int64))
        with self.assertRaisesRegex(ValueError, "add up to 3 but 'tokens' holds 4"):
            Wikitext2(self.folder, "validation")
        np.savez(path, tokens=np.array([1, 40479], dtype=np.uint16), sizes=np.array([2], dtype=np.int64))
        with self.assertRaisesRegex(ValueError, "wiki.validation.npz: token ids span 1..40479"):
            Wikitext2(self.folder, "validation")
        with open(path, "wb") as file:
            file.write(b"not a zip file")
        with self.assertRaisesRegex(ValueError, "wiki.validation.npz is not a readable"):
            Wikitext2(self.folder, "validation")


class CourseBreakModeTest(unittest.TestCase):
    """"lines" and "complete" as the course defines them, on streams whose token id is index + 1.

    Each expected list was worked out by hand: the `lines` chunks of every document (at most
    max_length + 1 tokens, overlapping by one), then for "complete" the chunks of at most
    min_length tokens dropped, consecutive survivors merged while their lengths add up to at most
    max_length + 1, each merge the stretch [first begin, first begin + summed lengths).

    The course's text is followed, not its code (see `Wikitext2`'s docstring): there the last chunk
    of a long line starts one token late and can run into the next document; here it starts on the
    previous chunk's last token and stops at its line's end, so no target crosses a line that
    "lines" keeps apart and none is skipped. `test_long_line_tail_merges_with_the_short_lines_after_it`
    pins that chunk: (4, 7), from the first chunk's last token to the line's end.
    """

    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)

    def bounds(self, documents, **kwargs):
        write_documents(self.folder, "train", documents)
        return Wikitext2(self.folder, "train", **kwargs).bounds

    def test_long_line_tail_merges_with_the_short_lines_after_it(self):
        # Stream indices: [0..7) [7, 9) [9] [10..13) [13, 15).
        documents = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10], [11, 12, 13], [14, 15]]
        self.assertEqual(self.bounds(documents, break_mode="lines", max_length=4),
                         [(0, 5), (4, 7), (7, 9), (10, 13), (13, 15)])  # (9, 10) dropped
        # (4, 7) + (7, 9): 3 + 2 = 5 tokens; (10, 13) + (13, 15): 3 + 2.
        self.assertEqual(self.bounds(documents, break_mode="complete", max_length=4),
                         [(0, 5), (4, 9), (10, 15)])
        dataset = Wikitext2(self.folder, "train", break_mode="complete", max_length=4)
        self.assertEqual(dataset[1]["source"].tolist(), [5, 6, 7, 8])
        self.assertEqual(dataset[1]["target"].tolist(), [6, 7, 8, 9])
        self.assertEqual(dataset[2]["source"].tolist(), [11, 12, 13, 14])
        self.assertEqual(dataset[2]["target"].tolist(), [12, 13, 14, 15])
        self.assertEqual(dataset[2]["mask"].tolist(), [1, 1, 1, 1])

    def test_lines_of_one_token(self):
        # Stream indices: [0] [1] [2, 3] [4] [5].
        documents = [[1], [2], [3, 4], [5], [6]]
        self.assertEqual(self.bounds(documents, break_mode="lines", max_length=3, min_length=0),
                         [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6)])
        # 1 + 1 + 2 = 4 tokens, then 1 + 1.
        self.assertEqual(self.bounds(documents, break_mode="complete", max_length=3, min_length=0),
                         [(0, 4), (4, 6)])
        # min_length=1 drops every one-token line before merging: (2, 4) is left alone.
        self.assertEqual(self.bounds(documents, break_mode="lines", max_length=3), [(2, 4)])
        self.assertEqual(self.bounds(documents, break_mode="complete", max_length=3), [(2, 4)])
        dataset = Wikitext2(self.folder, "train", break_mode="lines", max_length=3, min_length=0)
        self.assertEqual(dataset[0]["mask"].tolist(), [0, 0, 0])  # one token: nothing to predict

    def test_min_length_above_one(self):
        # Stream indices: [0..3) [3, 5) [5..8) [8..15) [15..18); a chunk holds at most 6 tokens.
        documents = [[1, 2, 3], [4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [16, 17, 18]]
        self.assertEqual(self.bounds(documents, break_mode="lines", max_length=5),
                         [(0, 3), (3, 5), (5, 8), (8, 14), (13, 15), (15, 18)])
        # min_length=1: 3 + 2; 3; 6; the long line's tail (13, 15) + (15, 18) = 2 + 3.
        self.assertEqual(self.bounds(documents, break_mode="complete", max_length=5),
                         [(0, 5), (5, 8), (8, 14), (13, 18)])
        self.assertEqual(self.bounds(documents, break_mode="lines", max_length=5, min_length=2),
                         [(0, 3), (5, 8), (8, 14), (15, 18)])
        # min_length=2 drops (3, 5) and the tail (13, 15) first. (0, 3) + (5, 8) = 6 tokens from
        # index 0: the stretch holds the dropped [4, 5] and stops before 7, 8.
        self.assertEqual(self.bounds(documents, break_mode="complete", max_length=5, min_length=2),
                         [(0, 6), (8, 14), (15, 18)])
        dataset = Wikitext2(self.folder, "train", break_mode="complete", max_length=5, min_length=2)
        self.assertEqual(dataset[0]["source"].tolist(), [1, 2, 3, 4, 5])
        self.assertEqual(dataset[2]["source"].tolist(), [16, 17, 0, 0, 0])
        self.assertEqual(dataset[2]["mask"].tolist(), [1, 1, 0, 0, 0])

    def test_num_tokens_and_num_lines(self):
        write_documents(self.folder, "train", [[1, 2, 3], [4], [5, 6]])
        dataset = Wikitext2(self.folder, "train", break_mode="complete", max_length=4)
        self.assertEqual((dataset.num_tokens, dataset.num_lines), (6, 4))


class RealDataTest(unittest.TestCase):
    """The course's preprocessed files (skipped where SHARED_DATA_DIR does not lead to them)."""

    @classmethod
    def setUpClass(cls):
        cls.folder = real_wikitext2_dir()

    def test_example_counts_and_first_test_source(self):
        counts = {split: len(Wikitext2(self.folder, split)) for split in SPLITS}
        self.assertEqual(counts, {"train": 9205, "validation": 958, "test": 1090})
        first = Wikitext2(self.folder, "test")[0]
        self.assertEqual(first["source"][:5].tolist(), [304, 4731, 8406, 614, 304])
        self.assertTrue(torch.equal(first["source"][1:], first["target"][:-1]))

    def test_break_mode_counts_and_sizes(self):
        counts = {split: [len(Wikitext2(self.folder, split, break_mode=mode))
                          for mode in ("none", "lines", "complete")]
                  for split in SPLITS}
        self.assertEqual(counts, {"train": [9205, 25248, 12194], "validation": [958, 2596, 1267],
                                  "test": [1090, 3063, 1425]})
        test = Wikitext2(self.folder, "test")
        self.assertEqual((test.num_tokens, test.num_lines), (279023, 2892))

    def test_every_token_is_a_target_once(self):
        dataset = Wikitext2(self.folder, "validation")
        tensors = dataset.tensors()
        self.assertEqual(int(tensors["mask"].sum()), dataset.tokens.size - 1)
        self.assertEqual(hashlib.sha256(dataset.tokens.astype("<u2").tobytes()).hexdigest(),
                         "9332ed428a20bb9738951dc9555fefb7f1404263cba05335f312a1ffb663b0ca")


class EmbeddingTest(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp()
        generator = np.random.default_rng(0)
        self.tokens = generator.normal(size=(13, 8)).astype(np.float32)
        self.position = generator.normal(size=(6, 8)).astype(np.float32)
        self.path = os.path.join(self.folder, "embeddings.npz")
        np.savez(self.path, tokens=self.tokens, position=self.position)

    def test_sum_of_token_and_position(self):
        embedding = GPT1Embedding.load_embeddings_from(self.path)
        tokens = torch.tensor([[3, 0, 12]])
        out = embedding(tokens, torch.tensor([[0, 1, 5]]))
        expected = self.tokens[[3, 0, 12]] + self.position[[0, 1, 5]]
        np.testing.assert_allclose(out[0].detach().numpy(), expected, rtol=1e-6)

    def test_out_of_range_names_value_and_limit(self):
        embedding = GPT1Embedding(13, 8, 6)
        with self.assertRaisesRegex(ValueError, r"token id 13 is out of range: valid token ids are 0..12"):
            embedding(torch.tensor([[1, 13]]), torch.tensor([[0, 1]]))
        with self.assertRaisesRegex(ValueError, r"position 6 is out of range: valid positions are 0..5"):
            embedding(torch.tensor([[1, 2]]), torch.tensor([[5, 6]]))
        with self.assertRaisesRegex(ValueError, "token id -1"):
            embedding(torch.tensor([[-1]]), torch.tensor([[0]]))

    def test_models_load_embeddings(self):
        lstm = LSTM.load_embeddings_from(self.path, hidden_size=5, num_layers=2)
        self.assertEqual((lstm.vocabulary_size, lstm.embedding_size, lstm.num_layers), (13, 8, 2))
        np.testing.assert_array_equal(lstm.classifier[2].weight.detach().numpy(), self.tokens)
        self.assertFalse(lstm.embedding.weight.requires_grad)
        gpt = MiniGPT1.load_embeddings_from(self.path, num_heads=2, num_layers=1, learn_embeddings=True)
        self.assertEqual(gpt.sequence_length, 6)
        np.testing.assert_array_equal(gpt.embedding.position.weight.detach().numpy(), self.position)
        self.assertTrue(gpt.embedding.tokens.weight.requires_grad)
        self.assertEqual(gpt(torch.randint(0, 13, (2, 6))).shape, (2, 6, 13))

    def test_bad_embedding_files(self):
        with self.assertRaisesRegex(FileNotFoundError, "prepare_data"):
            GPT1Embedding.load_embeddings_from(os.path.join(self.folder, "absent.npz"))
        np.savez(self.path, tokens=self.tokens)
        with self.assertRaisesRegex(ValueError, r"lacks the array\(s\) \['position'\]"):
            MiniGPT1.load_embeddings_from(self.path)
        np.savez(self.path, tokens=self.tokens, position=np.zeros((6, 9), np.float32))
        with self.assertRaisesRegex(ValueError, "same width"):
            GPT1Embedding.load_embeddings_from(self.path)

    def test_pickled_arrays_are_refused_naming_the_file_and_the_fix(self):
        objects = np.array([{"a": 1}, None], dtype=object)
        np.savez(self.path, tokens=objects, position=self.position)  # np.savez pickles object arrays
        with self.assertRaises(ValueError) as caught:
            GPT1Embedding.load_embeddings_from(self.path)
        message = str(caught.exception)
        self.assertIn(f"embeddings file {self.path}: array 'tokens' holds Python objects", message)
        self.assertIn("prepare_data --force", message)
        self.assertNotIn("allow_pickle", message)
        write_documents(self.folder, "train", [[1, 2, 3]], tokens=objects)
        with self.assertRaises(ValueError) as caught:
            Wikitext2(self.folder, "train")
        message = str(caught.exception)
        self.assertIn(f"data file {os.path.join(self.folder, 'wiki.train.npz')}: array 'tokens' holds "
                      "Python objects", message)
        self.assertIn(f"--data_folder {self.folder} --force", message)
        self.assertNotIn("allow_pickle", message)


class TorchUtilsTest(unittest.TestCase):
    def test_seed_experiment_repeats(self):
        seed_experiment(3)
        first = (torch.rand(3), np.random.rand(), __import__("random").random())
        seed_experiment(3)
        second = (torch.rand(3), np.random.rand(), __import__("random").random())
        self.assertTrue(torch.equal(first[0], second[0]))
        self.assertEqual(first[1:], second[1:])

    def test_to_device_nested(self):
        batch = {"a": torch.zeros(2, dtype=torch.float64), "b": [torch.ones(1), (torch.ones(2), "name")]}
        moved = to_device(batch, torch.device("meta"))
        self.assertEqual(moved["a"].device.type, "meta")
        self.assertEqual(moved["b"][1][0].device.type, "meta")
        self.assertEqual(moved["b"][1][1], "name")
        self.assertIsInstance(moved["b"][1], tuple)


if __name__ == "__main__":
    unittest.main()
