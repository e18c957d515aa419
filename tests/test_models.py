"""The two models: the course's shapes, values against independent computations, counts."""
import math
import unittest
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from gpt1_solution_template import Block, LayerNorm, LayerNormFunction, MiniGPT1, MultiHeadedAttention
from lstm_solution import LSTM
from tests.helpers import TINY, tiny_gpt, tiny_lstm



class CourseShapeTest(unittest.TestCase):
    """The course's public shape checks, with its sizes."""

    def test_lstm(self):
        model = LSTM(11, 13, 17, 3)
        inputs = torch.randint(0, 11, (5, 7))
        log_probas, (h, c) = model(inputs, model.initial_states(5))
        self.assertEqual(log_probas.shape, (5, 7, 11))
        self.assertEqual(h.shape, (3, 5, 17))
        self.assertEqual(c.shape, (3, 5, 17))
        self.assertEqual(model.loss(log_probas, inputs, torch.ones(5, 7)).shape, ())

    def test_layer_norm(self):
        self.assertEqual(LayerNorm(11)(torch.randn(3, 5, 7, 11)).shape, (3, 5, 7, 11))

    def test_attention(self):
        attention = MultiHeadedAttention(11, 13, 17)
        self.assertEqual(attention.split_heads(torch.randn(7, 17, 13 * 23)).shape, (7, 13, 17, 23))
        self.assertEqual(attention.merge_heads(torch.randn(7, 13, 17, 23)).shape, (7, 17, 13 * 23))
        q, k, v = (torch.randn(7, 13, 17, 11) for _ in range(3))
        self.assertEqual(attention.get_attention_weights(q, k).shape, (7, 13, 17, 17))
        self.assertEqual(attention.apply_attention(q, k, v).shape, (7, 17, 13 * 11))
        self.assertEqual(attention(torch.randn(7, 17, 13 * 11)).shape, (7, 17, 13 * 11))

    def test_minigpt1(self):
        model = MiniGPT1(11, 221, 23, 13, 3)
        inputs = torch.randint(0, 11, (7, 23))
        log_probas = model(inputs)
        self.assertEqual(log_probas.shape, (7, 23, 11))
        self.assertEqual(model.get_embeddings(inputs).shape, (7, 23, 221))
        self.assertEqual(model.loss(log_probas, inputs, torch.ones(7, 23)).shape, ())


class ParameterCountTest(unittest.TestCase):
    """Counts at the default sizes; the tied weight is one parameter, counted once."""

    @staticmethod
    def counts(model):
        parameters = list(model.parameters())
        return (sum(p.numel() for p in parameters),
                sum(p.numel() for p in parameters if p.requires_grad))

    def test_lstm_one_layer(self):
        self.assertEqual(self.counts(LSTM()), (34_107_392, 3_019_520))

    def test_minigpt1_one_layer(self):
        self.assertEqual(self.counts(MiniGPT1(num_layers=1)), (38_372_352, 7_087_872))

    def test_attention(self):
        attention = MultiHeadedAttention(64, 12, 256)
        self.assertEqual(sum(p.numel() for p in attention.parameters()), 4 * 768 * 769)
        self.assertEqual(4 * 768 * 769, 2_362_368)


