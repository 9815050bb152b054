"""Pretraining tiny Llama models from scratch on the lab mixture, with an atomic, resumable cache.

:func:`pretrain` returns a directory that ``LlamaForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load. The directory is ``<cache>/<hash>`` where ``<hash>`` covers
every setting (model shape, optimisation, world config, format version), so different settings never
share an entry.

Cache protocol (why a half-written entry is never used):

* training checkpoints (model, optimizer, scheduler, step, torch RNG) go to ``<cache>/<hash>.partial/``,
  each written to a temporary file and moved into place with ``os.replace``; an interrupted build
  resumes from the last checkpoint;
* the finished model, tokenizer and a ``lab_manifest.json`` (settings, hash, SHA-256 of every file)
  are written to a private temporary directory that is renamed to ``<cache>/<hash>`` in one
  ``os.replace``;
* an existing entry is used only if its manifest parses, names the expected hash and every listed file
  matches its checksum; otherwise it is logged, deleted and rebuilt.

Training is completion-only language modelling (loss on completion tokens and EOS, not on prompts):
the prompts are random symbol strings, so spending capacity on them buys nothing for the lab.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .tokenizer import build_tokenizer
from .world import WorldConfig, sample_pretraining

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the world, tokenizer or training recipe changes, so old cache entries are not reused."""
MANIFEST = "lab_manifest.json"
CHECKPOINT = "checkpoint.pt"
FAMILY_HIDDEN_SIZES = (32, 64, 128, 256)
"""Hidden sizes of the scaling family (paper, Prediction 2); any size with valid heads works."""


