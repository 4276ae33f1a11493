"""The on-disk format of a model directory, and the one place that names the files inside one:

    config.json          the Hugging Face config                                (CONFIG_FILE)
    model.safetensors    the LM's weights, each tied tensor once                (WEIGHTS_FILE)
    memory.json          {"format", "memory": MemoryConfig.to_dict() | null,   (MEMORY_FILE)
                          "source": {...} (only in an imported model)}
    tokenizer files      tokenizer_config.json, tokenizer.json, ... (only when the model has a tokenizer)
    manifest.json        {"format", "files": {name: sha256}} of every other file  (MANIFEST)

A *base model* is a pretrained LM imported without a memory (`smviz import`, smviz.model.importing):
the same files, with "memory": null in memory.json and a "source" record (SOURCE_FIELDS) of where the
weights came from:

    kind             "hf-dir" (a local Hugging Face directory), "gguf" (a .gguf file) or "hub" (a hub id)
    name             the directory's or file's name, or the hub id
    files            {file name: sha256} of the source's weight files (the GGUF file, the safetensors)
    dequantisation   how the weights became float32 ("from Q4_1 GGUF to float32"), null if they were
    transformers     the transformers version that read the source
    gguf             (GGUF sources only) the version of the gguf package that parsed the file

`MemoryModel.from_pretrained` refuses a base model (saying how to give it a memory: MemoryModel.attach
or `smviz retrofit`); `load_base_model` reads one (smviz.model.memory_model).

A directory is written whole (built in a temp sibling, renamed into place) and read only after every
file's sha256 matches the manifest; every value read from disk is type-checked, so a damaged or
hand-edited file gets a one-line ModelFileError naming the file and field. Weights are only ever
read as safetensors (nothing is unpickled). The model hash is the sha256 of the manifest's file list.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from smviz.errors import ConfigError, ModelFileError
from smviz.io import atomic_dir, strict_json
from smviz.memory import MemoryConfig

if TYPE_CHECKING:
    import transformers

MODEL_FORMAT = "smviz-model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MEMORY_FILE = "memory.json"
MANIFEST = "manifest.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
"""Present (and listed in the manifest) exactly when the model was saved with a tokenizer."""
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, MEMORY_FILE)
LOAD_TIME_KEYS = ("is_local", "local_files_only")
"""Keys a tokenizer loaded from disk adds to its config; dropped so save → load → save keeps the hash."""

SOURCE_KINDS = ("hf-dir", "gguf", "hub")
SOURCE_FIELDS = {"kind": str, "name": str, "files": dict, "dequantisation": (str, type(None)), "transformers": str}
"""The fields of an imported model's source record (memory.json "source") and their JSON types."""

_SHA256 = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- hashes


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_files(files: dict[str, str]) -> str:
    """The model hash: sha256 of the sorted 'name sha256' lines of the manifest (first 16 hex digits)."""
    text = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def unique_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied/shared tensor once (under its first name), contiguous — so the
    same weights always give the same safetensors bytes (and the same model hash)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.contiguous()
    return out


# --------------------------------------------------------------------------- writing


def _write_json(path: Path, obj: Any) -> None:
    """Strict JSON as the model format spells it (keys sorted, indent 2, non-ASCII as \\u escapes): part
    of the hashed bytes, so unlike `json_text` it keeps the escapes (the file is built inside a temp
    directory that `atomic_dir` renames into place)."""
    text = json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False)
    path.write_text(text + "\n", encoding="ascii")


