"""Model folders that ask to run their own code are refused, whatever stdin says.

A transformers folder can name Python files of its own in its configs (``auto_map`` in
``config.json``, ``tokenizer_config.json``, ``preprocessor_config.json`` ...;
``custom_pipelines``). transformers then imports them, after asking "Do you wish to run the
custom code? [y/N]" on the terminal, so one keystroke (or ``echo y |``) ran a folder's code.
The explorer never runs code a folder names: `refuse_own_code` is called before any
transformers call reads a folder or a config file, and every call passes
``trust_remote_code=False`` as well (so transformers never prompts and never reads stdin).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CODE_HOOKS", "refuse_own_code"]

# config keys by which transformers imports a folder's own Python files
CODE_HOOKS = ("auto_map", "custom_pipelines")
MAX_CONFIG_BYTES = 32 * 2**20  # configs are kilobytes; bigger ones are not read here


def _config_files(path: Path) -> list[Path]:
    """The JSON configs transformers reads code hooks from: ``*config.json`` in a folder."""
    if path.is_file():
        return [path]
    try:
        return sorted(p for p in path.iterdir() if p.name.endswith("config.json") and p.is_file())
    except OSError:
        return []


def _hook_in(data: Any) -> str | None:
    """The first code-hook key anywhere in parsed JSON (iterative: deep nesting is fine)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in CODE_HOOKS:
                    return str(key)
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return None


def refuse_own_code(path: Path, error: type[Exception]) -> None:
    """Raise ``error`` if the folder (or config file) ``path`` asks to run its own code.

    A config that cannot be read or parsed is left to the loader that reads it next (which
    reports it); one too deep or too big to check is refused.
    """
    for file in _config_files(path):
        try:
            if file.stat().st_size > MAX_CONFIG_BYTES:
                raise error(f"'{file}' is {file.stat().st_size:,} bytes, too big for a config "
                            f"to check for code hooks; is it the right file?")
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        except RecursionError as e:
            raise error(f"'{file}' nests JSON too deeply to read; is it a real config?") from e
        key = _hook_in(data)
        if key is not None:
            where = path if path.is_dir() else path.parent
            raise error(f"the folder '{where}' asks to run its own code ('{key}' in "
                        f"{file.name}), and the explorer never runs code from a model folder; "
                        f"if its model_type is one transformers has built in, remove '{key}' "
                        f"from {file.name} to load it with transformers' own code")
