"""PyTorch reference of TreB1eN/InsightFace_Pytorch's ``Backbone(num_layers, drop_ratio, mode='ir_se')``
(written from its layer list; module names give the state-dict keys of ``model_ir_se50.pth``).
NCHW input, already cropped to 112x112; returns unit-norm embeddings. :func:`from_config` builds the
network an ``ArcFaceConfig`` describes."""
import torch
from torch import nn

STAGE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}


class SEModule(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    def __init__(self, in_channel, depth, stride, reduction=16, eps=1e-5):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth, eps=eps))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel, eps=eps), nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth, eps=eps),
            SEModule(depth, reduction))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class TorchArcFace(nn.Module):
    def __init__(self, num_layers=50, stage_units=None, widths=(64, 128, 256, 512), input_size=112,
                 embedding_size=512, drop_ratio=0.6, se_reduction=16, bn_eps=1e-5):
        super().__init__()
        units = stage_units or STAGE_UNITS[num_layers]
        self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(widths[0], eps=bn_eps), nn.PReLU(widths[0]))
        body, in_channel = [], widths[0]
        for depth, n in zip(widths, units):
            for i in range(n):
                body.append(BottleneckIRSE(in_channel, depth, 2 if i == 0 else 1, se_reduction, bn_eps))
                in_channel = depth
        self.body = nn.Sequential(*body)
        side = input_size
        for _ in widths:
            side = (side + 1) // 2
        self.output_layer = nn.Sequential(nn.BatchNorm2d(widths[-1], eps=bn_eps), nn.Dropout(drop_ratio),
                                          nn.Flatten(), nn.Linear(widths[-1] * side * side, embedding_size),
                                          nn.BatchNorm1d(embedding_size, eps=bn_eps))

    def forward(self, x):
        x = self.output_layer(self.body(self.input_layer(x)))
        return x / torch.norm(x, 2, 1, True)


def from_config(config):
    """The network of an ``ArcFaceConfig`` (any object with its fields), eval mode."""
    return TorchArcFace(stage_units=config.units, widths=config.widths, input_size=config.input_size,
                        embedding_size=config.embedding_size, se_reduction=config.se_reduction,
                        bn_eps=config.bn_eps).eval()
