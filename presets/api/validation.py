"""Request validation helpers: each failure is an ApiError(400) that names the field and the rule."""

import json
import math
import re

from presets.errors import ApiError, model_not_found

_MISSING = object()


def _loads(body: bytes | str):
    try:
        data = json.loads(body)  # bytes: JSON's own encoding detection (UTF-8 with or without BOM, UTF-16/32)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\\ud800) cannot be text
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except UnicodeEncodeError:
        raise ApiError(400, "request body has a string that is not valid Unicode (a lone surrogate)") from None
    return data


def _not_json(e: ValueError) -> ApiError:
    return ApiError(400, f"request body must be valid JSON (a JSON object): {e}")


async def json_body(request, lenient_escapes: bool = False) -> dict:
    """The request's body as a JSON object (the HTTP server has bounded its size and read time)."""
    return json_object(await request.get_data(), lenient_escapes)


def json_object(raw: bytes, lenient_escapes: bool = False) -> dict:
    """`raw` as a JSON object, or a 400 that says why it is not one.

    lenient_escapes: a backslash JSON does not define (llm-api's README sends "stop": ["\\Q"]) is
    taken literally, as the person typing it meant, instead of failing the request.
    """
    try:
        data = _loads(raw)
    except UnicodeDecodeError as e:
        raise _not_json(e) from None
    except ValueError as e:
        if not lenient_escapes:
            raise _not_json(e) from None
        try:
            text = raw.decode(json.detect_encoding(raw))
        except UnicodeDecodeError as e2:
            raise _not_json(e2) from None
        valid = '"\\/bfnrtu'
        fixed = re.sub(r"\\(.)", lambda m: m.group(0) if m.group(1) in valid else "\\\\" + m.group(1), text, flags=re.S)
        try:
            data = _loads(fixed)
        except ValueError as e2:
            raise _not_json(e2) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


def reject_unknown(d: dict, allowed, where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        param = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ApiError(400, f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}", param=param)


def number(d: dict, key: str, where: str, default, lo=None, hi=None, lo_open=False):
    """A finite int or float (never a bool) within [lo, hi] ((lo, hi] when lo_open), or `default`."""
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        return default
    name = f"{where}.{key}" if where else key
    try:
        finite = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise ApiError(400, f"{name} must be a finite number, got {str(v)[:40]!r}", param=name)
    too_low = lo is not None and (v <= lo if lo_open else v < lo)
    if too_low or (hi is not None and v > hi):
        lo_txt = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_txt = "" if hi is None else f"<= {hi}"
        raise ApiError(400, f"{name} must be {' and '.join(t for t in (lo_txt, hi_txt) if t)}, got {v!r}", param=name)
    return float(v)


def integer(d: dict, key: str, where: str, default, lo=None, hi=None):
    """An int (never a bool or a float) within [lo, hi], or `default`."""
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        return default
    name = f"{where}.{key}" if where else key
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{name} must be an integer, got {v!r}", param=name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = " and ".join(t for t in (lo is not None and f">= {lo}", hi is not None and f"<= {hi}") if t)
        raise ApiError(400, f"{name} must be {rng}, got {v!r}", param=name)
    return v


def boolean(d: dict, key: str, where: str, default: bool) -> bool:
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, bool):
        name = f"{where}.{key}" if where else key
        raise ApiError(400, f"{name} must be true or false, got {v!r}", param=name)
    return v


def string_list(v, name: str, max_items: int) -> list[str]:
    """A non-empty list of at most `max_items` strings."""
    if not isinstance(v, list) or not v:
        raise ApiError(400, f"{name} must be a non-empty list of strings")
    if len(v) > max_items:
        raise ApiError(400, f"{name} has {len(v)} items; at most {max_items} are accepted per request")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise ApiError(400, f"{name}[{i}] must be a string, got {type(s).__name__}")
    return v


def adapter_slot(name, base: str | None, adapters: list[str], param: str) -> int:
    """The LoRA adapter slot a request names (0: the base model): `name` is absent, the base model's name
    (`base`), or an adapter's; anything else is a 404 naming what is served."""
    if name is None or (base is not None and name == base):
        return 0
    if isinstance(name, str) and name in adapters:
        return adapters.index(name) + 1
    raise model_not_found(name, [b for b in [base, *adapters] if b], param)  # an unloaded adapter leaves a None
