"""Tests of `utils.generate` on tiny checkpoints trained here; `python -m unittest tests.test_generate`.

The tiny models read a tiny GPT-1-style tokenizer (a vocab.json and merges.txt written by the
test); the round trip on the real GPT-1 tokenizer reads `$SHARED_DATA_DIR/gpt1-bpe` when present.
"""
import math
import os
import shutil
import string
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch

from tests.helpers import SENTENCE_MERGES, run_cli, write_tiny_tokenizer
from utils.checkpoint import read_checkpoint, save_checkpoint, write_payload
from utils.cli import shared_data_path
from utils.config import resolve_config
from utils.download import DownloadError
from utils.generate import _parser, choose_next, generate, main, score
from utils.models import build_model
from utils.tokenization import TOKENIZER_FILES, GPT1Tokenizer
from utils.wikitext2 import Wikitext2

SEQUENCE_LENGTH = 16
SENTENCE = "the cat sat on the mat . "


def write_sentence_tokenizer(folder):
    """A GPT-1-format tokenizer: single characters, their end-of-word forms and merges that make
    the words of SENTENCE whole tokens."""
    write_tiny_tokenizer(folder, SENTENCE_MERGES, symbols=(".", ",", *string.ascii_lowercase))


def corpus_ids(tokenizer, count=60, seed=0):
    """Ids of `count` short sentences with some regularity to learn."""
    rng = np.random.default_rng(seed)
    words = ["cat", "dog", "mat", "hat", "rug"]
    sentences = [f"the {rng.choice(words)} sat on the {rng.choice(words)} ." for _ in range(count)]
    return tokenizer.encode(" ".join(sentences))


def train_tiny(config, vocabulary_size, ids, steps=100):
    """A model of `config` after `steps` Adam steps on random windows of `ids`."""
    torch.manual_seed(0)
    model = build_model(config, vocabulary_size)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    data = torch.tensor(ids)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - SEQUENCE_LENGTH - 1, (8,), generator=generator)
        batch = torch.stack([data[s:s + SEQUENCE_LENGTH + 1] for s in starts.tolist()])  # (8, T + 1)
        log_probas = model.predict(batch[:, :-1])  # (8, T, V)
        loss = model.loss(log_probas, batch[:, 1:], torch.ones(8, SEQUENCE_LENGTH))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def run_main(argv):
    return run_cli(main, argv)


def reference_greedy(model, prompt, count):
    """Greedy continuation recomputed from scratch: `predict` on the whole (cut) prefix each step."""
    window = getattr(model, "sequence_length", None)
    prefix = list(prompt)
    for _ in range(count):
        context = prefix[-window:] if window else prefix
        log_probas = model.predict(torch.tensor([context]))[0, -1]  # (V,)
        prefix.append(int(log_probas[1:].argmax()) + 1)  # padding (id 0) excluded
    return prefix[len(prompt):]


_FIXTURES = {}


def tiny_fixtures():
    """Once per test run: a tokenizer folder, and an LSTM and a MiniGPT1 trained 100 steps and
    saved as checkpoints that record that folder as their data folder."""
    if not _FIXTURES:
        folder = tempfile.mkdtemp(prefix="test_generate_")
        write_sentence_tokenizer(folder)
        tokenizer = GPT1Tokenizer.from_folder(folder)
        ids = corpus_ids(tokenizer)
        sizes = dict(embeddings="none", embedding_size=24, hidden_size=32, num_heads=2, layers=1,
                     sequence_length=SEQUENCE_LENGTH, data_folder=folder)
        models, checkpoints = {}, {}
        for name in ("lstm", "gpt1"):
            config = resolve_config(f"tiny_{name}", model=name, **sizes)
            models[name] = train_tiny(config, tokenizer.vocabulary_size, ids)
            checkpoints[name] = os.path.join(folder, name, "best.pt")
            save_checkpoint(checkpoints[name], config, models[name])
        _FIXTURES.update(folder=folder, tokenizer=tokenizer, ids=ids, models=models,
                         checkpoints=checkpoints)
    return _FIXTURES


def tearDownModule():
    if _FIXTURES:
        shutil.rmtree(_FIXTURES["folder"], ignore_errors=True)


