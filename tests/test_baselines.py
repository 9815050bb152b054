"""The arena's baselines do what their papers say, measured by the test's own computations.

- replay: the training loss equals DPO loss + λ·NLL of the capability batches it drew;
- OGPSA: right after the projection, before Adam, every tensor's gradient is orthogonal to each held
  capability gradient of that tensor, and Adam's realised update is not (the field notes' critique);
- NSPO: right after a re-projection, (W − W_ref)Kᵀ = 0 for every MLP linear, with K recorded by the
  test's own forward hooks, and nothing else moved by it (full weights and LoRA);
- uniform_merge runs real mergekit: every tensor equals (1 − t)·base + t·aligned.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny import build_model_dir, build_tokenizer, capability_datasets, preference_dataset
from torch.nn import functional
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

from benchmarks.baselines import BASELINES, build_trainer, materialise_adapter, uniform_merge
from benchmarks.baselines.nspo import NSPODPOTrainer
from benchmarks.baselines.ogpsa import OGPSADPOTrainer

MLP_SUFFIXES = ("gate_proj", "up_proj", "down_proj")


def dpo_args(tmp_path: Path, **overrides: Any) -> DPOConfig:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        seed=0,
    )
    values.update(overrides)
    return DPOConfig(**values)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def load(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def common(model_dir: Path, tmp_path: Path, **args: Any) -> dict[str, Any]:
    return dict(
        model=load(model_dir),
        args=dpo_args(tmp_path, **args),
        train_dataset=preference_dataset(),
        processing_class=build_tokenizer(),
        capability_datasets=capability_datasets(),
    )


# ---------------------------------------------------------------------------------------------- registry


def test_registry_documents_every_baseline() -> None:
    assert set(BASELINES) == {"vanilla", "replay", "ogpsa", "nspo"}
    for name, spec in BASELINES.items():
        assert spec.name == name
        assert issubclass(spec.trainer_class, DPOTrainer)
        assert spec.source and spec.deviations
        if name != "vanilla":  # our classes: source, algorithm, options and deviations in the docstring
            doc = spec.trainer_class.__doc__ or ""
            assert "Algorithm" in doc and "Options" in doc and "Deviations" in doc, name
            assert set(spec.default_options) >= {"capability_batch_size", "capability_max_length"}


def test_vanilla_is_plain_trl(model_dir: Path, tmp_path: Path) -> None:
    trainer = build_trainer("vanilla", **common(model_dir, tmp_path))
    assert type(trainer) is DPOTrainer


@pytest.mark.parametrize(
    ("name", "options", "needle"),
    [
        ("nope", {}, "name='nope'"),
        ("ogpsa", {"refresh_step": 5}, "refresh_step"),
        ("vanilla", {"replay_weight": 1.0}, "replay_weight"),
        ("replay", {"replay_weight": -1.0}, "replay_weight"),
        ("replay", {"replay_weight": float("nan")}, "replay_weight"),
        ("ogpsa", {"refresh_steps": 0}, "refresh_steps"),
        ("ogpsa", {"n_reference": 2.5}, "n_reference"),
        ("nspo", {"eig_threshold": 2.0}, "eig_threshold"),
        ("nspo", {"reproject_steps": -1}, "reproject_steps"),
        ("nspo", {"mlp_modules": ["no_such_proj"]}, "mlp_modules"),
        ("nspo", {"mlp_modules": "gate_proj"}, "mlp_modules"),
    ],
)
def test_bad_options_are_refused_naming_them(
    model_dir: Path, tmp_path: Path, name: str, options: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        build_trainer(name, **common(model_dir, tmp_path), **options)


@pytest.mark.parametrize("name", ["replay", "ogpsa", "nspo"])
def test_capability_data_is_required(model_dir: Path, tmp_path: Path, name: str) -> None:
    kwargs = common(model_dir, tmp_path)
    kwargs["capability_datasets"] = {}
    with pytest.raises(ValueError, match="capability_datasets"):
        build_trainer(name, **kwargs)


# ---------------------------------------------------------------------------------------------- replay


def own_completion_nll(model: torch.nn.Module, rows: list[dict[str, str]]) -> torch.Tensor:
    """Token-pooled NLL of the completion tokens, each row run alone (no padding), prompt masked."""
    tok = build_tokenizer()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for row in rows:
        prompt_len = len(tok(row["prompt"])["input_ids"])
        ids = torch.tensor([tok(row["prompt"] + row["completion"])["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1].double()
        targets = ids[0, 1:]
        nll = functional.cross_entropy(logits, targets, reduction="none")
        total = total + nll[prompt_len - 1 :].sum()
        count += len(targets) - (prompt_len - 1)
    return total / count


def test_replay_loss_is_dpo_loss_plus_weighted_nll(model_dir: Path, tmp_path: Path) -> None:
    lam = 0.37
    trainer = build_trainer(
        "replay", **common(model_dir, tmp_path), replay_weight=lam, capability_batch_size=3
    )
    vanilla = build_trainer("vanilla", **common(model_dir, tmp_path / "v"))
    batch = next(iter(trainer.get_train_dataloader()))
    # which capability rows the replay will draw: a copy of its sampler, read before the call
    probe = copy.deepcopy(trainer.capability_sampler)
    data = capability_datasets()
    drawn = {task: [data[task][i] for i in probe.next_indices(task)] for task in probe.tasks}
    trainer.model.train()
    vanilla.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    dpo = vanilla.compute_loss(vanilla.model, batch)
    with torch.no_grad():
        nll = torch.stack([own_completion_nll(vanilla.model, rows) for rows in drawn.values()]).mean()
    expected = float(dpo.detach()) + lam * float(nll)
    assert abs(float(dpo.detach()) - float(loss.detach())) > 0.1  # the replay term is not negligible here
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert trainer._metrics["train"]["replay/nll"][-1] == pytest.approx(float(nll), rel=1e-5)
    trainer.model.eval()  # evaluation reports the plain DPO loss, comparable across methods
    with torch.no_grad():
        assert float(trainer.compute_loss(trainer.model, batch)) == pytest.approx(
            float(dpo.detach()), rel=1e-5
        )


# ---------------------------------------------------------------------------------------------- OGPSA


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    denom = float(a.norm() * b.norm())
    return abs(float(a @ b)) / denom if denom > 0 else 0.0


def test_ogpsa_anchor_is_the_mean_loss_gradient_over_the_reference_rows(
    model_dir: Path, tmp_path: Path
) -> None:
    """a_i = −∇ of the token-pooled completion NLL of the first n_reference rows, computed by the test
    (rows one by one, own tokenisation and cross-entropy); 6 rows in batches of 4 + 2."""
    trainer = build_trainer("ogpsa", **common(model_dir, tmp_path), n_reference=6, capability_batch_size=4)
    trainer.refresh_reference_gradients()
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = [p for p in model.parameters() if p.requires_grad]
    for task, anchor in zip(trainer.capability_sampler.tasks, trainer.reference_gradients, strict=True):
        rows = list(capability_datasets()[task].select(range(6)))
        grads = torch.autograd.grad(own_completion_nll(model, rows), params)
        mine, theirs = torch.cat([g.reshape(-1) for g in grads]), torch.cat([a.reshape(-1) for a in anchor])
        assert float(theirs.norm()) > 0
        assert torch.allclose(theirs.double(), -mine.double(), rtol=1e-4, atol=1e-6 * float(mine.norm())), (
            task
        )


class RecordingOGPSA(OGPSADPOTrainer):
    """Records, with its own hooks registered after the baseline's, the gradient right after the
    projection (before Adam) and the realised update after Adam, against the held anchors."""

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        raw = getattr(optimizer, "optimizer", optimizer)
        if not getattr(self, "_recording", False):
            raw.register_step_pre_hook(self._record_before)
            raw.register_step_post_hook(self._record_after)
            self._recording = True
            self.records: list[dict[str, Any]] = []
            self.refresh_steps_seen: list[int] = []
            self.raw_grads: list[list[torch.Tensor]] = []
        return optimizer

    def refresh_reference_gradients(self) -> None:
        super().refresh_reference_gradients()
        self.refresh_steps_seen.append(self.state.global_step)

    def project_gradients(self) -> None:
        self.raw_grads.append([p.grad.detach().clone() for p in self._params()])
        super().project_gradients()

    def _record_before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        params = self._params()
        self.records.append(
            {
                "grads": [p.grad.detach().clone() for p in params],
                "before": [p.detach().clone() for p in params],
                "anchors": [[a.clone() for a in task] for task in self.reference_gradients],
            }
        )

    def _record_after(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        record = self.records[-1]
        record["update"] = [p.detach() - b for p, b in zip(self._params(), record.pop("before"), strict=True)]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-accum2"])
def test_ogpsa_gradient_is_orthogonal_before_adam_but_update_is_not(
    model_dir: Path, tmp_path: Path, lora: bool
) -> None:
    """Once per optimizer step (after gradient accumulation), per tensor and per task."""
    kwargs = common(model_dir, tmp_path, max_steps=7, gradient_accumulation_steps=2 if lora else 1)
    if lora:
        kwargs["peft_config"] = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
    trainer = RecordingOGPSA(**kwargs, refresh_steps=5, n_reference=6, capability_batch_size=4)
    trainer.train()
    assert trainer.refresh_steps_seen == [0, 5]
    assert len(trainer.records) == 7
    # the anchors were recomputed at new weights
    first, second = trainer.records[0]["anchors"], trainer.records[5]["anchors"]
    assert any(not torch.equal(a, b) for a, b in zip(first[0], second[0], strict=True))
    worst_grad = worst_update = worst_raw = 0.0
    checked = 0
    for step, record in enumerate(trainer.records):
        for j, g in enumerate(record["grads"]):
            for anchor in record["anchors"]:
                if float(anchor[j].norm()) == 0 or float(g.norm()) == 0:
                    continue
                checked += 1
                worst_grad = max(worst_grad, cos(g, anchor[j]))
                worst_update = max(worst_update, cos(record["update"][j], anchor[j]))
                worst_raw = max(worst_raw, cos(trainer.raw_grads[step][j], anchor[j]))
    assert checked > (15 if lora else 50)
    assert worst_grad <= 1e-6, worst_grad
    assert worst_raw > 1e-2, worst_raw  # without the projection the test would see it
    assert worst_update > 1e-3, worst_update  # Adam puts the blocked component back (field notes §2)
    assert worst_update > 1e3 * worst_grad


# ---------------------------------------------------------------------------------------------- NSPO


def own_activations(model: torch.nn.Module, names: list[str], n_reference: int) -> dict[str, torch.Tensor]:
    """K per MLP linear: the inputs at every token of the first n_reference rows of each task, each row
    run alone through the untrained model, recorded by this test's own forward hooks."""
    tok = build_tokenizer()
    modules = dict(model.named_modules())
    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        modules[n].register_forward_pre_hook(
            lambda m, args, n=n: recorded[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        )
        for n in names
    ]
    with torch.no_grad():
        for rows in capability_datasets().values():
            for row in rows.select(range(n_reference)):
                model(input_ids=torch.tensor([tok(row["prompt"] + row["completion"])["input_ids"]]))
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in recorded.items()}


