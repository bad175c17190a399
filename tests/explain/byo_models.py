"""Small random models of the real architectures, saved in the formats researchers bring, and a tiny colour
data set with a classifier to register them against (tests of ``backbone_register`` and the methods on them).

Everything is built here from nothing: the tokenizer from a vocabulary and merges file written by the test.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from django.core.files.base import ContentFile
from safetensors.torch import save_file

from explain.models import Classifier, ClassLabel, Dataset, Image
from explain.nets.small_cnn import SmallCNN
from explain.precompute import worker
from tests.explain.precompute_helpers import png

SIZE = 16  # the classifier's input size: every model is checked at it
CLASSES = ["cardinal", "jay", "wren"]


def smooth_images(n: int, generator: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """(n, 3, size, size) smooth colour images in [0, 1] (bilinear upsampling of 4 x 4 noise)."""
    base = torch.rand(n, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False)


def colour_dataset(name: str, directory: Path, per_class: int = 2) -> tuple[Dataset, Classifier]:
    """A 3-class RGB data set of ``SIZE`` px images and a random-weight SmallCNN registered on it."""
    dataset = Dataset.objects.create(
        name=name, kind=Dataset.Kind.IMAGE_FOLDER, root_path=str(directory), image_width=SIZE,
        image_height=SIZE,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(7)
    for index, class_name in enumerate(CLASSES):
        label = ClassLabel.objects.create(dataset=dataset, index=index, name=class_name)
        pixels = (smooth_images(per_class, generator) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for i, array in enumerate(pixels):
            image = Image(dataset=dataset, class_label=label, source_id=f"{class_name}-{i}", split="train")
            image.file.save(
                f"{uuid.uuid4().hex}.png", ContentFile(png(np.ascontiguousarray(array))), save=False
            )
            image.save()
    torch.manual_seed(0)
    checkpoint = directory / f"{name}-cnn.pt"
    torch.save(SmallCNN(num_classes=len(CLASSES), in_channels=3, width=8).state_dict(), checkpoint)
    classifier = Classifier.objects.create(
        dataset=dataset, name=f"{name} cnn", architecture="small_cnn", checkpoint_path=str(checkpoint),
        split_point="features", input_size=SIZE, in_channels=3, options={"width": 8},
    )  # fmt: skip
    return dataset, classifier


def sd_vae(in_channels: int = 3, seed: int = 0):
    """A Stable Diffusion-shaped AutoencoderKL (3 channels in and out, 4 latent channels, factor 4) with no
    image_range in its config, as the released ones; its scaling factor gives its random latents about unit
    variance, as Stable Diffusion's 0.18215 does its own."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=in_channels, out_channels=in_channels, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=SIZE, scaling_factor=3.0,
    ).eval()  # fmt: skip


def trained_vae(image_range: tuple[float, float], steps: int = 120):
    """A tiny AutoencoderKL trained for a few seconds on smooth images given in ``image_range``: it
    reconstructs images in that range far better than in another."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=SIZE,
    )  # fmt: skip
    x = smooth_images(64, generator)
    low, high = image_range
    optimiser = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = x[torch.randint(0, len(x), (16,), generator=generator)] * (high - low) + low
        loss = (vae.decode(vae.encode(batch).latent_dist.mean).sample - batch).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return vae.eval()


def class_unet(num_class_embeds: int, latent_channels: int = 4, latent_size: int = 4):
    """A UNet2DModel latent denoiser with ``num_class_embeds`` class embeddings."""
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    return UNet2DModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()  # fmt: skip


def context_unet(cross_attention_dim: int = 16, latent_size: int = 4):
    """A UNet2DConditionModel that reads its condition through cross-attention (Stable Diffusion's and the
    CompVis class-conditional model's architecture)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    ).eval()  # fmt: skip


def ddim():
    from diffusers import DDIMScheduler

    from explain.nets.diffusion import scheduler_config

    return DDIMScheduler(**scheduler_config())


def save_class_denoiser(directory: Path, num_class_embeds: int) -> Path:
    """``diffusers-unet``: unet/ + scheduler/."""
    class_unet(num_class_embeds).save_pretrained(directory / "unet")
    ddim().save_pretrained(directory / "scheduler")
    return directory


def save_context_denoiser(directory: Path, num_classes: int, width: int = 16) -> Path:
    """``diffusers-unet-conditional``: unet/ + scheduler/ + class_embeddings.safetensors (classes + null)."""
    context_unet(width).save_pretrained(directory / "unet")
    ddim().save_pretrained(directory / "scheduler")
    weight = torch.randn(num_classes + 1, width, generator=torch.Generator().manual_seed(3))
    save_file({"weight": weight}, directory / "class_embeddings.safetensors")
    return directory


def tokenizer(directory: Path, max_length: int = 16):
    """A CLIPTokenizer over lower-case letters, written from a tiny vocabulary and merges file."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz.":
        vocab[char] = len(vocab)
        vocab[f"{char}</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length
    )


def save_stable_diffusion(directory: Path, text_width: int = 16, unet_width: int | None = None) -> Path:
    """A whole StableDiffusionPipeline directory with tiny random parts (``diffusers-stable-diffusion``)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    words = tokenizer(directory.parent / f"{directory.name}-vocab")
    torch.manual_seed(4)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(words.get_vocab()), hidden_size=text_width, intermediate_size=2 * text_width,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=words.model_max_length,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    ).eval()  # fmt: skip
    pipeline = StableDiffusionPipeline(
        vae=sd_vae(), text_encoder=text_encoder, tokenizer=words, unet=context_unet(unet_width or text_width),
        scheduler=ddim(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(directory)
    return directory


# Fixtures of the tests on researchers' own models; a test module imports them to use them.
@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    worker.cache_clear()
    yield
    torch.set_num_threads(threads)
