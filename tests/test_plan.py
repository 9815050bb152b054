"""The planning layer: construction checks, a memory plan counted from the real parameter set (and
checked against what a run really holds), provenance with fingerprints, and an import graph with no
cycle in which no library module imports a command module."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import build_model_dir, build_tokenizer, capability_datasets, preference_dataset, preference_rows
from trl import ModelConfig, ScriptArguments

from frontier_trainer.config import FrontierDPOConfig
from frontier_trainer.plan import (
    PLAN_FILE,
    FrontierPlan,
    check_arguments,
    check_model,
    trainable_parameter_set,
)
from frontier_trainer.sources import OFFLINE, InputError

PACKAGE = Path(__file__).resolve().parents[1] / "frontier_trainer"

COMMAND_MODULES = {
    "frontier_trainer.cli",
    "frontier_trainer.demo",
    "frontier_trainer.geometry_report",
    "frontier_trainer.lab.cli",
    "frontier_trainer.hma.cli",
    "frontier_trainer.evaluation.cli",
}
"""Modules that are command-line applications (entry points in pyproject.toml, and the demo)."""

KNOWN_EDGES: set[tuple[str, str]] = set()
"""Edges the graph test tolerates: none (the real/data <-> real/judge and evaluation/suites <->
real_suite cycles are gone; keep it empty)."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one intra-op thread


# --------------------------------------------------------------------------------------
# Import graph
# --------------------------------------------------------------------------------------


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: {frontier_trainer modules it imports}}``, top-level and function-level imports alike.

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``;
    relative imports are resolved against the importing module's package; ``benchmarks`` imports are
    kept as edges to ``benchmarks...`` so that the library check can see them. The implicit import of
    a parent package's ``__init__`` is not an edge (every submodule import has it).
    """
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rsplit(".", 1)[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [
                    f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                    for alias in node.names
                ]
            else:
                continue
            for target in targets:
                if target.startswith("benchmarks"):
                    edges.add(target)
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None`` (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_import_graph_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "frontier_trainer"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "sub" / "b.py").write_text("from frontier_trainer.sub import a\n")
    graph = import_graph(pkg)
    assert graph["frontier_trainer.sub.a"] == {"frontier_trainer.sub.b"}
    assert graph["frontier_trainer.sub.b"] == {"frontier_trainer.sub.a"}
    assert find_cycle(graph) == ["frontier_trainer.sub.a", "frontier_trainer.sub.b", "frontier_trainer.sub.a"]


def test_no_import_cycles_and_the_library_never_imports_a_command_module() -> None:
    graph = import_graph(PACKAGE)
    assert (
        "frontier_trainer.hma.merge" in graph and "frontier_trainer.plan" in graph
    )  # the walk saw the package
    for source, target in KNOWN_EDGES:
        graph.get(source, set()).discard(target)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
    library = {m for m in graph if m not in COMMAND_MODULES}
    bad = sorted(
        (m, t) for m in library for t in graph[m] if t in COMMAND_MODULES or t.startswith("benchmarks")
    )
    assert not bad, f"library modules importing command modules or benchmarks: {bad}"


# --------------------------------------------------------------------------------------
# Construction checks
# --------------------------------------------------------------------------------------


def _args(tmp_path: Path, **changes: Any) -> types.SimpleNamespace:
    """A FrontierDPOConfig's fields as a namespace, so engine settings can be set without building them."""
    args = FrontierDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    values = {name: getattr(args, name) for name in vars(args)}
    values.update(changes)
    return types.SimpleNamespace(**values)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"deepspeed": "ds.json"}, "does not support DeepSpeed"),
        ({"fsdp": "full_shard"}, "does not support FSDP"),
        ({"fp16": True}, "fp16=True with the frontier projection needs CUDA"),
        ({"optim": "lomo"}, "updates parameters inside backward"),
        ({"optim": "schedule_free_adamw"}, "updates parameters inside backward"),
        (
            {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}},
            "use_reentrant",
        ),
        ({"capability_tolerance": {"chess": 0.1}}, "capability_tolerance names unknown task"),
    ],
)
def test_check_arguments_refuses_what_breaks_exactness(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    check_arguments(_args(tmp_path), {"copy": None})  # the defaults pass
    with pytest.raises(ValueError, match=message):
        check_arguments(_args(tmp_path, **changes), {"copy": None})


def test_check_arguments_needs_data_names_metrics_and_allows_engines_without_projection(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="needs capability data"):
        check_arguments(_args(tmp_path), {})
    with pytest.raises(ValueError, match="capability_metrics names unknown task"):
        check_arguments(_args(tmp_path), {"copy": None}, {"count": lambda m, b: m})
    with pytest.raises(ValueError, match="task names must be non-empty strings"):
        check_arguments(_args(tmp_path), {"": None})
    check_arguments(_args(tmp_path, projection="none", deepspeed="ds.json", fsdp="full_shard"), {})


def test_check_model_refuses_low_precision_trainable_weights() -> None:
    model = torch.nn.Linear(2, 2)
    check_model(model)
    with pytest.raises(ValueError, match="DeepSpeed/FSDP"):
        check_model(model, fsdp_enabled=True)
    with pytest.raises(ValueError, match=r"torch.bfloat16.*low-precision"):
        check_model(model.to(torch.bfloat16))
    model.requires_grad_(False)
    check_model(model)  # frozen low-precision weights are not moved by the projection


# --------------------------------------------------------------------------------------
# Memory plan
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("plan") / "model")