def relative_residual(delta: torch.Tensor, K: torch.Tensor) -> float:
    delta = delta.double()
    return float((delta @ K.T).norm()) / max(float(delta.norm() * torch.linalg.matrix_norm(K, 2)), 1e-300)


class RecordingNSPO(NSPODPOTrainer):
    """Snapshots every parameter right before and right after each re-projection."""

    def reproject(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        super().reproject()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.__dict__.setdefault("snapshots", []).append((self.state.global_step, before, after))


def mlp_weight_names(model: torch.nn.Module) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if n.split(".")[-1] in MLP_SUFFIXES]


@pytest.mark.parametrize(("eig_threshold", "n_reference", "bound"), [(1e-10, 1, 1e-6), (1e-2, 20, None)])
def test_nspo_weights_satisfy_null_space_after_reprojection(
    model_dir: Path, tmp_path: Path, eig_threshold: float, n_reference: int, bound: float | None
) -> None:
    """(W − W_ref)Kᵀ = 0 right after each re-projection. With the exact threshold (K rank-deficient: 12
    tokens < d_in) to 1e-6 relative; with the default relative threshold τ, the null directions carry at
    most τ·λ_max of KᵀK, so the residual is bounded by √τ."""
    trainer = RecordingNSPO(
        **common(model_dir, tmp_path, max_steps=7),
        reproject_steps=5,
        eig_threshold=eig_threshold,
        n_reference=n_reference,
    )
    trainer.train()
    fresh = load(model_dir)
    names = [n for n, m in fresh.named_modules() if n.split(".")[-1] in MLP_SUFFIXES]
    assert len(names) == 6
    K = own_activations(fresh, names, n_reference)
    W_ref = load_file(str(model_dir / "model.safetensors"))
    steps = [s[0] for s in trainer.snapshots]
    assert steps == [4, 6, 7]  # after optimizer steps 5 and 7 (the last), and at on_train_end
    limit = bound if bound is not None else 1.01 * math.sqrt(eig_threshold)
    mlp = set(mlp_weight_names(fresh))
    for _, before, after in trainer.snapshots[:2]:
        moved = 0
        for name in names:
            delta = after[f"{name}.weight"] - W_ref[f"{name}.weight"]
            assert relative_residual(delta, K[name]) <= limit, name
            moved += float(delta.norm()) > 1e-4  # the constraint is not met by standing still
            if bound is not None:  # the residual before the re-projection was large: the test can tell
                assert relative_residual(before[f"{name}.weight"] - W_ref[f"{name}.weight"], K[name]) > 1e-2
        assert moved == len(names) if bound is not None else moved >= 1
        for key in before:
            if key not in mlp:
                assert torch.equal(before[key], after[key]), f"re-projection touched {key}"
            else:
                assert not torch.equal(before[key], after[key]), f"re-projection left {key} unchanged"


