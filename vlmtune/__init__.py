"""vlmtune: train, convert, chat with and evaluate LLaVA-style vision-language models."""

__version__ = "0.1.0"
