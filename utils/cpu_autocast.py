"""Whether this CPU can run a model's operations under bf16 or fp16 autocast: asked by trying, once.

oneDNN's LSTM and matmul kernels under CPU autocast exist only where the CPU has the instructions
for them (AVX-512 BF16, AMX, AVX-512 FP16...), and elsewhere fail deep inside `torch._VF.lstm`
("could not create a primitive descriptor"). Flags do not say which kernels a given PyTorch build
has, so the probe runs the model's operations on a tiny input and remembers the answer for the
process. The run's set-up, the tests and the benchmark ask it before computing under CPU autocast.
"""
import functools

import torch
import torch.nn.functional as F

from utils.cli import cpu_name, cpuinfo_value

CPU_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The CPU's own words for the instructions oneDNN's reduced-precision kernels use.
REDUCED_PRECISION_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "amx_tile")


def cpu_flags():
    """The reduced-precision instruction sets among the CPU's flags (empty where unknown)."""
    flags = set((cpuinfo_value("flags") or "").split())
    return [flag for flag in REDUCED_PRECISION_FLAGS if flag in flags]


def _try_operations(dtype, model):
    """The model's kinds of operation forward and backward under CPU autocast, on tiny tensors."""
    torch.manual_seed(0)  # a local generator is not enough for nn.LSTM's initialisation
    state = torch.random.get_rng_state()
    try:
        inputs = torch.randn(2, 3, 8, requires_grad=True)  # (B, T, C)
        weight = torch.randn(16, 8, requires_grad=True)  # (V, C)
        with torch.autocast("cpu", dtype=dtype):
            if model == "lstm":
                lstm = torch.nn.LSTM(8, 8, batch_first=True)
                inputs_ = lstm(inputs)[0]  # (B, T, C)
            else:
                queries = inputs.view(2, 1, 3, 8)  # (B, H, T, D)
                inputs_ = F.scaled_dot_product_attention(queries, queries, queries, is_causal=True).view(2, 3, 8)
            log_probas = F.log_softmax(inputs_ @ weight.t(), dim=-1, dtype=torch.float32)  # (B, T, V)
        log_probas.sum().backward()
    finally:
        torch.random.set_rng_state(state)


@functools.lru_cache(maxsize=None)
def cpu_autocast_refusal(precision, model):
    """None when this CPU runs `model` ("lstm" or "gpt1") under `precision` ("bf16", "fp16")
    autocast; else one line saying what failed and what the CPU lacks. Cached per process."""
    try:
        _try_operations(CPU_AUTOCAST_DTYPES[precision], model)
        return None
    except RuntimeError as error:
        # oneDNN's first sentence says what failed; the rest is how to debug oneDNN itself.
        detail = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
    flags = cpu_flags()
    has = f"it has {', '.join(flags)}" if flags else "it has none of " + ", ".join(REDUCED_PRECISION_FLAGS)
    return (f"this CPU ({cpu_name()}) cannot run the {model} under {precision} autocast with this "
            f"PyTorch ({detail}; {has})")
