from pathlib import Path

import pytest
import torch

# ../shared beside the repository: present for developers and CI, absent on a user's machine.
SHARED = Path(__file__).resolve().parents[2] / "shared"
CLIP_VOCAB = SHARED / "clip" / "bpe_simple_vocab_16e6.txt.gz"
MAGNETIC_TILE = SHARED / "data" / "magnetic_tile"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Add seeded noise to every parameter, so zero-initialised layers (zero convs, output
    convs) are not zero and a mis-wired weight cannot hide behind a zero."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def write_tiny_weights(folder, control: bool = True, seed: int = 0, factor: int = 8):
    """A complete weights folder with tiny random networks and a small trained BPE vocabulary;
    the autoencoder's factor (and the trimap embedder's) is `factor`."""
    from minibldm.autoencoder import Autoencoder
    from minibldm.clip import TextEncoder
    from minibldm.config import AutoencoderConfig, TextConfig, UNetConfig
    from minibldm.control import ControlNet
    from minibldm.tokenizer import Tokenizer
    from minibldm.unet import UNet
    from minibldm.weights import save

    tok = Tokenizer.train(["a tile with a crack", "a tile with a scratch", "a washer with a hole",
                           "a pill with a stain", "a metal part with a dent"], vocab_size=600)
    levels = {8: 4, 4: 3, 2: 2}[factor]
    cfgs = {"autoencoder": AutoencoderConfig(ch=16, ch_mult=(1, 2, 2, 2)[:levels],
                                             num_res_blocks=1, norm_num_groups=8),
            "unet": UNetConfig(model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,),
                               num_heads=2, context_dim=32, norm_num_groups=8, num_res_blocks=1,
                               hint_factor=factor),
            "text": TextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2)}
    torch.manual_seed(seed)
    nets = {"autoencoder": Autoencoder(cfgs["autoencoder"]), "unet": UNet(cfgs["unet"]),
            "text_encoder": TextEncoder(cfgs["text"])}
    if control:
        nets["control"] = ControlNet(cfgs["unet"])
    for i, net in enumerate(nets.values()):
        randomize(net, seed + i)
    save(folder, cfgs, {k: v.state_dict() for k, v in nets.items()}, tok)
    return folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Foreground estimates are cached under $XDG_CACHE_HOME: keep the tests' out of the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
