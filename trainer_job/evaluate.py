"""Evaluation numbers for the gate: held-out loss, and fixed probe questions answered
greedily by the base model and by the adapter (both kept in the adapter's manifest)."""

from __future__ import annotations

PROBES = (
    "What is continuity?",
    "What is the session briefing for?",
    "What does the gateway do?",
    "I am ending my session on the mesh. What should I write down?",
    "How do I roll back an adapter?",
)
PROBE_TOKENS = 48


def eval_loss(trainer) -> float:
    """Mean loss over the held-out chats' assistant tokens."""
    return float(trainer.evaluate()["eval_loss"])


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = PROBE_TOKENS) -> str:
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            input_ids=ids["input_ids"].to(device),
            attention_mask=ids["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def probe_answers(peft_model, tokenizer, questions) -> list[dict[str, str]]:
    """{question, base, adapter} for each probe, greedy."""
    answers = []
    for question in questions:
        with peft_model.disable_adapter():
            base = greedy_answer(peft_model, tokenizer, question)
        answers.append(
            {
                "question": question,
                "base": base,
                "adapter": greedy_answer(peft_model, tokenizer, question),
            }
        )
    return answers
