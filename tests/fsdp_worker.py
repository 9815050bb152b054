"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU): the projection under real FSDP2.

``fsdp_worker.py raw MODEL_DIR OUT_DIR`` trains the same tiny Llama twice side by side, for each
projection mode (null space, frontier): one copy sharded with FSDP2 (``fully_shard`` on each
decoder layer then the root: DTensor ``Shard(0)`` parameters) and projected by
:class:`ShardedUpdateProjector`, one copy wrapped in DDP and projected by :class:`UpdateProjector`,
with the same per-rank batches, the same capability batches and AdamW. It records, per step, the
coefficients of both, the realised leak measured against directions this worker computes itself
on a gathered, unsharded copy (``full_tensor`` of every parameter, ``torch.autograd.grad`` on a
plain model), the all-reduces issued, and at the end the max relative difference of the final
FSDP2 weights from DDP's. Then a resume: 2 steps, a ``torch.distributed.checkpoint`` of model and
optimizer plus the projector's per-rank state, a fresh model restored from it, 2 more steps,
compared with the uninterrupted 4.

``fsdp_worker.py trainer MODEL_DIR OUT_DIR`` trains FrontierDPOTrainer (null space, then
frontier) on a model sharded at load time (``DistributedConfig(fsdp_size=2)``) and then, in the
same processes, on the plain model under DDP, and records the final weights' relative
difference, the coefficients on each rank and the realised leak against directions computed on a
gathered copy from the very capability batches the trainer drew.

``fsdp_worker.py construct MODEL_DIR OUT_DIR JSON`` constructs the trainer with the JSON config
overrides (e.g. under ``accelerate launch --use_fsdp``) and records the error, if any.

Every rank writes ``OUT_DIR/<mode>.rank<r>.json`` with everything the test asserts, and
``"complete": true`` last, BEFORE the process exits: multi-process CPU runs sometimes abort at
exit after finishing (field notes §4), and the test trusts a complete result file over the exit code.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tokenizer, capability_datasets, preference_dataset

from frontier_trainer.directions import build_capability_sampler, capability_gradients, completion_metric
from frontier_trainer.distributed import (
    ShardedUpdateProjector,
    max_shard_bytes,
    sharded_capability_gradients,
)
from frontier_trainer.projection import UpdateProjector

TASKS = ("copy", "count")
#: Every trainer built here stays referenced until the process exits: destroying one mid-run can hit
#: the same native abort as the exit-time one (field notes §4), before the result file is written.
ALIVE: list[Any] = []
TOLERANCE = 0.01
STEPS = 4


def full(params: list[torch.Tensor]) -> torch.Tensor:
    """The whole parameter vector in float64 (a collective for DTensors)."""
    out = []
    for p in params:
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out.append(t.reshape(-1).double())
    return torch.cat(out)


def train_batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(3, 49, (2, 8), generator=g)


def load_plain(model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gathered_direction(model_dir: str, full_theta: torch.Tensor, batch: dict) -> torch.Tensor:
    """∇ completion_metric at θ (given as a full vector) on a plain, unsharded copy, float64."""
    plain = load_plain(model_dir)
    params = list(plain.parameters())
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(full_theta[offset : offset + p.numel()].view(p.shape).to(p.dtype))
            offset += p.numel()
    plain.eval()
    value = completion_metric(plain, batch)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1).double()
            for p, g in zip(params, grads, strict=True)
        ]
    )


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return abs(float(a @ b)) / denom if denom > 0 else 0.0


class Run:
    """One model (FSDP2 or DDP), its AdamW and its projector, stepped by hand."""

    def __init__(self, model_dir: str, kind: str, mode: str, k: int) -> None:
        self.kind = kind
        model = load_plain(model_dir)
        if kind == "fsdp":
            self.model = shard(model)
            self.inner = self.model
        else:
            self.model = torch.nn.parallel.DistributedDataParallel(model)
            self.inner = model
        self.params = [p for p in self.inner.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-2, weight_decay=0.1)
        tolerances = [TOLERANCE] * k if mode == "frontier" else None
        cls = ShardedUpdateProjector if kind == "fsdp" else UpdateProjector
        self.projector = cls(self.params, mode=mode, tolerances=tolerances)

    def directions(self, batches: list[dict]) -> None:
        dirs = []
        for batch in batches:
            if self.kind == "fsdp":
                _, grads = sharded_capability_gradients(self.model, self.params, batch)
            else:
                _, grads = capability_gradients(self.inner, self.params, batch)
            dirs.append(grads)
        self.projector.set_directions(dirs)

    def step(self, step: int, rank: int, refresh_batches: list[dict] | None) -> dict[str, Any]:
        ids = train_batch(step, rank)
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        if refresh_batches is not None:
            self.directions(refresh_batches)
        before = getattr(self.projector, "all_reduce_count", 0)
        self.projector.before_step()
        self.opt.step()
        report = self.projector.after_step()
        self.opt.zero_grad(set_to_none=True)
        return {
            "coefficients": report.coefficients,
            "raw_norm": report.raw_norm,
            "all_reduces": getattr(self.projector, "all_reduce_count", 0) - before,
        }


