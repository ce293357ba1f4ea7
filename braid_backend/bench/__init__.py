"""braid-bench: the A/B benchmark behind the `braid-bench` command (``python -m braid_backend.bench``).

cli.py parses arguments and runs each variant (stock, hf-static, braid, braid-eager) in its own
subprocess (child.py starts it, runner.py is the worker: timing.py times the batch sweep, latency.py the
batch-1 TTFT / chat / cold-start calls, checks.py the logits check, probe.py the GPU probe); collect.py
turns the workers' records into results.json (schema.py: its JSON Schema); report.py prints the tables and
writes results.md, plot.py the plot; prompts.py holds the built-in text prompts used for checkpoints that
come with a tokenizer.
"""


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
