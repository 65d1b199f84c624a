"""Hand-built models with planted unit detectors for dissection tests (loaded as ``python:`` specs).

``detector`` maps raw ``[0, 1]`` RGB (mean 0, std 1 preprocessing) to four units at full
resolution, followed by a linear head:

* unit 0 — exactly the concept world's "red" object pixels (R − 1.5·max(G, B) > 0.1), as 0/1;
* unit 1 — constant 0 (dead);
* unit 2 — 1 on every pixel of a "sky" scene image (≥ 40 % of pixels sky-blue), else 0;
* unit 3 — the red indicator plus a small ramp, so quantile thresholds have something to rank.
"""

import torch
from torch import nn


class _Detectors(nn.Module):
    def forward(self, x):
        r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
        red = (r - 1.5 * torch.maximum(g, b) > 0.1).float()
        sky_px = ((b > 0.8) & (g > 0.55) & (r < 0.8)).float()
        sky = (sky_px.mean(dim=(2, 3), keepdim=True) > 0.4).float().expand_as(red)
        return torch.cat([red, torch.zeros_like(red), sky, red * (1 + r)], dim=1)


class Planted(nn.Module):
    def __init__(self):
        super().__init__()
        self.detector = _Detectors()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.detector(x).mean(dim=(2, 3)))


def planted():
    torch.manual_seed(0)
    return Planted()
