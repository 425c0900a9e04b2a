"""Data pipeline: tokenizers, preprocessing to indexed datasets, blended GPT datasets, passkeys."""