class TinyCheckpoints(unittest.TestCase):
    """Tests on the tiny trained checkpoints of `tiny_fixtures()`."""

    @classmethod
    def setUpClass(cls):
        fixtures = tiny_fixtures()
        cls.folder, cls.tokenizer, cls.ids = fixtures["folder"], fixtures["tokenizer"], fixtures["ids"]
        cls.models, cls.checkpoints = fixtures["models"], fixtures["checkpoints"]


class TestGeneration(TinyCheckpoints):
    def test_greedy_equals_argmax_of_predict_step_by_step(self):
        prompt = self.tokenizer.encode("the cat")
        for name, model in self.models.items():
            with self.subTest(model=name):
                # 24 new tokens run the GPT's context past its sequence_length of 16.
                (greedy,) = generate(model, prompt, 24, temperature=0)
                self.assertEqual(greedy, reference_greedy(model, prompt, 24))
                self.assertGreaterEqual(len(set(greedy)), 2, "training should give a non-constant text")

    def test_lstm_incremental_state_equals_full_prefix(self):
        model = self.models["lstm"]
        ids = torch.tensor([self.ids[:30]])  # (1, 30)
        full = model.predict(ids)[0]  # (30, V)
        log_probas, state = model.step(ids[:, :3], None)
        torch.testing.assert_close(log_probas[0], full[2], atol=1e-5, rtol=1e-5)
        for t in range(3, 30):
            log_probas, state = model.step(ids[:, t:t + 1], state)  # (1, V)
            torch.testing.assert_close(log_probas[0], full[t], atol=1e-5, rtol=1e-5)

    def test_gpt_step_uses_the_last_sequence_length_tokens(self):
        model = self.models["gpt1"]
        ids = torch.tensor([self.ids[:40]])  # (1, 40)
        log_probas, _ = model.step(ids, None)
        expected = model.predict(ids[:, -SEQUENCE_LENGTH:])[0, -1]
        torch.testing.assert_close(log_probas[0], expected)

    def test_seeded_sampling_is_reproducible_and_seeds_differ(self):
        prompt = self.tokenizer.encode("the")
        for name, model in self.models.items():
            with self.subTest(model=name):
                def sample(seed):
                    generator = torch.Generator().manual_seed(seed)
                    return generate(model, prompt, 30, temperature=1.5, top_k=None, top_p=None,
                                    generator=generator, num_samples=3)

                first = sample(1)
                self.assertEqual(first, sample(1))
                self.assertNotEqual(first, sample(2))
                self.assertEqual(len(first), 3)
                self.assertTrue(all(len(row) == 30 for row in first))
                self.assertNotEqual(first[0], first[1], "the samples of a batch should differ")

    def test_cli_greedy_prints_decoded_prompt_and_continuation(self):
        prompt = "The cat"
        code, out, err = run_main(["--checkpoint", self.checkpoints["gpt1"], "--prompt", prompt,
                                   "--temperature", "0", "--max_new_tokens", "12"])
        self.assertEqual(code, 0, err)
        prompt_ids = self.tokenizer.encode(prompt)
        (continuation,) = generate(self.models["gpt1"], prompt_ids, 12, temperature=0)
        self.assertEqual(out, self.tokenizer.decode(prompt_ids + continuation) + "\n")

    def test_cli_seed_reproducible(self):
        argv = ["--checkpoint", self.checkpoints["lstm"], "--prompt", "the", "--temperature", "1.2",
                "--top_p", "0.95", "--num_samples", "2", "--max_new_tokens", "20"]
        first = run_main(argv + ["--seed", "7"])
        self.assertEqual(first[0], 0, first[2])
        self.assertEqual(first, run_main(argv + ["--seed", "7"]))
        self.assertNotEqual(first[1], run_main(argv + ["--seed", "8"])[1])
        self.assertEqual(len(first[1].rstrip("\n").split("\n\n")), 2)


