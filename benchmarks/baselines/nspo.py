"""NSPO-style baseline: weights re-projected into the null space of capability activations.

Source: Niu et al., "Mitigating the Safety Alignment Tax with Null-Space Constrained Policy
Optimization" (NSPO, ICLR 2026, arXiv 2512.11391; GRPO on verl). For every MLP linear, the
input activations K (tokens × d_in) of general-task prompts define the protected subspace: a
weight change ΔW with ΔW Kᵀ = 0 leaves those layers' outputs on those inputs unchanged. The
null space of KᵀK (eigenvalues below a relative threshold) gives P = U₀U₀ᵀ, computed once; the
released code then re-projects the accumulated weight change every 5 steps,
W ← W_ref + (W − W_ref) P (field notes §1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from trl import DPOTrainer

from benchmarks.baselines.common import (
    check_nonnegative_float,
    check_positive_int,
    make_sampler,
    raw_optimizer,
    reference_batches,
    refuse_unsupported_setup,
)
from frontier_trainer.directions import deterministic_forward

logger = logging.getLogger(__name__)

DEFAULT_MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


class NSPODPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose MLP weight changes are re-projected into the null space of the
    capability activations every ``reproject_steps`` optimizer steps and at the end of training.

    Algorithm:

    1. at the start of training, record with forward pre-hooks the input x of every MLP linear
       (``gate_proj``/``up_proj``/``down_proj``) at every non-pad token of the first
       ``n_reference`` rows (prompt and completion) of each capability task: C = KᵀK = Σ x xᵀ
       (float64, pooled over tasks; the forward runs without autocast, dropout off); snapshot W_ref = W;
    2. eigendecompose C = V diag(λ) Vᵀ; the null basis U₀ is the eigenvectors with
       λ ≤ ``eig_threshold`` · λ_max, and P = U₀U₀ᵀ (d_in × d_in, float64);
    3. after every ``reproject_steps``-th optimizer step (a step post-hook on the raw torch
       optimizer), on the last step and at ``on_train_end``: W ← W_ref + (W − W_ref) P, in float64;
    4. with LoRA (W = W₀ + s·BA, W_ref = W₀ frozen) the same map is (sBA)P = sB(AP): A ← A P is the
       exact re-projection, and B is left as it is.

    Options:
        reproject_steps: optimizer steps between re-projections, default 5 (the released code's).
        eig_threshold: relative eigenvalue threshold, default 1e-2 (eigen-directions carrying at
            most 1% of the largest activation energy count as null). Not a value read from the
            NSPO code: relative thresholds do not transfer across models (field notes §1); sweep it.
        n_reference: capability rows per task in K, default 200.
        mlp_modules: module-name suffixes of the projected linears, default gate/up/down_proj.
        capability_batch_size / capability_max_length: as in the other baselines (8 / 512).

    Deviations from the released code: DPO on TRL instead of GRPO on verl; fp32 weights and a
    float64 projection instead of bf16 (whose rounding of W_ref + ΔW·P breaks exactness, field notes
    §2); K includes the completion tokens of the capability rows (the capability is scored on them);
    P is per module (gate and up share an input, so their P are equal); the end-of-training
    re-projection comes before the trainer returns (the released code saves checkpoints before it);
    attention, embeddings, norms and the head stay unconstrained, as in NSPO. Resuming from a
    checkpoint takes the resumed weights as W_ref.

    Memory: one d_in × d_in float64 projector per MLP linear plus an fp32 copy of the MLP weights.
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: Any = None,
        *pos_args: Any,
        capability_datasets: Mapping[str, Any] | None = None,
        reproject_steps: int = 5,
        eig_threshold: float = 1e-2,
        n_reference: int = 200,
        mlp_modules: Sequence[str] = DEFAULT_MLP_MODULES,
        capability_batch_size: int = 8,
        capability_max_length: int | None = 512,
        **kwargs: Any,
    ) -> None:
        self.reproject_steps = check_positive_int("reproject_steps", reproject_steps, "nspo")
        self.eig_threshold = check_nonnegative_float("eig_threshold", eig_threshold, "nspo", upper=1.0)
        self.n_reference = check_positive_int("n_reference", n_reference, "nspo")
        batch_size = check_positive_int("capability_batch_size", capability_batch_size, "nspo")
        if (
            isinstance(mlp_modules, str)
            or not mlp_modules
            or not all(isinstance(m, str) and m for m in mlp_modules)
        ):
            raise ValueError(
                f"nspo: option mlp_modules={mlp_modules!r} must be a non-empty list of module-name suffixes."
            )
        self.mlp_modules = tuple(mlp_modules)
        refuse_unsupported_setup("nspo", args)
        super().__init__(model, ref_model, args, *pos_args, **kwargs)
        self.capability_sampler = make_sampler(
            "nspo",
            capability_datasets,
            self.processing_class,
            batch_size=batch_size,
            max_length=capability_max_length,
            seed=self.args.seed,
        )
        self.projected_modules: dict[str, nn.Module] = self._find_modules()
        #: module name -> P (d_in × d_in, float64); filled by prepare_null_space()
        self.projectors: dict[str, torch.Tensor] = {}
        #: module name -> W_ref (fp32 copy; absent for LoRA, whose W_ref is the frozen base weight)
        self.reference_weights: dict[str, torch.Tensor] = {}
        self.null_dims: dict[str, int] = {}
        self._hooked: torch.optim.Optimizer | None = None
        self._handle: Any = None
        self.add_callback(_NSPOCallback(self))

    # ------------------------------------------------------------------ set-up

    def _find_modules(self) -> dict[str, nn.Module]:
        model = self.accelerator.unwrap_model(self.model)
        found: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if name.split(".")[-1] not in self.mlp_modules:
                continue
            if _is_lora_layer(module):
                if getattr(module, "use_dora", {}) and any(module.use_dora.values()):
                    raise ValueError(
                        f"nspo: {name} uses DoRA, whose magnitude vector makes the re-projection inexact; use plain LoRA."
                    )
                if any(bool(module.lora_B[a].weight.any()) for a in module.lora_B):
                    # A ← AP is the re-projection only if W_ref = W₀, i.e. BA = 0 when training starts
                    raise ValueError(
                        f"nspo: {name} starts with a non-zero LoRA product BA (init_lora_weights other than "
                        "the default, or a trained adapter), so W_ref ≠ W₀ and A ← AP would not be the "
                        "re-projection. Use LoraConfig(init_lora_weights=True)."
                    )
                params = [module.lora_A[a].weight for a in module.lora_A]
            elif isinstance(module, nn.Linear):
                params = [module.weight]
            else:
                continue
            trainable = [p for p in params if p.requires_grad]
            if not trainable:
                continue
            low = {str(p.dtype) for p in trainable if p.dtype not in (torch.float32, torch.float64)}
            if low:
                raise ValueError(
                    f"nspo: {name} has {sorted(low)} trainable weights; rounding W_ref + ΔW·P in low precision "
                    "breaks the null-space constraint. Load the model with dtype=torch.float32 (bf16 autocast is fine)."
                )
            found[name] = module
        if not found:
            raise ValueError(
                f"nspo: no trainable linear module named like {list(self.mlp_modules)} found; set the option "
                "mlp_modules to your architecture's MLP projection names."
            )
        return found

    @torch.no_grad()
    def prepare_null_space(self) -> None:
        """Record KᵀK of every projected module on the capability rows, build each P, snapshot W_ref."""
        model = self.accelerator.unwrap_model(self.model)
        device = next(model.parameters()).device
        cov: dict[str, torch.Tensor] = {}
        mask_holder: dict[str, torch.Tensor] = {}

        def make_hook(name: str) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0].detach()
                keep = mask_holder["mask"].reshape(-1).bool()
                rows = x.reshape(-1, x.shape[-1])[keep].double()
                if name in cov:
                    cov[name].addmm_(rows.T, rows)
                else:
                    cov[name] = rows.T @ rows

            return hook

        handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in self.projected_modules.items()]
        try:
            # no autocast: K is the full-precision activation, whatever precision training runs in
            with deterministic_forward(model):
                for task in self.capability_sampler.tasks:
                    for batch in reference_batches(
                        self.capability_sampler, task, self.n_reference, device=device
                    ):
                        mask_holder["mask"] = batch["attention_mask"]
                        model(
                            input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"],
                            use_cache=False,
                        )
        finally:
            for handle in handles:
                handle.remove()
        for name, module in self.projected_modules.items():
            if name not in cov:
                raise ValueError(f"nspo: module {name} saw no capability token (is it used in the forward?).")
            eigvals, eigvecs = torch.linalg.eigh(cov[name])
            top = float(eigvals[-1])
            if top <= 0:
                raise ValueError(
                    f"nspo: module {name} has all-zero capability activations; no null space to define."
                )
            null = eigvecs[:, eigvals <= self.eig_threshold * top]
            self.projectors[name] = null @ null.T
            self.null_dims[name] = int(null.shape[1])
            if not _is_lora_layer(module):
                self.reference_weights[name] = module.weight.detach().to(torch.float32).clone()
        dims = list(self.null_dims.values())
        logger.info(
            "nspo: %d MLP linears, null-space dimension min %d / max %d (eig_threshold=%g).",
            len(dims),
            min(dims),
            max(dims),
            self.eig_threshold,
        )

    # ------------------------------------------------------------------ re-projection

    @torch.no_grad()
    def reproject(self) -> None:
        """W ← W_ref + (W − W_ref) P for every projected module (LoRA: A ← A P), in float64."""
        if not self.projectors:
            return
        removed = total = 0.0
        for name, module in self.projected_modules.items():
            P = self.projectors[name]
            if _is_lora_layer(module):
                for adapter in module.lora_A:
                    A = module.lora_A[adapter].weight
                    if A.requires_grad:
                        A64 = A.double()
                        kept = A64 @ P.to(A.device)
                        removed += float((A64 - kept).square().sum())
                        total += float(A64.square().sum())
                        A.copy_(kept.to(A.dtype))
            else:
                W = module.weight
                W_ref = self.reference_weights[name].to(W.device).double()
                delta = W.double() - W_ref
                kept = delta @ P.to(W.device)
                removed += float((delta - kept).square().sum())
                total += float(delta.square().sum())
                W.copy_((W_ref + kept).to(W.dtype))
        if total > 0:  # share of the MLP change (squared norm; with LoRA, of A) the re-projection took away
            self._metrics["train"]["nspo/fraction_removed"].append(removed / total)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        raw = raw_optimizer(optimizer)
        if raw is not self._hooked:
            if self._handle is not None:
                self._handle.remove()
            self._handle = raw.register_step_post_hook(self._after_step)
            self._hooked = raw
        return optimizer

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        step = self.state.global_step + 1  # global_step is incremented after the optimizer step
        if step % self.reproject_steps == 0 or step >= int(self.state.max_steps or 0):
            self.reproject()


class _NSPOCallback(TrainerCallback):
    """Computes the null space once at the start and re-projects once more at the end of training."""

    def __init__(self, trainer: NSPODPOTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.trainer.projectors:
            self.trainer.prepare_null_space()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.reproject()
