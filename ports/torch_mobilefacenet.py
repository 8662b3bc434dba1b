"""PyTorch reference of cunjian/pytorch_face_landmark's ``MobileFaceNet([112, 112], 136)`` (GDC head),
as FreeDoM's Face-GD/functions/landmark uses it (written from its layer list; module names give the
state-dict keys of ``mobilefacenet_model_best.pth.tar``). NCHW input in [0, 1]; returns
``(landmarks, conv_features)`` like the original. :func:`from_config` builds the network a
``MobileFaceNetConfig`` describes."""
from torch import nn


class ConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=1, stride=1, padding=0, groups=1, prelu=True, eps=1e-5):
        super().__init__()
        self.conv = nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_c, eps=eps)
        if prelu:
            self.prelu = nn.PReLU(out_c)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.prelu(x) if hasattr(self, "prelu") else x


class DepthWise(nn.Module):
    def __init__(self, in_c, out_c, groups, stride=2, residual=False, eps=1e-5):
        super().__init__()
        self.conv = ConvBlock(in_c, groups, eps=eps)
        self.conv_dw = ConvBlock(groups, groups, 3, stride, 1, groups=groups, eps=eps)
        self.project = ConvBlock(groups, out_c, prelu=False, eps=eps)
        self.residual = residual

    def forward(self, x):
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class Residual(nn.Module):
    def __init__(self, c, num_block, groups, eps=1e-5):
        super().__init__()
        self.model = nn.Sequential(*[DepthWise(c, c, groups, stride=1, residual=True, eps=eps)
                                     for _ in range(num_block)])

    def forward(self, x):
        return self.model(x)


class GDC(nn.Module):
    def __init__(self, channels, kernel, num_outputs, eps=1e-5):
        super().__init__()
        self.conv_6_dw = ConvBlock(channels, channels, kernel, groups=channels, prelu=False, eps=eps)
        self.conv_6_flatten = nn.Flatten()
        self.linear = nn.Linear(channels, num_outputs, bias=False)
        self.bn = nn.BatchNorm1d(num_outputs, eps=eps)

    def forward(self, x):
        return self.bn(self.linear(self.conv_6_flatten(self.conv_6_dw(x))))


class TorchMobileFaceNet(nn.Module):
    def __init__(self, input_size=112, widths=(64, 128, 512), expansions=(128, 128, 256, 256, 512, 256),
                 residual_units=(4, 6, 2), num_outputs=136, bn_eps=1e-5):
        super().__init__()
        stem, middle, top = widths
        e23, e3, e34, e4, e45, e5 = expansions
        n3, n4, n5 = residual_units
        self.conv1 = ConvBlock(3, stem, 3, 2, 1, eps=bn_eps)
        self.conv2_dw = ConvBlock(stem, stem, 3, 1, 1, groups=stem, eps=bn_eps)
        self.conv_23 = DepthWise(stem, stem, e23, eps=bn_eps)
        self.conv_3 = Residual(stem, n3, e3, eps=bn_eps)
        self.conv_34 = DepthWise(stem, middle, e34, eps=bn_eps)
        self.conv_4 = Residual(middle, n4, e4, eps=bn_eps)
        self.conv_45 = DepthWise(middle, middle, e45, eps=bn_eps)
        self.conv_5 = Residual(middle, n5, e5, eps=bn_eps)
        self.conv_6_sep = ConvBlock(middle, top, eps=bn_eps)
        self.output_layer = GDC(top, input_size // 16, num_outputs, eps=bn_eps)

    def forward(self, x):
        for layer in (self.conv1, self.conv2_dw, self.conv_23, self.conv_3, self.conv_34, self.conv_4, self.conv_45,
                      self.conv_5):
            x = layer(x)
        features = self.conv_6_sep(x)
        return self.output_layer(features), features


def from_config(config):
    """The network of a ``MobileFaceNetConfig`` (any object with its fields), eval mode."""
    return TorchMobileFaceNet(input_size=config.input_size, widths=config.widths, expansions=config.expansions,
                              residual_units=config.residual_units, num_outputs=config.num_outputs,
                              bn_eps=config.bn_eps).eval()
