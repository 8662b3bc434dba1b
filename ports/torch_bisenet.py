"""PyTorch reference BiSeNet (zllrunning/face-parsing.PyTorch ``model.py`` + ``resnet.py``), written
for the parity checks: same module names, so ``state_dict()`` keys equal those of ``79999_iter.pth``,
with width/depth knobs for tiny variants (:func:`from_config` maps a ``BiSeNetConfig`` onto them) and
no torchvision download at construction. NCHW input; returns the main and the two aux heads."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNReLU(nn.Module):
    def __init__(self, cin, cout, ks=3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, 1, ks // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class Resnet18(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, (w, b) in enumerate(zip(widths, blocks)):
            layers = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(b - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            cin = w

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        atten = F.avg_pool2d(feat, feat.size()[2:])
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(atten)))


class ContextPath(nn.Module):
    def __init__(self, widths, blocks, ctx):
        super().__init__()
        self.resnet = Resnet18(widths, blocks)
        self.arm16 = AttentionRefinementModule(widths[2], ctx)
        self.arm32 = AttentionRefinementModule(widths[3], ctx)
        self.conv_head32 = ConvBNReLU(ctx, ctx, 3)
        self.conv_head16 = ConvBNReLU(ctx, ctx, 3)
        self.conv_avg = ConvBNReLU(widths[3], ctx, 1)

    def forward(self, x):
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.avg_pool2d(feat32, feat32.size()[2:]))
        avg_up = F.interpolate(avg, feat32.size()[2:], mode="nearest")
        feat32_up = F.interpolate(self.arm32(feat32) + avg_up, feat16.size()[2:], mode="nearest")
        feat32_up = self.conv_head32(feat32_up)
        feat16_up = F.interpolate(self.arm16(feat16) + feat32_up, feat8.size()[2:], mode="nearest")
        feat16_up = self.conv_head16(feat16_up)
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, 1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = F.avg_pool2d(feat, feat.size()[2:])
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(atten))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, cin, cmid, n_classes):
        super().__init__()
        self.conv = ConvBNReLU(cin, cmid, 3)
        self.conv_out = nn.Conv2d(cmid, n_classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    def __init__(self, n_classes=19, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), ctx=128, fuse=256, aux_mid=64):
        super().__init__()
        self.cp = ContextPath(widths, blocks, ctx)
        self.ffm = FeatureFusionModule(widths[1] + ctx, fuse)
        self.conv_out = BiSeNetOutput(fuse, fuse, n_classes)
        self.conv_out16 = BiSeNetOutput(ctx, aux_mid, n_classes)
        self.conv_out32 = BiSeNetOutput(ctx, aux_mid, n_classes)

    def forward(self, x):
        size = x.size()[2:]
        feat_res8, feat_cp8, feat_cp16 = self.cp(x)
        heads = (self.conv_out(self.ffm(feat_res8, feat_cp8)), self.conv_out16(feat_cp8), self.conv_out32(feat_cp16))
        return tuple(F.interpolate(h, size, mode="bilinear", align_corners=True) for h in heads)


def from_config(config):
    """The network of a ``BiSeNetConfig`` (any object with its fields), eval mode."""
    return BiSeNet(n_classes=config.n_classes, widths=config.resnet_widths, blocks=config.resnet_blocks,
                   ctx=config.context_channels, fuse=config.fuse_channels, aux_mid=config.aux_mid_channels).eval()
