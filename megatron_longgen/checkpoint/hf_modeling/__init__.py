"""HF modeling code of an exported LongGen model.

These two files are copied verbatim into every exported HF folder and imported from there by
``transformers`` (``trust_remote_code=True``), so they must not import megatron_longgen.
"""