class LayerNormTest(unittest.TestCase):
    def test_matches_functional_layer_norm(self):
        torch.manual_seed(1)
        norm = LayerNorm(11, eps=1e-5)
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        inputs = torch.randn(3, 5, 7, 11) * 4 + 2
        expected = F.layer_norm(inputs, (11,), norm.weight, norm.bias, eps=1e-5)
        for fused in (True, False):  # the hand-derived backward's forward, and the explicit formula
            norm.fused = fused
            torch.testing.assert_close(norm(inputs), expected, rtol=1e-5, atol=1e-5, msg=f"fused={fused}")

    def test_gradients_match_functional_layer_norm(self):
        torch.manual_seed(2)
        weight, bias = torch.randn(11), torch.randn(11)
        inputs = torch.randn(3, 5, 11) * 3 - 1
        upstream = torch.randn(3, 5, 11)  # a loss whose gradient is not constant along the vector

        def gradients(run):
            leaves = [tensor.clone().requires_grad_() for tensor in (inputs, weight, bias)]
            (run(*leaves) * upstream).sum().backward()
            return [leaf.grad for leaf in leaves]

        expected = gradients(lambda x, w, b: F.layer_norm(x, (11,), w, b, eps=1e-5))
        actual = gradients(lambda x, w, b: LayerNormFunction.apply(x, w, b, 1e-5))
        for name, got, want in zip(("inputs", "weight", "bias"), actual, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)

    def test_hand_derived_backward_by_finite_differences(self):
        torch.manual_seed(3)
        leaves = [torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True),
                  torch.randn(6, dtype=torch.float64, requires_grad=True),
                  torch.randn(6, dtype=torch.float64, requires_grad=True)]
        self.assertTrue(torch.autograd.gradcheck(lambda x, w, b: LayerNormFunction.apply(x, w, b, 1e-5), leaves))

    def test_both_paths_give_the_same_module_gradients(self):
        torch.manual_seed(4)
        inputs, upstream = torch.randn(4, 9, 16) * 2 + 1, torch.randn(4, 9, 16)
        grads = {}
        for fused in (True, False):
            torch.manual_seed(5)
            norm = LayerNorm(16)
            with torch.no_grad():
                norm.weight.normal_()
                norm.bias.normal_()
            norm.fused = fused
            x = inputs.clone().requires_grad_()
            (norm(x) * upstream).sum().backward()
            grads[fused] = (x.grad, norm.weight.grad, norm.bias.grad)
        for name, fast, plain in zip(("inputs", "weight", "bias"), grads[True], grads[False]):
            torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5, msg=name)

    def test_reset_parameters(self):
        norm = LayerNorm(5)
        with torch.no_grad():
            norm.weight.fill_(3)
            norm.bias.fill_(2)
        norm.reset_parameters()
        self.assertTrue(torch.equal(norm.weight, torch.ones(5)))
        self.assertTrue(torch.equal(norm.bias, torch.zeros(5)))

    def test_biased_variance(self):
        # Two values a and b: biased std is |a - b| / 2, so the output is exactly -1 and +1.
        out = LayerNorm(2, eps=0.0)(torch.tensor([[1.0, 3.0]]))
        torch.testing.assert_close(out, torch.tensor([[-1.0, 1.0]]))


def explicit_attention(attention, hidden_states):
    """Multi-head causal attention, head by head with plain loops and -inf masking."""
    batch_size, length, width = hidden_states.shape
    heads, size = attention.num_heads, attention.head_size
    q = attention.queries(hidden_states)
    k = attention.keys(hidden_states)
    v = attention.values(hidden_states)
    outputs = []
    for h in range(heads):
        cols = slice(h * size, (h + 1) * size)
        scores = q[:, :, cols] @ k[:, :, cols].transpose(1, 2) / math.sqrt(size)  # (B, T, T)
        future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        outputs.append(weights @ v[:, :, cols])  # (B, T, size)
    return attention.output(torch.cat(outputs, dim=-1))


class AttentionValueTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(2)
        self.attention = MultiHeadedAttention(head_size=5, num_heads=3, sequence_length=9)
        self.hidden = torch.randn(4, 9, 15)

    def test_split_heads_index_identity_and_round_trip(self):
        x = torch.randn(2, 6, 3 * 7)
        y = self.attention.split_heads(x)
        for b, h, t, i in [(0, 0, 0, 0), (1, 2, 5, 6), (0, 1, 3, 4), (1, 0, 2, 1)]:
            self.assertEqual(y[b, h, t, i].item(), x[b, t, h * 7 + i].item())
        self.assertTrue(torch.equal(self.attention.merge_heads(y), x))
        z = torch.randn(2, 3, 6, 7)
        self.assertTrue(torch.equal(self.attention.split_heads(self.attention.merge_heads(z)), z))

    def test_attention_weights(self):
        q, k = torch.randn(4, 3, 9, 5), torch.randn(4, 3, 9, 5)
        weights = self.attention.get_attention_weights(q, k)
        torch.testing.assert_close(weights.sum(-1), torch.ones(4, 3, 9))
        above = torch.triu(torch.ones(9, 9, dtype=torch.bool), diagonal=1)
        self.assertEqual(weights[..., above].abs().max().item(), 0.0)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(5)
        expected = torch.softmax(scores.masked_fill(above, float("-inf")), dim=-1)
        torch.testing.assert_close(weights, expected)

    def test_apply_attention_against_explicit(self):
        q, k, v = (torch.randn(4, 3, 9, 5) for _ in range(3))
        out = self.attention.apply_attention(q, k, v)
        for h in range(3):
            scores = q[:, h] @ k[:, h].transpose(1, 2) / math.sqrt(5)
            future = torch.triu(torch.ones(9, 9, dtype=torch.bool), diagonal=1)
            head = torch.softmax(scores.masked_fill(future, float("-inf")), -1) @ v[:, h]
            torch.testing.assert_close(out[:, :, h * 5:(h + 1) * 5], head)

    def test_forward_against_explicit_both_paths(self):
        expected = explicit_attention(self.attention, self.hidden)
        for fused in (True, False):
            self.attention.fused = fused
            torch.testing.assert_close(self.attention(self.hidden), expected)

    def test_shorter_sequences_and_too_long(self):
        expected = explicit_attention(self.attention, self.hidden[:, :4])
        torch.testing.assert_close(self.attention(self.hidden[:, :4]), expected)
        with self.assertRaisesRegex(ValueError, "longer than sequence_length=9"):
            self.attention(torch.randn(1, 10, 15))


class BlockTest(unittest.TestCase):
    def test_post_norm(self):
        torch.manual_seed(3)
        block = Block(head_size=4, mlp_hidden_size=20, num_heads=2, sequence_length=6)
        x = torch.randn(3, 6, 8)
        a = F.layer_norm(x + explicit_attention(block.attention, x), (8,), block.norm1.weight, block.norm1.bias)
        mlp = block.mlp[2](F.gelu(block.mlp[0](a)))
        expected = F.layer_norm(a + mlp, (8,), block.norm2.weight, block.norm2.bias)
        torch.testing.assert_close(block(x), expected)


def explicit_lstm(model, inputs):
    """The LSTM equations step by step with the module's own weights, from zero states."""
    x = model.embedding.weight[inputs]  # (B, T, E)
    batch_size, length, _ = x.shape
    for layer in range(model.num_layers):
        w_ih = getattr(model.lstm, f"weight_ih_l{layer}")
        w_hh = getattr(model.lstm, f"weight_hh_l{layer}")
        b = getattr(model.lstm, f"bias_ih_l{layer}") + getattr(model.lstm, f"bias_hh_l{layer}")
        h = torch.zeros(batch_size, model.hidden_size)
        c = torch.zeros(batch_size, model.hidden_size)
        outputs = []
        for t in range(length):
            i, f, g, o = (x[:, t] @ w_ih.T + h @ w_hh.T + b).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        x = torch.stack(outputs, dim=1)
    hidden = torch.relu(x @ model.classifier[0].weight.T + model.classifier[0].bias)
    return torch.log_softmax(hidden @ model.embedding.weight.T, dim=-1)


def explicit_gpt(model, inputs):
    length = inputs.shape[1]
    x = model.embedding.tokens.weight[inputs] + model.embedding.position.weight[:length]
    for block in model.layers:
        a = F.layer_norm(x + explicit_attention(block.attention, x), x.shape[-1:],
                         block.norm1.weight, block.norm1.bias)
        x = F.layer_norm(a + block.mlp[2](F.gelu(block.mlp[0](a))), x.shape[-1:],
                         block.norm2.weight, block.norm2.bias)
    return torch.log_softmax(x @ model.embedding.tokens.weight.T, dim=-1)