class TestChooseNext(unittest.TestCase):
    def setUp(self):
        # Padding is by far the likeliest token: it must still never come out.
        logits = torch.tensor([[9.0, 2.0, 1.5, 1.0, 0.5, -1.0]])  # (1, V)
        self.log_probas = torch.log_softmax(logits, dim=-1).expand(2000, -1)  # (B, V)

    def test_padding_never_chosen(self):
        generator = torch.Generator().manual_seed(0)
        self.assertTrue((choose_next(self.log_probas, 0) == 1).all())
        sampled = choose_next(self.log_probas, 2.0, None, None, generator)
        self.assertFalse((sampled == 0).any())
        self.assertEqual(set(sampled.tolist()), {1, 2, 3, 4, 5})

    def test_top_k_and_top_p_restrict_the_choice(self):
        generator = torch.Generator().manual_seed(0)
        self.assertEqual(set(choose_next(self.log_probas, 1.0, 2, None, generator).tolist()), {1, 2})
        self.assertEqual(set(choose_next(self.log_probas, 1.0, 1, None, generator).tolist()), {1})
        # Without padding the probabilities are ~(.45, .27, .17, .10, .02): .45 + .27 < .75 <= + .17.
        self.assertEqual(set(choose_next(self.log_probas, 1.0, None, 0.75, generator).tolist()), {1, 2, 3})
        self.assertEqual(set(choose_next(self.log_probas, 1.0, None, 0.01, generator).tolist()), {1})


class TestScore(TinyCheckpoints):
    def test_cli_score_equals_exp_of_loss(self):
        text = "the cat sat on the hat ."
        ids = self.tokenizer.encode(text)
        self.assertLessEqual(len(ids) - 1, SEQUENCE_LENGTH)
        for name, model in self.models.items():
            with self.subTest(model=name):
                source, target = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
                with torch.no_grad():
                    loss = model.loss(model.predict(source), target, torch.ones(target.shape))
                code, out, err = run_main(["--checkpoint", self.checkpoints[name], "--score", text])
                self.assertEqual(code, 0, err)
                fields = out.split()
                self.assertEqual(fields[0], "ppl")
                self.assertAlmostEqual(float(fields[fields.index("loss") + 1]), loss.item(), places=4)
                self.assertAlmostEqual(float(fields[1]), math.exp(loss.item()), places=2)
                self.assertEqual(int(fields[fields.index("tokens") + 1]), len(ids) - 1)

    def test_long_text_is_scored_in_windows_as_validation(self):
        """score() on ids longer than a window equals the perplexity of the data loader's cut."""
        ids = self.ids[:75]
        np.savez(os.path.join(self.folder, "wiki.validation.npz"),
                 tokens=np.array(ids, dtype=np.uint16), sizes=np.array([len(ids)]))
        data = Wikitext2(self.folder, "validation", max_length=SEQUENCE_LENGTH,
                         vocabulary_size=self.tokenizer.vocabulary_size).tensors()
        for name, model in self.models.items():
            with self.subTest(model=name), torch.no_grad():
                nll = -model.predict(data["source"]).gather(2, data["target"].unsqueeze(2)).squeeze(2)
                expected = (nll * data["mask"]).sum() / data["mask"].sum()
                result = score(model, ids, window=SEQUENCE_LENGTH, batch_size=2)
                self.assertEqual(result["tokens"], len(ids) - 1)
                self.assertAlmostEqual(result["loss"], expected.item(), places=5)
                self.assertAlmostEqual(result["ppl"], math.exp(result["loss"]))

    def test_cli_score_reads_a_file(self):
        path = os.path.join(self.folder, "paragraph.txt")
        with open(path, "w", encoding="utf-8") as file:
            file.write(SENTENCE * 3 + "\n\n" + SENTENCE * 4 + "\n")
        ids = self.tokenizer.encode(SENTENCE * 7)
        code, out, err = run_main(["--checkpoint", self.checkpoints["lstm"], "--score", path])
        self.assertEqual(code, 0, err)
        expected = score(self.models["lstm"], ids, window=SEQUENCE_LENGTH)
        self.assertIn(f"ppl {expected['ppl']:.2f} ", out)
        self.assertIn(f"tokens {len(ids) - 1} ", out)


class TestCommandLine(unittest.TestCase):
    def test_help_shows_each_default_once(self):
        text = " ".join(_parser().format_help().split())
        for shown in ("tokens to add (default: 100)", "0 is greedy (default: 0.8)",
                      "the K best tokens (default: 40)", "in (0, 1] (default: off)",
                      "continuations to write (default: 1)", "seed of the sampling (default: random)"):
            self.assertIn(shown, text)
        self.assertNotRegex(text, r"default[^()]*\)[^-]*\(default")


