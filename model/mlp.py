import torch
import torch.nn.functional as F
from torch import nn

from .linear import linear


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): w2(silu(w1 x) * w3 x). Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = linear(dim, inter_dim, "w1")
        self.w2 = linear(inter_dim, dim, "w2")
        self.w3 = linear(dim, inter_dim, "w3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