class ForwardValueTest(unittest.TestCase):
    def test_lstm_against_equations(self):
        model = tiny_lstm()
        inputs = torch.randint(0, TINY["vocabulary_size"], (3, 8))
        log_probas, (h, c) = model(inputs, model.initial_states(3))
        torch.testing.assert_close(log_probas, explicit_lstm(model, inputs), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.predict(inputs), log_probas)

    def test_lstm_state_carries(self):
        model = tiny_lstm()
        inputs = torch.randint(0, TINY["vocabulary_size"], (2, 10))
        full, _ = model(inputs, model.initial_states(2))
        first, state = model(inputs[:, :6], model.initial_states(2))
        second, _ = model(inputs[:, 6:], state)
        torch.testing.assert_close(torch.cat([first, second], 1), full)

    def test_gpt_against_definition(self):
        model = tiny_gpt()
        inputs = torch.randint(0, TINY["vocabulary_size"], (3, 12))
        for fused in (True, False):
            for module in model.modules():
                if isinstance(module, MultiHeadedAttention):
                    module.fused = fused
            torch.testing.assert_close(model(inputs), explicit_gpt(model, inputs), rtol=1e-4, atol=1e-4)

    def test_log_probabilities_normalised(self):
        for model, run in ((tiny_lstm(), lambda m, x: m(x, m.initial_states(2))[0]),
                           (tiny_gpt(), lambda m, x: m(x))):
            x = torch.randint(0, TINY["vocabulary_size"], (2, 5))
            torch.testing.assert_close(run(model, x).exp().sum(-1), torch.ones(2, 5))

    def test_features_and_output_weight_give_predict(self):
        for model in (tiny_lstm(), tiny_gpt()):
            x = torch.randint(0, TINY["vocabulary_size"], (2, 7))
            expected = torch.log_softmax(model.features(x) @ model.output_weight.T, -1)
            torch.testing.assert_close(model.predict(x), expected)


class CausalityTest(unittest.TestCase):
    def check(self, model):
        torch.manual_seed(4)
        x = torch.randint(1, TINY["vocabulary_size"], (2, 12))
        before = model.predict(x)
        for t in (0, 5, 11):
            changed = x.clone()
            changed[:, t] = (changed[:, t] + 7) % TINY["vocabulary_size"]
            after = model.predict(changed)
            torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
            self.assertGreater((after[:, t] - before[:, t]).abs().max().item(), 1e-4)

    def test_lstm(self):
        self.check(tiny_lstm().eval())

    def test_gpt(self):
        self.check(tiny_gpt().eval())


class LossTest(unittest.TestCase):
    def test_hand_made_padded_batch(self):
        # Vocabulary 3; probabilities chosen so each NLL is a known logarithm.
        probas = torch.tensor([
            [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
            [[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.5, 0.5]],  # last position is padding
            [[0.3, 0.3, 0.4], [0.3, 0.3, 0.4], [0.0, 1.0, 0.0]],  # all padding
        ])
        targets = torch.tensor([[0, 1, 2], [1, 2, 0], [0, 0, 0]])
        mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [0, 0, 0]])
        first = -(math.log(0.5) + math.log(0.8) + math.log(0.6)) / 3
        second = -(math.log(0.2) + math.log(1 / 3)) / 2
        expected = (first + second) / 2  # the empty sequence contributes nothing
        for model in (LSTM(3, 4, 5), MiniGPT1(3, 4, 3, 2, 1)):
            loss = model.loss(probas.log(), targets, mask)  # log(0) = -inf sits under the mask
            self.assertAlmostEqual(loss.item(), expected, places=6)

    def test_all_padding_is_zero_not_nan(self):
        log_probas = torch.log_softmax(torch.randn(2, 4, 5, requires_grad=True), -1)
        loss = LSTM(5, 3, 3).loss(log_probas, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4))
        self.assertEqual(loss.item(), 0.0)
        loss.backward()


