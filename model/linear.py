"""The one Linear factory of the model.

Every projection that may run in a low-precision GEMM is built here, so a precision backend
(the FP8 issue adds te / torch / emulated) changes this file only. Modules kept in high
precision as in DeepSeek-V3 (embedding, output head, router, norms) do not use it.
"""

import torch
from torch import nn


def linear(in_features: int, out_features: int, name: str = "") -> nn.Module:
    """A bias-free projection y = x W^T with W of shape (out_features, in_features).

    `name` is the module's dotted path inside a block (e.g. "attn.wq_b"); backends use it to
    exclude modules by name.
    """
    del name  # only the high-precision backend exists so far
    return nn.Linear(in_features, out_features, bias=False)

