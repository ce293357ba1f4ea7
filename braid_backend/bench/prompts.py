"""The built-in text prompts braid-bench uses when the model comes with a tokenizer (a local checkpoint
folder or a hub id). Batch b takes the first b of them, cycling. Short on purpose: they stand for a chat
turn, and their token counts after the chat template are recorded with the results."""
from __future__ import annotations

PROMPTS = (
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse keeper.",
    "What are three tips for writing readable Python code?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "How does a hash table handle collisions?",
    "Give me a simple recipe for pancakes.",
)


def batch_prompts(b: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(b)]
