"""A non-LM like the motion model of issue 13: poses [batch, frames, 20] (float), a text
embedding [batch, 1024] (float), action ids [batch, frames] (int) → poses [batch, frames, 20]."""

import torch
from torch import nn


class StickFigureTransformer(nn.Module):
    def __init__(self, pose_dim=20, text_dim=1024, actions=12, dim=32, heads=4, layers=2, max_frames=40):
        super().__init__()
        self.pose_in = nn.Linear(pose_dim, dim)
        self.text_in = nn.Linear(text_dim, dim)
        self.action = nn.Embedding(actions, dim)
        self.frame = nn.Embedding(max_frames, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pose_out = nn.Linear(dim, pose_dim)

    def forward(self, poses, text, actions):
        frames = torch.arange(poses.shape[1])
        x = self.pose_in(poses) + self.action(actions) + self.frame(frames)[None] + self.text_in(text)[:, None]
        return poses + self.pose_out(self.encoder(x))
