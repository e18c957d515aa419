"""The fused path computes what the reference path computes: `python -m unittest tests.test_batch_loss`.

On the CPU in fp32, on the same weights and batch (tiny models of tests/helpers.py, a padded batch
with an empty sequence), the fused loss, NLL sum, token count and gradients equal the plain path's
to 1e-5 relative; `fused_token_nll` equals an explicit log-softmax in float64, whatever the block
size and the vocabulary's padding; fused attention equals `get_attention_weights` + `apply_attention`; and `BatchLoss`'s
`scale` gives the course's loss `model.loss(model.predict(x), y, mask)`. Under bf16 autocast the
loss stays within 1% of fp32, and the LSTM computed layer by layer (as under CUDA autocast)
equals the whole `nn.LSTM`. On a GPU, `CudaPathTest` (skipped elsewhere) repeats these on CUDA.
"""
import copy
import itertools
import unittest

import torch

from gpt1_solution_template import MultiHeadedAttention
from tests.helpers import TINY, skip_unless_cpu_autocast, tiny_gpt, tiny_lstm
from utils import training
from utils.config import resolve_config
from utils.batch_loss import BatchLoss, fused_token_nll, set_fused_kernels
from utils.language_model import token_nll

RELATIVE = 1e-5


def padded_batch(seed=0, batch_size=5):
    """`(source, target, mask)` `(B, T)`: lengths T, 11, 1, 0 (an empty sequence) and T - 3."""
    generator = torch.Generator().manual_seed(seed)
    length, vocabulary = TINY["sequence_length"], TINY["vocabulary_size"]
    source = torch.randint(1, vocabulary, (batch_size, length), generator=generator)
    target = torch.randint(1, vocabulary, (batch_size, length), generator=generator)
    lengths = torch.tensor([length, 11, 1, 0, length - 3])[:batch_size]
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).float()  # (B, T)
    # Padding as the data has it: id 0 after the last real token.
    return source * mask.long(), target * mask.long(), mask


def assert_close(test, actual, expected, what, relative=RELATIVE, scale=None):
    """`max |actual - expected| <= relative * scale`, `scale` being `max |expected|` by default.

    A gradient that is zero in exact arithmetic (the key bias's: adding a constant to all the
    scores of a query leaves its softmax unchanged) holds rounding noise alone; such tensors are
    measured against the largest gradient of the model instead (`scale`).
    """
    scale = max(expected.abs().max().item(), scale or 0.0)
    error = (actual - expected).abs().max().item()
    test.assertLessEqual(error, relative * max(scale, 1e-30),
                         f"{what}: max error {error:.3g} against max |value| {scale:.3g}")


def compare_paths(test, make_model, learn_embeddings, device="cpu", relative=RELATIVE):
    """`BatchLoss(fused=True)` against `BatchLoss(fused=False)` in fp32: loss, sums, gradients."""
    model = make_model(learn_embeddings=learn_embeddings).to(device)
    source, target, mask = (tensor.to(device) for tensor in padded_batch())
    sequences = int((mask.sum(dim=1) > 0).sum())
    results = {}
    for fused in (False, True):
        copy_ = copy.deepcopy(model)
        loss, nll_sum, count = BatchLoss(copy_, fused=fused)(source, target, mask, 1.0 / sequences)
        loss.backward()
        gradients = {name: p.grad for name, p in copy_.named_parameters() if p.requires_grad}
        results[fused] = (loss.detach(), nll_sum, count, gradients)
    (loss, nll_sum, count, gradients), (f_loss, f_nll_sum, f_count, f_gradients) = results[False], results[True]
    assert_close(test, f_loss, loss, "loss", relative)
    assert_close(test, f_nll_sum, nll_sum, "nll_sum", relative)
    test.assertEqual(f_count.item(), count.item())
    test.assertEqual(count.item(), mask.sum().item())
    test.assertEqual(gradients.keys(), f_gradients.keys())
    embedding_grads = [name for name in gradients if "embedding" in name]
    test.assertEqual(bool(embedding_grads), learn_embeddings)
    largest = max(gradient.abs().max().item() for gradient in gradients.values())
    for name, gradient in gradients.items():
        test.assertIsNotNone(gradient, name)
        floor = largest if name.endswith("keys.bias") else None
        if floor is None:
            test.assertGreater(gradient.abs().max().item(), 1e-4 * largest, name)
        assert_close(test, f_gradients[name], gradient, f"gradient of {name}", relative, scale=floor)


