"""Latent Diffusion Counterfactual Explanations (LDCE; Schrodi, Farid et al. 2024) with consensus guidance.

1. Abduction: encode z_0 = E(x^F) and noise it to the start step with Eq. (2).
2. Counterfactual generation: deterministic DDIM (Eq. 5, sigma_t = 0) guided at every step by the gradient of
lambda_c L(f(D(z0_hat)), y_CF) + lambda_d ||D(z0_hat) - x^F||_1 (Eq. 9) with respect to z_t, where z0_hat is
the one-step prediction of Eq. (4) from the unconditional score.
3. Consensus guidance (Eq. 10, 11): per 1x1 latent patch, the classifier's guidance is zeroed where its angle
to the implicit classifier eps(z_t, c) - eps(z_t) exceeds ``gamma`` degrees.
4. Gradient renormalisation, as the authors' released sampler (``enforce_same_norms=True``, on in every
released config; the paper's lambda values assume it): after the consensus filter, each guidance term
sqrt(1 - alpha_t) grad L is rescaled, per item, to the L2 norm of the implicit classifier eps_c - eps_uc
before it is weighted. The guided score is (Eq. 6)

    eps = eps_uc + eta * (lambda_c * r(consensus(sqrt(1 - a_t) grad L_c))
                          + lambda_d * r(sqrt(1 - a_t) grad L_d))

with r(v) = v / ||v|| * ||eps_c - eps_uc|| (``enforce_same_norms=False``: r is the identity). The distance is
the released one: the L1 sum over pixels of the prediction clamped to the image range.

``consensus=False`` is the plain guidance: with ``gamma=180`` the two are equal. The conditional pass is run
whenever consensus or renormalisation needs it, outside the autograd graph: the implicit classifier takes no
gradient, so both backward passes of a step (classifier, distance) go through the unconditional pass alone
(half the backward work of one graph over both; checked against a plain reference in the tests).
LDCE-cls uses the platform's class-conditional latent denoiser (explain.nets.diffusion); LDCE-txt
(``LDCETxt``) a local Stable Diffusion directory with its CLIP text encoder. NFE: ``start_step`` U-Net steps
(each scoring the unconditional and, when needed, the conditional input) plus as many backward steps.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from explain.methods.base import SplitClassifier
from explain.methods.declaration import AUTOENCODER, DENOISER, MethodDeclaration, Variant
from explain.methods.generative import Generated, GenerativeMethod, frozen
from explain.nets.autoencoder import decode, encode, load_autoencoder
from explain.nets.diffusion import LatentDenoiser, TextToImage, load_denoiser, load_stable_diffusion

LDCE_CLS = MethodDeclaration(
    name="ldce-cls",
    target="explain.methods.ldce:LDCE",
    paper="Schrodi, Farid et al., Latent Diffusion Counterfactual Explanations, 2024 (class-conditional)",
    kind="generative",
    backbones={"autoencoder": AUTOENCODER, "denoiser": DENOISER},
    batch=16,
    variants=(
        Variant(
            name="ldce-cls-fashion-mnist",
            overrides={"start_step": 220, "lambda_c": 13.8},  # the search kept lambda_d and gamma
            reason="Table 5's values are per data set: the paper fixes eta 2, respacing 2, 1x1 consensus "
            "with zero overwrite and the L1 distance, and tunes T, lambda_c, gamma and lambda_d on a few "
            "examples of each data set (section 4, appendix D). Tuned likewise on 30 Fashion-MNIST training "
            "images of the demo's pairs (bench/tune_ldce.py): T 220, lambda_c 13.8 flip 30 of 30 at the "
            "least L1, Table 5's ImageNet values 14 of 18; the algorithm is the paper's",
            demo_budget="full",
        ),
        Variant(
            name="ldce-cls-cpu-demo",
            overrides={
                "num_inference_steps": 50,
                "start_step": 19,
                "lambda_c": 20.0,
                "consensus": False,
                "enforce_same_norms": False,
            },
            reason="make demo on a CPU: at its paper defaults (191 steps, consensus guidance) LDCE-cls flips "
            "39 of the demo's 60 learning images on the shipped denoiser (0.65; bench/bench_demo_flips.py) "
            "and 43 of 60 held-out images of its pairs (0.72, Shirt -> T-shirt 2 of 10; bench/bench_shipped_"
            "methods.py --n 10), below the demo's 90% floor (the paper's own flip ratio is 83.1%, Table 1). "
            "A better conditioned denoiser does not close the gap: trained 12,000 steps instead of 1,500, "
            "its samples' accuracy rose from 0.63 to 0.94 and the flips fell from 44 and 49. So this variant "
            "runs 50 DDIM steps with a stronger classifier scale on the raw gradients and no consensus: 58 "
            "of 60 (the demo ran it before ldce-cls-fashion-mnist; bench/bench_generative_units.py still "
            "does)",
        ),
        Variant(
            name="ldce-cls-cpu-tiny",
            overrides={
                "num_inference_steps": 20,
                "start_step": 6,
                "lambda_c": 20.0,
                "consensus": False,
                "enforce_same_norms": False,
            },
            reason="the tiny demo inside make test: ldce-cls-cpu-demo with 20 DDIM steps",
            demo_budget="tiny",
        ),
    ),
)


def renormalise(v: torch.Tensor, reference: torch.Tensor, small: float = 1e-22) -> torch.Tensor:
    """v rescaled per item to the L2 norm of ``reference`` (the released ``_renormalize_gradient``)."""
    norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.ndim - 1)))
    norm = torch.where(norm < small, norm + small, norm)
    return v / norm * reference.flatten(1).norm(dim=1).view_as(norm)


def consensus_mask(guide: torch.Tensor, implicit: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, 1, h, w) bool: the 1x1 latent patches whose angle between ``guide`` and ``implicit`` (B, C, h, w)
    is at most ``gamma`` degrees (Eq. 10, 11)."""
    cos = F.cosine_similarity(guide, implicit, dim=1, eps=1e-12)
    return (cos >= math.cos(math.radians(gamma))).unsqueeze(1)


