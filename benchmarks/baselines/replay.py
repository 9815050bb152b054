"""DPO + capability replay: the usual regulariser a user adds to keep capabilities.

Source: the "PTX" replay term of InstructGPT (Ouyang et al. 2022, eq. 2: pretraining
log-likelihood mixed into the RL objective with weight γ) and the NLL term of RPO (Pang et
al. 2024, "Iterative Reasoning Preference Optimization", α = 1), applied here to the
capability data rather than to the chosen responses. TRL's built-in relative is
``DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, λ])`` (it replaced the deprecated
``rpo_alpha``): it adds the NLL of the *chosen preference responses only*, which protects
nothing the preference data does not contain.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from trl import DPOTrainer

from benchmarks.baselines.common import check_nonnegative_float, check_positive_int, make_sampler
from frontier_trainer.directions import completion_metric

logger = logging.getLogger(__name__)


class ReplayDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose training loss is ``L_DPO + λ · mean_i NLL_i`` (capability replay).

    Algorithm, at every training micro-batch (so the replay forward/backward is part of the
    measured step, as it would be for a user):

    1. compute TRL's DPO loss on the preference micro-batch;
    2. draw the next batch of every capability task from the project's seeded sampler
       (:func:`frontier_trainer.directions.build_capability_sampler`; prompt tokens masked);
    3. NLL_i = token-mean next-token NLL of task i's batch (``-completion_metric``);
    4. return ``L_DPO + replay_weight · (1/T) Σ_i NLL_i``; evaluation returns the plain DPO loss.

    Options:
        replay_weight: λ, default 1.0 (RPO's α = 1 and TRL's old ``rpo_alpha`` recommendation;
            values from 0.1 to 1 are the usual range, the arena sweeps it).
        capability_batch_size: rows per capability batch, default 8.
        capability_max_length: longer capability rows are dropped (not truncated), default 512.

    Deviations: the replay data are the capability tasks (not pretraining text, not the chosen
    responses); tasks are weighted equally, whatever their sizes.
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: Any = None,
        *pos_args: Any,
        capability_datasets: Mapping[str, Any] | None = None,
        replay_weight: float = 1.0,
        capability_batch_size: int = 8,
        capability_max_length: int | None = 512,
        **kwargs: Any,
    ) -> None:
        self.replay_weight = check_nonnegative_float("replay_weight", replay_weight, "replay")
        batch_size = check_positive_int("capability_batch_size", capability_batch_size, "replay")
        super().__init__(model, ref_model, args, *pos_args, **kwargs)
        self.capability_sampler = make_sampler(
            "replay",
            capability_datasets,
            self.processing_class,
            batch_size=batch_size,
            max_length=capability_max_length,
            seed=self.args.seed,
        )

    def replay_nll(self, model: torch.nn.Module) -> torch.Tensor:
        """Mean over tasks of the token-mean NLL of each task's next capability batch (differentiable)."""
        device = next(model.parameters()).device
        losses = [
            -completion_metric(model, self.capability_sampler.next_batch(task, device=device))
            for task in self.capability_sampler.tasks
        ]
        return torch.stack(losses).mean()

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        out = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not self.model.training or self.replay_weight == 0:
            return out
        loss, outputs = out if return_outputs else (out, None)
        nll = self.replay_nll(model)
        self._metrics["train"]["replay/nll"].append(float(nll.detach()))
        loss = loss + self.replay_weight * nll.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss
