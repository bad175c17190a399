"""Throughput of the generative methods at batch 1 and batch 16, with no data set and no database.

The quality columns live in ``bench_generative.py`` (trained backbones, Fashion-MNIST); this script only times
``explain_batch`` on random inputs, so it runs on a bare GPU machine (``bench/gpu/run.py``). Two model sizes:

- ``embedded``: the embedded default's architectures (28 px grey, the configs ``bench_generative.py`` trains),
  loaded from ``--backbones DIR`` when that folder holds trained ones (``autoencoder/``, ``denoiser/``,
  ``bridge/``, ``sae/``, ``c3lt/``), random weights otherwise;
- ``paper``: random models of the papers' sizes: 256 px RGB, an SD-sized autoencoder (4 x 32 x 32 latents),
  a latent UNet, a pixel-space bridge UNet, and ResNet-50 (224 px features of 2048 x 8 x 8 at 256 px).

Timing does not depend on the weights except through early stopping (SLC stops once the decision flips, which
random models rarely do): the rows say the NFE each batch ran.

    .venv/bin/python bench/bench_generative_speed.py                  # both sizes, CPU (and GPU if present)
    .venv/bin/python bench/bench_generative_speed.py --tiny --device cpu   # seconds: the smoke run in tests
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import DDIMScheduler, UNet2DModel

from explain.methods import registered
from explain.methods.base import SplitClassifier
from explain.methods.c3lt import C3LT
from explain.methods.ldce import LDCE
from explain.methods.rcsb import RCSB
from explain.methods.slc import SLC
from explain.nets.autoencoder import autoencoder_config, encode, load_autoencoder, new_autoencoder
from explain.nets.bridge import BridgeSchedule, InpaintingBridge, bridge_config, load_bridge
from explain.nets.c3lt_maps import C3LTMaps, LatentMap, load_c3lt_maps
from explain.nets.classifiers import build_classifier, split_classifier
from explain.nets.diffusion import LatentDenoiser, denoiser_config, load_denoiser, scheduler_config
from explain.nets.sae import SparseAutoencoder, load_sae
from explain.nets.small_cnn import SmallCNN

METHODS = ("c3lt", "slc", "ldce-cls", "rcsb")
# Few steps for the smoke run (--tiny): the code paths, not the paper's budgets.
TINY_OPTIONS = {
    "slc": {"stage1_steps": 2, "max_steps": 3},
    "ldce-cls": {"num_inference_steps": 8, "start_step": 3},
    "rcsb": {"steps": 3, "ig_steps": 2},
}


def embedded_models(backbones: Path | None, tiny: bool) -> tuple[dict, str]:
    """The embedded default's classifier and backbones: trained from ``backbones`` if there, else random."""
    torch.manual_seed(0)
    width = 16
    classifier = SmallCNN(num_classes=10, width=width).eval()
    if backbones is not None and (backbones / "autoencoder").is_dir():
        nets = {
            "vae": load_autoencoder(backbones / "autoencoder"),
            "denoiser": load_denoiser(backbones / "denoiser"),
            "bridge": load_bridge(backbones / "bridge"),
            "sae": load_sae(backbones / "sae"),
            "maps": load_c3lt_maps(backbones / "c3lt"),
        }
        if (backbones / "classifier.pt").is_file():
            state = torch.load(backbones / "classifier.pt", map_location="cpu", weights_only=True)
            classifier.load_state_dict(state)
        return {"split": classifier.split(), "shape": (1, 28, 28), **nets}, f"trained ({backbones})"
    blocks = (8, 16) if tiny else (16, 32)
    nets = random_backbones(
        autoencoder=autoencoder_config(1, 4, blocks, 28, norm_num_groups=8),
        denoiser=denoiser_config(10, 4, 14, (16, 32) if tiny else (32, 64), norm_num_groups=16),
        bridge=bridge_config(1, 28, blocks, norm_num_groups=8),
        d_features=2 * width,
        shape=(1, 28, 28),
    )
    return {"split": classifier.split(), "shape": (1, 28, 28), **nets}, "random weights"


def paper_models() -> tuple[dict, str]:
    """Random models of the papers' sizes at 256 px (see the module docstring)."""
    torch.manual_seed(0)
    resnet = build_classifier("resnet50", 200).eval()
    nets = random_backbones(
        autoencoder=autoencoder_config(3, 4, (128, 256, 512, 512), 256, norm_num_groups=32),
        denoiser=denoiser_config(200, 4, 32, (224, 448, 672, 896), norm_num_groups=32),
        bridge=bridge_config(3, 256, (128, 128, 256, 256, 512, 512), norm_num_groups=32),
        d_features=2048,
        shape=(3, 256, 256),
    )
    return {"split": split_classifier(resnet, "resnet50"), "shape": (3, 256, 256), **nets}, "random weights"


