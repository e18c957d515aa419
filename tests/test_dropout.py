"""`dropout` in both models: `python -m unittest tests.test_dropout`.

With p = 0 (the default) a model is the course's, bit for bit, in train and eval mode, on both
attention paths, without drawing a random number; in eval mode any p is off; in train mode p > 0
drops the expected fraction of units (over >= 50,000 of them, within 0.02) at every place named
in the models' docstrings, on both attention paths and in `LSTM.lstm_by_layer`.
"""
import inspect
import unittest
import warnings
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import gpt1_solution_template
from gpt1_solution_template import Block, LayerNorm, MiniGPT1, MultiHeadedAttention
from lstm_solution import LSTM
from tests.helpers import TINY, tiny_gpt, tiny_lstm
from utils.config import resolve_config
from utils.batch_loss import set_fused_kernels
from utils.models import build_model

RATE = 0.3
TOLERANCE = 0.02  # about 10 standard deviations of the fraction over 50,000 units


def lstm_with(dropout, seed=0, num_layers=TINY["num_layers"]):
    torch.manual_seed(seed)
    return LSTM(TINY["vocabulary_size"], TINY["embedding_size"], TINY["hidden_size"], num_layers,
                True, dropout=dropout)


def gpt_with(dropout, seed=0):
    torch.manual_seed(seed)
    return MiniGPT1(TINY["vocabulary_size"], TINY["embedding_size"], TINY["sequence_length"],
                    TINY["num_heads"], TINY["num_layers"], True, dropout=dropout)


def tokens(batch_size, seed=1):
    """Ids `(B, sequence_length)` from 1 up: id 0 is the LSTM's all-zero padding row."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, TINY["vocabulary_size"], (batch_size, TINY["sequence_length"]),
                         generator=generator)


def run(model, inputs):
    """Log-probabilities `(B, T, V)` through the course's `forward`."""
    if isinstance(model, LSTM):
        return model(inputs, model.initial_states(inputs.shape[0]))[0]
    return model(inputs)


def variants():
    """`(name, make(dropout=None or p), fused)`: each model, MiniGPT1 on both attention paths."""
    yield "LSTM", lambda p=None: tiny_lstm(True) if p is None else lstm_with(p), None
    for fused in (False, True):
        yield f"MiniGPT1 fused={fused}", lambda p=None: tiny_gpt(True) if p is None else gpt_with(p), fused


def build(make, p, fused):
    model = make(p)
    if fused is not None:
        set_fused_kernels(model, fused)
    return model


class SignatureTest(unittest.TestCase):
    """The course's positional arguments are unchanged; `dropout` is keyword-only, default 0."""

    def test_keyword_only_with_default_zero(self):
        for cls in (LSTM, MultiHeadedAttention, Block, MiniGPT1):
            parameter = inspect.signature(cls.__init__).parameters["dropout"]
            self.assertEqual(parameter.kind, inspect.Parameter.KEYWORD_ONLY, cls.__name__)
            self.assertEqual(parameter.default, 0.0, cls.__name__)
        self.assertEqual(list(inspect.signature(LayerNorm.__init__).parameters), ["self", "hidden_size", "eps"])
        with self.assertRaises(TypeError):
            LSTM(11, 13, 17, 2, False, None, 0.5)

    def test_positional_arguments_unchanged(self):
        self.assertEqual(list(inspect.signature(LSTM.__init__).parameters)[1:7],
                         ["vocabulary_size", "embedding_size", "hidden_size", "num_layers",
                          "learn_embeddings", "_embedding_weight"])
        self.assertEqual(list(inspect.signature(MiniGPT1.__init__).parameters)[1:9],
                         ["vocabulary_size", "embedding_size", "sequence_length", "num_heads",
                          "num_layers", "learn_embeddings", "_tokens_embedding_weight",
                          "_positional_embedding_weight"])
        self.assertEqual(list(inspect.signature(Block.__init__).parameters)[1:5],
                         ["head_size", "mlp_hidden_size", "num_heads", "sequence_length"])
        self.assertEqual(list(inspect.signature(MultiHeadedAttention.__init__).parameters)[1:4],
                         ["head_size", "num_heads", "sequence_length"])