def capability_batches(sampler: Any) -> list[dict]:
    return [sampler.next_batch(task) for task in TASKS]


def run_raw(model_dir: str, out: Path, rank: int) -> dict[str, Any]:
    tok = build_tokenizer()
    result: dict[str, Any] = {"modes": {}}
    plain_params = list(load_plain(model_dir).parameters())
    theta0 = full(plain_params)
    for mode in ("nullspace", "frontier"):
        runs = {kind: Run(model_dir, kind, mode, len(TASKS)) for kind in ("fsdp", "ddp")}
        samplers = {
            kind: build_capability_sampler(capability_datasets(), tok, max_length=None, batch_size=4, seed=0)
            for kind in runs
        }
        steps = []
        gathered: list[torch.Tensor] = []
        for step in range(STEPS):
            refresh = step % 2 == 0
            record: dict[str, Any] = {"step": step}
            theta_before = full(runs["fsdp"].params)
            batches = {kind: capability_batches(samplers[kind]) if refresh else None for kind in runs}
            if refresh:  # the test's own directions, on a gathered copy at θ_before
                gathered = [gathered_direction(model_dir, theta_before, b) for b in batches["fsdp"]]
            for kind, run in runs.items():
                record[kind] = run.step(step, rank, batches[kind])
            delta = full(runs["fsdp"].params) - theta_before
            record["gathered_leak"] = [cos(g, delta) for g in gathered]
            # frontier constraint (Thm 4.1): ⟨ĉ_i, δ⟩ ≥ −ε ‖u‖, with u's norm from the step's report
            raw_norm = record["fsdp"]["raw_norm"]
            record["gathered_signed"] = [float(g @ delta) / (float(g.norm()) * raw_norm) for g in gathered]
            steps.append(record)
        theta_f, theta_d = full(runs["fsdp"].params), full(runs["ddp"].params)
        proj = runs["fsdp"].projector
        local_bytes = sum(t.numel() * t.element_size() for t in proj.state_dict()["directions"][0])
        result["modes"][mode] = {
            "steps": steps,
            "rel_diff_vs_ddp": float((theta_f - theta_d).norm() / theta_d.norm()),
            "max_abs_diff_vs_ddp": float((theta_f - theta_d).abs().max()),
            "moved_rel": float((theta_d - theta0).norm() / theta0.norm()),
            "extra_memory_bytes": proj.extra_memory_bytes(),
            "local_direction_bytes": local_bytes,
            "planned_shard_bytes": max_shard_bytes(plain_params, 2),
            "full_bytes": sum(p.numel() * p.element_size() for p in plain_params),
        }
    result["resume"] = run_resume(model_dir, out, rank, tok)
    result["refusals"] = refusals(model_dir)
    return result


def refusals(model_dir: str) -> dict[str, str | None]:
    """The errors of projecting DTensors with UpdateProjector and of a partly sharded parameter set."""
    from frontier_trainer.distributed import shard_group

    model = shard(load_plain(model_dir))
    params = list(model.parameters())
    out: dict[str, str | None] = {}
    for name, attempt in {
        "update_projector_on_dtensors": lambda: UpdateProjector(params),
        "partly_sharded": lambda: shard_group(
            [params[0], torch.nn.Parameter(torch.zeros(3))], ["a", "b.weight"]
        ),
    }.items():
        try:
            attempt()
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    return out


