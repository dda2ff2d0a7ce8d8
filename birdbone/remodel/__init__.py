"""Remodel: change a model's weights — purification now; density-loss waves and healing next.

:mod:`rewrite` is the one write path (chosen tensors transformed, the rest copied byte for byte);
:mod:`purify` holds the two denoising transforms of the organ architecture (``fft``, ``haar``)
as pure functions over arrays and :func:`purify_model`, which applies one to a GGUF.
"""

from birdbone.remodel.purify import METHODS, PurifyResult, fft_purify, haar_purify, purify_model
from birdbone.remodel.rewrite import relative_change, rewrite_tensors

__all__ = ["METHODS", "PurifyResult", "fft_purify", "haar_purify", "purify_model", "relative_change", "rewrite_tensors"]
