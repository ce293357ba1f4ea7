"""Chat with a local checkpoint on the braid-patched model, streaming the reply as it is generated.

    python examples/chat.py /path/to/checkpoint [--device cuda] [--max-new-tokens 256]

Reads one user message per line from stdin (Ctrl-D / end of input ends the chat). Each turn applies the
tokenizer's chat template to the conversation so far, runs model.generate() in a thread and prints the
reply from a TextIteratorStreamer as it arrives (on the patched model, K tokens per CUDA-graph replay).
Without a GPU set TRITON_INTERPRET=1 (the Triton kernels then run in the CPU interpreter, slowly).
"""
from __future__ import annotations

import argparse
import sys
import threading

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

import braid_backend

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="local folder with the model and its tokenizer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--system", default=None, help="optional system message")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(args.device).eval()
    report = braid_backend.patch(model)
    print(str(report).splitlines()[0], flush=True)   # e.g. "braid_backend.patch(...): family=qwen2, N modules patched"
    if not getattr(tokenizer, "chat_template", None):
        print("note: the tokenizer has no chat template; using plain 'role: text' lines", file=sys.stderr)

    messages = [{"role": "system", "content": args.system}] if args.system else []
    sampling = ({"do_sample": True, "temperature": args.temperature} if args.temperature > 0
                else {"do_sample": False})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for line in sys.stdin:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        inputs = encode(tokenizer, messages).to(args.device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens, pad_token_id=pad, **sampling)
        failed = []

        def run(kwargs=kwargs, streamer=streamer, failed=failed):
            try:
                model.generate(**kwargs)
            except Exception as e:   # the streamer would wait forever: end it, report in the main thread
                failed.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        print("assistant: ", end="", flush=True)
        reply = []
        for chunk in streamer:
            reply.append(chunk)
            print(chunk, end="", flush=True)
        thread.join()
        print(flush=True)
        if failed:
            raise failed[0]
        st = braid_backend.status(model)
        print(f"[generate() path: {st.last_path if st else 'stock'}]", file=sys.stderr, flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def encode(tokenizer, messages):
    """The conversation so far as model inputs, ending with the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text, return_tensors="pt")


if __name__ == "__main__":
    sys.exit(main())
