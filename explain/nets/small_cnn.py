"""The built-in classifier for small images (28 x 28 Fashion-MNIST): features f on a 7 x 7 grid, decision g.

The 7 x 7 grid gives the embedded default the cell geometry of the papers (VGG-16 and ResNet-50 at 224 px).
"""

from torch import Tensor, nn

from explain.nets.split import SplitClassifier


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv x2, pool, conv x2, pool, conv -> ``width * 2`` x 7 x 7 features; global average pool + linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 64, dropout: float = 0.2):
        super().__init__()
        self.num_classes, self.in_channels, self.width, self.dropout = (
            num_classes,
            in_channels,
            width,
            dropout,
        )
        half = width // 2
        self.features = nn.Sequential(
            *_conv(in_channels, half),
            *_conv(half, half),
            nn.MaxPool2d(2),
            *_conv(half, width),
            *_conv(width, width),
            nn.MaxPool2d(2),
            *_conv(width, 2 * width),
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def split(self) -> SplitClassifier:
        """f = the convolutional features (the 7 x 7 grid at 28 px), g = pooling and the linear layer."""
        return SplitClassifier(f=self.features, g=self.classifier)
