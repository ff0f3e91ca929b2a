"""CLIP's text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", Sec. 2.4), the text encoder τ of Stable Diffusion 1.x.

SD 1.x conditions its UNet on the last hidden state of CLIP ViT-L/14's text transformer (12
pre-LN layers, width 768, 12 heads, causal self-attention, quick-GELU), after the final layer
norm: (B, 77, 768) for 77 tokens from minibldm.tokenizer. No pooling and no projection are used,
and no attention mask: padding tokens are encoded like the rest, as SD's FrozenCLIPEmbedder does.

Module names equal the keys of the CompVis checkpoints under `cond_stage_model.transformer.`
(the Hugging Face CLIPTextModel layout of transformers 4.x, as published with openai/clip-vit-
large-patch14), so those weights load after a prefix strip.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import attention
from .config import TextConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        width = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); token t attends to tokens 0..t."""
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class TextEncoder(nn.Module):
    """Token ids (B, T) -> last hidden state (B, T, hidden_size), T <= max_position_embeddings."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.hidden_size
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(cfg.vocab_size, width),
                position_embedding=nn.Embedding(cfg.max_position_embeddings, width),
            )),
            encoder=nn.ModuleDict(dict(
                layers=nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)),
            )),
            final_layer_norm=nn.LayerNorm(width, eps=cfg.layer_norm_eps),
        ))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        emb = self.text_model.embeddings
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)  # (T,)
        x = emb.token_embedding(token_ids) + emb.position_embedding(positions)  # (B, T, C)
        for layer in self.text_model.encoder.layers:
            x = layer(x)
        return self.text_model.final_layer_norm(x)
