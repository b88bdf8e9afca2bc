"""Which grammar library constrains decoding fastest on this CPU: xgrammar,
llguidance or outlines-core, on the same tokenizer, schema and answer.

For each library: the time to compile a JSON schema (nested objects, arrays, enums,
required fields) into a matcher for the tokenizer, and the time per generated token
to compute the allowed-token mask, apply it to a row of logits and advance by the
token, walking a valid answer token by token. Ratios are against llguidance, the one
the worker uses (`inference_worker/constraints.py`).

    pip install xgrammar==0.2.9 outlines-core==0.2.14   # llguidance is a dependency
    python bench/grammar_libraries.py [--vocab 32000]

A library that is not installed is skipped. Prints a table and writes
bench/results/grammar_libraries.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "priority": {"enum": ["low", "normal", "high"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "site": {"enum": ["desktop", "vps"]}},
            "required": ["id", "site"],
            "additionalProperties": False,
        },
        "done": {"type": "boolean"},
    },
    "required": ["name", "priority", "tags", "owner"],
    "additionalProperties": False,
}
ANSWER = {
    "name": "move the context store to the new layout",
    "priority": "high",
    "tags": ["context", "sync", "redis"],
    "owner": {"id": 42, "site": "vps"},
    "done": False,
}


def build_tokenizer(vocab: int):
    from trainer_job.continuity_corpus import training_chats
    from trainer_job.demo_model import build_tokenizer as build

    texts = [m["content"] for chat in training_chats(3000, seed=0) for m in chat]
    # Enough varied text for a Mistral-sized vocabulary: the standard library's source.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts += [path.read_text(errors="replace") for path in sorted(stdlib.glob("*.py"))]
    texts += [json.dumps(ANSWER), json.dumps(SCHEMA)] * 50
    return build(texts, vocab)


def answer_ids(tokenizer) -> list[int]:
    return tokenizer.encode(json.dumps(ANSWER), add_special_tokens=False)


def walk(step, ids: list[int], vocab_size: int) -> list[float]:
    """Per-token seconds of `step(logits, token)` along `ids`."""
    logits = torch.randn(1, vocab_size)
    times = []
    for token in ids:
        row = logits.clone()
        started = time.perf_counter()
        step(row, token)
        times.append(time.perf_counter() - started)
    return times


def run_llguidance(tokenizer, ids):
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    started = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - started
    assert not matcher.is_error(), matcher.get_error()
    mask = llt.allocate_token_bitmask(1, lltok.vocab_size)

    def step(row, token):
        llt.fill_next_token_bitmask(matcher, mask, 0)
        llt.apply_token_bitmask_inplace(row, mask)
        assert row[0, token] > -float("inf"), "the answer's token was masked out"
        assert matcher.consume_token(token), matcher.get_error()

    times = walk(step, ids, len(tokenizer))
    assert matcher.is_accepting()
    return tokenizer_s, compile_s, times


def run_xgrammar(tokenizer, ids):
    import xgrammar as xgr

    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgr.GrammarCompiler(info)
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - started
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def step(row, token):
        matcher.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(row, mask)
        assert row[0, token] > -float("inf"), "the answer's token was masked out"
        assert matcher.accept_token(token)

    return tokenizer_s, compile_s, walk(step, ids, len(tokenizer))


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte -> the byte: printable bytes
    stand for themselves, the others for chr(256), chr(257), ... in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    mapping = {chr(b): b for b in printable}
    mapping.update({chr(256 + n): b for n, b in enumerate(others)})
    return mapping


def run_outlines(tokenizer, ids):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    started = time.perf_counter()
    byte_of = byte_level_alphabet()
    special = set(tokenizer.all_special_ids)
    tokens: dict[bytes, list[int]] = {}
    for text, token_id in tokenizer.get_vocab().items():
        if token_id not in special:
            tokens.setdefault(bytes(byte_of[c] for c in text), []).append(token_id)
    vocabulary = Vocabulary(tokenizer.eos_token_id, tokens)
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    guide = Guide(index)
    compile_s = time.perf_counter() - started
    vocab_size = len(tokenizer)

    def step(row, token):
        allowed = torch.tensor(guide.get_tokens())
        masked = torch.full_like(row, -float("inf"))
        masked[0, allowed] = row[0, allowed]
        assert masked[0, token] > -float("inf"), "the answer's token was masked out"
        guide.advance(token)

    return tokenizer_s, compile_s, walk(step, ids, vocab_size)


LIBRARIES = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000, help="tokenizer size (Mistral: 32768)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer(args.vocab)
    ids = answer_ids(tokenizer)
    results = {}
    for name, run in LIBRARIES.items():
        try:
            tokenizer_s, compile_s, times = run(tokenizer, ids)
        except ImportError as exc:
            print(f"{name}: not installed ({exc.name}); skipped")
            continue
        results[name] = {
            "tokenizer_setup_ms": round(tokenizer_s * 1000, 2),
            "schema_compile_ms": round(compile_s * 1000, 2),
            "per_token_us_median": round(statistics.median(times) * 1e6, 1),
            "per_token_us_p90": round(sorted(times)[int(len(times) * 0.9)] * 1e6, 1),
        }
    base = results.get("llguidance")
    print(f"vocabulary {len(tokenizer)} tokens, answer {len(ids)} tokens")
    print(
        f"{'library':<14}{'setup ms':>10}{'compile ms':>12}{'us/token':>10}{'p90':>8}{'ratio':>7}"
    )
    for name, r in results.items():
        ratio = r["per_token_us_median"] / base["per_token_us_median"] if base else float("nan")
        r["per_token_ratio_vs_llguidance"] = round(ratio, 2)
        print(
            f"{name:<14}{r['tokenizer_setup_ms']:>10}{r['schema_compile_ms']:>12}"
            f"{r['per_token_us_median']:>10}{r['per_token_us_p90']:>8}{ratio:>7.2f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"vocab": len(tokenizer), "answer_tokens": len(ids), "libraries": results}
    (out / "grammar_libraries.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
