"""Files that carry a compressed model onward: an Ollama Modelfile, and a DVC stage that reruns it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from birdbone.io.atomic import write_text_atomic
from birdbone.io.errors import InputError

# Ollama's Go template for ChatML (SmolLM2, Qwen, ...): used when the GGUF's own template is ChatML.
CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')


def write_modelfile(gguf: str | Path) -> Path:
    """``NAME.Modelfile`` beside ``NAME.gguf``: ``ollama create NAME -f NAME.Modelfile`` serves it."""
    from birdbone.io.model_file import open_model

    gguf = Path(gguf)
    with open_model(gguf) as m:
        template = str(m.meta("tokenizer.chat_template", "") or "")
    lines = ["# Ollama Modelfile written by birdbone compress", f"FROM ./{gguf.name}"]
    if "<|im_start|>" in template:
        lines += [f'TEMPLATE """{CHATML}"""', 'PARAMETER stop "<|im_end|>"']
    else:
        lines += ["# no TEMPLATE: Ollama reads the chat template stored in the GGUF (tokenizer.chat_template)"]
    out = gguf.with_name(gguf.name.removesuffix(".gguf") + ".Modelfile")
    write_text_atomic(out, "\n".join(lines) + "\n")
    return out


def _rel(path: str | Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it (DVC paths are relative to dvc.yaml), else absolute."""
    p = Path(path).resolve()
    try:
        return p.relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(p)


def write_dvc_stage(folder: Path, model: str, recipe: Path, sets: list[str], text: Path | None, eval_text: Path | None,
                    out: Path, run_dir: Path) -> Path:
    """Add (or replace) a ``compress-NAME`` stage in ``folder/dvc.yaml``; other stages are kept as they are."""
    import yaml

    from birdbone.io.model_file import resolve_model_path

    path = folder / "dvc.yaml"
    data = {}
    if path.exists():
        from birdbone.io.inputs import read_yaml

        data = read_yaml(path, "dvc.yaml") or {}
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
            raise InputError(path, "is not a dvc.yaml with a 'stages' mapping; refusing to change it")
    model_file = resolve_model_path(model)
    args = ["birdbone", "compress", model if model == "builtin" else _rel(model_file, folder), "-r", _rel(recipe, folder)]
    deps = [_rel(model_file, folder), _rel(recipe, folder)]
    for flag, p in (("--text", text), ("--eval-text", eval_text)):
        if p is not None:
            args += [flag, _rel(p, folder)]
            deps.append(_rel(p, folder))
    for s in sets:
        args += ["--set", s]
    args += ["-o", _rel(out, folder), "--run-dir", _rel(run_dir, folder)]
    name = "compress-" + re.sub(r"[^A-Za-z0-9_-]+", "-", out.name.removesuffix(".gguf"))
    data.setdefault("stages", {})[name] = {"cmd": shlex.join(args), "deps": deps, "outs": [_rel(out, folder), _rel(run_dir, folder)]}
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
    return path