def guided_score(
    eps_uc: torch.Tensor,
    eps_c: torch.Tensor | None,
    grad_c: torch.Tensor,
    grad_d: torch.Tensor,
    a_t: torch.Tensor,
    *,
    lambda_c: float,
    lambda_d: float,
    eta: float,
    gamma: float | None,
    enforce_same_norms: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eps, consensus mask or None): Eq. (6) with consensus (``gamma`` not None, Eq. 10-11) and the
    released renormalisation. ``grad_c`` is the gradient of the cross-entropy (= -grad log p(y | x0_hat)),
    ``grad_d`` of the distance, both with respect to z_t."""
    guide_c = (1 - a_t).sqrt() * grad_c
    guide_d = (1 - a_t).sqrt() * grad_d
    keep = None
    implicit = None if eps_c is None else (eps_c - eps_uc).detach()  # Eq. (7)
    if gamma is not None:
        keep = consensus_mask(guide_c, implicit, gamma)
        guide_c = torch.where(keep, guide_c, torch.zeros_like(guide_c))  # o = 0
    if enforce_same_norms:
        guide_c, guide_d = renormalise(guide_c, implicit), renormalise(guide_d, implicit)
    return eps_uc.detach() + eta * (lambda_c * guide_c + lambda_d * guide_d), keep


class LDCE(GenerativeMethod):
    """LDCE-cls; defaults from Table 5 (ImageNet, LDCE-cls): gamma 45, T 191, lambda_c 2.3, lambda_d 0.3."""

    name = "ldce-cls"

    def __init__(
        self,
        *,
        autoencoder: str | os.PathLike[str] | AutoencoderKL,
        denoiser: str | os.PathLike[str] | LatentDenoiser,
        num_inference_steps: int = 500,
        start_step: int = 191,
        gamma: float = 45.0,
        lambda_c: float = 2.3,
        lambda_d: float = 0.3,
        eta: float = 2.0,
        consensus: bool = True,
        enforce_same_norms: bool = True,
        region_threshold: float = 0.25,
        region_sigma: float = 1.0,
    ):
        """``num_inference_steps``: DDIM respacing of the 1000 training steps (500: the paper's factor 2);
        ``start_step``: how many of those steps the abduction noises to and the generation walks back."""
        if not 1 <= start_step <= num_inference_steps:
            raise ValueError(
                f"start_step must lie in 1..num_inference_steps ({num_inference_steps}), not {start_step}"
            )
        if not 0 <= gamma <= 180:
            raise ValueError(f"the consensus threshold gamma is an angle in degrees in [0, 180], not {gamma}")
        self.autoencoder = str(autoencoder) if isinstance(autoencoder, str | os.PathLike) else autoencoder
        self.denoiser = str(denoiser) if isinstance(denoiser, str | os.PathLike) else denoiser
        self._vae = (
            load_autoencoder(autoencoder) if isinstance(autoencoder, str | os.PathLike) else autoencoder
        )
        self._denoiser = load_denoiser(denoiser) if isinstance(denoiser, str | os.PathLike) else denoiser
        self.num_inference_steps, self.start_step = num_inference_steps, start_step
        self.gamma, self.lambda_c, self.lambda_d, self.eta = gamma, lambda_c, lambda_d, eta
        self.consensus, self.enforce_same_norms = consensus, enforce_same_norms
        self.region_threshold, self.region_sigma = region_threshold, region_sigma

    # Hooks that LDCE-txt overrides: the image <-> latent maps, the scores and the schedule.
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return encode(self._vae, x)

    def _decode(self, z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return decode(self._vae, z, like.shape[1])

    def _score(self, z_t: torch.Tensor, t: int, y: torch.Tensor | None) -> torch.Tensor:
        """eps(z_t, y); ``y`` None: the unconditional eps(z_t)."""
        d = self._denoiser
        return d.eps(z_t, t, torch.full((len(z_t),), d.null_class, device=z_t.device) if y is None else y)

    def _scheduler(self):
        return self._denoiser.scheduler

    def _modules(self) -> list:
        return [self._vae, self._denoiser.unet]

    def _noise(self, query: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            shape = self._encode(query).shape
        return {"eps": torch.randn(shape, generator=generator, device=query.device)}

    def _generate(self, model: SplitClassifier, x: torch.Tensor, y: torch.Tensor, noise: dict) -> Generated:
        scheduler = self._scheduler()
        scheduler.set_timesteps(self.num_inference_steps)
        timesteps = scheduler.timesteps[-self.start_step :].tolist()
        alphas = scheduler.alphas_cumprod.to(x.device)
        final = scheduler.final_alpha_cumprod.to(x.device)
        kept = []
        with frozen(*self._modules(), model.f, model.g):
            with torch.no_grad():
                z_0 = self._encode(x)
            a_T = alphas[timesteps[0]]
            z_t = a_T.sqrt() * z_0 + (1 - a_T).sqrt() * noise["eps"]  # abduction, Eq. (2)
            for i, t in enumerate(timesteps):
                a_t = alphas[t]
                a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else final
                z_t = z_t.detach().requires_grad_(True)
                eps_c = None
                if self.consensus or self.enforce_same_norms:
                    with torch.no_grad():  # the implicit classifier takes no gradient: no graph for it
                        eps_c = self._score(z_t, t, y)
                eps_uc = self._score(z_t, t, None)
                z0_hat = (z_t - (1 - a_t).sqrt() * eps_uc) / a_t.sqrt()  # Eq. (4)
                x0_hat = self._decode(z0_hat, x)
                l_c = F.cross_entropy(model.g(model.f(x0_hat)), y, reduction="sum")
                l_d = (x0_hat.clamp(0, 1) - x).abs().sum()  # d = L1 (Eq. 9), the released sum
                (grad_c,) = torch.autograd.grad(l_c, z_t, retain_graph=True)
                (grad_d,) = torch.autograd.grad(l_d, z_t)
                eps, keep = guided_score(
                    eps_uc,
                    eps_c,
                    grad_c,
                    grad_d,
                    a_t,
                    lambda_c=self.lambda_c,
                    lambda_d=self.lambda_d,
                    eta=self.eta,
                    gamma=self.gamma if self.consensus else None,
                    enforce_same_norms=self.enforce_same_norms,
                )
                if keep is not None:
                    kept.append(keep.float().flatten(1).mean(1))
                with torch.no_grad():
                    z0_pred = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                    z_t = a_prev.sqrt() * z0_pred + (1 - a_prev).sqrt() * eps  # DDIM, Eq. (5), sigma_t = 0
            with torch.no_grad():
                x_cf = self._decode(z_t, x)
        b, steps = len(x), len(timesteps)
        extra = {"consensus_kept": [float(v) for v in torch.stack(kept).mean(0)]} if kept else {}
        return Generated(
            x_cf=x_cf,
            nfe={"unet": [steps] * b, "unet_backward": [steps] * b, "classifier": [steps] * b},
            extra=extra,
        )


LDCE_TXT = MethodDeclaration(
    name="ldce-txt",
    target="explain.methods.ldce:LDCETxt",
    paper="Schrodi, Farid et al., Latent Diffusion Counterfactual Explanations, 2024 (Stable Diffusion)",
    kind="generative",
    batch=16,
    settings={"stable_diffusion": "FOIL_STABLE_DIFFUSION_PATH"},
    setting_models={"stable_diffusion": "text_denoiser"},
    class_names="class_names",
    half_precision=True,  # Stable Diffusion is released and commonly run in float16 on GPUs
    variants=(
        Variant(
            name="ldce-txt-cpu-tiny",
            overrides={
                "num_inference_steps": 10,
                "start_step": 3,
                "lambda_c": 20.0,
                "consensus": False,
                "image_size": 64,
            },
            reason="the CUB test inside make test (a tiny random Stable Diffusion, a VGG-16 at 224 px on a "
            "CPU): 3 of 10 DDIM steps at 64 px, a stronger classifier scale and no consensus",
        ),
    ),
)


class LDCETxt(LDCE):
    """LDCE-txt on Stable Diffusion (a local directory with ``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``, or its loaded parts), prompts "a photo of a {class name}." (appendix D);
    defaults from Table 5 (ImageNet).

    Images are resized to ``image_size`` for the SD autoencoder (its config's range is set to [-1, 1], and
    ``explain.nets.autoencoder`` converts range and channels) and decoded back to the classifier's size.
    """

    name = "ldce-txt"

    def __init__(
        self,
        *,
        stable_diffusion: str | os.PathLike[str] | TextToImage,
        class_names: list[str],
        prompt: str = "a photo of a {}.",
        image_size: int = 256,
        num_inference_steps: int = 500,
        start_step: int = 191,
        gamma: float = 50.0,
        lambda_c: float = 3.95,
        lambda_d: float = 1.2,
        eta: float = 2.0,
        consensus: bool = True,
        enforce_same_norms: bool = True,
        region_threshold: float = 0.25,
        region_sigma: float = 1.0,
    ):
        """``stable_diffusion``: a local Stable Diffusion directory or its loaded parts
        (``explain.nets.diffusion.load_stable_diffusion``; the worker loads them once per process)."""
        if not 1 <= start_step <= num_inference_steps:
            raise ValueError(
                f"start_step must lie in 1..num_inference_steps ({num_inference_steps}), not {start_step}"
            )
        if not 0 <= gamma <= 180:
            raise ValueError(f"the consensus threshold gamma is an angle in degrees in [0, 180], not {gamma}")
        sd = (
            load_stable_diffusion(stable_diffusion)
            if isinstance(stable_diffusion, str | os.PathLike)
            else stable_diffusion
        )
        self.stable_diffusion = (
            str(stable_diffusion) if isinstance(stable_diffusion, str | os.PathLike) else sd
        )
        self.class_names, self.prompt, self.image_size = list(class_names), prompt, image_size
        self._vae, self._unet, self._sched = sd.vae, sd.unet, sd.scheduler  # the VAE's range: [-1, 1]
        texts = [""] + [prompt.format(name) for name in self.class_names]
        self._embeddings = sd.embed(texts)  # row 0: the empty prompt
        self.num_inference_steps, self.start_step = num_inference_steps, start_step
        self.gamma, self.lambda_c, self.lambda_d, self.eta = gamma, lambda_c, lambda_d, eta
        self.consensus, self.enforce_same_norms = consensus, enforce_same_norms
        self.region_threshold, self.region_sigma = region_threshold, region_sigma

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        return encode(self._vae, F.interpolate(x, size=size, mode="bilinear", align_corners=False))

    def _decode(self, z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = decode(self._vae, z, like.shape[1])
        return F.interpolate(out, size=like.shape[-2:], mode="bilinear", align_corners=False, antialias=True)

    def _score(self, z_t, t, y):
        dtype = self._unet.dtype  # float16 where the worker loaded it so (a GPU); scores in float32
        emb = self._embeddings.to(z_t.device, dtype)
        states = emb[:1].expand(len(z_t), -1, -1) if y is None else emb[1 + y]  # row 0: the empty prompt
        return self._unet(z_t.to(dtype), t, encoder_hidden_states=states).sample.float()

    def _scheduler(self):
        return self._sched

    def _modules(self) -> list:
        return [self._vae, self._unet]
