"""What several test modules share: the kernel tests' device and tolerances, the error measure, the
base families and small generate()/outcome helpers. conftest.py has set TRITON_INTERPRET by now."""
import torch

from braid_backend.kernels._common import interpret_mode, kernels_usable
from braid_backend.testing.numerics import random_tokens, rel_err

# Kernel tests: under the interpreter the kernels run on CPU tensors; otherwise (TRITON_INTERPRET=0 on
# a GPU box) on CUDA.
KERNEL_DEV = torch.device("cuda" if torch.cuda.is_available() and not interpret_mode() else "cpu")
KERNELS_USABLE, KERNELS_WHY = kernels_usable(KERNEL_DEV)

FP32_TOL = 1e-5      # relative-norm error of an fp32 kernel against its fp32 torch reference
BF16_RATIO = 2.0     # a bf16 kernel's error vs fp32 may be at most 2x the stock bf16 path's error ...
BF16_FLOOR = 1e-4    # ... plus this floor (relative norm)
CAST_MATCH = 0.25    # distance to the stock bf16 reference, in units of the stock path's own error

relerr = rel_err     # ||a - ref|| / ||ref|| in fp64, inf on NaN

BASE_FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]


def gen(model, ids, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(ids, pad_token_id=0, **kw)


def toks(model, B, T, seed, device="cpu"):
    return random_tokens(model.config.vocab_size, B, T, seed, device)


def outcome(fn):
    """('ok', tensor) or ('exc', exception type): what a call did, for stock-vs-patched comparisons."""
    try:
        return "ok", fn()
    except Exception as e:
        return "exc", type(e)


def same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "exc":
        return a[1] is b[1]
    return a[1].dtype == b[1].dtype and torch.equal(a[1], b[1])


def tiny_tokenizer(vocab: int):
    """A word-level tokenizer over "w0".."w{vocab-1}" (id i is "wi"), built offline, sized to a tiny preset."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")


def tiny_bpe_tokenizer(vocab: int):
    """A byte-level BPE tokenizer of exactly `vocab` ids (trained on the bench's prompts, then padded with
    added tokens), built offline: what stop_strings and token healing need (a real subword vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from braid_backend.bench.prompts import PROMPTS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(PROMPTS) * 3, trainer=trainer)
    tok.add_tokens([f"<x{i}>" for i in range(vocab - tok.get_vocab_size())])
    assert tok.get_vocab_size() == vocab
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_chat_checkpoint(path) -> str:
    """The tiny Qwen2 preset (random weights, vocab 307, lm_head untied) + a 300-token byte-level BPE
    tokenizer trained on the bench's prompts, with Qwen-style special tokens (<|im_end|> is id 2, the
    model's eos) and a chat template: what a small chat checkpoint folder looks like, built without any
    download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from braid_backend.bench.prompts import PROMPTS
    from braid_backend.testing.presets import build_model

    path = str(path)
    # untied lm_head: with tied random embeddings greedy decoding just repeats the last prompt token
    model = build_model("tiny", dtype=torch.float32, tie_word_embeddings=False)
    model.save_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(PROMPTS) * 3 + ["user assistant system hello there"], trainer=trainer)
    assert tok.get_vocab_size() <= model.config.vocab_size and tok.token_to_id("<|im_end|>") == 2
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path
