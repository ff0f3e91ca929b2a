"""minibldm: a small, readable PyTorch reimplementation of AdaBLDM defect generation
(Li et al. 2024, arXiv 2402.19330). `minibldm.load(folder)` returns the networks of a weights
folder; `minibldm.Pipeline` makes defect images from it (minibldm/api.py); see README.md."""
from .api import Pipeline
from .weights import Models, load

__version__ = "0.1.0"
__all__ = ["load", "Models", "Pipeline"]
