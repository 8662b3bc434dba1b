"""PyTorch reference of the ermongroup/ddim ``Model`` UNet (SDEdit's CelebA-HQ DDPM), written for the
parity checks: its ``state_dict`` keys are those of the published checkpoint (``temb.dense.0``,
``down.{i}.block.{j}.norm1``, ``mid.attn_1.q``, ``up.{i}.upsample.conv``, ...). Images are NCHW.
:func:`from_config` builds the network a ``DDPMUNetConfig`` describes."""
import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, temb_ch, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb):
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_proj(swish(temb))[:, :, None, None]
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c, groups, eps):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=eps)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)          # b, hw, c
        k = self.k(h).flatten(2)                          # b, c, hw
        v = self.v(h).flatten(2)                          # b, c, hw
        w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # b, hw(q), hw(k)
        h = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c, with_conv):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, 2)


class Upsample(nn.Module):
    def __init__(self, c, with_conv):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Model(nn.Module):
    """Built from a ``DDPMUNetConfig`` (any object with the same fields)."""

    def __init__(self, config):
        super().__init__()
        ch, mult, nres = config.ch, tuple(config.ch_mult), config.num_res_blocks
        groups, eps = config.norm_groups, config.norm_eps
        self.config = config
        temb_ch = 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        res = config.resolution
        in_mult = (1,) + mult
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cin = ch * in_mult[i]
            for _ in range(nres):
                level.block.append(ResnetBlock(cin, ch * m, temb_ch, groups, eps))
                cin = ch * m
                if res in config.attn_resolutions:
                    level.attn.append(AttnBlock(cin, groups, eps))
            if i != len(mult) - 1:
                level.downsample = Downsample(cin, config.resamp_with_conv)
                res //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, temb_ch, groups, eps)
        self.mid.attn_1 = AttnBlock(cin, groups, eps)
        self.mid.block_2 = ResnetBlock(cin, cin, temb_ch, groups, eps)

        ups = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for j in range(nres + 1):
                skip = ch * (in_mult[i] if j == nres else mult[i])
                level.block.append(ResnetBlock(cin + skip, ch * mult[i], temb_ch, groups, eps))
                cin = ch * mult[i]
                if res in config.attn_resolutions:
                    level.attn.append(AttnBlock(cin, groups, eps))
            if i != 0:
                level.upsample = Upsample(cin, config.resamp_with_conv)
                res *= 2
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)

        self.norm_out = nn.GroupNorm(groups, cin, eps=eps)
        self.conv_out = nn.Conv2d(cin, config.out_ch, 3, padding=1)

    def forward(self, x, t):
        temb = self.temb.dense[1](swish(self.temb.dense[0](timestep_embedding(t, self.config.ch))))
        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def from_config(config):
    """The network of a ``DDPMUNetConfig`` (any object with its fields), eval mode."""
    return Model(config).eval()