def default_cache_dir() -> Path:
    """``$FRONTIER_TRAINER_CACHE/lab`` if the variable is set, else ``~/.cache/frontier_trainer/lab``."""
    root = os.environ.get("FRONTIER_TRAINER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "frontier_trainer"
    return base / "lab"


@dataclass(frozen=True)
class LabConfig:
    """Every setting of a lab model; the cache key is a hash of all of them.

    Attributes:
        hidden_size: model width (the scaling family uses 32, 64, 128, 256).
        num_layers: transformer blocks.
        num_heads: attention heads; ``None`` picks ``max(1, hidden_size // 32)`` (head dim 32, or the
            full width below 32).
        intermediate_size: MLP width; ``None`` picks ``4 * hidden_size``.
        steps: optimizer steps.
        batch_size: sequences (examples) per step.
        learning_rate: peak AdamW learning rate (linear warm-up, cosine decay to 10 %).
        warmup_steps: warm-up steps (capped at a tenth of ``steps``).
        weight_decay: AdamW weight decay.
        seed: seed of initialisation and of the pretraining data stream.
        world: the synthetic world (entanglement knob, world seed, split fraction).
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int | None = None
    intermediate_size: int | None = None
    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        heads = self.heads
        if heads < 1 or self.hidden_size % heads:
            raise ValueError(
                f"num_heads={heads} does not divide hidden_size={self.hidden_size}; pass a num_heads that "
                f"divides it, e.g. num_heads={max(1, self.hidden_size // 32)}."
            )
        if (self.hidden_size // heads) % 2:
            raise ValueError(
                f"hidden_size/num_heads={self.hidden_size // heads} is odd; rotary embeddings need an even "
                "head dimension: change num_heads or hidden_size."
            )
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size={self.intermediate_size!r} must be a positive integer.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be positive.")

    @property
    def heads(self) -> int:
        """Resolved number of attention heads."""
        return self.num_heads if self.num_heads is not None else max(1, self.hidden_size // 32)

    def to_dict(self) -> dict[str, Any]:
        """Resolved settings (``None`` defaults filled in) plus the format version, for hashing."""
        d = asdict(self)
        d["num_heads"] = self.heads
        d["intermediate_size"] = self.intermediate_size or 4 * self.hidden_size
        d["format_version"] = FORMAT_VERSION
        return d

    def settings_hash(self) -> str:
        """16-hex-digit SHA-256 of :meth:`to_dict` (canonical JSON)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_model(config: LabConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` of the given shape (seeded by ``config.seed``)."""
    d = config.to_dict()
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attention_dropout=0.0,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def make_batch(tokenizer: PreTrainedTokenizerFast, config: LabConfig, step: int) -> dict[str, torch.Tensor]:
    """The training batch of a step: a pure function of (seed, step), so resuming replays exactly.

    Right-padded ``input_ids``/``attention_mask``; ``labels`` are -100 on prompt and padding tokens.
    """
    rng = random.Random(config.seed * 1_000_003 + step)
    rows = [sample_pretraining(rng, config.world) for _ in range(config.batch_size)]
    prompts = tokenizer([p for p, _ in rows], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in rows], add_special_tokens=False)["input_ids"]
    seqs = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompts, completions, strict=True)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lr_lambda(config: LabConfig):
    warmup = min(config.warmup_steps, max(1, config.steps // 10))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate_entry(path: Path, expected_hash: str) -> str | None:
    """Why a cache entry is unusable (a message), or ``None`` if it is complete and intact."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST}"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        found_hash = manifest["hash"]
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST} ({err})"
    if found_hash != expected_hash:
        return f"manifest hash {found_hash!r} != expected {expected_hash!r}"
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if _sha256(f) != digest:
            return f"checksum mismatch in {name}"
    return None


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a lab model directory (settings, hash, training stats)."""
    return json.loads((Path(model_dir) / MANIFEST).read_text())


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _load_checkpoint(partial: Path, expected_hash: str) -> dict[str, Any] | None:
    ckpt_path = partial / CHECKPOINT
    if not ckpt_path.is_file():
        return None
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("hash") != expected_hash:
            raise ValueError(f"checkpoint hash {ckpt.get('hash')!r} != {expected_hash!r}")
        return ckpt
    except Exception as err:  # a garbled checkpoint is discarded, never trusted
        logger.warning("Ignoring unusable lab checkpoint %s (%s); training from scratch.", ckpt_path, err)
        return None


def _train(
    config: LabConfig,
    tokenizer: PreTrainedTokenizerFast,
    partial: Path,
    digest: str,
    checkpoint_every: int,
    progress: bool,
    stop_after: int | None,
) -> tuple[LlamaForCausalLM, dict[str, Any]] | None:
    model = build_model(config, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    start, elapsed, losses = 0, 0.0, []
    ckpt = _load_checkpoint(partial, digest)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        start, elapsed, losses = ckpt["step"], ckpt["elapsed"], ckpt["losses"]
        logger.info("Resuming lab pretraining %s from step %d/%d.", digest, start, config.steps)

    def save(step: int) -> None:
        state = {
            "hash": digest,
            "step": step,
            "elapsed": elapsed + time.perf_counter() - t0,
            "losses": losses,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        _atomic_torch_save(state, partial / CHECKPOINT)

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, config.steps),
        initial=start,
        total=config.steps,
        desc=f"pretrain lab h{config.hidden_size} L{config.num_layers}",
        disable=not progress,
    )
    running = None
    for step in bar:
        batch = make_batch(tokenizer, config, step)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % 50 == 0 or step == config.steps - 1:
            losses.append([step, value])
            bar.set_postfix(loss=f"{running:.3f}")
        done = step + 1
        if done < config.steps and checkpoint_every and done % checkpoint_every == 0:
            save(done)
        if stop_after is not None and done >= stop_after and done < config.steps:
            save(done)
            logger.info("Stopped lab pretraining at step %d (stop_after); call again to resume.", done)
            return None
    model.eval()
    stats = {"train_seconds": elapsed + time.perf_counter() - t0, "final_loss": running, "loss_curve": losses}
    return model, stats


def pretrain(
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    *,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    steps: int = 2000,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    entanglement: float | None = None,
    world: WorldConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    checkpoint_every: int = 250,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Pretrain (or load from cache) a lab model and return its directory.

    Args:
        hidden_size, num_layers, seed, num_heads, intermediate_size, steps, batch_size, learning_rate:
            see :class:`LabConfig`.
        entanglement: shortcut for ``world=WorldConfig(entanglement=...)`` (with ``world``'s other
            fields kept).
        world: the synthetic world; default :class:`WorldConfig`.
        cache_dir: cache root; default :func:`default_cache_dir`.
        force: rebuild even if a valid entry exists.
        checkpoint_every: steps between resumable checkpoints (0 disables them).
        progress: show a tqdm progress bar.
        stop_after: stop (leaving a resumable checkpoint) after this many steps; for tests of resuming.

    Returns:
        ``<cache_dir>/<hash>``, holding ``config.json``, ``model.safetensors``, the tokenizer files and
        ``lab_manifest.json``.

    Raises:
        ValueError: on invalid shapes or settings (the message names the argument and the fix).
        RuntimeError: if ``stop_after`` interrupted the build (no finished model yet).
    """
    world = world or WorldConfig()
    if entanglement is not None:
        world = WorldConfig(**{**world.to_dict(), "entanglement": entanglement})
    config = LabConfig(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        world=world,
    )
    return pretrain_config(
        config,
        cache_dir=cache_dir,
        force=force,
        checkpoint_every=checkpoint_every,
        progress=progress,
        stop_after=stop_after,
    )


def pretrain_config(
    config: LabConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    checkpoint_every: int = 250,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """:func:`pretrain` taking a :class:`LabConfig`."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    digest = config.settings_hash()
    final = root / digest
    partial = root / f"{digest}.partial"
    if final.exists():
        problem = "rebuild forced" if force else validate_entry(final, digest)
        if problem is None:
            logger.info("Using cached lab model %s", final)
            return final
        logger.warning("Lab cache entry %s is unusable (%s); deleting and rebuilding it.", final, problem)
        shutil.rmtree(final)
    if force and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(exist_ok=True)

    tokenizer = build_tokenizer()
    result = _train(config, tokenizer, partial, digest, checkpoint_every, progress, stop_after)
    if result is None:
        raise RuntimeError(f"lab pretraining stopped early (stop_after={stop_after}); call again to resume.")
    model, stats = result

    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{digest}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "hash": digest,
            "format_version": FORMAT_VERSION,
            "settings": config.to_dict(),
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch": torch.__version__,
            **stats,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, final)
    except OSError:
        if validate_entry(final, digest) is None:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    shutil.rmtree(partial, ignore_errors=True)
    logger.info(
        "Lab model %s built in %.1fs (final loss %.3f).",
        final,
        stats["train_seconds"],
        stats["final_loss"] or float("nan"),
    )
    return final


def load(model_dir: str | os.PathLike[str]) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a lab model and its tokenizer from a directory returned by :func:`pretrain`."""
    model = LlamaForCausalLM.from_pretrained(model_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model.eval()
    return model, tokenizer