def _real_trainable_bytes(
    model_dir: Path, peft_config: Any = None, dtype: torch.dtype = torch.float32
) -> int:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "lora",
    [
        None,
        dict(lora_r=3, lora_target_modules=["q_proj", "down_proj"]),
        dict(lora_r=2, lora_target_modules="all-linear", lora_modules_to_save=["lm_head"]),
        dict(lora_r=2, use_dora=True),
    ],
    ids=["full", "two-targets", "all-linear+modules_to_save", "dora"],
)
def test_meta_device_count_equals_the_real_model(model_dir: Path, lora: dict[str, Any] | None) -> None:
    from transformers import AutoConfig
    from trl import get_peft_config

    model_args = ModelConfig(
        model_name_or_path=str(model_dir), dtype="float32", use_peft=lora is not None, **(lora or {})
    )
    real = _real_trainable_bytes(model_dir, get_peft_config(model_args) if lora else None)
    count, size = trainable_parameter_set(AutoConfig.from_pretrained(model_dir), model_args)
    assert size == real and count * 4 == real


def test_lora_over_a_bf16_base_counts_fp32_adapters(model_dir: Path) -> None:
    from transformers import AutoConfig
    from trl import get_peft_config

    model_args = ModelConfig(model_name_or_path=str(model_dir), dtype="bfloat16", use_peft=True, lora_r=4)
    real = _real_trainable_bytes(model_dir, get_peft_config(model_args), torch.bfloat16)
    count, size = trainable_parameter_set(AutoConfig.from_pretrained(model_dir), model_args)
    assert size == real == 4 * count  # peft keeps the adapters in fp32 over a bf16 base


def _plan(
    tmp_path: Path, model: str, caps: dict[str, str], offline: bool = True, **train: Any
) -> FrontierPlan:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prefs = tmp_path / "prefs.jsonl"
    if not prefs.exists():
        prefs.write_text("\n".join(json.dumps(r) for r in preference_rows()))
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", capability_datasets=caps
    )
    values.update(train)
    return FrontierPlan.build(
        FrontierDPOConfig(**values),
        ModelConfig(model_name_or_path=model, dtype="float32"),
        ScriptArguments(dataset_name=str(prefs)),
        offline=offline,
    )


@pytest.fixture(scope="module")
def cap_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("caps")
    out = {}
    for task, ds in capability_datasets().items():
        out[task] = str(root / f"{task}.jsonl")
        ds.to_json(out[task])
    return out


def test_memory_plan_counts_projector_tracker_and_checkpoint(
    model_dir: Path, cap_files: dict[str, str], tmp_path: Path
) -> None:
    T = _real_trainable_bytes(model_dir)
    plan = _plan(tmp_path, str(model_dir), cap_files, capability_rank=3)
    mem = plan.memory
    m, k = 2, 6
    assert mem.trainable_bytes == T and mem.num_directions == k
    assert mem.projector_bytes == mem.projector_peak_bytes == (k + 1) * T
    assert mem.tracker_bytes == (m + 1) * T and mem.tracker_peak_bytes == (2 * m + 1) * T
    assert mem.checkpoint_bytes == k * T and mem.total_bytes == (k + 1 + m + 1) * T
    ema = _plan(tmp_path, str(model_dir), cap_files, capability_ema=0.5).memory
    assert ema.projector_peak_bytes == (2 + 2) * T  # one fresh gradient beside the k old directions
    quiet = _plan(tmp_path, str(model_dir), cap_files, degradation_tracking=False).memory
    assert quiet.tracker_bytes == 0 and quiet.total_bytes == 3 * T
    # with defaults (rank 1, tracking on) the extra state is twice the projector's (k+1) T
    default = _plan(tmp_path, str(model_dir), cap_files).memory
    assert default.total_bytes == 2 * default.projector_bytes


