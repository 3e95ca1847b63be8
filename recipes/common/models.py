r"""Image-classification models shared by the recipes (and their checkpoint analysis).

* ``cifar_resnet20/32/38/56`` (any ``cifar_resnet<6n+2>``): the CIFAR ResNets of He, Zhang, Ren &
  Sun (CVPR 2016, section 4.2): a 3x3 convolution with 16 channels, three stages of ``n`` basic
  blocks with 16, 32 and 64 channels (the first block of stages 2 and 3 halves the resolution with
  stride 2), global average pooling and one linear layer: ``6n + 2`` weighted layers. Shortcuts are
  **option A** of the paper (identity; where the shape changes, the input is subsampled with stride
  2 and the new channels are zero), so ResNet20 has 0.27M parameters, as in the paper's Table 6.
  Option B (1x1 convolution + BatchNorm projection) is available from :class:`CifarResNet` directly.
* ``digits_cnn``: a two-convolution network (about 5k parameters) for the 8x8 digits demo.
* any other name: ``timm.create_model(name, num_classes=..., in_chans=..., pretrained=False)``.

The switches ``batchnorm`` and ``residual`` build the variants studied by PyHessian (Yao et al.
2020, section 4): without BatchNorm every normalization layer is removed and convolutions get a
bias; without residual connections each block is two plain convolutions (a "plain" network of the
same depth). All models work on 32x32 RGB and on 8x8 grey-scale inputs (``in_chans=1``): the
three stages take 8x8 to 2x2 before the global pooling.

Initialization: convolutions He-normal (fan-in, ReLU gain; He et al. 2015), linear layers PyTorch's
default, BatchNorm weight 1 and bias 0. A residual network **without** BatchNorm doubles the
variance of its signal in every block at that initialization (``x + F(x)`` with ``Var F(x) ~ Var
x``), about ``2^27`` for ResNet56, which makes the initial loss astronomical; following the idea
of Fixup (Zhang, Dauphin & Ma, ICLR 2019) in its simplest form, the second convolution of each
block is then scaled by ``1/sqrt(number of blocks)``, so the variance grows by at most a factor
``(1 + 1/L)^L < e`` over ``L`` blocks. Networks with BatchNorm, and plain networks, are unaffected.
"""
from __future__ import annotations

import math
import re
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["build_model", "CifarResNet", "DigitsCNN", "ZOO_MODELS"]

#: the model names this module builds itself (anything else goes to timm)
ZOO_MODELS = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet38", "cifar_resnet56", "digits_cnn")

_CIFAR_RESNET = re.compile(r"^cifar_resnet(\d+)$")


def _norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


class _ZeroPadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and append ``extra`` zero channels (no parameters)."""

    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (each followed by BatchNorm when enabled) with an optional shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, batchnorm: bool, residual: bool, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn1 = _norm(planes, batchnorm)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=not batchnorm)
        self.bn2 = _norm(planes, batchnorm)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or in_planes != planes):
            if shortcut == "A":
                self.shortcut = _ZeroPadShortcut(planes - in_planes, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=not batchnorm), _norm(planes, batchnorm)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth ``6n + 2`` (see the module docstring).

    Args:
        depth: 20, 32, 38, 56, ... (``depth - 2`` divisible by 6).
        num_classes: output classes.
        in_chans: input channels (3 for RGB, 1 for grey scale).
        batchnorm: keep the BatchNorm layers (``False``: none, convolutions get biases).
        residual: keep the shortcut connections (``False``: a plain network of the same depth).
        shortcut: ``"A"`` (zero-padding identity, the paper's CIFAR choice, default) or ``"B"``
            (1x1 convolution projection where the shape changes).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_chans: int = 3,
        batchnorm: bool = True,
        residual: bool = True,
        shortcut: str = "A",
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 38, 56, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth, self.batchnorm, self.residual, self.shortcut = depth, batchnorm, residual, shortcut
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=not batchnorm)
        self.bn1 = _norm(16, batchnorm)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks: List[nn.Module] = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, batchnorm, residual, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        self._initialize(num_blocks=3 * n)

    def _initialize(self, num_blocks: int) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.residual and not self.batchnorm:
            with torch.no_grad():  # see the module docstring: keep the forward signal bounded
                for m in self.modules():
                    if isinstance(m, BasicBlock):
                        m.conv2.weight.mul_(1.0 / math.sqrt(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class DigitsCNN(nn.Module):
    """A tiny CNN for the 8x8 digits demo: conv 3x3 (16) -> conv 3x3 stride 2 (32) -> pool -> linear."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, batchnorm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=not batchnorm)
        self.bn1 = _norm(16, batchnorm)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=not batchnorm)
        self.bn2 = _norm(32, batchnorm)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    batchnorm: bool = True,
    residual: bool = True,
) -> nn.Module:
    """Build a model by name (see the module docstring for the architectures).

    Args:
        name: ``cifar_resnet20``, ``cifar_resnet32``, ``cifar_resnet38``, ``cifar_resnet56`` (any
            ``cifar_resnet<6n+2>``), ``digits_cnn``, or a timm model name (``resnet18``,
            ``vit_tiny_patch16_224``, ...; needs ``pip install hessopt[timm]``; random init).
        num_classes: number of output classes.
        in_chans: input channels (1 for the digits, 3 for RGB).
        batchnorm: ``False`` removes every BatchNorm layer (CIFAR ResNets and ``digits_cnn``).
        residual: ``False`` removes the shortcut connections (CIFAR ResNets; ``digits_cnn`` has
            none, so it ignores the switch).

    Example:
        >>> model = recipes.common.build_model("cifar_resnet20", num_classes=10)
        >>> plain = recipes.common.build_model("cifar_resnet56", 10, batchnorm=False, residual=False)
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"the model name must be a non-empty string, got {name!r}")
    for arg, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    match = _CIFAR_RESNET.match(name)
    if match:
        return CifarResNet(int(match.group(1)), num_classes, in_chans, batchnorm=batchnorm, residual=residual)
    if name == "digits_cnn":
        return DigitsCNN(num_classes, in_chans, batchnorm=batchnorm)
    return _timm_model(name, num_classes, in_chans, batchnorm, residual)


def _timm_model(name: str, num_classes: int, in_chans: int, batchnorm: bool, residual: bool) -> nn.Module:
    if not (batchnorm and residual):
        raise ValueError(
            f"batchnorm=False / residual=False are available for the zoo's CIFAR ResNets and "
            f"digits_cnn only, not for the timm model {name!r}"
        )
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            f"{name!r} is not one of the recipes' own models ({', '.join(ZOO_MODELS)}), so it would come from "
            "timm, which is not installed: pip install hessopt[timm]"
        ) from err
    try:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, pretrained=False)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"unknown model {name!r}: use one of the zoo's {', '.join(ZOO_MODELS)} or a timm "
                "model name (timm.list_models())"
            ) from err
        raise
