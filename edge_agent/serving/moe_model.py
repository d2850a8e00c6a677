"""A Mixtral-style mixture-of-experts forward pass in NumPy, on hot-swappable weights.

The reference model server (:mod:`edge_agent.serving.server`) runs it; tests and benchmarks use
it to compute what a fresh load of a version answers. Architecture (the tensor names
``python -m devtools.modelgen moe`` and Mixtral checkpoints use)::

    x = embed_tokens[tokens]
    per layer:  x += o_proj(causal multi-head attention(rms_norm(x)), with rotary positions)
                h = rms_norm(x);  router = softmax(top_k(gate(h)))
                x += sum over the token's top-k experts of router * w2(silu(w1 h) * w3 h)
    logits = lm_head(rms_norm(x))

All arithmetic is float32 and deterministic: the same weights and tokens give the same bits.
BF16/F16/F8 weights are widened once per group with :mod:`edge_agent.serving.dtypes`; F32
weights are used in place (views of the mapped file). :meth:`MoEModel.build` converts only the
groups whose :class:`~edge_agent.serving.weights.Group` object changed and shares the others'
arrays with the previous model, so a swap of two experts costs two experts of memory, not a
second model.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from manifest.errors import ModelError

from .dtypes import FLOAT32_DTYPES, to_float32
from .weights import Group, Tensor, Weights

__all__ = ["MoEConfig", "MoEModel", "Output"]

F32 = npt.NDArray[np.float32]
MAX_CONFIG_SIZE = 1 << 20
PROBE_TOKENS = 16


@dataclass(frozen=True)
class MoEConfig:
    """The architecture: from the version's ``config.json``, checked against tensor shapes."""

    layers: int
    hidden: int
    heads: int
    experts: int
    top_k: int
    vocab: int
    eps: float = 1e-5
    rope_theta: float = 1e6

    @classmethod
    def of(cls, weights: Weights) -> MoEConfig:
        doc = _read_config(weights.path / "config.json")
        t = weights.tensors
        embed = _tensor(t, "model.embed_tokens.weight")
        vocab, hidden = embed.shape if len(embed.shape) == 2 else (0, 0)
        layers = 0
        while f"model.layers.{layers}.block_sparse_moe.gate.weight" in t:
            layers += 1
        if not layers or not hidden:
            raise ModelError(f"{weights.path}: not a Mixtral-style MoE model (no embeddings "
                             "or no model.layers.N.block_sparse_moe.gate.weight)")
        experts = _tensor(t, "model.layers.0.block_sparse_moe.gate.weight").shape[0]
        heads = _number(doc, "num_attention_heads", max(1, hidden // 64), int, weights.path)
        top_k = _number(doc, "num_experts_per_tok", 2, int, weights.path)
        eps = _number(doc, "rms_norm_eps", 1e-5, float, weights.path)
        theta = _number(doc, "rope_theta", 1e6, float, weights.path)
        if heads < 1 or hidden % heads or (hidden // heads) % 2:
            raise ModelError(f"{weights.path}: {heads} heads do not divide hidden size {hidden}")
        if not 1 <= top_k <= experts:
            raise ModelError(f"{weights.path}: num_experts_per_tok {top_k} is not in 1..{experts}")
        return cls(layers=layers, hidden=hidden, heads=heads, experts=experts, top_k=top_k,
                   vocab=vocab, eps=eps, rope_theta=theta)


@dataclass(frozen=True)
class Output:
    """The answer for one sequence: next-token logits of the last position."""

    version: str
    logits: F32

    @property
    def logits_sha256(self) -> str:
        return hashlib.sha256(self.logits.tobytes()).hexdigest()

    def top(self, k: int = 5) -> list[tuple[int, float]]:
        order = np.argsort(-self.logits, kind="stable")[:k]
        return [(int(i), float(self.logits[i])) for i in order]


@dataclass(frozen=True, eq=False)
class MoEModel:
    """One version's weights as float32 arrays, ready to run; immutable."""

    weights: Weights
    config: MoEConfig
    arrays: Mapping[str, F32]
    converted: Mapping[str, Mapping[str, F32]]  # group file -> its tensors as float32

    @property
    def version(self) -> str:
        return self.weights.version

    @property
    def nbytes(self) -> int:
        """Private float32 memory (F32 weights are views of the mapped file and count 0)."""
        return sum(self.arrays[n].nbytes for n, t in self.weights.tensors.items()
                   if t.dtype != "F32")

    @classmethod
    def build(cls, weights: Weights, previous: MoEModel | None = None) -> MoEModel:
        """Convert the groups that changed since ``previous``; share the others' arrays."""
        config = MoEConfig.of(weights)
        converted: dict[str, Mapping[str, F32]] = {}
        for file, group in weights.groups.items():
            old = previous.weights.groups.get(file) if previous is not None else None
            if previous is not None and old is group and file in previous.converted:
                converted[file] = previous.converted[file]
            else:
                converted[file] = _convert(group)
        arrays = {name: converted[file][name] for file, group in weights.groups.items()
                  for name, tensor in group.tensors.items()
                  if weights.tensors.get(name) is tensor}  # the group the weight map names
        model = cls(weights, config, MappingProxyType(arrays), MappingProxyType(converted))
        model._check_shapes()
        return model

    def changed_groups(self, previous: MoEModel | None) -> list[str]:
        """Group files converted for this model rather than shared with ``previous``."""
        if previous is None:
            return sorted(self.converted)
        return sorted(f for f, c in self.converted.items() if previous.converted.get(f) is not c)

    # -- the forward pass ------------------------------------------------------------------

    def forward(self, tokens: Sequence[int]) -> Output:
        """Next-token logits after ``tokens`` (ids in ``0..vocab-1``)."""
        with np.errstate(all="ignore"):  # a diverged version's NaN is caught by probe()
            return self._forward(tokens)

    def _forward(self, tokens: Sequence[int]) -> Output:
        c, a = self.config, self.arrays
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or not len(ids) or ids.min() < 0 or ids.max() >= c.vocab:
            raise ValueError(f"tokens must be 1 or more ids in 0..{c.vocab - 1}")
        x = a["model.embed_tokens.weight"][ids].astype(np.float32)
        cos, sin = self._rope(len(ids))
        for layer in range(c.layers):
            p = f"model.layers.{layer}"
            h = _rms_norm(x, a[f"{p}.input_layernorm.weight"], c.eps)
            x = x + self._attention(h, p, cos, sin)
            h = _rms_norm(x, a[f"{p}.post_attention_layernorm.weight"], c.eps)
            x = x + self._experts(h, f"{p}.block_sparse_moe")
        last = _rms_norm(x[-1:], a["model.norm.weight"], c.eps)
        logits = (last @ a["lm_head.weight"].T)[0]
        return Output(self.version, np.ascontiguousarray(logits, dtype=np.float32))

    def generate(self, tokens: Sequence[int], new_tokens: int,
                 stop: Callable[[], bool] | None = None) -> list[int]:
        """Greedy decoding of ``new_tokens`` tokens after ``tokens``; fewer when ``stop()``
        turns true (checked before each token: nobody waits for the answer any more)."""
        seq = list(tokens)
        for _ in range(new_tokens):
            if stop is not None and stop():
                break
            seq.append(int(np.argmax(self.forward(seq).logits)))
        return seq[len(tokens):]

    def probe(self) -> Output:
        """A fixed input every version must answer with finite logits (the acceptance test)."""
        ids = np.linspace(0, self.config.vocab - 1, PROBE_TOKENS).astype(np.int64)
        out = self.forward(ids.tolist())
        if not np.isfinite(out.logits).all():
            raise ModelError(f"version {self.version} computes non-finite logits (NaN or "
                             "infinity) on the probe input: refusing to serve it")
        return out

    def _rope(self, n: int) -> tuple[F32, F32]:
        d = self.config.hidden // self.config.heads
        inv = self.config.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        angles = np.outer(np.arange(n, dtype=np.float64), inv)
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def _attention(self, h: F32, p: str, cos: F32, sin: F32) -> F32:
        a, n, heads = self.arrays, h.shape[0], self.config.heads
        d = self.config.hidden // heads

        def proj(x: str) -> F32:
            out: F32 = (h @ a[f"{p}.self_attn.{x}_proj.weight"].T).reshape(n, heads, d)
            return out.transpose(1, 0, 2)  # heads, n, d

        q, k, v = _rotate(proj("q"), cos, sin), _rotate(proj("k"), cos, sin), proj("v")
        scores = (q @ k.transpose(0, 2, 1)) * np.float32(1 / math.sqrt(d))
        causal = np.tril(np.ones((n, n), dtype=bool))
        scores = np.where(causal, scores, np.float32(-np.inf)).astype(np.float32, copy=False)
        att = (_softmax(scores) @ v).transpose(1, 0, 2).reshape(n, heads * d)
        out: F32 = (att @ a[f"{p}.self_attn.o_proj.weight"].T).astype(np.float32, copy=False)
        return out

    def _experts(self, h: F32, p: str) -> F32:
        a, k = self.arrays, self.config.top_k
        logits = h @ a[f"{p}.gate.weight"].T  # tokens, experts
        chosen = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        gates = _softmax(np.take_along_axis(logits, chosen, axis=1))
        out = np.zeros_like(h)
        for e in np.unique(chosen):
            rows, slot = np.nonzero(chosen == e)
            q = f"{p}.experts.{e}"
            x = h[rows]
            y = (_silu(x @ a[f"{q}.w1.weight"].T) * (x @ a[f"{q}.w3.weight"].T))
            out[rows] += gates[rows, slot][:, None] * (y @ a[f"{q}.w2.weight"].T)
        return out

    def _check_shapes(self) -> None:
        c, hid = self.config, self.config.hidden
        want = {"model.embed_tokens.weight": (c.vocab, hid), "model.norm.weight": (hid,),
                "lm_head.weight": (c.vocab, hid)}
        for layer in range(c.layers):
            p = f"model.layers.{layer}"
            want[f"{p}.input_layernorm.weight"] = want[f"{p}.post_attention_layernorm.weight"] = (
                hid,)
            want.update({f"{p}.self_attn.{x}_proj.weight": (hid, hid) for x in "qkvo"})
            want[f"{p}.block_sparse_moe.gate.weight"] = (c.experts, hid)
            ffn = _tensor(self.weights.tensors, f"{p}.block_sparse_moe.experts.0.w1.weight")
            for e in range(c.experts):
                q = f"{p}.block_sparse_moe.experts.{e}"
                want[f"{q}.w1.weight"] = want[f"{q}.w3.weight"] = ffn.shape
                want[f"{q}.w2.weight"] = (hid, ffn.shape[0])
        for name, shape in want.items():
            got = _tensor(self.weights.tensors, name).shape
            if got != shape:
                raise ModelError(f"{self.weights.path}: {name} has shape {list(got)}, the "
                                 f"architecture needs {list(shape)}")


def _convert(group: Group) -> Mapping[str, F32]:
    out: dict[str, F32] = {}
    for name, tensor in group.tensors.items():
        if tensor.dtype == "F32":
            out[name] = tensor.numpy()  # a view of the mapped file: no copy
        elif tensor.dtype in FLOAT32_DTYPES:
            out[name] = to_float32(tensor.raw, tensor.dtype, tensor.shape,
                                   out=_private_f32(tensor.shape))
        else:
            out[name] = tensor.numpy().astype(np.float32)
    return MappingProxyType(out)


def _private_f32(shape: tuple[int, ...]) -> F32:
    """A float32 array in its own anonymous mapping, unmapped when the array is dropped.

    Kept out of the malloc heap on purpose: glibc keeps freed heap memory, so a swapped-out
    version's arrays would stay resident (measured by scripts/bench_swap.py: hundreds of MiB
    over six swaps), while a mapping goes back to the OS with the last request using it.
    """
    count = math.prod(shape)
    buf = mmap.mmap(-1, max(4, 4 * count))
    arr: F32 = np.frombuffer(buf, dtype=np.float32, count=count).reshape(shape)
    return arr


def _number(doc: dict[str, Any], key: str, default: float, kind: type, where: Path) -> Any:
    value = doc.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or (kind is int and value != int(value))
            or not value > 0):
        raise ModelError(f"{where / 'config.json'}: {key} must be a positive "
                         f"{'integer' if kind is int else 'number'}, not {value!r}")
    return kind(value)


def _tensor(tensors: Mapping[str, Tensor], name: str) -> Tensor:
    try:
        return tensors[name]
    except KeyError:
        raise ModelError(f"the model has no tensor {name!r}") from None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_SIZE + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from e
    try:
        doc = json.loads(raw) if len(raw) <= MAX_CONFIG_SIZE else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise ModelError(f"{path}: not a JSON object of at most {MAX_CONFIG_SIZE} bytes")
    return doc


def _rms_norm(x: F32, w: F32, eps: float) -> F32:
    var = np.mean(x * x, axis=-1, keepdims=True)
    out: F32 = (x / np.sqrt(var + np.float32(eps))) * w
    return out


def _rotate(x: F32, cos: F32, sin: F32) -> F32:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, :], sin[None, :, :]
    out: F32 = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out


def _softmax(x: F32) -> F32:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    out: F32 = e / np.sum(e, axis=-1, keepdims=True)
    return out


def _silu(x: F32) -> F32:
    out: F32 = (x / (np.float32(1) + np.exp(-x))).astype(np.float32, copy=False)
    return out
