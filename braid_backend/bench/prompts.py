"""The built-in text prompts braid-bench uses when the model comes with a tokenizer (a local checkpoint
folder or a hub id). Batch b takes the first b of them, cycling. Short on purpose: they stand for a chat
turn, and their token counts after the chat template are recorded with the results. Also: loading the
checkpoint's tokenizer and encoding the prompts (in the worker process)."""
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


def load_tokenizer(spec: dict, notes: list):
    """(tokenizer or None, prompt description). spec["prompts"]: "random", "text" (a tokenizer is
    required) or "auto" (text when the checkpoint has a tokenizer; presets never do)."""
    mode = spec.get("prompts", "auto")
    random_info = {"source": "random", "chat_template": False, "tokens": None, "texts": None}
    if mode == "random" or (mode == "auto" and spec.get("model_source", "preset") == "preset"):
        return None, random_info
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec["model"])
    except Exception as e:
        if mode == "text":
            raise
        notes.append(f"no tokenizer loaded from {spec['model']} ({type(e).__name__}: {str(e)[:200]}): "
                     "random token prompts")
        return None, random_info
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.pad_token = tok.convert_ids_to_tokens(0)
    templated = bool(getattr(tok, "chat_template", None))
    return tok, {"source": "text", "chat_template": templated, "tokens": None,
                 "texts": batch_prompts(max(spec["batch_sizes"]))}


def text_prompts(tok, b: int, device):
    """(input_ids, attention_mask) of the first b built-in prompts, through the chat template if the
    tokenizer has one, left-padded."""
    texts = batch_prompts(b)
    templated = bool(getattr(tok, "chat_template", None))
    if templated:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
                 for t in texts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)
