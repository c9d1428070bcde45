"""Tokenizer (filled by the tokenizer issue)."""
