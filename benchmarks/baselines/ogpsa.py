"""OGPSA-style baseline: orthogonal gradient projection against per-tensor capability gradients.

Source: Sun et al., "OGPSA: Orthogonal Gradient Projection for Safety Alignment" (arXiv
2602.07892; code https://github.com/SunGL001/OGPSA, LLaMA-Factory ``dpo_pg`` trainer). Their
trainer keeps, for every trainable weight tensor W, one or two "base" gradients of the mean
next-token loss on ~200 reference examples of general tasks, normalised per tensor; a tensor
hook replaces each gradient by its component orthogonal to them (Gram–Schmidt for two), and the
base gradients are refreshed every few steps. Field notes §1–§2: Adam's per-coordinate
preconditioning puts the blocked component back into the realised update.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from trl import DPOTrainer

from benchmarks.baselines.common import (
    check_positive_int,
    make_sampler,
    raw_optimizer,
    reference_batches,
    refuse_unsupported_setup,
)
from frontier_trainer.directions import IGNORE_INDEX, capability_gradients

logger = logging.getLogger(__name__)


class OGPSADPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose gradient is projected, per weight tensor, orthogonally to capability
    gradients before the optimizer step.

    Algorithm:

    1. every ``refresh_steps`` optimizer steps (and before the first), for each capability task i
       compute a_i = gradient of the mean next-token log-likelihood of the completion tokens of its
       first ``n_reference`` rows (token-pooled over the whole set), one tensor per trainable weight;
    2. per tensor W, orthonormalise {a_i[W]} by Gram–Schmidt (in float64) into {u_k[W]}, kept in the
       weights' dtype;
    3. in a step pre-hook on the raw torch optimizer — after accumulation, DDP all-reduce,
       unscaling and clipping (field notes §3) — set g_W ← g_W − Σ_k ⟨g_W, u_k[W]⟩ u_k[W];
    4. AdamW then steps on the projected gradient (its moments and decoupled weight decay are not
       projected: that is the method, and the weakness the field notes measure).

    Options:
        refresh_steps: optimizer steps between refreshes of the reference gradients, default 5.
        n_reference: reference rows per task, default 200 (OGPSA's ~200).
        capability_batch_size: rows per forward when computing the reference gradients, default 8.
        capability_max_length: longer capability rows are dropped, default 512.

    Deviations from the released code: the projection is applied once per optimizer step to the
    accumulated (and clipped) gradient instead of per micro-batch in a tensor hook — identical up to
    rounding since the projection is linear, but clipping now sees the unprojected norm; any number
    of tasks (not one or two); reference gradients stay on the parameters' device in their dtype
    (the released code keeps them on the CPU); the gradient is of our completion metric
    (mean log-likelihood of completion tokens, prompts masked), which only flips the sign of the
    mean next-token loss and so spans the same directions.
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: Any = None,
        *pos_args: Any,
        capability_datasets: Mapping[str, Any] | None = None,
        refresh_steps: int = 5,
        n_reference: int = 200,
        capability_batch_size: int = 8,
        capability_max_length: int | None = 512,
        **kwargs: Any,
    ) -> None:
        self.refresh_steps = check_positive_int("refresh_steps", refresh_steps, "ogpsa")
        self.n_reference = check_positive_int("n_reference", n_reference, "ogpsa")
        batch_size = check_positive_int("capability_batch_size", capability_batch_size, "ogpsa")
        refuse_unsupported_setup("ogpsa", args)
        super().__init__(model, ref_model, args, *pos_args, **kwargs)
        self.capability_sampler = make_sampler(
            "ogpsa",
            capability_datasets,
            self.processing_class,
            batch_size=batch_size,
            max_length=capability_max_length,
            seed=self.args.seed,
        )
        #: per task, one gradient tensor per trainable parameter (the held anchors a_i)
        self.reference_gradients: list[list[torch.Tensor]] = []
        #: per parameter, the orthonormal basis (k × numel, float64) of its anchors
        self._bases: list[torch.Tensor] = []
        self._refreshed_at: int | None = None
        self._hooked: torch.optim.Optimizer | None = None
        self._handle: Any = None

    def _params(self) -> list[torch.nn.Parameter]:
        model = self.accelerator.unwrap_model(self.model)
        return [p for p in model.parameters() if p.requires_grad]

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        raw = raw_optimizer(optimizer)
        if raw is not self._hooked:  # create_optimizer runs on every train(): hook once
            if self._handle is not None:
                self._handle.remove()
            self._handle = raw.register_step_pre_hook(self._project_before_step)
            self._hooked = raw
        return optimizer

    def refresh_reference_gradients(self) -> None:
        """Recompute every task's mean reference gradient at the current weights and its per-tensor basis."""
        model = self.accelerator.unwrap_model(self.model)
        params = self._params()
        device = params[0].device
        anchors: list[list[torch.Tensor]] = []
        for task in self.capability_sampler.tasks:
            batches = reference_batches(self.capability_sampler, task, self.n_reference, device=device)
            total = [torch.zeros_like(p) for p in params]
            tokens = 0
            for batch in batches:
                # the batch metric is a token mean: weight it by its scored tokens, so the anchor is the
                # gradient of the token-pooled mean over the whole reference set
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                with self.autocast_smart_context_manager():
                    _, grads = capability_gradients(model, params, batch)
                for acc, g in zip(total, grads, strict=True):
                    acc.add_(g, alpha=n)
                tokens += n
            anchors.append([acc / tokens for acc in total])
        self.reference_gradients = anchors
        self._bases = []
        for j in range(len(params)):
            basis: list[torch.Tensor] = []
            for anchor in anchors:
                v = anchor[j].reshape(-1).double()
                for u in basis:  # Gram–Schmidt, twice for numerical orthogonality
                    v = v - (u @ v) * u
                for u in basis:
                    v = v - (u @ v) * u
                norm = v.norm()
                if norm > 1e-12 * max(1.0, float(anchor[j].double().norm())) and norm > 0:
                    basis.append(v / norm)
            dtype = params[j].dtype  # stored in the weights' dtype; the projection itself runs in float64
            if basis:
                self._bases.append(torch.stack(basis).to(dtype))
            else:
                self._bases.append(torch.zeros(0, params[j].numel(), dtype=dtype, device=device))
        self._refreshed_at = self.state.global_step

    def _project_before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        step = self.state.global_step
        if self._refreshed_at is None or (step % self.refresh_steps == 0 and step != self._refreshed_at):
            self.refresh_reference_gradients()
        self.project_gradients()

    @torch.no_grad()
    def project_gradients(self) -> None:
        """g_W ← g_W − Σ_k ⟨g_W, u_k⟩ u_k for every trainable tensor W (float64 arithmetic)."""
        removed = total = 0.0
        for p, basis in zip(self._params(), self._bases, strict=True):
            if p.grad is None or basis.shape[0] == 0:
                continue
            g = p.grad.reshape(-1).double()
            u = basis.double()
            coeffs = u @ g
            projected = g - u.T @ coeffs
            removed += float(coeffs.square().sum())
            total += float(g.square().sum())
            p.grad.copy_(projected.view_as(p.grad).to(p.grad.dtype))
        if total > 0:
            self._metrics["train"]["ogpsa/fraction_removed"].append(removed / total)
