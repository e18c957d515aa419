"""Small torch helpers shared by the training script, the tools and the tests."""
import random

import numpy as np
import torch


def seed_experiment(seed):
    """Seed Python, NumPy and PyTorch (all devices) so a run can be repeated exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def to_device(tensors, device):
    """Move a tensor, or a dict / list / tuple of them (nested), to `device`.

    Anything that is not a tensor is returned unchanged, so batches may carry metadata.
    """
    if isinstance(tensors, torch.Tensor):
        return tensors.to(device, non_blocking=True)
    if isinstance(tensors, dict):
        return {key: to_device(value, device) for key, value in tensors.items()}
    if isinstance(tensors, list):
        return [to_device(value, device) for value in tensors]
    if isinstance(tensors, tuple):
        return tuple(to_device(value, device) for value in tensors)
    return tensors


def unwrap(model):
    """The plain module inside DistributedDataParallel or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