def test_nspo_lora_reprojects_lora_a_exactly(model_dir: Path, tmp_path: Path) -> None:
    """With LoRA, (sBA)P = sB(AP): the effective change satisfies ΔW Kᵀ = 0 after re-projection, and
    B and the non-MLP adapters (q_proj) are untouched by it."""
    kwargs = common(model_dir, tmp_path, max_steps=5)
    kwargs["peft_config"] = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[*MLP_SUFFIXES, "q_proj"], task_type="CAUSAL_LM"
    )
    trainer = RecordingNSPO(**kwargs, reproject_steps=5, eig_threshold=1e-10, n_reference=1)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    fresh = load(model_dir)
    names = [n for n, m in fresh.named_modules() if n.split(".")[-1] in MLP_SUFFIXES]
    K = own_activations(fresh, names, 1)
    _, before, after = trainer.snapshots[0]
    modules = dict(model.named_modules())
    for key in before:
        is_mlp_A = "lora_A" in key and any(f"{s}.lora_A" in key for s in MLP_SUFFIXES)
        if is_mlp_A:
            assert not torch.equal(before[key], after[key]), key
        else:
            assert torch.equal(before[key], after[key]), f"re-projection touched {key}"
    for name in names:
        layer = modules[f"base_model.model.{name}"]
        A = after[f"base_model.model.{name}.lora_A.default.weight"]
        B = after[f"base_model.model.{name}.lora_B.default.weight"]
        delta = layer.scaling["default"] * (B.double() @ A.double())
        assert float(delta.norm()) > 1e-5
        assert relative_residual(delta, K[name]) <= 1e-6, name


