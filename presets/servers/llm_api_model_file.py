"""Find the model file in models_dir, or download it once from the HuggingFace Hub as llm-api did."""

import logging
import os

from presets.servers.llm_api_config import ConfigError, LlmApiConfig

log = logging.getLogger(__name__)


def resolve(cfg: LlmApiConfig) -> str:
    """The local model file: <models_dir>/ggml-<family>-<name>-q4.bin, else setup_params.filename in
    models_dir, else downloaded from setup_params.repo_id and saved under the first name."""
    target = cfg.model_file
    if os.path.isfile(target):
        log.info("found the model file %s", target)
        return target
    filename = cfg.setup_params.get("filename")
    if filename and os.path.isfile(os.path.join(cfg.models_dir, filename)):
        log.info("found the model file %s", os.path.join(cfg.models_dir, filename))
        return os.path.join(cfg.models_dir, filename)
    repo_id = cfg.setup_params.get("repo_id")
    if not repo_id:
        raise ConfigError(
            f"model file not found: {target}"
            + (f" (nor {filename} beside it)" if filename else "")
            + "; put the GGUF file there, or set setup_params.repo_id and filename to download it"
        )
    return _download(cfg, repo_id, filename, target)


def _download(cfg: LlmApiConfig, repo_id: str, filename: str, target: str) -> str:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        os.makedirs(cfg.models_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"models_dir: cannot create {cfg.models_dir}: {e}") from e
    log.info("downloading %s from %s to %s", filename, repo_id, target)
    try:
        path = huggingface_hub.hf_hub_download(
            repo_id=repo_id,
            filename=filename,
            revision=cfg.setup_params.get("revision"),
            local_dir=cfg.models_dir,
            cache_dir=os.path.join(cfg.models_dir, ".cache"),
        )
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        raise ConfigError(
            f"cannot download {filename} from {repo_id}: the HuggingFace Hub cannot be reached here "
            f"({type(e).__name__}: offline mode or no network); put the file at {target}"
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ConfigError(f"cannot download {filename} from {repo_id}: {type(e).__name__}: {e}") from e
    os.replace(path, target)
    log.info("saved the model file as %s", target)
    return target
