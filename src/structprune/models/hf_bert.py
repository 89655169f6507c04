"""structprune 0.2's name for :mod:`structprune.models.hf`, which now covers every transformers family it
describes (BERT, RoBERTa, ALBERT, DistilBERT, ViT, GPT-2, Llama-style), not only BERT's layout."""

from .hf import is_supported, load_pretrained, part_names, save_pretrained, sync_config  # noqa: F401
