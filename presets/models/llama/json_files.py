"""Reading the JSON files of a model folder (config.json, tokenizer_config.json, ...) with one-line errors."""

import json
import os


def read_json(path: str, error=ValueError, required: bool = True) -> dict:
    """The object in a JSON file; {} for an absent file that is not `required`; `error(message)` when the file
    is absent, unreadable or not a JSON object."""
    if not required and not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise error(f"{path} is not a JSON object")
    return value
