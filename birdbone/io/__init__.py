"""Files in, files out: lazy readers for GGUF / safetensors / Hugging Face folders, the GGUF
writer, and the thin ctypes layer over the llama.cpp library that llama-cpp-python ships.

Nothing here imports torch or any other birdbone room.
"""

from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.model_file import ModelFile, TensorInfo, open_model

__all__ = ["BirdboneError", "InputError", "ModelFile", "TensorInfo", "open_model"]