class TiedAndFrozenTest(unittest.TestCase):
    def test_tied_is_one_tensor(self):
        lstm, gpt = tiny_lstm(), tiny_gpt()
        self.assertIs(lstm.classifier[2].weight, lstm.embedding.weight)
        self.assertIs(gpt.classifier.weight, gpt.embedding.tokens.weight)

    def test_frozen_embeddings_get_no_gradient(self):
        for model in (tiny_lstm(), tiny_gpt()):
            x = torch.randint(1, TINY["vocabulary_size"], (2, 6))
            model.loss(model.predict(x), x, torch.ones(2, 6)).backward()
            for name, parameter in model.named_parameters():
                if name.startswith("embedding"):
                    self.assertFalse(parameter.requires_grad, name)
                    self.assertIsNone(parameter.grad, name)
                else:
                    self.assertIsNotNone(parameter.grad, name)

    def test_learned_embeddings_get_gradient(self):
        for model in (tiny_lstm(learn_embeddings=True), tiny_gpt(learn_embeddings=True)):
            x = torch.randint(1, TINY["vocabulary_size"], (2, 6))
            model.loss(model.predict(x), x, torch.ones(2, 6)).backward()
            self.assertGreater(model.output_weight.grad.abs().sum().item(), 0)


class OverfitTest(unittest.TestCase):
    """A model that can learn memorises one small batch."""

    def check(self, model):
        torch.manual_seed(5)
        x = torch.randint(1, TINY["vocabulary_size"], (4, 12))
        y = torch.randint(1, TINY["vocabulary_size"], (4, 12))
        mask = torch.ones(4, 12)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        first = None
        for _ in range(150):
            optimizer.zero_grad()
            loss = model.loss(model.predict(x), y, mask)
            loss.backward()
            optimizer.step()
            first = loss.item() if first is None else first
        self.assertLess(loss.item(), 0.2 * first)
        self.assertLess(loss.item(), 0.2)

    def test_lstm(self):
        self.check(tiny_lstm(learn_embeddings=True))

    def test_gpt(self):
        self.check(tiny_gpt(learn_embeddings=True))


class InitialLossTest(unittest.TestCase):
    """Built as the package builds them for --embeddings none, both start near ln V."""

    def test_loss_at_initialisation(self):
        from utils.models import build_model
        from utils.config import resolve_config

        vocabulary = 500
        for model_name in ("lstm", "gpt1"):
            torch.manual_seed(6)
            config = resolve_config("init", model=model_name, embeddings="none", embedding_size=64,
                                    hidden_size=32, num_heads=4, sequence_length=16, layers=2)
            model = build_model(config, vocabulary)
            x = torch.randint(1, vocabulary, (8, 16))
            loss = model.loss(model.predict(x), torch.randint(1, vocabulary, (8, 16)), torch.ones(8, 16))
            self.assertAlmostEqual(loss.item(), math.log(vocabulary), delta=0.3, msg=model_name)
            self.assertEqual(model.output_weight[0].abs().sum().item(), 0.0)


class ForbiddenFunctionTest(unittest.TestCase):
    """LayerNorm, attention and MiniGPT1 are written out: the library versions must not run."""

    def test_library_layer_norm_and_attention_unused(self):
        def forbidden(*args, **kwargs):
            raise AssertionError("a forbidden function was called")

        class ForbiddenModule(nn.Module):
            def __init__(self, *args, **kwargs):
                raise AssertionError("nn.MultiheadAttention or nn.LayerNorm was built")

        patches = [mock.patch.object(F, "layer_norm", forbidden),
                   mock.patch.object(torch, "layer_norm", forbidden),
                   mock.patch.object(F, "multi_head_attention_forward", forbidden),
                   mock.patch.object(nn, "LayerNorm", ForbiddenModule),
                   mock.patch.object(nn, "MultiheadAttention", ForbiddenModule)]
        for patch in patches:
            patch.start()
        try:
            norm = LayerNorm(8)
            for fused in (True, False):
                norm.fused = fused
                norm(torch.randn(2, 8, requires_grad=True)).sum().backward()
            attention = MultiHeadedAttention(4, 2, 6)
            for fused in (True, False):
                attention.fused = fused
                attention(torch.randn(2, 6, 8))
            model = MiniGPT1(17, 8, 6, 2, 2)
            model(torch.randint(0, 17, (2, 6))).sum().backward()
        finally:
            for patch in patches:
                patch.stop()


if __name__ == "__main__":
    unittest.main()
