"""Evaluate a model against its parent: perplexity (as llama.cpp's tool computes it), KL
divergence, canary agreement and speed, in llama.cpp for GGUF files and in torch for
``transformers`` models. Start with :func:`birdbone.evaluate.compare.evaluate`.
"""