class TestRoundTrip(unittest.TestCase):
    def test_real_tokenizer_round_trip(self):
        shared = shared_data_path()
        folder = os.path.join(shared, "gpt1-bpe") if shared else None
        if not folder or not os.path.isfile(os.path.join(folder, "vocab.json")):
            self.skipTest("the real GPT-1 tokenizer files are not available "
                          "(set SHARED_DATA_DIR to the folder holding gpt1-bpe/)")
        tokenizer = GPT1Tokenizer.from_folder(folder)
        text = ("The tower is 324 metres tall, about the same height as an 81-storey building; "
                "it was the tallest man-made structure in the world for 41 years.")
        ids = tokenizer.encode(text)
        decoded = tokenizer.decode(ids)
        self.assertEqual(decoded, "the tower is 324 metres tall , about the same height as an 81 - "
                                  "storey building ; it was the tallest man - made structure in "
                                  "the world for 41 years .")
        self.assertEqual(tokenizer.encode(decoded), ids)

    def test_tiny_tokenizer_round_trip(self):
        with tempfile.TemporaryDirectory() as folder:
            write_sentence_tokenizer(folder)
            tokenizer = GPT1Tokenizer.from_folder(folder)
            ids = tokenizer.encode("The cat sat on the mat, the dog too.")
            self.assertEqual(tokenizer.decode(ids), "the cat sat on the mat , the dog too .")


