"""sparsellm: prune pre-trained causal language models to high sparsity."""
__version__ = "0.1.0"
