"""The lab's deterministic word-level tokenizer, built in code (no download).

One token per whitespace-separated word of the synthetic world, plus four special tokens. No special
token is ever added automatically (no BOS, no EOS post-processor), so for every row
``tokenizer(prompt).input_ids`` is a prefix of ``tokenizer(prompt + completion).input_ids`` and equals
the first part of ``tokenizer(prompt).input_ids + tokenizer(completion).input_ids``: the separately
and jointly tokenised forms used by TRL and by the capability metric coincide.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .world import SEP, all_words

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK]
MAX_VOCAB = 4096

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] }}{% if not message['content'].endswith('" + SEP + "') %}"
    "{{ ' " + SEP + "' }}{% endif %}{% endif %}"
    "{% endfor %}"
)
"""User turns are rendered as the prompt (``' =>'`` appended if missing); assistant turns as
``' ' + content + eos``; ``add_generation_prompt`` adds nothing, the prompt already ends with ``=>``."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the lab tokenizer: ids 0-3 are ``<pad> <eos> <bos> <unk>``, then the sorted world words.

    Deterministic: the vocabulary is the sorted word list of :func:`world.all_words`, independent of
    any world setting, so every lab model shares it.
    """
    words = all_words()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    if len(vocab) > MAX_VOCAB:
        raise ValueError(f"the world has {len(vocab)} tokens, more than MAX_VOCAB={MAX_VOCAB}; shrink it.")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
