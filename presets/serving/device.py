"""Pick the device and dtype from settings: CUDA when asked or available, fp32 on CPU."""

import torch


def resolve(device: str, dtype: str, local_rank: int = 0) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is available")
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if dtype == "auto":
        if dev.type == "cpu":
            return dev, torch.float32
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, getattr(torch, dtype)
