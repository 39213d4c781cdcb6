"""Loading and unloading LoRA adapters while serving, in vLLM's shapes (off unless --allow_runtime_lora):

    POST /v1/load_lora_adapter    {"lora_name": "sql", "lora_path": "/adapters/sql"}
    POST /v1/unload_lora_adapter  {"lora_name": "sql"}

Both answer 200 with a line of text, as vLLM does. A loaded adapter takes a new slot (a slot number is never
given out twice, so no prefix-cache block of an unloaded adapter is ever taken for a new one); unloading one
that has sequences running or waiting is a 409. One rank only: under torchrun every rank would have to load
it between the same two steps.
"""

import asyncio

from quart import Blueprint, current_app, request

from presets.api.validation import json_body, reject_unknown
from presets.engine.adapters import NAME, AdapterError, AdapterSpec, read_adapter
from presets.errors import ApiError
from presets.http.app import runtime
from presets.models.llama.lora import module_paths

lora_admin = Blueprint("lora_admin", __name__, url_prefix="/v1")


def _served():
    """(the LlamaModel with its LoRA settings, the runtime), when adapters may be loaded now."""
    model = current_app.extensions["openai_model"]
    if not model.allow_runtime_lora:
        raise ApiError(404, "loading LoRA adapters while serving is off: start the server with --allow_runtime_lora")
    rt = runtime()
    rt.require_ready()
    if rt.heartbeat_s:
        raise ApiError(400, "LoRA adapters cannot be loaded while serving on several ranks; list them at start")
    return model, rt


def _name(body: dict) -> str:
    name = body.get("lora_name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ApiError(400, "lora_name must be a name of letters, digits, '.', '_' and '-'", param="lora_name")
    return name


@lora_admin.post("/load_lora_adapter")
async def load_lora_adapter():
    body = await json_body(request)
    model, rt = _served()
    reject_unknown(body, ("lora_name", "lora_path"), "body")
    name, path = _name(body), body.get("lora_path")
    if not isinstance(path, str) or not path:
        raise ApiError(400, "lora_path must be the adapter's folder on the server", param="lora_path")
    if name in rt.adapters or name == model.name:
        raise ApiError(400, f"the LoRA adapter {name!r} is already loaded", param="lora_name")
    args = rt.loop.engine.model.args
    try:  # reading the folder off the event loop; the model is touched by the engine thread only
        adapter = await asyncio.to_thread(
            read_adapter, AdapterSpec(name, path), model.max_lora_rank, module_paths(args.n_layers)
        )
    except AdapterError as e:
        raise ApiError(400, str(e), param="lora_path") from None
    slot = len(rt.adapters) + 1
    await rt.acall(lambda: rt.loop.engine.add_adapter(adapter, slot))
    rt.adapters.append(name)  # the routes see it once the layers hold it
    return f"Success: LoRA adapter '{name}' added successfully.", 200, {"Content-Type": "text/plain"}


@lora_admin.post("/unload_lora_adapter")
async def unload_lora_adapter():
    body = await json_body(request)
    _, rt = _served()
    reject_unknown(body, ("lora_name", "lora_int_id"), "body")
    name = _name(body)
    if name not in rt.adapters:
        raise ApiError(404, f"the LoRA adapter {name!r} cannot be found", param="lora_name")
    slot = rt.adapters.index(name) + 1

    def unload():
        users = rt.loop.scheduler.uses(slot)
        if users:
            return users
        rt.loop.engine.remove_adapter(slot)
        rt.adapters[slot - 1] = None  # the slot stays taken: its cached blocks are never another's
        return 0

    users = await rt.acall(unload)
    if users:
        raise ApiError(
            409, f"the LoRA adapter {name!r} has {users} sequence(s) running or waiting; retry when they end"
        )
    return f"Success: LoRA adapter '{name}' removed successfully.", 200, {"Content-Type": "text/plain"}
