"""birdbone: open a language model, dissect and measure it, remodel and quantize it, and ship
a GGUF that llama.cpp serves.

Rooms (see docs/architecture.md): ``io`` (files and llama.cpp), ``bridge`` (torch),
``evaluate`` (perplexity, KLD, canaries, speed), ``cli`` (the ``birdbone`` command).
"""

__version__ = "0.1.0"
