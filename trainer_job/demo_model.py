"""Build the small Mistral-architecture demo model and its tokenizer, on this machine.

No weights are downloaded anywhere in the project: `make run`, the tests and the
benchmarks serve this model. It is a real `MistralForCausalLM` with a byte-level BPE
tokenizer and a Mistral-style `[INST] … [/INST]` chat template, trained for a couple
of minutes on the generated continuity chats so that it answers in readable English.

    python -m trainer_job build-demo-model            # build into the cache if missing
    python -m trainer_job build-demo-model --force    # rebuild
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.paths import demo_model_dir

log = logging.getLogger(__name__)

# Bump when anything below changes what gets built: a cached model with another
# version is rebuilt.
BUILDER_VERSION = 3
BUILD_INFO = "BUILD_INFO.json"

# Mistral's template shape (v0.3, with tools): the system prompt is folded into the
# first user turn (so every chat with the same system prompt and tiers starts with the
# same tokens, which the prefix cache reuses), the prompt ends with "[/INST]" and the
# assistant's turn ends with the eos token. The answer follows "[/INST]" directly:
# with byte-level BPE a space there would become the first character of every answer
# (sentencepiece hides it; BPE does not). Tools are listed in [AVAILABLE_TOOLS] before
# the last user turn (after the system prompt when that turn is the first, so that the
# system prompt still comes first); a turn that calls tools is [TOOL_CALLS] and a JSON list of
# {"name", "arguments"}; a tool's result comes back in [TOOL_RESULTS] naming the call.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = none %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if tools is not defined %}{%- set tools = none %}{%- endif %}"
    "{%- set ns = namespace(turn=0, last_user=-1) %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- if message['role'] in ['user', 'assistant'] and not message.get('tool_calls') %}"
    "{%- if (message['role'] == 'user') != (ns.turn % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set ns.turn = ns.turn + 1 %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- set offered = '' %}"
    "{%- if tools and loop.index0 == ns.last_user %}"
    "{%- set offered = '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' %}"
    "{%- endif %}"
    "{%- if loop.first and system_message %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + offered + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- offered + '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- message['content'] or '' }}{{- '[TOOL_CALLS][' }}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' }}"
    "{{- (call['function']['arguments'] | tojson) + '}' }}"
    "{%- if not loop.last %}{{- ', ' }}{%- endif %}"
    "{%- endfor %}"
    "{{- ']' + eos_token }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] + eos_token }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '[TOOL_RESULTS]{\"call_id\": ' + (message.get('tool_call_id') | tojson) }}"
    "{{- ', \"content\": ' + (message['content'] | tojson) + '}[/TOOL_RESULTS]' }}"
    "{%- else %}{{- raise_exception('Only system, user, assistant and tool roles are supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
)
TOOL_TOKENS = [
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
]


@dataclass(frozen=True)
class DemoModelSpec:
    """Shape and training budget of the demo model (about 4.7M parameters)."""

    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    block_size: int = 128
    batch_size: int = 16
    train_steps: int = 500
    learning_rate: float = 3e-3
    chats: int = 3000
    tool_chats: int = 600  # chats that offer tools (most call one)
    seed: int = 0


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", *TOOL_TOKENS]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def _model_config(spec: DemoModelSpec, tokenizer):
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_random_model(
    folder: Path, spec: DemoModelSpec, tokenizer_from: Path, dtype: str | None = None
) -> Path:
    """A Mistral of `spec`'s shape with the demo tokenizer and untrained weights
    (seeded with `spec.seed`; built in `dtype`, e.g. "float16", to halve the memory a
    large one needs): for benchmarks that need a bigger model than the demo and no
    readable answers. Written whole or not at all, like the demo model."""
    import torch
    from transformers import AutoTokenizer, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(spec.seed)
    config = _model_config(spec, tokenizer)
    model = MistralForCausalLM._from_config(config, dtype=getattr(torch, dtype or "float32"))
    save_model_folder(model, tokenizer, folder)
    return folder


def save_model_folder(model, tokenizer, path: Path, info: dict | None = None) -> None:
    """Save into a temporary folder beside `path`, then rename it into place: an
    interrupted save never leaves a half-written model behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if info is not None:
            (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def parameter_count(model: Path) -> int:
    """Parameters in a model folder's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model.glob("*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            for name in weights.keys():
                count = 1
                for size in weights.get_slice(name).get_shape():
                    count *= size
                total += count
    return total


def _packed_blocks(token_lists: list[list[int]], block_size: int):
    import torch

    flat = [t for ids in token_lists for t in ids]
    usable = len(flat) // block_size * block_size
    return torch.tensor(flat[:usable], dtype=torch.long).view(-1, block_size)


def train_demo_model(spec: DemoModelSpec, progress: bool = True):
    """Train the tokenizer and the model in memory; returns (model, tokenizer, stats)."""
    import torch
    from transformers import MistralForCausalLM

    from trainer_job.continuity_corpus import tool_chats, training_chats

    torch.manual_seed(spec.seed)
    chats = training_chats(spec.chats, seed=spec.seed)
    with_tools = tool_chats(spec.tool_chats, seed=spec.seed)
    texts = [_render(chat) for chat in chats]
    texts += [json.dumps(chat) + json.dumps(tools) for chat, tools in with_tools]
    tokenizer = build_tokenizer(texts, spec.vocab_size)
    token_lists = [
        tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False) for chat in chats
    ]
    token_lists += [
        tokenizer.apply_chat_template(chat, tools=tools, tokenize=True, return_dict=False)
        for chat, tools in with_tools
    ]
    random.Random(spec.seed).shuffle(token_lists)
    blocks = _packed_blocks(token_lists, spec.block_size)

    model = MistralForCausalLM(_model_config(spec, tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    warmup = max(1, spec.train_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, spec.train_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(spec.seed)
    started = time.monotonic()
    loss_value = float("nan")
    for step in range(spec.train_steps):
        index = torch.randint(0, blocks.shape[0], (spec.batch_size,), generator=generator)
        batch = blocks[index]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if progress and (step % 50 == 0 or step == spec.train_steps - 1):
            elapsed = time.monotonic() - started
            eta = elapsed / (step + 1) * (spec.train_steps - step - 1)
            print(
                f"demo model: step {step + 1}/{spec.train_steps} loss {loss_value:.3f} "
                f"({elapsed:.0f}s, eta {eta:.0f}s)",
                flush=True,
            )
    model.eval()
    stats = {
        "final_loss": loss_value,
        "train_seconds": round(time.monotonic() - started, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, tokenizer, stats


def _render(chat: list[dict[str, str]]) -> str:
    # Tokenizer training text: the same surface form the chat template produces.
    parts = []
    system = chat[0]["content"] if chat[0]["role"] == "system" else None
    for message in chat:
        if message["role"] == "user":
            prefix = f"{system}\n\n" if system else ""
            parts.append(f"[INST] {prefix}{message['content']} [/INST]")
        elif message["role"] == "assistant":
            parts.append(message["content"])
    return "".join(parts)


def is_built(path: Path) -> bool:
    info = path / BUILD_INFO
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("builder_version") == BUILDER_VERSION
    except (OSError, ValueError):
        return False


def ensure_demo_model(
    path: Path | None = None, force: bool = False, spec: DemoModelSpec | None = None
) -> Path:
    """Build the demo model into `path` (the cache by default) unless it is already there.

    The model is written to a temporary folder beside the target and renamed into
    place, so an interrupted build never leaves a half-written model behind.
    """
    path = Path(path) if path else demo_model_dir()
    if is_built(path) and not force:
        return path
    spec = spec or DemoModelSpec()
    model, tokenizer, stats = train_demo_model(spec)
    info = {"builder_version": BUILDER_VERSION, "spec": asdict(spec), **stats}
    save_model_folder(model, tokenizer, path, info)
    log.info("demo model built at %s (%s)", path, stats)
    return path