def test_memory_plan_counts_the_activation_projector_and_no_directions_in_activation_mode(
    model_dir: Path, cap_files: dict[str, str], tmp_path: Path
) -> None:
    """capability_space="activation" holds no gradient directions (k = 0) but the activation bases and
    step images (activation_memory of the model at activation_rank); "both" holds both; the dry run
    says so and counts them in the totals."""
    from transformers import AutoModelForCausalLM

    from frontier_trainer.activation import activation_memory

    T = _real_trainable_bytes(model_dir)
    expected = activation_memory(AutoModelForCausalLM.from_pretrained(model_dir), rank=4, num_directions=0)
    m = 2
    act = _plan(tmp_path / "a", str(model_dir), cap_files, capability_space="activation", activation_rank=4)
    mem = act.memory
    assert mem.num_directions == 0 and mem.projector_bytes == 0
    assert mem.checkpoint_bytes == expected["activation_basis"] > 0  # frontier_state.pt holds the bases
    assert mem.activation_bytes == expected["activation_total"] > 0
    assert mem.activation_refresh_bytes == expected["activation_refresh_one_pass"]  # tiny: one pass fits
    assert mem.total_bytes == mem.activation_bytes + (m + 1) * T
    assert mem.total_peak_bytes == mem.activation_bytes + mem.activation_refresh_bytes + (2 * m + 1) * T
    text = "\n".join(act.lines(_config(tmp_path, cap_files, capability_space="activation", activation_rank=4),
                                 ModelConfig()))  # fmt: skip
    assert "projector: none (capability_space='activation'" in text
    assert f"activation_extra_bytes: {expected['activation_total']}" in text and "directions_extra_bytes: 0" in text
    both = _plan(tmp_path / "b", str(model_dir), cap_files, capability_space="both", activation_rank=4).memory
    assert both.num_directions == m and both.projector_bytes == (m + 1) * T
    assert both.activation_bytes == expected["activation_total"]
    assert both.checkpoint_bytes == m * T + expected["activation_basis"]
    assert both.total_bytes == (m + 1) * T + both.activation_bytes + (m + 1) * T
    gradient = _plan(tmp_path / "g", str(model_dir), cap_files).memory
    assert gradient.activation_bytes == 0 and gradient.activation_refresh_bytes == 0


def _config(tmp_path: Path, caps: dict[str, str], **train: Any) -> FrontierDPOConfig:
    return FrontierDPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                             capability_datasets=caps, **train)  # fmt: skip


def test_hub_model_without_a_local_config_is_unknown_offline_not_an_error(
    cap_files: dict[str, str], tmp_path: Path
) -> None:
    plan = _plan(tmp_path, "some-org/not-cached-model", cap_files)
    assert plan.model.status == OFFLINE and plan.offline == ["model_name_or_path"]
    assert plan.memory.trainable_bytes is None and plan.memory.total_bytes is None
    assert any("memory: unknown" in line for line in plan.lines(plan_args(tmp_path), ModelConfig()))


def plan_args(tmp_path: Path) -> FrontierDPOConfig:
    return FrontierDPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, report_to="none")


def test_plan_refuses_bad_settings_before_training(
    model_dir: Path, cap_files: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="capability_tolerance: task"):
        _plan(tmp_path, str(model_dir), cap_files, projection="frontier", capability_tolerance={"chess": 0.1})
    with pytest.raises(InputError, match="use_reentrant"):
        _plan(
            tmp_path, str(model_dir), cap_files,
            activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True},
        )  # fmt: skip


