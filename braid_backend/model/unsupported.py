"""Unsupported: raised with the reason a model (or part of it) is left stock; its own module so that every
planning module (spec.py, moe.py, quant.py) can raise it without importing each other."""


class Unsupported(Exception):
    """Raised with the reason a model (or part of it) is left stock."""
