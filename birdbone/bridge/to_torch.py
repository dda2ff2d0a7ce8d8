"""A ``transformers`` causal LM from any model birdbone opens.

GGUF files go through transformers' own GGUF loading (it dequantizes with gguf-py and undoes
llama.cpp's q/k permutation); birdbone does not reimplement it. Models come back in float32,
in eval mode, with the GGUF quantizer marker dropped so ``save_pretrained`` works.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.model_file import resolve_model_path

log = logging.getLogger(__name__)


def load_causal_lm(model: str | Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(model)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if path.is_file() and path.suffix == ".gguf":
            from birdbone.io.families import check_fits, family_of_file, hf_config_overrides
            from birdbone.io.model_file import open_model

            with open_model(path) as m:
                family = family_of_file(m)  # outside the table (experts too): one line naming the supported ones
                if m.architecture == "deci":  # per-layer widths: transformers has no deci model (bridge/shaped.py)
                    from birdbone.bridge.shaped import load_shaped_lm

                    return load_shaped_lm(path)
                check_fits(m, family)  # a missing bias or a wrong shape: one line, not transformers' report
                overrides = hf_config_overrides(m, family)
            # transformers' GGUF loader draws a tqdm bar on stderr whatever its settings say
            with contextlib.redirect_stderr(io.StringIO()):
                config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
                for key, value in overrides.items():
                    setattr(config, key, value)
                lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32)
            _drop_gguf_marker(lm)
        elif path.is_dir():
            from birdbone.io.families import family_of_model_type
            from birdbone.io.inputs import read_json

            if (path / "config.json").is_file():  # a family outside the table: one line (without a config transformers says so)
                config = read_json(path / "config.json", "model config")
                family_of_model_type(config.get("model_type") if isinstance(config, dict) else None)
            lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        elif path.suffix == ".safetensors" and (path.parent / "config.json").exists():
            lm = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32)
        else:
            raise InputError(path, "torch needs a GGUF, a Hugging Face folder, or a .safetensors file with config.json beside it")
    except (OSError, ValueError) as e:
        if isinstance(e, BirdboneError):
            raise
        raise InputError(path, f"transformers could not load it: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return lm.eval()


def _drop_gguf_marker(lm) -> None:
    """transformers marks GGUF-loaded models as quantized and then refuses ``save_pretrained``."""
    for obj, attr in ((lm, "hf_quantizer"), (lm.config, "quantization_config")):
        if getattr(obj, attr, None) is not None:
            try:
                delattr(obj, attr)
            except AttributeError:
                setattr(obj, attr, None)
    if hasattr(lm, "is_quantized"):
        lm.is_quantized = False
