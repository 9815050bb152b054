"""Run under ``torchrun --nproc_per_node 2``: FrontierDPOTrainer (or, with a 4th argument
``grpo``, FrontierGRPOTrainer with a refusal reward) on CPU/gloo DDP.

Writes ``rank<r>.json`` with a SHA-256 of the trainable parameters after every optimizer step
(and the measured leak), so the test can check that both replicas stay byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from datasets import Dataset
from tiny import build_tokenizer, capability_datasets, preference_dataset

from frontier_trainer import FrontierDPOConfig, FrontierDPOTrainer, FrontierGRPOConfig, FrontierGRPOTrainer


def refusal_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """Refusal words rewarded on the harmful prompts (a small length term keeps rewards varied)."""
    return [
        sum(w in ("refuse", "sorry") for w in str(c).split()) + 0.01 * len(str(c).split())
        for c in completions
    ]


def main() -> None:
    model_dir, out_dir, projection = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    kind = sys.argv[4] if len(sys.argv) > 4 else "dpo"
    base = FrontierGRPOTrainer if kind == "grpo" else FrontierDPOTrainer
    rank = int(os.environ.get("RANK", "0"))
    records: list[dict] = []
    drawn: list[list] = []
    first_directions: list[list[float]] = []
    if kind == "sketch":
        # stand in for nondeterministic kernels after the all-reduce: rank 1's sketch result differs in
        # its last bits; the broadcast from rank 0 must make the installed directions identical anyway
        from frontier_trainer import subspace

        original = subspace.GradientSketch.directions

        def perturbed(self):
            directions, values = original(self)
            if rank == 1:
                for direction in directions:
                    for t in direction:
                        t.mul_(1 + 1e-6)
            return directions, values

        subspace.GradientSketch.directions = perturbed

    class Recording(base):
        def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
            super()._after_optimizer_step(optimizer, args, kwargs)
            params = [p for p in self.accelerator.unwrap_model(self.model).parameters() if p.requires_grad]
            digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in params)).hexdigest()
            dirs = hashlib.sha256(
                b"".join(t.detach().cpu().numpy().tobytes() for d in self.projector.directions for t in d)
            ).hexdigest()
            if kind == "sketch" and not records:  # the directions of the first refresh, at the initial weights
                first_directions.extend(
                    torch.cat([t.detach().reshape(-1) for t in d]).tolist() for d in self.projector.directions
                )
            records.append(
                {
                    "step": self.state.global_step,
                    "sha256": digest,
                    "directions_sha256": dirs,
                    "leak": self._last_report.realised_leak,
                    "drawn": list(drawn),
                }
            )

    settings = dict(
        output_dir=str(out_dir / "run"),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        ddp_backend="gloo",
        projection=projection,
        capability_tolerance=0.05,
        capability_refresh_steps=2,
        capability_batch_size=4,
        seed=0,
    )
    common = dict(processing_class=build_tokenizer(), capability_datasets=capability_datasets())
    if kind == "grpo":
        settings.update(per_device_train_batch_size=4, num_generations=4, max_completion_length=6)
        prompts = Dataset.from_list([{"prompt": f"harm w{i} =>"} for i in range(32)])
        args = FrontierGRPOConfig(**settings)
        trainer = Recording(
            model=model_dir, reward_funcs=refusal_reward, args=args, train_dataset=prompts, **common
        )
    else:
        if kind == "sketch":
            settings.update(capability_estimator="sketch", capability_sketch_batches=3, capability_batch_size=2)
        if kind == "roundrobin":  # one of the two tasks re-estimated per refresh, every step
            settings.update(capability_refresh_tasks=1, capability_refresh_steps=1)
        args = FrontierDPOConfig(**settings)
        trainer = Recording(model=model_dir, args=args, train_dataset=preference_dataset(32), **common)
    sampler = trainer.capability_sampler
    collate = sampler.collate

    def recording_collate(task, indices, device=None):
        drawn.append([task, list(indices)])
        return collate(task, indices, device=device)

    sampler.collate = recording_collate
    assert trainer.args.world_size == 2, f"expected 2 processes, got {trainer.args.world_size}"
    trainer.train()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(records))
    if first_directions:
        (out_dir / f"rank{rank}_directions.json").write_text(json.dumps(first_directions))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