class PathEquivalenceTest(unittest.TestCase):
    """`BatchLoss(fused=True)` against `BatchLoss(fused=False)` in fp32 on the CPU."""

    def test_lstm_frozen_embeddings(self):
        compare_paths(self, tiny_lstm, learn_embeddings=False)

    def test_lstm_learned_embeddings(self):
        compare_paths(self, tiny_lstm, learn_embeddings=True)

    def test_gpt_frozen_embeddings(self):
        compare_paths(self, tiny_gpt, learn_embeddings=False)

    def test_gpt_learned_embeddings(self):
        compare_paths(self, tiny_gpt, learn_embeddings=True)

    def test_per_token_nll_and_log_probabilities(self):
        source, target, _ = padded_batch()
        for make_model in (tiny_lstm, tiny_gpt):
            model = make_model()
            with torch.no_grad():
                plain = BatchLoss(copy.deepcopy(model), fused=False)
                fast = BatchLoss(copy.deepcopy(model), fused=True)
                assert_close(self, fast.token_nll(source, target), plain.token_nll(source, target),
                             f"{type(model).__name__} token NLL")
                # The model's own log-probabilities with fused attention equal the explicit ones.
                assert_close(self, fast.model.predict(source), plain.model.predict(source),
                             f"{type(model).__name__} log-probabilities")

    def test_kernel_flags_follow_the_path(self):
        model = tiny_gpt()
        flagged = [module for layer in model.layers for module in (layer.attention, layer.norm1, layer.norm2)]
        BatchLoss(model, fused=False)
        self.assertEqual({module.fused for module in flagged}, {False})
        BatchLoss(model, fused=True)
        self.assertEqual({module.fused for module in flagged}, {True})


def check_close_to_fp32(test, device):
    """bf16 loss within 1% of fp32, gradients within 5% (relative L2), the loss itself fp32."""
    source, target, mask = (tensor.to(device) for tensor in padded_batch())
    sequences = int((mask.sum(dim=1) > 0).sum())
    for make_model in (tiny_lstm, tiny_gpt):
        model = make_model(learn_embeddings=True).to(device)
        results = {}
        for dtype in (None, torch.bfloat16):
            copy_ = copy.deepcopy(model)
            loss, nll_sum, _ = BatchLoss(copy_, fused=True, autocast_dtype=dtype)(
                source, target, mask, 1.0 / sequences)
            loss.backward()
            gradients = torch.cat([p.grad.flatten() for p in copy_.parameters() if p.requires_grad])
            results[dtype] = loss.detach(), nll_sum, gradients
        (loss, nll_sum, gradients), (m_loss, m_nll_sum, m_gradients) = results[None], results[torch.bfloat16]
        name = type(model).__name__
        test.assertEqual((m_loss.dtype, m_nll_sum.dtype), (torch.float32, torch.float32), name)
        assert_close(test, m_loss, loss, f"{name} bf16 loss", relative=1e-2)
        assert_close(test, m_nll_sum, nll_sum, f"{name} bf16 nll_sum", relative=1e-2)
        error = ((m_gradients - gradients).norm() / gradients.norm()).item()
        test.assertLess(error, 5e-2, f"{name}: bf16 gradients differ by {error:.3g} (relative L2)")


def check_lstm_by_layer(test, device, relative):
    """`LSTM.lstm_by_layer` gives `self.lstm`'s outputs, final states and gradients."""
    model = tiny_lstm().to(device)
    inputs = torch.randn(3, 16, TINY["embedding_size"], device=device,
                         generator=torch.Generator(device).manual_seed(3))
    states = tuple(torch.randn(2, *model.initial_states(3)[0].shape, device=device).unbind(0))
    results = []
    for run in (model.lstm, model.lstm_by_layer):
        model.zero_grad()
        outputs, (h, c) = run(inputs, states)
        (outputs.float().square().sum() + h.float().sum() + c.float().sum()).backward()
        results.append([outputs, h, c] + [p.grad.clone() for p in model.lstm.parameters()])
    for name, by_layer, whole in zip(["outputs", "h", "c"] + [n for n, _ in model.lstm.named_parameters()],
                                     results[1], results[0]):
        test.assertEqual(by_layer.shape, whole.shape, name)
        assert_close(test, by_layer.float(), whole.float(), f"lstm_by_layer {name}", relative)


class MixedPrecisionTest(unittest.TestCase):
    """The fused path under bf16 autocast on the CPU (CudaPathTest repeats it on a GPU)."""

    def test_lstm_by_layer_equals_the_whole_lstm(self):
        check_lstm_by_layer(self, "cpu", RELATIVE)

    @skip_unless_cpu_autocast("bf16", "lstm", "gpt1")
    def test_bf16_autocast_on_cpu(self):
        check_close_to_fp32(self, "cpu")


@unittest.skipUnless(torch.cuda.is_available(), "no CUDA device here (run on a GPU machine)")
class CudaPathTest(unittest.TestCase):
    """On a GPU: fp32 with TF32 off equals the reference path; bf16 is close to fp32."""

    def setUp(self):
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        def restore():
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        self.addCleanup(restore)

    def test_fp32_paths_are_equal(self):
        for make_model in (tiny_lstm, tiny_gpt):
            for learn in (False, True):
                with self.subTest(model=make_model.__name__, learn_embeddings=learn):
                    compare_paths(self, make_model, learn, device="cuda", relative=1e-4)

    def test_bf16_autocast_on_cuda(self):
        check_close_to_fp32(self, "cuda")

    def test_run_exp_names_the_gpu_by_its_index(self):
        for name in (None, "cuda"):  # the default, and --device cuda
            self.assertEqual(training.Processes(name).device, torch.device("cuda", torch.cuda.current_device()))

    def test_a_training_step_never_waits_for_the_gpu(self):
        """No host-device sync in the fused path's step: forward, scaled backward, fused AdamW."""
        source, target, mask = (tensor.to("cuda") for tensor in padded_batch())
        config = resolve_config("6")  # fused path, precision auto (bf16), AdamW
        device = torch.device("cuda")
        for make_model in (tiny_lstm, tiny_gpt):
            model = make_model(learn_embeddings=True).to(device)
            step = BatchLoss(model, fused=True, autocast_dtype=torch.bfloat16)
            learnable = [p for p in model.parameters() if p.requires_grad]
            optimizer = training.make_optimizer(config, learnable)
            scaler = training.make_grad_scaler(config, device)
            for index in range(3):  # the first step creates the optimizer's and scaler's state
                if index == 2:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    optimizer.zero_grad(set_to_none=True)
                    loss, _, _ = step(source, target, mask, 0.25)
                    training.optimizer_step(loss, optimizer, scaler, learnable)
                finally:
                    torch.cuda.set_sync_debug_mode("default")

    def test_lstm_by_layer_on_cuda(self):
        check_lstm_by_layer(self, "cuda", 1e-4)  # what the fused path runs under autocast
        with torch.autocast("cuda", dtype=torch.bfloat16):
            check_lstm_by_layer(self, "cuda", 1e-2)  # cuDNN in fp16, each way


class FusedTokenNllTest(unittest.TestCase):
    """`fused_token_nll` against `log_softmax(features @ weight.T)` in float64."""

    def setUp(self):
        generator = torch.Generator().manual_seed(1)
        self.features = torch.randn(3, 7, 6, dtype=torch.float64, generator=generator)  # (B, T, C)
        self.weight = torch.randn(13, 6, dtype=torch.float64, generator=generator)  # (V, C)
        self.targets = torch.randint(0, 13, (3, 7), generator=generator)  # (B, T)

    def explicit(self, features, weight):
        return token_nll(torch.log_softmax(features @ weight.t(), dim=-1), self.targets)  # (B, T)

    def test_values_and_gradients_for_any_block_size(self):
        vocabulary = self.weight.shape[0]
        upstream = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        features, weight = self.features.clone().requires_grad_(), self.weight.clone().requires_grad_()
        expected = self.explicit(features, weight)
        expected_grads = torch.autograd.grad((expected * upstream).sum(), (features, weight))
        # 1 row per block, 4 rows (21 = 5 * 4 + 1: a ragged last block), and all rows at once; the
        # vocabulary as it is (the CPU's default) and padded from 13 to 16 or 64 (CUDA's default).
        for rows, multiple in itertools.product((1, 4, 21, 64), (1, 16, 64)):
            with self.subTest(rows=rows, vocabulary_multiple=multiple):
                nll = fused_token_nll(features, weight, self.targets, block_bytes=4 * vocabulary * rows,
                                      vocabulary_multiple=multiple)
                self.assertEqual(nll.shape, (3, 7))
                self.assertEqual(nll.dtype, torch.float32)  # the documented output dtype
                assert_close(self, nll.double(), expected.detach(), "NLL", relative=1e-6)
                grads = torch.autograd.grad((nll * upstream).sum(), (features, weight))
                # float64 in and out; the block's softmax and the stored Jacobian are fp32 inside.
                for name, got, want in zip(("features", "weight"), grads, expected_grads):
                    self.assertEqual(got.dtype, torch.float64)
                    assert_close(self, got, want, f"gradient of {name}", relative=1e-6)

    def test_frozen_weight_gets_no_gradient(self):
        features = self.features.clone().requires_grad_()
        nll = fused_token_nll(features, self.weight, self.targets, block_bytes=4 * 13 * 5)
        (grad,) = torch.autograd.grad(nll.sum(), (features,))
        features_ = self.features.clone().requires_grad_()
        (expected,) = torch.autograd.grad(self.explicit(features_, self.weight).sum(), (features_,))
        assert_close(self, grad, expected, "gradient of features", relative=1e-6)

    def test_gradcheck(self):
        features = self.features[:1, :3, :4].clone().requires_grad_()  # (1, 3, 4)
        weight = self.weight[:5, :4].clone().requires_grad_()  # (5, 4)
        targets = self.targets[:1, :3] % 5

        for multiple in (1, 8):
            def function(f, w):
                return fused_token_nll(f, w, targets, block_bytes=4 * 5 * 2, vocabulary_multiple=multiple).double()

            # The NLL is returned in fp32, so the numerical derivative is checked loosely.
            self.assertTrue(torch.autograd.gradcheck(function, (features, weight), eps=1e-3, atol=1e-3, rtol=1e-3))

    def test_no_grad_gives_the_same_values(self):
        with torch.no_grad():
            nll = fused_token_nll(self.features, self.weight, self.targets, block_bytes=4 * 13 * 3)
        assert_close(self, nll.double(), self.explicit(self.features, self.weight), "NLL", relative=1e-6)