def test_nspo_lora_refuses_nonzero_initial_adapter(model_dir: Path, tmp_path: Path) -> None:
    kwargs = common(model_dir, tmp_path, max_steps=1)
    kwargs["peft_config"] = LoraConfig(r=2, target_modules=list(MLP_SUFFIXES), init_lora_weights=False)
    with pytest.raises(ValueError, match="init_lora_weights"):
        NSPODPOTrainer(**kwargs, n_reference=1)


# ---------------------------------------------------------------------------------------------- merges


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tied_model_dir(path: Path, seed: int) -> Path:
    """A tiny Llama with tied embeddings (as SmolLM2): the head is saved once, as embed_tokens."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_uniform_merge_is_linear_interpolation_through_mergekit(tmp_path: Path, tied: bool) -> None:
    build = tied_model_dir if tied else build_model_dir
    base = build(tmp_path / "base", seed=0)
    aligned = build(tmp_path / "aligned", seed=1)
    t = 0.3
    out = uniform_merge(base, aligned, t, tmp_path / "merged")
    a, b = load_file(str(base / "model.safetensors")), load_file(str(aligned / "model.safetensors"))
    merged: dict[str, torch.Tensor] = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(str(f)))
    assert set(merged) == set(a)
    for key, value in merged.items():
        expected = (1 - t) * a[key].double() + t * b[key].double()
        assert not torch.equal(a[key], b[key]) or "norm" in key
        assert torch.allclose(value.double(), expected, atol=1e-6, rtol=0), key
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["t"] == t and "linear" in provenance["mergekit_yaml"]
    assert provenance["inputs"]["base"]["sha256"]["model.safetensors"] == sha256(base / "model.safetensors")
    assert provenance["inputs"]["aligned"]["sha256"]["model.safetensors"] == sha256(
        aligned / "model.safetensors"
    )
    assert (out / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    head = (1 - t) * a["model.embed_tokens.weight"].double() + t * b["model.embed_tokens.weight"].double()
    if not tied:
        head = (1 - t) * a["lm_head.weight"].double() + t * b["lm_head.weight"].double()
    assert reloaded.config.tie_word_embeddings is tied
    assert torch.allclose(reloaded.lm_head.weight.detach().double(), head, atol=1e-6)


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_uniform_merge_refuses_bad_t(tmp_path: Path, t: Any) -> None:
    with pytest.raises(ValueError, match="t="):
        uniform_merge(tmp_path / "a", tmp_path / "b", t, tmp_path / "out")


def test_uniform_merge_refuses_missing_inputs(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="aligned_dir"):
        uniform_merge(model_dir, tmp_path / "missing", 0.5, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="base_dir"):
        uniform_merge(tmp_path / "empty", model_dir, 0.5, tmp_path / "out")


def test_materialise_adapter_merges_lora(model_dir: Path, tmp_path: Path) -> None:
    model = get_peft_model(
        load(model_dir),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    out = materialise_adapter(model_dir, tmp_path / "adapter", tmp_path / "full")
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(model_dir / "model.safetensors"))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    delta = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(merged[key], base[key] + delta.detach(), atol=1e-6)
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    # the materialised model is a valid uniform_merge input
    uniform_merge(model_dir, out, 0.5, tmp_path / "merged")
