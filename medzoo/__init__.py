"""medzoo: a model zoo for Chinese medical language models."""
__version__ = "0.1.0"

from medzoo.hookspecs import hookimpl  # noqa: E402,F401  plugins write `from medzoo import hookimpl`
