from __future__ import annotations

import torch
from torch import nn


class ConceptModel(nn.Module):
    """features (B, C, H, W) -> embedding (B, D) -> dropout -> head -> logits (B, K)."""

    def __init__(self, body: nn.Module, embed_dim: int, num_concepts: int, dropout: float) -> None:
        super().__init__()
        self.body = body  # image -> (B, D) penultimate activations
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_concepts)
        self.embed_dim = embed_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))  # (B, K)

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embedding) from one pass: indexing and serving need both."""
        e = self.body(x)
        return self.head(self.dropout(e)), e