def run_resume(model_dir: str, out: Path, rank: int, tok: Any) -> dict[str, Any]:
    """Null space, refresh at steps 0 and 3: steps 2 uses directions restored from the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def refresh(step: int) -> bool:
        return step % 3 == 0

    def go(run: Run, sampler: Any, steps: range) -> None:
        for step in steps:
            run.step(step, rank, capability_batches(sampler) if refresh(step) else None)

    k = len(TASKS)
    whole = Run(model_dir, "fsdp", "nullspace", k)
    go(
        whole,
        build_capability_sampler(capability_datasets(), tok, max_length=None, batch_size=4, seed=0),
        range(4),
    )
    theta_whole = full(whole.params)

    first = Run(model_dir, "fsdp", "nullspace", k)
    sampler = build_capability_sampler(capability_datasets(), tok, max_length=None, batch_size=4, seed=0)
    go(first, sampler, range(2))
    ckpt = out / "resume-ckpt"
    model_sd, optim_sd = get_state_dict(first.model, first.opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt / "dcp"))
    torch.save(
        {"projector": first.projector.state_dict(), "sampler": sampler.state_dict()},
        ckpt / f"frontier_state.rank{rank}.pt",
    )
    dist.barrier()

    second = Run(model_dir, "fsdp", "nullspace", k)
    model_sd, optim_sd = get_state_dict(second.model, second.opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    set_state_dict(second.model, second.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    saved = torch.load(ckpt / f"frontier_state.rank{rank}.pt", weights_only=True)
    second.projector.load_state_dict(saved["projector"])
    sampler2 = build_capability_sampler(capability_datasets(), tok, max_length=None, batch_size=4, seed=0)
    sampler2.load_state_dict(saved["sampler"])
    go(second, sampler2, range(2, 4))
    theta_resumed = full(second.params)

    other = dict(saved["projector"], rank=1 - rank)
    try:
        second.projector.load_state_dict(other)
        wrong_rank_error = None
    except ValueError as err:
        wrong_rank_error = str(err)
    return {
        "max_abs_diff": float((theta_resumed - theta_whole).abs().max()),
        "rel_diff": float((theta_resumed - theta_whole).norm() / theta_whole.norm()),
        "wrong_rank_error": wrong_rank_error,
    }


def trainer_args(out: Path, projection: str, **overrides: Any) -> Any:
    from frontier_trainer import FrontierDPOConfig

    values: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=STEPS,
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
        capability_tolerance=TOLERANCE,
        capability_refresh_steps=2,
        capability_batch_size=4,
        degradation_tracking=False,
        seed=0,
    )
    values.update(overrides)
    return FrontierDPOConfig(**values)


def recording_trainer(model_dir: str) -> type:
    """FrontierDPOTrainer that records, per step, the coefficients and the leak against
    directions this worker computes on a gathered copy from the very batches the trainer drew."""
    from frontier_trainer import FrontierDPOTrainer

    class Recording(FrontierDPOTrainer):
        records: list[dict[str, Any]]

        def _params(self) -> list[torch.Tensor]:
            return [p for p in self._unwrapped_model().parameters() if p.requires_grad]

        def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
            if not hasattr(self, "records"):
                self.records, self._gathered = [], []
                sampler = self.capability_sampler
                draw = sampler.next_batch

                def recorded(task: str, device: Any = None) -> dict:
                    batch = draw(task, device)
                    self._drawn.append({k: v.detach().clone() for k, v in batch.items()})
                    return batch

                sampler.next_batch = recorded  # type: ignore[method-assign]
            self._drawn: list[dict] = []
            self._theta_before = full(self._params())
            super()._before_optimizer_step(optimizer, args, kwargs)
            if self._drawn:
                self._gathered = [gathered_direction(model_dir, self._theta_before, b) for b in self._drawn]

        def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
            super()._after_optimizer_step(optimizer, args, kwargs)
            delta = full(self._params()) - self._theta_before
            report = self._last_report
            self.records.append(
                {
                    "step": self.state.global_step,
                    "coefficients": report.coefficients,
                    "realised_leak": report.realised_leak,
                    "gathered_leak": [cos(g, delta) for g in self._gathered],
                    "gathered_signed": [
                        float(g @ delta) / (float(g.norm()) * report.raw_norm) for g in self._gathered
                    ],
                    "projector": type(self.projector).__name__,
                }
            )

    return Recording


def run_trainer(model_dir: str, out: Path, rank: int) -> dict[str, Any]:
    """Per projection mode: FrontierDPOTrainer on a model sharded at load time, then on the plain
    model under DDP, in the same processes; then the tracker refusal under FSDP2."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    def sharded() -> Any:
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, distributed_config=DistributedConfig(fsdp_size=2)
        )

    cls = recording_trainer(model_dir)
    theta0 = full(list(load_plain(model_dir).parameters()))
    result: dict[str, Any] = {"modes": {}}
    for projection in ("nullspace", "frontier"):
        runs = {}
        for kind in ("fsdp", "ddp"):
            trainer = cls(
                model=sharded() if kind == "fsdp" else model_dir,
                args=trainer_args(out / f"{projection}-{kind}", projection),
                train_dataset=preference_dataset(32),
                processing_class=build_tokenizer(),
                capability_datasets=capability_datasets(),
            )
            ALIVE.append(trainer)
            assert trainer.args.world_size == 2, trainer.args.world_size
            trainer.train()
            if kind == "fsdp" and projection == "nullspace":  # the mixin's per-rank state, saved
                # Trainer._save_checkpoint creates the folder before this call; here every rank does, before
                # either writes (without it rank 0's optimizer save raced rank 1's makedirs and failed under load)
                (out / "ckpt").mkdir(parents=True, exist_ok=True)
                trainer._save_optimizer_and_scheduler(str(out / "ckpt"))
                saved_directions = [[t.clone() for t in d] for d in trainer.projector.directions]
                saved_position = trainer.capability_sampler.state_dict()
            params = [p for p in trainer._unwrapped_model().parameters() if p.requires_grad]
            runs[kind] = {
                "theta": full(params),
                "records": trainer.records,
                "bytes": trainer.peak_state_bytes,
            }
        theta_f, theta_d = runs["fsdp"]["theta"], runs["ddp"]["theta"]
        result["modes"][projection] = {
            "rel_diff_vs_ddp": float((theta_f - theta_d).norm() / theta_d.norm()),
            "moved_rel": float((theta_d - theta0).norm() / theta0.norm()),
            "fsdp": runs["fsdp"]["records"],
            "ddp": runs["ddp"]["records"],
            "peak_state_bytes": {k: v["bytes"] for k, v in runs.items()},
        }
    dist.barrier()
    resumed = cls(
        model=sharded(),
        args=trainer_args(out / "resumed", "nullspace"),
        train_dataset=preference_dataset(32),
        processing_class=build_tokenizer(),
        capability_datasets=capability_datasets(),
    )
    ALIVE.append(resumed)
    resumed.create_optimizer_and_scheduler(num_training_steps=STEPS)
    resumed._load_optimizer_and_scheduler(str(out / "ckpt"))
    loaded = resumed.projector.directions
    result["state_files"] = sorted(p.name for p in (out / "ckpt").glob("frontier_state*"))
    result["state_round_trip"] = (
        len(loaded) == len(saved_directions)
        and all(
            torch.equal(a, b)
            for da, db in zip(loaded, saved_directions, strict=True)
            for a, b in zip(da, db, strict=True)
        )
        and resumed.capability_sampler.state_dict() == saved_position
    )
    try:
        cls(
            model=sharded(),
            args=trainer_args(out / "tracking", "nullspace", degradation_tracking=True),
            train_dataset=preference_dataset(8),
            processing_class=build_tokenizer(),
            capability_datasets=capability_datasets(),
        )
        result["tracking_error"] = None
    except ValueError as err:
        result["tracking_error"] = str(err)
    try:  # the sketch estimator has no sharded path: refused at construction, before training
        cls(
            model=sharded(),
            args=trainer_args(out / "sketch", "nullspace", capability_estimator="sketch"),
            train_dataset=preference_dataset(8),
            processing_class=build_tokenizer(),
            capability_datasets=capability_datasets(),
        )
        result["sketch_error"] = None
    except ValueError as err:
        result["sketch_error"] = str(err)
    return result


