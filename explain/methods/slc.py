"""Simple Localized Counterfactuals (SLC; Carlyn et al. 2025): a masked latent edit of an autoencoder.

z_edit = z + dz (Eq. 1), x_cf = D(z_edit) (Eq. 2), L_cf = lambda_c L_class(x_cf, t) + lambda_s ||dz||_1 (Eq.
3) with L_class = -(target logit), plus the optional SAE trait loss lambda_t ||h_enc(x_cf) - h_enc(x)||_1
(Eq. 7). As in the authors' released code (Imageomics/simple-localized-counterfactuals,
``LatentEditPipeline``), which docs/fidelity.md compares line by line:

- Both stages run Adam on dz from dz = 0. At each step the classifier sees D(z + (dz + p) o M), where p is a
  fresh draw of ``perturbation`` x N(0, 1) (0 in stage 1, M = 1 in stage 1); the optimiser never sees p
  itself and p is not kept. Stage 1 feeds the classifier the autoencoder's round trip D(E(.)) of the edit.
- A stage stops when the classifier predicts the target with p(target) > ``stop_probability`` for
  ``stop_patience`` consecutive steps (judged on the perturbed edit, before that step's update), or after
  ``stage1_steps`` / ``max_steps`` steps.
- The mask (Eq. 5 on latent aggregated gradients, appendix B): the sum over stage 1 of dL_cf/d(dz), its
  positive part (or its magnitude), summed over latent channels, Gaussian-filtered as scipy's
  ``gaussian_filter`` (reflect borders, radius 4 sigma), divided by its maximum, values below ``t`` zeroed
  (a soft mask).
- The counterfactual is D(z + dz o M) with the final stage-2 dz and no perturbation.
- The L1 terms are means over elements (``nn.L1Loss``); the sparsity term is on dz, not dz o M.
- The trait loss (with an SAE) compares the SAE codes of the classifier's pooled features weighted by the
  mask, of the edit and of the reconstruction D(E(x)), as the release's ``SAELatentEditPipeline``.
- Latents are in the autoencoder's own units (its posterior mean, before the diffusion scaling factor), so
  ``lr`` and ``perturbation`` mean what they mean in the release on the same autoencoder.

The trait loss's SAE is trained with the Matryoshka objective the paper uses (``explain.nets.sae``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from explain.methods.base import SplitClassifier
from explain.methods.declaration import AUTOENCODER, SAE, MethodDeclaration, Variant
from explain.methods.generative import BatchAdam, Generated, GenerativeMethod, frozen
from explain.nets.autoencoder import decode, encode, load_autoencoder
from explain.nets.sae import SparseAutoencoder, load_sae

DECLARATION = MethodDeclaration(
    name="slc",
    target="explain.methods.slc:SLC",
    paper="Carlyn et al., Simple Localized Counterfactuals, 2025",
    kind="generative",
    backbones={"autoencoder": AUTOENCODER, "sae": SAE},
    optional=frozenset({"sae"}),  # the trait loss (Eq. 7) is optional
    batch=16,
    variants=(
        Variant(
            name="slc-cpu-demo",
            overrides={"lr": 0.1, "stage1_steps": 5, "max_steps": 100, "sigma": 1.0},
            reason="a CPU budget: 100 steps instead of 500 and a ten times larger step size (the release's "
            "ImageNet value) so that the edit grows within them; a mask blur for 28-pixel images",
        ),
        Variant(
            name="slc-cpu-tiny",
            overrides={"lr": 0.1, "stage1_steps": 5, "max_steps": 60, "sigma": 1.0},
            reason="the tiny demo inside make test: slc-cpu-demo with 60 steps",
            demo_budget="tiny",
        ),
    ),
)


def reflect_blur_matrix(n: int, sigma: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n, n) matrix W with W @ v = scipy.ndimage.gaussian_filter1d(v, sigma) (mode "reflect", truncate 4):
    a normalised Gaussian of radius int(4 sigma + 0.5), borders mirrored about the edge (d c b a | a b c d),
    as often as the radius needs."""
    if sigma <= 0:
        return torch.eye(n, device=device, dtype=dtype)
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum()
    index = (torch.arange(n, device=device).view(-1, 1) + offsets.long().view(1, -1)) % (2 * n)
    index = torch.where(index >= n, 2 * n - 1 - index, index)
    matrix = torch.zeros(n, n, device=device, dtype=torch.float64)
    matrix.scatter_add_(1, index, weights.expand(n, -1).contiguous())
    return matrix.to(dtype)


