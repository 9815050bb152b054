"""A tiny word-level Llama and datasets for trainer tests: built in a second, fully offline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

WORDS = [f"w{i}" for i in range(40)] + ["refuse", "sorry", "copy", "count", "=>", "harm"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}=> {% endif %}"
    )
    return tok


def build_model_dir(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a random tiny Llama and its tokenizer to ``path`` (TRL reloads the reference from it)."""
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
    )
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def preference_rows(n: int = 16) -> list[dict[str, str]]:
    return [
        {"prompt": f"harm w{i % 10} w{(i * 3) % 10} =>", "chosen": " sorry refuse", "rejected": f" w{i % 7} w{i % 5}"}
        for i in range(n)
    ]


def preference_dataset(n: int = 16) -> Dataset:
    return Dataset.from_list(preference_rows(n))


def capability_rows(n: int = 20, start: int = 0) -> dict[str, list[dict[str, str]]]:
    """Rows of the two capability tasks (``copy``, ``count``), indices start..start+n-1."""
    idx = range(start, start + n)
    return {
        "copy": [{"prompt": f"copy w{i} w{i + 1} =>", "completion": f" w{i} w{i + 1}"} for i in idx],
        "count": [{"prompt": f"count w{i} =>", "completion": f" w{i + 1} w{i + 2} w{i + 3}"} for i in idx],
    }


def capability_datasets(n: int = 20) -> dict[str, Dataset]:
    return {task: Dataset.from_list(rows) for task, rows in capability_rows(n).items()}


# --------------------------------------------------------------------------------------
# an independent leak probe: its own tokenisation, metric, gradients and step records
# --------------------------------------------------------------------------------------


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float64 CPU vector of ``tensors``."""
    return torch.cat([t.detach().reshape(-1).cpu() for t in tensors]).double()


def independent_gradient(
    model: torch.nn.Module, params: Sequence[torch.nn.Parameter], rows: Sequence[dict[str, str]], tok: Any
) -> torch.Tensor:
    """∇ of the pooled mean completion log-likelihood over ``rows``, one unpadded row at a time,
    flattened in float64. Shares no code with frontier_trainer (tokeniser calls and autograd only)."""
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    count = 0  # scored tokens over all rows
    for row in rows:
        n_prompt = len(tok(row["prompt"])["input_ids"])
        count += len(tok(row["prompt"] + row["completion"])["input_ids"]) - n_prompt
    was_training = model.training
    model.eval()
    try:
        for row in rows:
            prompt_ids = tok(row["prompt"])["input_ids"]
            ids = tok(row["prompt"] + row["completion"])["input_ids"]
            with torch.enable_grad():
                device = next(model.parameters()).device
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
                logp = torch.log_softmax(logits, dim=-1)
                score = sum(logp[pos - 1, ids[pos]] for pos in range(len(prompt_ids), len(ids)))
                grads = torch.autograd.grad(score / count, list(params), allow_unused=True)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc.add_(g.double())
    finally:
        model.train(was_training)
    return torch.cat([t.reshape(-1) for t in total]).cpu()


class LeakProbe(TrainerCallback):
    """Records θ right before and after every real optimizer step (``on_pre_optimizer_step`` /
    ``on_optimizer_step``), recomputes each capability task's gradient at θ_before with
    :func:`independent_gradient`, and keeps |cos(∇f_i, θ_after − θ_before)| per task.

    ``params`` (optional) names the parameters the leak is measured over (default: all with
    ``requires_grad`` at that step)."""

    def __init__(self, rows: Mapping[str, Sequence[dict[str, str]]], tok: Any, params: Any = None) -> None:
        self.rows = {task: list(r) for task, r in rows.items()}
        self.tok = tok
        self.params = params
        self.steps: list[dict[str, Any]] = []
        self._before: torch.Tensor | None = None

    def _params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        if self.params is not None:
            return list(self.params(model))
        return [p for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model = getattr(model, "module", model)
        params = self._params(model)
        self._before = flat(params)
        self._grads = {t: independent_gradient(model, params, r, self.tok) for t, r in self.rows.items()}
        self._model = model

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self._before is not None
        delta = flat(self._params(self._model)) - self._before
        leak = {
            t: abs(float(g @ delta)) / float(g.norm() * delta.norm()) if float(delta.norm()) > 0 else 0.0
            for t, g in self._grads.items()
        }
        self.steps.append({"step": state.global_step, "delta": delta, "leak": leak, "grads": self._grads})
        self._before = None

    def max_leak(self) -> float:
        return max(v for s in self.steps for v in s["leak"].values())


# --------------------------------------------------------------------------------------
# multi-process runs: the known exit-time abort, and nothing else, is tolerated
# --------------------------------------------------------------------------------------

KNOWN_EXIT_ABORT = "terminate called without an active exception"
"""Multi-process CPU runs occasionally abort natively at exit, after their work is done (field notes
§4: SIGABRT, about 4 in 30 runs)."""


def check_multiprocess_exit(proc: Any, results: Sequence[Path]) -> None:
    """Fail unless ``proc`` exited 0, or it hit :data:`KNOWN_EXIT_ABORT` and every result file the
    ranks write at the END of their work exists and parses as JSON (so the abort came after the
    work). The caller still asserts on the results; a failure during the run stays red."""
    import json
    import warnings

    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    if proc.returncode == 0:
        return
    assert KNOWN_EXIT_ABORT in proc.stderr, f"exit {proc.returncode}:\n{log}"
    for path in results:
        assert Path(path).is_file(), f"exit {proc.returncode} and no {path}:\n{log}"
        json.loads(Path(path).read_text())
    warnings.warn(f"known exit-time abort after the work finished (exit {proc.returncode})", stacklevel=2)


def run_until_results(cmd: Sequence[str], env: Mapping[str, str], results: Sequence[Path], timeout: float = 300) -> Any:
    """Run a multi-process command; once every result file exists (the ranks write them at the END of
    their work) give it 20 s to exit, then stop it. A hang in teardown (seen: gloo workers that had
    written their results never exited) thus costs 20 s, not a CI timeout; a hang before the results
    still fails. Returns a ``CompletedProcess``; pass it to :func:`check_multiprocess_exit`."""
    import subprocess
    import tempfile
    import time
    import warnings

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(cmd), env=dict(env), stdout=out, stderr=err, text=True, start_new_session=True)
        deadline, done_at = time.monotonic() + timeout, None
        while proc.poll() is None:
            now = time.monotonic()
            if done_at is None and all(Path(p).is_file() for p in results):
                done_at = now
            if (done_at is not None and now - done_at > 20) or now > deadline:
                import os
                import signal

                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if done_at is None:
                    raise AssertionError(f"no results after {timeout:.0f} s: {list(map(str, results))}")
                warnings.warn("the ranks wrote their results but did not exit; stopped them", stacklevel=2)
                out.seek(0), err.seek(0)
                return subprocess.CompletedProcess(cmd, 0, out.read(), err.read())
            time.sleep(0.2)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
