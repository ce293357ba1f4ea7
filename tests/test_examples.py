"""examples/chat.py end to end on CPU (Triton interpreter): a tiny random checkpoint with a real
(byte-level BPE) tokenizer and a chat template, saved to tmp, two user lines on stdin; the streamed
replies must be what stock greedy generate() of the same templated conversation decodes to.

save_tiny_chat_checkpoint (tests/helpers.py) is also used by tests/test_bench.py (braid-bench -m <folder>)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import save_tiny_chat_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    return save_tiny_chat_checkpoint(tmp_path_factory.mktemp("chat-ckpt"))


def stock_replies(path, user_lines, max_new_tokens):
    """What the unpatched model answers, turn by turn, with the reply fed back into the conversation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    messages, replies = [], []
    for line in user_lines:
        messages.append({"role": "user", "content": line})
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
    return replies


def test_chat_streams_stock_greedy_text(chat_checkpoint):
    lines = ["Explain why the sky is blue.", "And the sunset?"]
    n = 4
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, os.path.join(ROOT, "examples", "chat.py"), chat_checkpoint, "--device", "cpu",
           "--max-new-tokens", str(n)]
    r = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, env=env, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    first = r.stdout.splitlines()[0]
    assert first.startswith("braid_backend.patch(Qwen2ForCausalLM): family=qwen2"), r.stdout
    expected = stock_replies(chat_checkpoint, lines, n)
    assert all(x.strip() for x in expected), expected    # real text, so the comparison means something
    # the replies may hold newlines: look for each whole "assistant: <reply>\n", in order
    pos = 0
    for reply in expected:
        at = r.stdout.find(f"assistant: {reply}\n", pos)
        assert at >= 0, (reply, r.stdout)
        pos = at + len(reply)
    assert r.stdout.count("assistant: ") == 2
    assert r.stderr.count("[generate() path: fast]") == 2, r.stderr[-3000:]