class TestBadInput(TinyCheckpoints):
    def assert_one_line_error(self, argv, *words, prefix="python -m utils.generate: error: "):
        code, out, err = run_main(argv)
        self.assertEqual(code, 2, f"argv {argv} gave code {code}: {err}")
        self.assertEqual(out, "")
        self.assertTrue(err.startswith(prefix), err)
        self.assertEqual(err.count("\n"), 1, f"not one line: {err!r}")
        self.assertNotIn("Traceback", err)
        for word in words:
            self.assertIn(word, err)

    def test_bad_inputs(self):
        checkpoint = self.checkpoints["gpt1"]
        corrupt = os.path.join(self.folder, "corrupt.pt")
        with open(corrupt, "wb") as file:
            file.write(b"not a checkpoint at all")
        with open(checkpoint, "rb") as file:
            truncated_bytes = file.read()[:300]
        truncated = os.path.join(self.folder, "truncated.pt")
        with open(truncated, "wb") as file:
            file.write(truncated_bytes)
        cases = {
            "missing checkpoint": (["--checkpoint", os.path.join(self.folder, "nope.pt"), "--prompt", "the"],
                                   ["nope.pt"]),
            "corrupt checkpoint": (["--checkpoint", corrupt, "--prompt", "the"], ["corrupt.pt"]),
            "truncated checkpoint": (["--checkpoint", truncated, "--prompt", "the"], ["truncated.pt"]),
            "no prompt": (["--checkpoint", checkpoint], ["--prompt"]),
            "empty prompt": (["--checkpoint", checkpoint, "--prompt", ""], ["--prompt"]),
            "blank prompt": (["--checkpoint", checkpoint, "--prompt", "   "], ["--prompt"]),
            "negative temperature": (["--checkpoint", checkpoint, "--prompt", "the", "--temperature", "-0.5"],
                                     ["--temperature"]),
            "nan temperature": (["--checkpoint", checkpoint, "--prompt", "the", "--temperature", "nan"],
                                ["--temperature"]),
            "top_k 0": (["--checkpoint", checkpoint, "--prompt", "the", "--top_k", "0"], ["--top_k"]),
            "top_p 0": (["--checkpoint", checkpoint, "--prompt", "the", "--top_p", "0"], ["--top_p"]),
            "top_p above 1": (["--checkpoint", checkpoint, "--prompt", "the", "--top_p", "1.5"], ["--top_p"]),
            "not a number": (["--checkpoint", checkpoint, "--prompt", "the", "--top_k", "many"], ["--top_k"]),
            "no checkpoint flag": (["--prompt", "the"], ["--checkpoint"]),
            "score too short": (["--checkpoint", checkpoint, "--score", "the"], ["at least 2"]),
            "bad device": (["--checkpoint", checkpoint, "--prompt", "the", "--device", "tpu9"], ["--device"]),
            "unsupported device": (["--checkpoint", checkpoint, "--prompt", "the", "--device", "meta"],
                                   ["--device 'meta'", "cpu, cuda or cuda:N"]),
        }
        prompt = ["--checkpoint", checkpoint, "--prompt", "the"]
        cases.update({
            "a billion new tokens": (prompt + ["--max_new_tokens", "1000000000"], ["--max_new_tokens", "100,000"]),
            "a billion samples": (prompt + ["--num_samples", "1000000000"], ["--num_samples", "1,000"]),
            "negative new tokens": (prompt + ["--max_new_tokens", "-1"], ["--max_new_tokens"]),
        })
        payload = read_checkpoint(checkpoint)
        for name, change, words in (
                ("no config", lambda p: p.pop("config"), ["lacks its 'config'"]),
                ("no model_size", lambda p: p.pop("model_size"), ["lacks its 'model_size'"]),
                ("sizes of text", lambda p: p["model_size"].update(vocabulary_size="many"), ["'model_size' is not"]),
                ("a vocabulary of 1e11", lambda p: p["model_size"].update(vocabulary_size=10 ** 11),
                 ["does not fit", "100000000000"]),
                ("epochs a string", lambda p: p["state"].update(epochs="abc"), ["'state' is not"]),
                ("config of another kind", lambda p: p["config"].update(model="rnn"), ["--model='rnn'"])):
            damaged = {key: (dict(value) if isinstance(value, dict) else value) for key, value in payload.items()}
            change(damaged)
            path = os.path.join(self.folder, name.replace(" ", "_") + ".pt")
            write_payload(path, damaged)  # digest-valid: the bytes are as written
            cases[name] = (["--checkpoint", path, "--prompt", "the"], [path] + words)
        for name, (argv, words) in cases.items():
            with self.subTest(name):
                self.assert_one_line_error(argv, *words)

    def test_cuda_asked_for_where_there_is_none(self):
        with mock.patch("torch.cuda.is_available", return_value=False):
            self.assert_one_line_error(["--checkpoint", self.checkpoints["lstm"], "--prompt", "the",
                                        "--device", "cuda"], "--device cuda", "--device cpu")

    def test_missing_tokenizer_is_fetched_from_its_pinned_files(self):
        empty = tempfile.mkdtemp(dir=self.folder)

        def fetch_into(fetcher, remote, folder):
            shutil.copy(os.path.join(self.folder, remote.name), folder)

        with mock.patch("utils.prepare_data.fetch_into", side_effect=fetch_into) as fetched:
            code, out, err = run_main(["--checkpoint", self.checkpoints["lstm"], "--prompt", "the",
                                       "--temperature", "0", "--max_new_tokens", "3",
                                       "--data_folder", empty])
        self.assertEqual(code, 0, err)
        self.assertEqual([call.args[1:] for call in fetched.call_args_list],
                         [(remote, empty) for remote in TOKENIZER_FILES])

    def test_missing_tokenizer_that_cannot_be_fetched(self):
        empty = tempfile.mkdtemp(dir=self.folder)
        with mock.patch("utils.prepare_data.fetch_into", side_effect=DownloadError("no network")):
            self.assert_one_line_error(["--checkpoint", self.checkpoints["lstm"], "--prompt", "the",
                                        "--data_folder", empty], "utils.prepare_data", "no network")

    def test_tokenizer_that_does_not_fit_the_model(self):
        shared = shared_data_path()
        folder = os.path.join(shared, "gpt1-bpe") if shared else None
        if not folder or not os.path.isfile(os.path.join(folder, "vocab.json")):
            self.skipTest("the real GPT-1 tokenizer files are not available (SHARED_DATA_DIR)")
        self.assert_one_line_error(["--checkpoint", self.checkpoints["lstm"], "--prompt", "the",
                                    "--data_folder", folder], "--data_folder")


if __name__ == "__main__":
    unittest.main()
