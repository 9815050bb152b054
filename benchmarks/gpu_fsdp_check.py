"""FSDP2 check for a lent GPU: consistency against DDP and per-rank peak memory against vanilla.

Run with one process per GPU (NCCL), or on the CPU with gloo for a smoke test::

    torchrun --nproc_per_node N benchmarks/gpu_fsdp_check.py --out results/gpu_fsdp.json
    torchrun --nproc_per_node 2 benchmarks/gpu_fsdp_check.py --cpu --hidden 64 --layers 2 --steps 3

What it measures, on a random Llama of the given size in fp32 (AdamW, the null-space projection
against 2 capability directions refreshed every other step):

1. consistency: the same model trained side by side sharded with FSDP2 (``fully_shard`` per
   decoder layer, then the root) and projected by :class:`ShardedUpdateProjector`, and under
   DDP projected by :class:`UpdateProjector` (skipped when one rank cannot hold the DDP copy
   next to the sharded one: ``--no-ddp``): max relative difference of the final weights,
   whether every rank got the same coefficients, and the realised leak |cos(c_i, Δθ)|;
2. memory: per-rank peak ``torch.cuda.max_memory_allocated`` of FSDP2 training steps without
   projection (vanilla) and with it, against the planned (k+1) T / N of the projector.

GPU kernels are not bitwise deterministic, so the comparison with DDP is a tolerance (1e-5
relative is reported as a pass), not an equality. Nothing here is asserted in CI (no GPU there);
the CPU path is smoke-tested by tests/test_fsdp.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from frontier_trainer.directions import capability_gradients, completion_metric
from frontier_trainer.distributed import ShardedUpdateProjector, max_shard_bytes, sharded_capability_gradients
from frontier_trainer.projection import UpdateProjector

logger = logging.getLogger("gpu_fsdp_check")


def build(hidden: int, layers: int, vocab: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).float()


def shard(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, rank: int, vocab: int, seq: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (2, seq), generator=g).to(device)


def capability_batch(task: int, vocab: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The same rows on every rank (a capability batch must be identical across ranks)."""
    g = torch.Generator().manual_seed(7 + task)
    ids = torch.randint(0, vocab, (2, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def full(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1).double() for p in params])


def train(model: Any, kind: str, args: argparse.Namespace, device: torch.device, project: bool) -> dict[str, Any]:
    """``args.steps`` AdamW steps; with ``project`` the null-space projection (refresh every 2)."""
    inner = model.module if kind == "ddp" else model
    params = [p for p in inner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    projector: UpdateProjector | None = None
    if project:
        projector = ShardedUpdateProjector(params) if kind == "fsdp" else UpdateProjector(params)
    coefficients, leaks = [], []
    rank = dist.get_rank()
    for step in range(args.steps):
        ids = batch(step, rank, args.vocab, args.seq, device)
        model(input_ids=ids, labels=ids).loss.backward()
        if projector is not None:
            if step % 2 == 0:
                dirs = []
                for task in range(2):
                    cb = capability_batch(task, args.vocab, args.seq, device)
                    if kind == "fsdp":
                        _, g = sharded_capability_gradients(model, params, cb)
                    else:
                        _, g = capability_gradients(inner, params, cb, metric=completion_metric)
                    dirs.append(g)
                projector.set_directions(dirs)
            projector.before_step()
        opt.step()
        if projector is not None:
            report = projector.after_step(measure=True)
            coefficients.append(report.coefficients)
            leaks.append(max(report.realised_leak or [0.0]))
        opt.zero_grad(set_to_none=True)
    return {"params": params, "coefficients": coefficients, "max_leak": max(leaks, default=None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU (smoke test)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-ddp", action="store_true", help="skip the DDP comparison (memory only)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    use_cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    device_type = "cuda" if use_cuda else "cpu"

    def peak_reset() -> None:
        if use_cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    def peak() -> int | None:
        return int(torch.cuda.max_memory_allocated(device)) if use_cuda else None

    result: dict[str, Any] = {"world_size": world, "device": str(device), "config": vars(args) | {"out": None}}
    # memory: vanilla FSDP2 then projected FSDP2, each a fresh model
    for project in (False, True):
        peak_reset()
        model = shard(build(args.hidden, args.layers, args.vocab, seed=0).to(device), device_type)
        run = train(model, "fsdp", args, device, project)
        key = "projected" if project else "vanilla"
        result[f"peak_bytes_{key}"] = peak()
        if project:
            result["planned_projector_bytes_per_rank"] = 3 * max_shard_bytes(run["params"], world)
            result["max_leak_fsdp"] = run["max_leak"]
            theta_fsdp, coeff_fsdp = full(run["params"]), run["coefficients"]
        del model, run
    if result["peak_bytes_vanilla"] is not None:
        result["measured_extra_bytes_per_rank"] = result["peak_bytes_projected"] - result["peak_bytes_vanilla"]
    # consistency: ranks agree on every coefficient; FSDP2 against DDP
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, coeff_fsdp)
    result["ranks_agree_on_coefficients"] = all(g == gathered[0] for g in gathered)
    if not args.no_ddp:
        ddp_model = build(args.hidden, args.layers, args.vocab, seed=0).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(ddp_model, device_ids=[device] if use_cuda else None)
        run = train(ddp, "ddp", args, device, True)
        theta_ddp = full(run["params"])
        result["rel_diff_vs_ddp"] = float((theta_fsdp - theta_ddp).norm() / theta_ddp.norm())
        result["max_leak_ddp"] = run["max_leak"]
        result["consistent"] = result["rel_diff_vs_ddp"] <= 1e-5 and result["ranks_agree_on_coefficients"]
    if rank == 0:
        logger.info("%s", json.dumps(result, indent=2))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