class ZeroDropoutTest(unittest.TestCase):
    """p = 0 is the course's model: same state_dict, same outputs and gradients, no random draws."""

    def test_bit_identical_in_train_and_eval_mode(self):
        inputs = tokens(3)
        for name, make, fused in variants():
            plain, zero = build(make, None, fused), build(make, 0.0, fused)
            self.assertEqual(list(plain.state_dict()), list(zero.state_dict()), name)
            for key, value in plain.state_dict().items():
                self.assertTrue(torch.equal(value, zero.state_dict()[key]), f"{name} {key}")
            for train in (True, False):
                outputs = []
                for model in (plain, zero):
                    model.train(train)
                    model.zero_grad()
                    rng = torch.get_rng_state()
                    log_probas = run(model, inputs)
                    self.assertTrue(torch.equal(torch.get_rng_state(), rng), f"{name} drew random numbers")
                    log_probas.sum().backward()
                    outputs.append([log_probas] + [p.grad for p in model.parameters()])
                for plain_tensor, zero_tensor in zip(*outputs):
                    self.assertTrue(torch.equal(plain_tensor, zero_tensor), f"{name} train={train}")

    def test_lstm_by_layer_draws_nothing(self):
        model = lstm_with(0.0)
        inputs = torch.randn(3, 7, TINY["embedding_size"])
        states = model.initial_states(3)
        rng = torch.get_rng_state()
        by_layer, _ = model.lstm_by_layer(inputs, states)
        self.assertTrue(torch.equal(torch.get_rng_state(), rng))
        self.assertTrue(torch.equal(by_layer, model.lstm(inputs, states)[0]))


class EvalModeTest(unittest.TestCase):
    """In eval mode a p = 0.5 model computes what the p = 0 model with its weights computes."""

    def test_dropout_is_off(self):
        inputs = tokens(3)
        for name, make, fused in variants():
            dropped, plain = build(make, 0.5, fused).eval(), build(make, 0.0, fused).eval()
            plain.load_state_dict(dropped.state_dict())
            self.assertTrue(torch.equal(run(dropped, inputs), run(plain, inputs)), name)
            self.assertTrue(torch.equal(dropped.predict(inputs), plain.predict(inputs)), name)

    def test_lstm_by_layer_is_off(self):
        model = lstm_with(0.5).eval()
        inputs, states = torch.randn(3, 7, TINY["embedding_size"]), model.initial_states(3)
        self.assertTrue(torch.equal(model.lstm_by_layer(inputs, states)[0], model.lstm(inputs, states)[0]))


class TrainModeTest(unittest.TestCase):
    """p > 0 in train mode: passes differ, and each dropout drops a fraction p of its units."""

    def test_two_passes_differ(self):
        inputs = tokens(3)
        for name, make, fused in variants():
            model = build(make, RATE, fused).train()
            self.assertFalse(torch.equal(run(model, inputs), run(model, inputs)), name)

    def assert_rate(self, recorded, name):
        """`recorded`: `(input, output)` pairs of one dropout. Units already 0 carry no evidence."""
        kept = dropped = 0
        for before, after in recorded:
            live = before != 0
            zeroed = live & (after == 0)
            survivors = live & (after != 0)
            torch.testing.assert_close(after[survivors], before[survivors] / (1 - RATE), msg=name)
            kept, dropped = kept + int(survivors.sum()), dropped + int(zeroed.sum())
        self.assertGreaterEqual(kept + dropped, 50_000, name)
        self.assertAlmostEqual(dropped / (kept + dropped), RATE, delta=TOLERANCE, msg=name)

    def check_every_dropout(self, model, inputs, expected_names):
        recorded = {}

        def hook(module_name):
            return lambda module, args, output: recorded.setdefault(module_name, []).append((args[0], output))

        handles = [module.register_forward_hook(hook(module_name))
                   for module_name, module in model.named_modules() if isinstance(module, nn.Dropout)]
        try:
            run(model.train(), inputs)
        finally:
            for handle in handles:
                handle.remove()
        self.assertEqual(sorted(recorded), sorted(expected_names))
        for module_name, pairs in recorded.items():
            self.assertEqual(pairs[0][0].shape, pairs[0][1].shape, module_name)
            self.assertAlmostEqual(model.get_submodule(module_name).p, RATE)
            self.assert_rate(pairs, module_name)

    def test_lstm_embeddings_and_output(self):
        # 160 x 16 x 32 embedded units, 160 x 16 x 24 output units.
        self.check_every_dropout(lstm_with(RATE), tokens(160), ["embedding_dropout", "output_dropout"])

    def test_gpt_both_paths(self):
        # 128 x 16 x 32 units per residual branch; 128 x 4 x 136 causal attention weights per layer.
        # The fused kernel drops its weights inside (checked by the two tests below).
        for fused in (False, True):
            model = gpt_with(RATE)
            set_fused_kernels(model, fused)
            parts = ["attention.residual_dropout", "mlp_dropout"]
            if not fused:
                parts.append("attention.attention_dropout")
            names = ["embedding_dropout"] + [f"layers.{i}.{part}" for i in range(TINY["num_layers"])
                                             for part in parts]
            with self.subTest(fused=fused):
                self.check_every_dropout(model, tokens(128), names)

    def test_gpt_fused_path_gives_the_rate_to_the_kernel(self):
        # The kernel's mask is internal: what it is given is checked here, what it does below.
        model = gpt_with(RATE)
        set_fused_kernels(model, True)
        calls = []
        real = F.scaled_dot_product_attention

        def recording(*args, **kwargs):
            calls.append(kwargs.get("dropout_p", 0.0))
            return real(*args, **kwargs)

        with mock.patch.object(gpt1_solution_template.F, "scaled_dot_product_attention", recording):
            run(model.train(), tokens(2))
            run(model.eval(), tokens(2))
        self.assertEqual(calls, [RATE] * TINY["num_layers"] + [0.0] * TINY["num_layers"])

    def test_fused_attention_drops_weights(self):
        # One head whose values are the one-hot key positions: its output is the attention
        # weights themselves, dropped or not, (B, T, T); 400 x 136 of them below the diagonal.
        length = TINY["sequence_length"]
        attention = MultiHeadedAttention(length, 1, length, dropout=RATE)
        with torch.no_grad():
            attention.values.weight.copy_(torch.eye(length))
            attention.values.bias.zero_()
            attention.output.weight.copy_(torch.eye(length))
            attention.output.bias.zero_()
        attention.residual_dropout.p = 0.0
        hidden = torch.eye(length).expand(400, length, length)  # (B, T, T): token t is one-hot t
        attention.eval()
        weights = attention(hidden)  # (B, T, T)
        attention.train()
        self.assert_rate([(weights, attention(hidden))], "fused attention weights")

    def test_lstm_between_layers(self):
        model = lstm_with(RATE)
        self.assertAlmostEqual(model.lstm.dropout, RATE)
        model.embedding_dropout.p = model.output_dropout.p = 0.0  # only the inter-layer dropout left
        inputs = tokens(3)
        self.assertFalse(torch.equal(run(model.train(), inputs), run(model, inputs)))

    def test_one_layer_lstm_does_not_warn(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = lstm_with(RATE, num_layers=1)
        self.assertEqual(model.lstm.dropout, 0.0)

    def test_lstm_by_layer_drops_between_layers_only(self):
        """Layer by layer, with the mask drawn on the same seed: one-layer nn.LSTMs + F.dropout."""
        model = lstm_with(RATE).train()
        inputs = torch.randn(3, 7, TINY["embedding_size"])
        (h, c) = (torch.randn(2, 3, TINY["hidden_size"]) for _ in range(2))
        singles = [nn.LSTM(size, TINY["hidden_size"], batch_first=True)
                   for size in (TINY["embedding_size"], TINY["hidden_size"])]  # built before seeding
        for layer, single in enumerate(singles):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(single, f"{name}_l0").data = getattr(model.lstm, f"{name}_l{layer}").data
        torch.manual_seed(9)
        by_layer, (last_h, last_c) = model.lstm_by_layer(inputs, (h, c))
        torch.manual_seed(9)
        outputs, expected_h, expected_c = inputs, [], []
        for layer, single in enumerate(singles):
            if layer:
                outputs = F.dropout(outputs, RATE, training=True)
            outputs, (h_layer, c_layer) = single(outputs, (h[layer:layer + 1], c[layer:layer + 1]))
            expected_h.append(h_layer)
            expected_c.append(c_layer)
        torch.testing.assert_close(by_layer, outputs)
        torch.testing.assert_close(last_h, torch.cat(expected_h))
        torch.testing.assert_close(last_c, torch.cat(expected_c))


class BuildModelTest(unittest.TestCase):
    """`build_model` passes `config.dropout` to both models."""

    def test_config_dropout_reaches_every_dropout(self):
        for model_name in ("lstm", "gpt1"):
            config = resolve_config("drop", model=model_name, embeddings="none", embedding_size=32,
                                    hidden_size=24, num_heads=4, sequence_length=16, layers=2, dropout=0.2)
            model = build_model(config, TINY["vocabulary_size"])
            self.assertEqual(model.dropout, 0.2, model_name)
            rates = {module.p for module in model.modules() if isinstance(module, nn.Dropout)}
            self.assertEqual(rates, {0.2}, model_name)
            if model_name == "lstm":
                self.assertEqual(model.lstm.dropout, 0.2)

    def test_default_config_has_none(self):
        for model_name in ("lstm", "gpt1"):
            config = resolve_config("drop", model=model_name, embeddings="none", embedding_size=32,
                                    hidden_size=24, num_heads=4, sequence_length=16, layers=2)
            model = build_model(config, TINY["vocabulary_size"])
            self.assertEqual({module.p for module in model.modules() if isinstance(module, nn.Dropout)}, {0.0})


if __name__ == "__main__":
    unittest.main()
