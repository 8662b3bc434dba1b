"""PyTorch reference of facenet-pytorch's MTCNN ONet (written from its layer list; state-dict keys are
those of facenet_pytorch/data/onet.pt). NCHW input, already cropped to 48x48 and normalised.
:func:`from_config` builds the network an ``ONetConfig`` describes."""
import math

import torch
from torch import nn


class TorchONet(nn.Module):
    def __init__(self, widths=(32, 64, 64, 128), hidden=256, feature_size=3):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.conv1, self.prelu1 = nn.Conv2d(3, c1, 3), nn.PReLU(c1)
        self.conv2, self.prelu2 = nn.Conv2d(c1, c2, 3), nn.PReLU(c2)
        self.conv3, self.prelu3 = nn.Conv2d(c2, c3, 3), nn.PReLU(c3)
        self.conv4, self.prelu4 = nn.Conv2d(c3, c4, 2), nn.PReLU(c4)
        self.dense5, self.prelu5 = nn.Linear(c4 * feature_size ** 2, hidden), nn.PReLU(hidden)
        self.dense6_1 = nn.Linear(hidden, 2)
        self.dense6_2 = nn.Linear(hidden, 4)
        self.dense6_3 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = nn.functional.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = nn.functional.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous().flatten(1)
        x = self.prelu5(self.dense5(x))
        return {"prob": torch.softmax(self.dense6_1(x), dim=1), "box": self.dense6_2(x),
                "landmarks": self.dense6_3(x)}


def feature_size(input_size):
    """Side of conv4's output for a square input: convs 3, 3, 3, 2 (no padding), max-pools 3/2, 3/2, 2/2
    in ceil mode after the first three (26 -> 1, 48 -> 3)."""
    side = input_size
    for kernel, pool in ((3, (3, 2)), (3, (3, 2)), (3, (2, 2)), (2, None)):
        side -= kernel - 1
        if pool is not None:
            side = math.ceil((side - pool[0]) / pool[1]) + 1
    return side


def from_config(config):
    """The network of an ``ONetConfig`` (any object with its fields), eval mode."""
    return TorchONet(tuple(config.widths), config.hidden, feature_size(config.input_size)).eval()
