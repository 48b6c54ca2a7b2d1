"""MINT heads: read a list of taps, return one membership logit per sample ([B]).

Heads are sized at construction from the taps' channel counts (no lazy modules, so DeepSpeed
ZeRO-3 sees every parameter at init) and are resolution independent (global pooling).
"""

from collections.abc import Sequence

import torch
from timm.layers import ConvNormAct, Mlp, SelectAdaptivePool2d
from torch import Tensor, nn


def _classifier(in_features: int, hidden: int, dropout: float) -> Mlp:
    """Linear -> ReLU -> Dropout -> Linear(1)."""
    return Mlp(in_features, hidden, 1, act_layer=nn.ReLU, drop=(dropout, 0.0))


class _CellPool(nn.AdaptiveAvgPool2d):
    """``AdaptiveAvgPool2d(grid)`` that returns a map already of the grid's size as is.

    Pooling a g x g map to g x g cells averages one value per cell: the identity, bit for bit, yet
    PyTorch's CPU kernel costs as much as the head's convolution (the default digits head: 4x4 tokens,
    grid 4; see docs/performance.md). Same output and gradient, no parameters either way.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] == nn.modules.utils._pair(self.output_size):
            return x
        return super().forward(x)


class ConvHead(nn.Module):
    """The aMINT paper's CNN head: per tap 3x3 conv-BN-ReLU -> avg pool; concat -> MLP.

    ``grid=1`` is the paper's global pooling; ``grid=g`` average-pools each map to g x g cells and
    flattens them, keeping *where* features are (membership of an exact image is spatial detail).
    """

    input_fmt = "NCHW"

    def __init__(self, in_chs: Sequence[int], channels: int = 64, hidden: int = 256, dropout: float = 0.2,
                 grid: int = 1):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(ConvNormAct(c, channels, 3), _CellPool(grid), nn.Flatten(1)) for c in in_chs
        )
        self.classifier = _classifier(channels * grid * grid * len(in_chs), hidden, dropout)

    def forward(self, taps: list[Tensor]) -> Tensor:
        feats = [branch(t) for branch, t in zip(self.branches, taps, strict=True)]
        return self.classifier(torch.cat(feats, dim=1)).squeeze(1)


class MlpHead(nn.Module):
    """Original MINT head: per tap per-channel global max; concat -> MLP."""

    input_fmt = "NCHW"

    def __init__(self, in_chs: Sequence[int], hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.pool = SelectAdaptivePool2d(pool_type="max", flatten=True)
        self.classifier = _classifier(sum(in_chs), hidden, dropout)

    def forward(self, taps: list[Tensor]) -> Tensor:
        return self.classifier(torch.cat([self.pool(t) for t in taps], dim=1)).squeeze(1)


class TokenHead(nn.Module):
    """ViT head: per tap [B, N, C] tokens (the first `num_prefix_tokens` being cls/register tokens)
    -> mean of patch tokens, concat prefix tokens, LayerNorm; concat across taps -> MLP.
    NCHW maps (CNNs) are read as H*W tokens without prefix."""

    input_fmt = "NLC"

    def __init__(self, in_chs: Sequence[int], num_prefix_tokens: int = 0, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.norms = nn.ModuleList(nn.LayerNorm(c * (1 + num_prefix_tokens)) for c in in_chs)
        self.classifier = _classifier(sum(n.normalized_shape[0] for n in self.norms), hidden, dropout)

    def _pool(self, tokens: Tensor) -> Tensor:
        if tokens.ndim == 4:
            tokens = tokens.flatten(2).transpose(1, 2)
        p = self.num_prefix_tokens
        return torch.cat([tokens[:, p:].mean(dim=1), tokens[:, :p].flatten(1)], dim=1)

    def forward(self, taps: list[Tensor]) -> Tensor:
        feats = [norm(self._pool(t)) for norm, t in zip(self.norms, taps, strict=True)]
        return self.classifier(torch.cat(feats, dim=1)).squeeze(1)


HEAD_KINDS = ("conv", "mlp", "token")


def build_head(
    kind: str,
    in_chs: Sequence[int],
    *,
    num_prefix_tokens: int = 0,
    hidden: int = 256,
    channels: int = 64,
    dropout: float = 0.2,
    grid: int = 1,
) -> nn.Module:
    """MINT head of `kind` for taps with channel counts `in_chs` (``grid`` applies to the conv head)."""
    if kind == "conv":
        return ConvHead(in_chs, channels=channels, hidden=hidden, dropout=dropout, grid=grid)
    if kind == "mlp":
        return MlpHead(in_chs, hidden=hidden, dropout=dropout)
    if kind == "token":
        return TokenHead(in_chs, num_prefix_tokens=num_prefix_tokens, hidden=hidden, dropout=dropout)
    raise ValueError(f"unknown MINT head kind {kind!r}; valid kinds: {', '.join(HEAD_KINDS)}")
