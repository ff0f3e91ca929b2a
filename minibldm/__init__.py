"""minibldm: a small, readable PyTorch reimplementation of AdaBLDM defect generation
(Li et al. 2024, arXiv 2402.19330). `minibldm.load(folder)` returns the networks of a weights
folder; see README.md."""
__version__ = "0.1.0"


def load(weights_dir, device="cpu", dtype=None, control=None):
    """Load a weights folder; see minibldm.weights.load."""
    import torch

    from .weights import load as _load
    return _load(weights_dir, device=device, dtype=dtype or torch.float32, control=control)