def write_model_dir(
    directory: str | os.PathLike,
    lm: transformers.PreTrainedModel,
    memory: MemoryConfig | None,
    tokenizer: transformers.PreTrainedTokenizerBase | None = None,
    *,
    source: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write a model directory atomically (a temp sibling renamed into place); returns the manifest's
    file → sha256. An existing directory is replaced only if it is an smviz model directory.
    `memory` None writes a base model; `source` (see SOURCE_FIELDS) records where an imported one came from."""
    if source is not None:
        check_source(source, "the source record")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ModelFileError(f"{directory} is a file, not a model directory; choose another path")
    if directory.exists() and any(directory.iterdir()) and not (directory / MANIFEST).exists():
        raise ModelFileError(f"{directory} exists and is not an smviz model directory; refusing to overwrite it")
    with atomic_dir(directory) as tmp:
        lm.config.save_pretrained(tmp)
        safetensors.torch.save_file(unique_tensors(lm), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        meta = {"format": MODEL_FORMAT, "memory": None if memory is None else memory.to_dict()}
        _write_json(tmp / MEMORY_FILE, meta | ({} if source is None else {"source": source}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _drop_load_time_keys(tmp / TOKENIZER_CONFIG)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json(tmp / MANIFEST, {"format": MODEL_FORMAT, "files": files})
    return files


def _drop_load_time_keys(tokenizer_config: Path) -> None:
    """A tokenizer loaded from disk saves how it was loaded ('is_local', ...); keep the file a
    function of the tokenizer alone, so save → load → save keeps the model hash."""
    if tokenizer_config.is_file():
        cfg = json.loads(tokenizer_config.read_text())
        for key in LOAD_TIME_KEYS:
            cfg.pop(key, None)
        _write_json(tokenizer_config, cfg)


# --------------------------------------------------------------------------- reading


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path} is unreadable ({e}); the model directory is damaged") from None
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path} must hold a JSON object, got {type(obj).__name__}; the model directory is damaged")
    return obj


def _check_format(path: Path, obj: dict[str, Any]) -> None:
    if obj.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} has format {obj.get('format')!r}, expected {MODEL_FORMAT!r}")


def read_manifest(directory: Path) -> dict[str, str]:
    """The manifest's file → sha256, every entry type-checked (a plain file name, a sha256 hex digest)."""
    path = directory / MANIFEST
    manifest = _read_json_object(path)
    _check_format(path, manifest)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ModelFileError(f"{path}: 'files' must be an object of file name -> sha256; the model directory is damaged")
    for name, digest in files.items():
        if not name or "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST:
            raise ModelFileError(f"{path} lists {name!r}, which is not a file of a model directory")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ModelFileError(f"{path}: the sha256 of {name!r} must be 64 hex digits, got {digest!r}")
    absent = [name for name in REQUIRED_FILES if name not in files]
    if absent:
        raise ModelFileError(f"{path} does not list {absent}; the model directory is damaged")
    return files


def verify_model_dir(directory: str | os.PathLike) -> dict[str, str]:
    """Check that `directory` is a complete, unaltered smviz model; returns its manifest's file → sha256."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a model directory" if directory.exists() else "does not exist"
        raise ModelFileError(f"model directory {directory} {what}")
    if not (directory / MANIFEST).is_file():
        raise ModelFileError(f"{directory} is not an smviz model directory: {MANIFEST} is missing")
    files = read_manifest(directory)
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise ModelFileError(f"{path} is missing (listed in {MANIFEST}); re-save or re-download the model")
        if sha256_file(path) != digest:
            raise ModelFileError(f"{path} was altered since the model was saved (sha256 mismatch); refusing to load it")
    return files


def model_dir_hash(directory: str | os.PathLike) -> str:
    """The model hash of a model directory, verified, without loading its weights."""
    return hash_files(verify_model_dir(directory))


def has_tokenizer(files: dict[str, str]) -> bool:
    """Whether a model directory (its manifest's files) holds a tokenizer."""
    return TOKENIZER_CONFIG in files


def check_source(source: Any, where: str) -> dict[str, Any]:
    """`source` if it is a well-formed source record (SOURCE_FIELDS); ModelFileError naming the field."""
    if not isinstance(source, dict):
        raise ModelFileError(f"{where} must be an object, got {type(source).__name__}")
    for name, kind in SOURCE_FIELDS.items():
        if not isinstance(source.get(name), kind):
            raise ModelFileError(f"{where}: field {name!r} is missing or of the wrong type ({source.get(name)!r})")
    if source["kind"] not in SOURCE_KINDS:
        raise ModelFileError(f"{where}: field 'kind' must be one of {SOURCE_KINDS}, got {source['kind']!r}")
    for name, digest in source["files"].items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ModelFileError(f"{where}: the sha256 of {name!r} must be 64 hex digits, got {digest!r}")
    return source


def _read_memory_file(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    path = Path(directory) / MEMORY_FILE
    obj = _read_json_object(path)
    _check_format(path, obj)
    return path, obj


def is_base_model_dir(directory: str | os.PathLike) -> bool:
    """Whether a model directory holds a base model (imported, no memory: memory.json's "memory" is null)."""
    return _read_memory_file(directory)[1].get("memory", {}) is None


def read_source(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The source record of an imported model's memory.json (type-checked), or None for a model smviz built."""
    path, obj = _read_memory_file(directory)
    return None if "source" not in obj else check_source(obj["source"], f"{path}: 'source'")


def read_memory_config(directory: str | os.PathLike) -> MemoryConfig:
    """The MemoryConfig of memory.json, every field type-checked (unknown fields ignored with a warning);
    a base model (no memory) gets a ModelFileError saying how to load it or give it a memory."""
    path, obj = _read_memory_file(directory)
    if "memory" in obj and obj["memory"] is None:
        source = read_source(directory)
        origin = f" (imported from {source['name']})" if source else ""
        raise ModelFileError(
            f"{Path(directory)} holds a base model without a memory{origin}: load it with "
            "smviz.model.load_base_model, or attach a memory with MemoryModel.attach / smviz retrofit"
        )
    try:
        return MemoryConfig.from_dict(obj.get("memory"))
    except ConfigError as e:
        raise ModelFileError(f"{path}: {e}") from None


def _json_kind_ok(default: Any, value: Any, key: str) -> bool:
    """Whether `value` read from config.json has the JSON kind of the config class's default."""
    if value is None or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        if isinstance(value, list) and key.endswith("_token_id"):  # several eos ids (Llama 3)
            return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (dict, list)):
        return isinstance(value, type(default))
    return True


def read_hf_config(directory: str | os.PathLike) -> transformers.PretrainedConfig:
    """The HF config of config.json, each field of the JSON kind of that config class's default (an
    integer where an integer belongs, ...). Whether smviz supports its architecture is the registry's
    question (`architecture_of`)."""
    import transformers  # here, not at module level: the app's metadata readers import this module

    path = Path(directory) / CONFIG_FILE
    raw = _read_json_object(path)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelFileError(f"{path}: field 'model_type' must be a non-empty string, got {model_type!r}")
    try:
        defaults = transformers.AutoConfig.for_model(model_type).to_dict()
    except ValueError as e:
        raise ModelFileError(f"{path}: model_type {model_type!r} is unknown to this transformers ({e})") from None
    for key, value in raw.items():
        if key in defaults and not _json_kind_ok(defaults[key], value, key):
            raise ModelFileError(f"{path}: field {key!r} must be of type {type(defaults[key]).__name__}, got {value!r}")
    try:
        return transformers.AutoConfig.from_pretrained(path.parent)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelFileError(f"{path} is not a valid Hugging Face config ({e})") from None


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors; a file that is not safetensors (a pickle, a truncated file)
    is refused, never unpickled."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        return safetensors.torch.load_file(path)
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path} is not a safetensors file ({e}); refusing to load it") from None


def read_tokenizer(directory: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory."""
    import transformers

    directory = Path(directory)
    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelFileError(f"the tokenizer files in {directory} cannot be loaded ({e})") from None
