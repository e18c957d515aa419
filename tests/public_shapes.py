"""Public shape tests of the graded functions, handed out with the starter (`python -m utils.starter`).

They check only the shape of what each graded function returns, on a tiny model, so that a student
sees at once which functions are still TODOs; the values are the graders' business. In the starter
this file is `test_shapes_public.py`: run `python -m unittest test_shapes_public -v` in its folder.

Legend: B batch, T time, C channels, H heads, D head size (C = H * D), V vocabulary, L layers.
"""
import unittest

import torch

from gpt1_solution import LayerNorm, MiniGPT1, MultiHeadedAttention
from lstm_solution import LSTM

B, T, V, H, D, L = 3, 5, 41, 4, 6, 2
C = H * D  # 24
LSTM_HIDDEN = 10
POSITIONS = 8  # sequence_length of the attention and of MiniGPT1, T <= POSITIONS


def tokens():
    return torch.randint(1, V, (B, T))


class LSTMShapes(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.model = LSTM(V, C, LSTM_HIDDEN, L)

    def test_forward(self):
        states = (torch.zeros(L, B, LSTM_HIDDEN), torch.zeros(L, B, LSTM_HIDDEN))
        log_probas, (h, c) = self.model(tokens(), states)
        self.assertEqual(tuple(log_probas.shape), (B, T, V))
        self.assertEqual(tuple(h.shape), (L, B, LSTM_HIDDEN))
        self.assertEqual(tuple(c.shape), (L, B, LSTM_HIDDEN))

    def test_loss(self):
        log_probas = torch.log_softmax(torch.randn(B, T, V), dim=-1)
        loss = self.model.loss(log_probas, tokens(), torch.ones(B, T))
        self.assertEqual(tuple(loss.shape), ())


class LayerNormShapes(unittest.TestCase):
    def test_forward(self):
        norm = LayerNorm(C)
        for shape in ((B, T, C), (T, C)):
            self.assertEqual(tuple(norm(torch.randn(shape)).shape), shape)


class AttentionShapes(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.attention = MultiHeadedAttention(D, H, POSITIONS)

    def test_split_heads(self):
        self.assertEqual(tuple(self.attention.split_heads(torch.randn(B, T, C)).shape), (B, H, T, D))

    def test_merge_heads(self):
        self.assertEqual(tuple(self.attention.merge_heads(torch.randn(B, H, T, D)).shape), (B, T, C))

    def test_get_attention_weights(self):
        queries, keys = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
        weights = self.attention.get_attention_weights(queries, keys)
        self.assertEqual(tuple(weights.shape), (B, H, T, T))

    def test_apply_attention(self):
        queries, keys, values = (torch.randn(B, H, T, D) for _ in range(3))
        attended = self.attention.apply_attention(queries, keys, values)
        self.assertEqual(tuple(attended.shape), (B, T, C))

    def test_forward(self):
        self.assertEqual(tuple(self.attention(torch.randn(B, T, C)).shape), (B, T, C))


class MiniGPT1Shapes(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.model = MiniGPT1(V, C, POSITIONS, H, L)

    def test_get_embeddings(self):
        self.assertEqual(tuple(self.model.get_embeddings(tokens()).shape), (B, T, C))

    def test_forward(self):
        self.assertEqual(tuple(self.model(tokens()).shape), (B, T, V))

    def test_loss(self):
        log_probas = torch.log_softmax(torch.randn(B, T, V), dim=-1)
        loss = self.model.loss(log_probas, tokens(), torch.ones(B, T))
        self.assertEqual(tuple(loss.shape), ())


if __name__ == "__main__":
    unittest.main()