def random_backbones(
    *, autoencoder: dict, denoiser: dict, bridge: dict, d_features: int, shape: tuple[int, int, int]
) -> dict:
    vae = new_autoencoder(autoencoder).eval()
    with torch.no_grad():  # C3LT's maps act on the flattened latent code (the release's 2-layer maps)
        latent_dim = encode(vae, torch.zeros(1, *shape)).numel()
    unet = UNet2DModel(**denoiser).eval()
    return {
        "vae": vae,
        "denoiser": LatentDenoiser(unet=unet, scheduler=DDIMScheduler(**scheduler_config())),
        "bridge": InpaintingBridge(unet=UNet2DModel(**bridge).eval(), schedule=BridgeSchedule()),
        "sae": SparseAutoencoder(d_in=d_features).eval(),
        "maps": C3LTMaps(
            g=LatentMap(latent_dim).eval(), h=LatentMap(latent_dim).eval(), class_a=0, class_b=1
        ),
    }


def runnable(name: str, nets: dict) -> str:
    """The registered name that runs on these images: the release's 16-pixel RCSB cells do not tile 28-pixel
    images (``rcsb`` refuses them), so the embedded size runs the variant ``rcsb-28px``."""
    return "rcsb-28px" if name == "rcsb" and nets["shape"][-1] % 16 else name


def build(name: str, nets: dict, tiny: bool):
    entry = registered(name)  # a variant runs with its registered config under the tiny options
    options = {**entry.config(), **(TINY_OPTIONS.get(entry.method, {}) if tiny else {})}
    if name == "c3lt":
        return C3LT(autoencoder=nets["vae"], maps=nets["maps"])
    if name == "slc":
        return SLC(autoencoder=nets["vae"], sae=nets["sae"], **options)
    if name == "ldce-cls":
        return LDCE(autoencoder=nets["vae"], denoiser=nets["denoiser"], **options)
    if entry.method == "rcsb":
        return RCSB(bridge=nets["bridge"], **options)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def to_device(nets: dict, device: str) -> dict:
    split = nets["split"]
    nets["split"] = SplitClassifier(f=split.f.to(device), g=split.g.to(device))
    for module in (nets["vae"], nets["denoiser"].unet, nets["bridge"].unet, nets["sae"]):
        module.to(device)
    nets["maps"].g.to(device), nets["maps"].h.to(device)
    return nets


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_batch(method, nets: dict, batch: int, device: str) -> tuple[float, float]:
    """(counterfactuals per second, NFE of the slowest item) for one ``explain_batch`` of ``batch``."""
    generator = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, *nets["shape"], generator=generator).to(device)
    targets = [1] * batch  # class 1: the C3LT maps' class_b
    synchronise(device)
    start = time.perf_counter()
    results = method.explain_batch(nets["split"], x, targets, generator=generator, batch_size=batch)
    synchronise(device)
    seconds = time.perf_counter() - start
    nfe = max(max((v for k, v in r.timings.items() if k.startswith("nfe_")), default=0.0) for r in results)
    return batch / seconds, nfe


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="embedded,paper", help="comma list of embedded, paper")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--backbones", type=Path, default=None, help="trained embedded-default backbones")
    parser.add_argument("--tiny", action="store_true", help="tiny nets and few steps: a smoke run")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip what would overrun this")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    deadline = time.perf_counter() + args.budget_s
    batches = [int(b) for b in args.batches.split(",")]
    lines = [
        f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""),
        "",
        "| models | weights | method | " + " | ".join(f"cf/s @{b}" for b in batches) + " | "
        f"@{batches[-1]} / @{batches[0]} | NFE | note |",
        "|---|---|---|" + "---:|" * (len(batches) + 2) + "---|",
    ]
    print("\n".join(lines), flush=True)
    rows = []
    for size in args.sizes.split(","):
        nets, weights = paper_models() if size == "paper" else embedded_models(args.backbones, args.tiny)
        nets = to_device(nets, args.device)
        for name in args.methods.split(","):
            name = runnable(name, nets)
            method = build(name, nets, args.tiny)
            rates, nfe, note = {}, 0.0, ""
            timed_batch(method, nets, 1, args.device)  # warm-up (kernels, allocator)
            for batch in batches:
                left = deadline - time.perf_counter()
                expected = batch / rates[batches[0]] if rates else 0.0  # at worst batch x the first's time
                if expected > left:
                    note = f"@{batch} skipped: about {expected:.0f} s expected, {max(left, 0):.0f} s left"
                    break
                rates[batch], nfe = timed_batch(method, nets, batch, args.device)
            ratio = rates[batches[-1]] / rates[batches[0]] if len(rates) == len(batches) else float("nan")
            cells = " | ".join(f"{rates[b]:.2f}" if b in rates else "-" for b in batches)
            line = f"| {size} | {weights} | {name} | {cells} | {ratio:.1f}x | {nfe:.0f} | {note} |"
            print(line, flush=True)
            lines.append(line)
            rows.append({"size": size, "method": name, "rates": rates, "nfe": nfe, "note": note})
        del nets
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
