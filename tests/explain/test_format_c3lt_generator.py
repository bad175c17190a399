"""The C3LT generator format: a generator and encoder pair (TorchScript, or state dicts of C3LT's DCGAN) with
a declared latent shape, loaded as the autoencoder C3LT maps through, checked against the networks it was
written from, run through C3LT, and refused when broken."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from explain.methods.c3lt import C3LT
from explain.nets.autoencoder import decode, encode
from explain.nets.c3lt_maps import C3LTMaps, LatentMap, apply_n
from explain.nets.formats.c3lt_generator import load_generator_pair
from explain.nets.formats.common import FormatError

from .gen_fixtures import one_thread, tiny_classifier  # noqa: F401

LATENT = 8


def released_dcgan(seed: int) -> tuple[nn.Module, nn.Module]:
    """C3LT's models/gans/dcgan.py Generator and models/encoders/encoder_dcgan.py EncoderDCGAN, as released
    (ngf = ndf = 4 here), with random weights and batch-norm statistics."""
    torch.manual_seed(seed)
    ngf = ndf = 4
    generator = nn.Sequential(
        nn.ConvTranspose2d(LATENT, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, 1, kernel_size=1, stride=1, padding=2, bias=False), nn.Tanh(),
    )  # fmt: skip
    encoder = nn.Sequential(
        nn.Conv2d(1, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, LATENT, 4, 2, 1, bias=False), nn.BatchNorm2d(LATENT),
    )  # fmt: skip
    for net in (generator, encoder):
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
    return generator.eval(), encoder.eval()


class Wrapped(nn.Module):  # the released classes keep the Sequential as ``main``
    def __init__(self, main: nn.Module):
        super().__init__()
        self.main = main

    def forward(self, x):
        return self.main(x)


def write_pair(tmp_path, kind: str, seed: int = 0, **manifest) -> tuple[nn.Module, nn.Module]:
    generator, encoder = released_dcgan(seed)
    g, e = Wrapped(generator).eval(), Wrapped(encoder).eval()
    if kind == "torchscript":
        torch.jit.save(torch.jit.trace(g, torch.randn(2, LATENT, 1, 1)), tmp_path / "netG.pt")
        torch.jit.save(torch.jit.trace(e, torch.randn(2, 1, 28, 28)), tmp_path / "encoder.pt")
    else:
        torch.save(g.state_dict(), tmp_path / "netG.pt")
        torch.save(e.state_dict(), tmp_path / "encoder.pt")
    declared = {
        "format": kind,
        "generator": "netG.pt",
        "encoder": "encoder.pt",
        "latent_shape": [LATENT, 1, 1],
        "image_channels": 1,
        "image_size": 28,
        "image_range": [-1, 1],
    }
    (tmp_path / "generator.json").write_text(json.dumps(declared | manifest))
    return g, e


@pytest.mark.parametrize("kind", ["torchscript", "dcgan-state-dict"])
def test_pair_equals_the_networks_it_was_saved_from(tmp_path, kind):
    g, e = write_pair(tmp_path, kind)
    pair = load_generator_pair(tmp_path)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = encode(pair, x)  # images in [0, 1], the pair sees [-1, 1]
        torch.testing.assert_close(z, e(2 * x - 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decode(pair, z, 1), (g(z) + 1) / 2, rtol=1e-5, atol=1e-5)
    assert pair.config.latent_channels == LATENT and pair.config.image_range == [-1.0, 1.0]


def test_c3lt_runs_on_the_pair(tmp_path):
    g, e = write_pair(tmp_path, "dcgan-state-dict")
    pair = load_generator_pair(tmp_path)
    torch.manual_seed(3)
    forward, backward = LatentMap(LATENT), LatentMap(LATENT)  # the release's maps on its (D, 1, 1) codes
    maps = C3LTMaps(g=forward.eval(), h=backward.eval(), class_a=0, class_b=1)
    method = C3LT(autoencoder=pair, maps=maps)
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    first = method.explain(tiny_classifier(), x, 1, generator=torch.Generator().manual_seed(5))
    again = method.explain(tiny_classifier(), x, 1, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():  # Eq. (1): x' = G(g(E(x))), in [0, 1]
        expected = (g(apply_n(forward, e(2 * x - 1), 1)) + 1) / 2
    assert first.image.shape == (1, 28, 28)
    np.testing.assert_array_equal(first.image, again.image)  # one forward pass: no randomness
    np.testing.assert_allclose(first.image, expected[0].numpy(), rtol=1e-5, atol=1e-5)


def test_refuses_a_missing_manifest(tmp_path):
    write_pair(tmp_path, "torchscript")
    (tmp_path / "generator.json").unlink()
    with pytest.raises(FormatError, match="no generator.json.*latent_shape"):
        load_generator_pair(tmp_path)


@pytest.mark.parametrize("kind", ["torchscript", "dcgan-state-dict"])
def test_refuses_a_truncated_file(tmp_path, kind):
    write_pair(tmp_path, kind)
    data = (tmp_path / "netG.pt").read_bytes()
    (tmp_path / "netG.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated"):
        load_generator_pair(tmp_path)


def test_refuses_wrong_channels(tmp_path):
    write_pair(tmp_path, "dcgan-state-dict", image_channels=3)
    with pytest.raises(FormatError, match="does not take 3-channel 28 x 28 images"):
        load_generator_pair(tmp_path)


def test_refuses_a_wrong_latent_shape(tmp_path):
    write_pair(tmp_path, "torchscript", latent_shape=[16, 1, 1])
    with pytest.raises(FormatError, match=r"gives \(8, 1, 1\) codes but generator.json declares"):
        load_generator_pair(tmp_path)
