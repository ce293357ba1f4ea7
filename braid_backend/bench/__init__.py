"""braid-bench: the A/B benchmark behind the `braid-bench` command (``python -m braid_backend.bench``).

cli.py parses arguments and runs each variant (stock, hf-static, braid, braid-eager) in its own
subprocess (runner.py); report.py holds the results.json schema, the tables and the plot; prompts.py the
built-in text prompts used for checkpoints that come with a tokenizer.
"""


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
