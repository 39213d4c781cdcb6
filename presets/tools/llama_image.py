"""The build steps of every Llama-2 image, whichever documented command builds it.

Kaito's Llama-2 docs give three `docker build` commands for the same image, each with its own build args:

- the `LLAMA_VERSION` form:
  `docker build --build-arg LLAMA_VERSION=llama-2-7b --build-arg SRC_DIR=/home/kaito/presets/llama-2 .`
  (./Dockerfile; the weights in llama/<LLAMA_VERSION>/ of the build context);
- the `LLAMA_WEIGHTS` form:
  `docker build --file docker/presets/llama-2/Dockerfile --build-arg LLAMA_WEIGHTS=<folder>
  --build-arg SRC_DIR=presets/llama-2 .`;
- the `WEIGHTS_PATH` form:
  `docker build --file docker/presets/inference/llama-2/Dockerfile --build-arg WEIGHTS_PATH=<folder>
  --build-arg MODEL_TYPE=llama2-completion --build-arg VERSION=0.0.1 .`.

Each Dockerfile only names its args to this module, in the image's /workspace/llama/llama-2:

    python -m presets.tools.llama_image server SRC_DIR=<value> LLAMA_WEIGHTS=<value>  # before the weights' COPY
    python -m presets.tools.llama_image weights LLAMA_WEIGHTS=<value> VERSION=<value>  # after it

A bad arg stops the build with one line naming it. SRC_DIR is a name, not a path to copy (the `LLAMA_VERSION` form
gives a path on the builder's machine): its last folder says which server, `llama-2` (text) or `llama-2-chat` (chat).
"""

import os
import shutil
import sys

import presets

SERVERS = {
    "llama-2": "llama2-completion",
    "llama2-completion": "llama2-completion",
    "llama-2-chat": "llama2-chat",
    "llama2-chat": "llama2-chat",
}
WEIGHTS_HINT = {
    "LLAMA_VERSION": "pass --build-arg LLAMA_VERSION=<MODEL-VERSION> (llama-2-7b, llama-2-7b-chat, ...), with the "
    "weights in llama/<MODEL-VERSION>/ of the build context (the repository root)",
    "LLAMA_WEIGHTS": "pass --build-arg LLAMA_WEIGHTS=<the weights' folder, relative to the repository root>",
    "WEIGHTS_PATH": "pass --build-arg WEIGHTS_PATH=<the weights' folder, relative to the repository root>",
}


class BuildArgError(Exception):
    """A build arg the image cannot be built with; the message names it."""


def server_for(arg: str, value: str) -> str:
    """The server folder under presets/inference/ that SRC_DIR or MODEL_TYPE names."""
    name = os.path.basename(value.strip().rstrip("/"))
    if name not in SERVERS:
        raise BuildArgError(
            f"{arg}={value!r}: its last folder must be llama-2 (text completion, POST /generate) or llama-2-chat "
            f"(chat, POST /chat); llama2-completion and llama2-chat are accepted too"
        )
    return SERVERS[name]


def check_weights_arg(arg: str, value: str) -> None:
    """The weights' build arg, before Docker copies it: set, and a folder inside the build context."""
    if arg not in WEIGHTS_HINT:
        raise BuildArgError(f"{arg}: not a weights build arg ({', '.join(WEIGHTS_HINT)})")
    if not value.strip():
        raise BuildArgError(f"{arg} is not set: {WEIGHTS_HINT[arg]}")
    if os.path.isabs(value) or ".." in value.split("/"):
        raise BuildArgError(
            f"{arg}={value!r}: Docker copies the weights from the build context, so {arg} is a folder relative to "
            f"the repository root (move or link nothing outside it; copy the weights under weights/ or llama/)"
        )


def server(workdir: str, args: dict[str, str]) -> str:
    """Check the args and put the chosen server's inference_api.py in `workdir`; returns the server's name."""
    (src_arg, src), (weights_arg, weights) = args.items()
    name = server_for(src_arg, src)
    check_weights_arg(weights_arg, weights)
    source = os.path.join(os.path.dirname(presets.__file__), "inference", name, "inference_api.py")
    shutil.copyfile(source, os.path.join(workdir, "inference_api.py"))
    return name


def weights(workdir: str, args: dict[str, str]) -> None:
    """Check that the copied weights/ holds a checkpoint, then write version.txt."""
    (weights_arg, value), (_, version) = args.items()
    folder = os.path.join(workdir, "weights")
    found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not {"params.json", "config.json"} & set(found):
        listed = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "") if found else "nothing"
        raise BuildArgError(
            f"{weights_arg}={value!r}: the folder holds no checkpoint (Meta's params.json with consolidated.NN.pth "
            f"and tokenizer.model, or a HuggingFace config.json with safetensors); it has: {listed}"
        )
    with open(os.path.join(workdir, "version.txt"), "w") as f:
        f.write(f"{version}\n")


def parse(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BuildArgError(f"{pair!r}: expected NAME=value")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    steps = {"server": server, "weights": weights}
    if len(argv) != 3 or argv[0] not in steps:
        print("usage: python -m presets.tools.llama_image server|weights NAME=value NAME=value", file=sys.stderr)
        return 2
    try:
        steps[argv[0]](os.getcwd(), parse(argv[1:]))
    except BuildArgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