def run_construct(model_dir: str, out: Path, rank: int, overrides: str) -> dict[str, Any]:
    """Build the trainer with the JSON config ``overrides`` on the plain model and record the error,
    if any; then build it with projection='none' (no check) and record what accelerate runs."""
    cls = recording_trainer(model_dir)
    result: dict[str, Any] = {}
    for projection in ("nullspace", "none"):
        try:
            trainer = cls(
                model=model_dir,
                args=trainer_args(out / f"construct-{projection}", projection, **json.loads(overrides)),
                train_dataset=preference_dataset(8),
                processing_class=build_tokenizer(),
                capability_datasets=capability_datasets(),
            )
        except ValueError as err:
            result[projection] = {"error": str(err)}
            continue
        ALIVE.append(trainer)
        result[projection] = {
            "error": None,
            "num_processes": trainer.accelerator.num_processes,
            "world_size_env": int(os.environ.get("WORLD_SIZE", "1")),
            "sharded": any(type(p).__name__ == "DTensor" for p in trainer._unwrapped_model().parameters()),
        }
    return result


def main() -> None:
    mode, model_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    try:
        if mode == "raw":
            dist.init_process_group("gloo")
            result = run_raw(model_dir, out, rank)
        elif mode.startswith("trainer"):
            result = run_trainer(model_dir, out, rank)
        elif mode.startswith("construct"):
            result = run_construct(model_dir, out, rank, sys.argv[4])
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    except Exception:  # the test shows this rank's own traceback, not the peer's broken pipe
        (out / f"{mode}.rank{rank}.json").write_text(
            json.dumps({"complete": False, "error": traceback.format_exc()})
        )
        raise
    result["rank"] = rank
    result["complete"] = True
    (out / f"{mode}.rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