def lag_mask(aggregated: torch.Tensor, sigma: float, t: float, only_positive: bool) -> torch.Tensor:
    """Eq. (5) on latent aggregated gradients (B, D, h, w) -> (B, 1, h, w): T(G(M_init, sigma), t), where
    M_init is the gradients' positive part (or magnitude) summed over channels, and G is divided by its max.
    An item with no positive gradient gets an empty mask (the release would divide by zero)."""
    m = aggregated.clamp(min=0) if only_positive else aggregated.abs()
    m = m.sum(1, keepdim=True)
    h, w = m.shape[-2:]
    rows = reflect_blur_matrix(h, sigma, device=m.device, dtype=m.dtype)
    cols = reflect_blur_matrix(w, sigma, device=m.device, dtype=m.dtype)
    m = rows @ m @ cols.T
    m = m / m.flatten(1).max(1).values.clamp(min=torch.finfo(m.dtype).tiny).view(-1, 1, 1, 1)
    return torch.where(m < t, torch.zeros_like(m), m)


class SLC(GenerativeMethod):
    """Two-stage masked latent edit; paper defaults (lr 0.01, 25 + 500 steps, sigma 3, t 0.5, 0.1 weights),
    the released ImageNet configuration where the paper states no number (perturbation, stopping rule,
    positive gradients)."""

    name = "slc"

    def __init__(
        self,
        *,
        autoencoder: str | os.PathLike[str] | AutoencoderKL,
        sae: str | os.PathLike[str] | SparseAutoencoder | None = None,
        lr: float = 0.01,
        stage1_steps: int = 25,
        max_steps: int = 500,
        sigma: float = 3.0,
        t: float = 0.5,
        lambda_c: float = 1.0,
        lambda_s: float = 0.1,
        lambda_t: float = 0.1,
        perturbation: float | None = None,
        only_positive_gradients: bool = True,
        stop_probability: float = 0.95,
        stop_patience: int = 5,
        region_threshold: float = 0.25,
        region_sigma: float = 1.0,
    ):
        if stage1_steps < 1 or max_steps < 1:
            raise ValueError(f"stage1_steps ({stage1_steps}) and max_steps ({max_steps}) must be >= 1")
        if not 0 <= t < 1:
            raise ValueError(f"the mask threshold t must lie in [0, 1), not {t}")
        if not 0 < stop_probability < 1 or stop_patience < 1:
            raise ValueError(
                f"stop_probability ({stop_probability}) must lie in (0, 1) and stop_patience "
                f"({stop_patience}) be >= 1"
            )
        if perturbation is not None and perturbation < 0:
            raise ValueError(
                f"perturbation must be >= 0 (or None for the release's value), not {perturbation}"
            )
        self.autoencoder = str(autoencoder) if isinstance(autoencoder, str | os.PathLike) else autoencoder
        self.sae = str(sae) if isinstance(sae, str | os.PathLike) else sae
        self._vae = (
            load_autoencoder(autoencoder) if isinstance(autoencoder, str | os.PathLike) else autoencoder
        )
        self._sae = load_sae(sae) if isinstance(sae, str | os.PathLike) else sae
        self.lr, self.stage1_steps, self.max_steps = lr, stage1_steps, max_steps
        self.sigma, self.t = sigma, t
        self.lambda_c, self.lambda_s, self.lambda_t = lambda_c, lambda_s, lambda_t
        self.perturbation, self.only_positive_gradients = perturbation, only_positive_gradients
        self.stop_probability, self.stop_patience = stop_probability, stop_patience
        self.region_threshold, self.region_sigma = region_threshold, region_sigma

    @property
    def _strength(self) -> float:
        """The stage-2 perturbation: as given, else the release's ImageNet value for the pipeline in use
        (cfg_2: 2 for the plain latent edit, 1 with the SAE trait loss)."""
        if self.perturbation is not None:
            return self.perturbation
        return 1.0 if self._trait_loss else 2.0

    @property
    def _trait_loss(self) -> bool:
        return self._sae is not None and self.lambda_t != 0

    def _noise(self, query: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            shape = encode(self._vae, query).shape
        # one standard normal draw per stage-2 step, so that batches equal items one at a time
        steps = torch.randn((self.max_steps, *shape), generator=generator, device=query.device)
        return {"noise": steps.transpose(0, 1)}

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """E(x) in the autoencoder's own latent units (the release edits unscaled latents)."""
        return encode(self._vae, x) / self._vae.config.scaling_factor

    def _decode(self, z: torch.Tensor, channels: int) -> torch.Tensor:
        """D(z), not clamped (the release's wrapper clamps: see docs/fidelity.md)."""
        return decode(self._vae, z * self._vae.config.scaling_factor, channels)

    def _generate(self, model: SplitClassifier, x: torch.Tensor, y: torch.Tensor, noise: dict) -> Generated:
        channels = x.shape[1]
        with frozen(self._vae, self._sae, model.f, model.g):
            with torch.no_grad():
                z = self._encode(x)
            # Stage 1: the unmasked edit, through the autoencoder's round trip, collecting the gradients.
            ones = torch.ones_like(z[:, :1])
            _, aggregated, steps1, _ = self._optimise(
                model, z, y, ones, self.stage1_steps, channels, round_trip=True
            )
            mask = lag_mask(aggregated, self.sigma, self.t, self.only_positive_gradients)  # Eq. (5)
            # Stage 2: from dz = 0 again, inside the mask, each step seen through a fresh perturbation.
            reference = None
            if self._trait_loss:
                with torch.no_grad():
                    reference = self._traits(model.f(self._decode(z, channels)), mask)
            perturb = self._strength * noise["noise"]  # (B, steps, ...)
            dz, _, steps2, by_rule = self._optimise(
                model, z, y, mask, self.max_steps, channels, perturb=perturb, reference=reference
            )
            with torch.no_grad():
                x_cf = self._decode(z + dz * mask, channels)  # Eq. (1), (2): no perturbation
        evaluations = [a + b for a, b in zip(steps1, steps2, strict=True)]
        # encoder/decoder passes: E(x); per stage-1 step D, E, D; per stage-2 step D; D(z) for the trait
        # reference; the final D
        passes = [1 + 3 * a + b + (reference is not None) + 1 for a, b in zip(steps1, steps2, strict=True)]
        return Generated(
            x_cf=x_cf,
            nfe={"autoencoder": passes, "classifier": evaluations},
            extra={
                "stage1_steps": [float(s) for s in steps1],
                "stage2_steps": [float(s) for s in steps2],
                "latent_mask_area": [float(v) for v in (mask > 0).float().flatten(1).mean(1)],
                "stage2_stopped_by_rule": [float(b) for b in by_rule],
            },
        )

    def _traits(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h_enc of the classifier's spatial features weighted by the mask (bicubic to the feature grid,
        min-max normalised, as the release's SAE pipeline) and average-pooled."""
        # torchvision's resize of a tensor, as the release calls it: bicubic with antialiasing
        weight = F.interpolate(
            mask, size=features.shape[-2:], mode="bicubic", align_corners=False, antialias=True
        )
        low = weight.flatten(1).min(1).values.view(-1, 1, 1, 1)
        weight = weight - low
        weight = weight / weight.flatten(1).max(1).values.clamp(min=1e-12).view(-1, 1, 1, 1)
        return self._sae.h_enc((features * weight).mean(dim=(-2, -1)))

    def _optimise(
        self,
        model: SplitClassifier,
        z: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        max_steps: int,
        channels: int,
        *,
        round_trip: bool = False,
        perturb: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[bool]]:
        """Adam on dz from 0 for the items not yet stopped (the release's ``_inner_forward``).

        Each step decodes z + (dz + perturb[:, step]) o mask (through D(E(.)) when ``round_trip``), checks the
        stopping rule, then takes one Adam step on L_cf (Eq. 3, plus Eq. 7 against ``reference``). Returns
        dz, the summed gradients dL_cf/d(dz) of the steps taken, the classifier evaluations per item and
        whether the rule (not the cap) stopped it.
        """
        dz = torch.zeros_like(z)
        adam = BatchAdam(dz, alpha=self.lr)
        aggregated = torch.zeros_like(z)
        active = torch.ones(len(z), dtype=torch.bool, device=z.device)
        streak = torch.zeros(len(z), dtype=torch.long, device=z.device)
        evaluations = torch.zeros(len(z), dtype=torch.long)
        by_rule = torch.zeros_like(active)
        for step in range(max_steps):
            # only the items still running go through the networks (a batch is as fast as its items alone)
            rows = active.nonzero().squeeze(1)
            dz_rows = dz[rows].detach().requires_grad_(True)
            shown = dz_rows if perturb is None else dz_rows + perturb[rows, step]
            x_edit = self._decode(z[rows] + shown * mask[rows], channels)  # Eq. (1), (2)
            if round_trip:
                x_edit = self._decode(self._encode(x_edit), channels)
            features = model.f(x_edit)
            logits = model.g(features)
            evaluations[rows.cpu()] += 1
            target = y[rows]
            p_target = torch.softmax(logits.detach(), -1).gather(1, target.view(-1, 1)).squeeze(1)
            hit = (logits.detach().argmax(-1) == target) & (p_target > self.stop_probability)
            streak[rows] = torch.where(hit, streak[rows] + 1, 0)
            stopped = torch.zeros_like(active)
            stopped[rows] = streak[rows] >= self.stop_patience
            active = active & ~stopped
            by_rule = by_rule | stopped
            if not bool(active.any()):
                break
            l_class = -logits.gather(1, target.view(-1, 1)).squeeze(1)
            loss = self.lambda_c * l_class + self.lambda_s * dz_rows.abs().flatten(1).mean(1)  # Eq. (3)
            if reference is not None:
                change = self._traits(features, mask[rows]) - reference[rows]
                loss = loss + self.lambda_t * change.abs().mean(1)  # Eq. (7)
            (grad_rows,) = torch.autograd.grad(loss.sum(), dz_rows)
            grad = torch.zeros_like(dz)
            grad[rows] = grad_rows
            keep = active.view(-1, 1, 1, 1)
            aggregated = aggregated + torch.where(keep, grad, torch.zeros_like(grad))
            dz = dz - adam.direction(grad, active)
        return dz, aggregated, [int(e) for e in evaluations], [bool(b) for b in by_rule]