class FusedAttentionTest(unittest.TestCase):
    """`MultiHeadedAttention.forward` with the fused kernel against the explicit definition."""

    def test_forward_and_gradients(self):
        torch.manual_seed(3)
        attention = MultiHeadedAttention(TINY["embedding_size"] // TINY["num_heads"], TINY["num_heads"],
                                         TINY["sequence_length"])
        for length in (TINY["sequence_length"], 5):  # full length and a shorter sequence
            with self.subTest(length=length):
                inputs = torch.randn(3, length, TINY["embedding_size"])
                outputs, grads = {}, {}
                for fused in (False, True):
                    module = copy.deepcopy(attention)
                    set_fused_kernels(module, fused)
                    self.assertEqual(module.fused, fused)
                    x = inputs.clone().requires_grad_()
                    outputs[fused] = module(x)
                    outputs[fused].square().sum().backward()
                    grads[fused] = [x.grad] + [p.grad for p in module.parameters()]
                assert_close(self, outputs[True], outputs[False], "attention output")
                names = ["inputs"] + [name for name, _ in attention.named_parameters()]
                largest = max(gradient.abs().max().item() for gradient in grads[False])
                for name, got, want in zip(names, grads[True], grads[False]):
                    assert_close(self, got, want, f"gradient of {name}",
                                 scale=largest if name == "keys.bias" else None)

    def test_is_causal(self):
        torch.manual_seed(4)
        attention = MultiHeadedAttention(8, 4, 16)
        inputs = torch.randn(2, 16, 32)
        changed = inputs.clone()
        changed[:, 9] += 1.0
        with torch.no_grad():
            before, after = attention(inputs), attention(changed)
        self.assertTrue(torch.equal(before[:, :9], after[:, :9]))
        self.assertFalse(torch.allclose(before[:, 9:], after[:, 9:]))


class ScaleTest(unittest.TestCase):
    """`loss = scale * sum over non-empty sequences of their mean NLL`, on both paths."""

    def test_course_loss_and_sums(self):
        source, target, mask = padded_batch(seed=5)
        sequences = int((mask.sum(dim=1) > 0).sum())
        self.assertEqual(sequences, 4)  # one of the five is empty
        for make_model in (tiny_lstm, tiny_gpt):
            model = make_model()
            with torch.no_grad():
                log_probas = model.predict(source)  # (B, T, V), the course's definition
                course = model.loss(log_probas, target, mask)
                nll = token_nll(log_probas, target)  # (B, T)
            for fused in (False, True):
                with self.subTest(model=type(model).__name__, fused=fused), torch.no_grad():
                    step = BatchLoss(copy.deepcopy(model), fused=fused)
                    loss, nll_sum, count = step(source, target, mask, 1.0 / sequences)
                    assert_close(self, loss, course, "loss with scale = 1 / sequences")
                    assert_close(self, nll_sum, (nll * mask).sum(), "nll_sum")
                    self.assertEqual(count.item(), mask.sum().item())
                    # Two processes of a DDP run pass world_size / sequences: the loss doubles.
                    doubled, _, _ = step(source, target, mask, 2.0 / sequences)
                    assert_close(self, doubled, 2 * course, "loss with scale = 2 / sequences")

    def test_all_empty_batch_is_zero(self):
        source, target, mask = padded_batch(seed=6)
        mask.zero_()
        for make_model in (tiny_lstm, tiny_gpt):
            for fused in (False, True):
                loss, nll_sum, count = BatchLoss(make_model(), fused=fused)(source, target, mask, 1.0)
                self.assertEqual((loss.item(), nll_sum.item(), count.item()), (0.0, 0.0, 0.0))


if __name__ == "__main__":
    unittest.main()
