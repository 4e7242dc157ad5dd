"""An LM with a non-standard block: a tiny mixture of experts with top-k routing, and a
causal depthwise-convolution token mixer instead of attention (state-space style)."""

import torch
from torch import nn


class TopKMoE(nn.Module):
    def __init__(self, dim, experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, dim, 2 * dim) * dim ** -0.5)
        self.down = nn.Parameter(torch.randn(experts, 2 * dim, dim) * (2 * dim) ** -0.5)

    def forward(self, x):
        weights, chosen = self.router(x).topk(self.top_k, dim=-1)
        gates = torch.zeros(*x.shape[:-1], self.up.shape[0], dtype=x.dtype)
        gates = gates.scatter(-1, chosen, weights.softmax(-1))
        # every expert computed, gated by its routing weight (0 for experts not chosen):
        # a dense form with no data-dependent shapes, so it traces
        hidden = torch.einsum("btd,edh->bteh", x, self.up).relu()
        out = torch.einsum("bteh,ehd->bted", hidden, self.down)
        return (out * gates[..., None]).sum(-2)


class ConvMixer(nn.Module):
    def __init__(self, dim, width):
        super().__init__()
        self.width = width
        self.conv = nn.Conv1d(dim, dim, width, groups=dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, x):
        padded = nn.functional.pad(x.transpose(1, 2), (self.width - 1, 0))
        return self.conv(padded).transpose(1, 2) * torch.sigmoid(self.gate(x))


class TinyMoELM(nn.Module):
    def __init__(self, vocab_size=80, max_seq_len=48, dim=24, experts=4, top_k=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.mixers = nn.ModuleList(ConvMixer(dim, 4) for _ in range(layers))
        self.moes = nn.ModuleList(TopKMoE(dim, experts, top_k) for _ in range(layers))
        self.norms = nn.ModuleList(nn.RMSNorm(dim) for _ in range(2 * layers))
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for i, (mixer, moe) in enumerate(zip(self.mixers, self.moes)):
            x = x + mixer(self.norms[2 * i](x))
            x = x + moe(self.norms[2 * i + 1](x))
        return self.out(x)