def test_plan_matches_what_a_run_holds(model_dir: Path, cap_files: dict[str, str], tmp_path: Path) -> None:
    """The projector's measured peak and the checkpoint's frontier_state.pt agree with the plan.

    Without EMA (the default): with ``capability_ema > 0`` the trainer's own counter does not see the
    fresh gradient that exists while it is merged into the old direction (the plan's (k+2) T).
    """
    from frontier_trainer.trainer import STATE_FILE, FrontierDPOTrainer

    for ema in (0.0,):
        out = tmp_path / f"run-{ema}"
        train = dict(
            max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
            save_strategy="steps", save_steps=2, capability_refresh_steps=1, capability_batch_size=4,
            capability_ema=ema, degradation_tracking=False, activation_checkpointing=False,
        )  # fmt: skip
        plan = _plan(out, str(model_dir), cap_files, offline=False, **train)
        trainer = FrontierDPOTrainer(
            model=str(model_dir),
            args=FrontierDPOConfig(
                output_dir=str(out / "out"),
                use_cpu=True,
                bf16=False,
                report_to="none",
                capability_datasets=cap_files,
                **train,
            ),
            train_dataset=preference_dataset(),
            processing_class=build_tokenizer(),
        )
        trainer.train()
        assert trainer.peak_state_bytes == plan.memory.projector_peak_bytes
        size = (out / "out" / "checkpoint-2" / STATE_FILE).stat().st_size
        assert plan.memory.checkpoint_bytes <= size <= plan.memory.checkpoint_bytes + 64 * 1024, size


def _held_tensor_bytes(obj: Any, params: set[int]) -> int:
    """Bytes of the tensors an object holds in its attributes, lists, tuples and dicts (not parameters,
    not through other objects), counting each storage once: what a callback keeps alive."""
    seen: set[int] = set()
    total = 0
    stack = [vars(obj)]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if id(item) not in params and item.untyped_storage().data_ptr() not in seen:
                seen.add(item.untyped_storage().data_ptr())
                total += item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def test_tracker_holds_what_the_plan_says(model_dir: Path, cap_files: dict[str, str], tmp_path: Path) -> None:
    """Between measurements the degradation tracker holds (m+1) T: its snapshot and m gradients."""
    from transformers import TrainerCallback

    from frontier_trainer.tracking import DegradationCallback
    from frontier_trainer.trainer import FrontierDPOTrainer

    train = dict(
        max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        capability_refresh_steps=1, capability_batch_size=4, degradation_tracking=True,
        degradation_eval_steps=1, activation_checkpointing=False, capability_eval_datasets=cap_files,
    )  # fmt: skip
    plan = _plan(tmp_path, str(model_dir), cap_files, offline=False, **train)
    held: list[int] = []

    class Probe(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs["model"]
            params = {id(p) for p in model.parameters()}
            (tracker,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, DegradationCallback)]
            held.append(_held_tensor_bytes(tracker, params))

    trainer = FrontierDPOTrainer(
        model=str(model_dir),
        args=FrontierDPOConfig(
            output_dir=str(tmp_path / "out"),
            use_cpu=True,
            bf16=False,
            report_to="none",
            capability_datasets=cap_files,
            **train,
        ),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        callbacks=[Probe()],
    )
    trainer.train()
    assert plan.memory.tracker_bytes == 3 * plan.memory.trainable_bytes
    assert held == [plan.memory.tracker_bytes] * 2


# --------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------


def test_plan_writes_provenance_with_fingerprints(
    model_dir: Path, cap_files: dict[str, str], tmp_path: Path
) -> None:
    plan = _plan(tmp_path, str(model_dir), cap_files, learning_rate=3e-4)
    path = plan.write(tmp_path / "prov")
    assert path.name == PLAN_FILE
    record = json.loads(path.read_text())
    assert record["versions"]["torch"] == importlib.metadata.version("torch")
    assert record["settings"]["training"]["learning_rate"] == 3e-4
    by_key = {s["key"]: s for s in record["sources"]}
    assert by_key["model_name_or_path"]["fingerprint"].startswith("sha256:")
    assert by_key["dataset_name"]["fingerprint"].startswith("rows-sha256:")
    assert by_key["capability_datasets['copy']"]["source_sha256"].startswith("sha256:")
    assert record["memory"]["total_bytes"] == plan.memory.total_bytes
    fingerprints = plan.capability_fingerprints
    assert set(fingerprints) == {"copy", "count"} and fingerprints["copy"] != fingerprints["count"]
    # a changed row changes the capability fingerprint; the same data gives the same one
    again = _plan(tmp_path, str(model_dir), cap_files)
    assert again.capability_fingerprints == fingerprints
    changed = dict(cap_files)
    rows = Path(cap_files["copy"]).read_text().splitlines()
    edited = tmp_path / "copy-edited.jsonl"
    edited.write_text("\n".join([rows[0].replace("w0", "w9"), *rows[1:]]) + "\n")
    changed["copy"] = str(edited)
    assert _plan(tmp_path, str(model_dir), changed).capability_fingerprints["copy"] != fingerprints["copy"]
    assert not (tmp_path / "out").exists()  # building a plan writes nothing by itself
