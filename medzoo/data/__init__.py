"""Data: row formats, loading, mixing and tokenization."""
