"""Which group each tensor belongs to: per routed expert, per layer, and the rest.

Rules are regular expressions matched at the start of the tensor name, tried in order; the first
match decides. ``--group-pattern`` rules come before the defaults. A rule's group name is the
named capture ``group`` when there is one, else its named captures as ``name.value`` pairs
joined with dots (``(?P<layer>\\d+)...(?P<expert>\\d+)`` gives ``layer.3.expert.7``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from manifest.errors import LocalError
from manifest.metadata import check_group_name

__all__ = ["DEFAULT_RULES", "GroupRule", "assign_groups", "natural_key", "parse_pattern"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class GroupRule:
    pattern: re.Pattern[str]
    template: str | None = None  # str.format template over the named captures

    def match(self, name: str) -> str | None:
        m = self.pattern.match(name)
        if m is None:
            return None
        caps = {k: v for k, v in m.groupdict().items() if v is not None}
        if self.template is not None:
            return self.template.format(**caps)
        if "group" in caps:
            return caps["group"]
        return ".".join(f"{k}.{v}" for k, v in caps.items())


def _rule(regex: str, template: str) -> GroupRule:
    return GroupRule(re.compile(regex), template)


# Mixtral: model.layers.L.block_sparse_moe.experts.E.w1.weight; Qwen2/3-MoE, OLMoE, DeepSeek-V3:
# model.layers.L.mlp.experts.E.gate_proj.weight (+ .weight_scale_inv companions).
DEFAULT_RULES: tuple[GroupRule, ...] = (
    _rule(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?experts\.(?P<expert>\d+)\.",
          "layers.{layer}.experts.{expert}"),
    _rule(r"^(?:.*\.)?(?:layers|layer|h|blocks)\.(?P<layer>\d+)\.", "layers.{layer}"),
    _rule(r"^(?:model\.|bert\.|transformer\.)?(?:embed_tokens|embeddings|wte|wpe)\.",
          "embeddings"),
    _rule(r"^(?:model\.|transformer\.)?(?:norm|ln_f|final_layernorm)\.", "norm"),
    _rule(r"^(?:model\.)?lm_head\.", "lm_head"),
)


def parse_pattern(text: str) -> GroupRule:
    """A user ``--group-pattern``: a regex with at least one named capture."""
    try:
        pattern = re.compile(text)
    except re.error as e:
        raise LocalError(f"--group-pattern {text!r} is not a valid regular expression: {e}") from e
    if not pattern.groupindex:
        raise LocalError(
            f"--group-pattern {text!r} needs a named capture, e.g. (?P<layer>\\d+)"
        )
    return GroupRule(pattern)


def _fallback(name: str) -> str:
    """Heads and other loose tensors: the name without a model prefix and its last part."""
    parts = name.split(".")
    for prefix in ("model", "bert", "transformer"):
        if len(parts) > 2 and parts[0] == prefix:
            parts = parts[1:]
    if len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _safe(group: str) -> str:
    cleaned = _UNSAFE.sub("_", group).strip(".") or "_"
    while ".." in cleaned:
        cleaned = cleaned.replace("..", ".")
    if cleaned[0] in "-.":
        cleaned = "_" + cleaned
    return check_group_name(cleaned[:200])


def assign_groups(
    names: Iterable[str], patterns: Sequence[GroupRule] = ()
) -> dict[str, list[str]]:
    """Group name -> sorted tensor names; groups in natural order."""
    groups: dict[str, list[str]] = {}
    rules = (*patterns, *DEFAULT_RULES)
    for name in names:
        group = next((g for r in rules if (g := r.match(name)) is not None), None)
        groups.setdefault(_safe(group or _fallback(name)), []).append(name)
    return {g: sorted(groups[g], key=natural_key) for g in sorted(groups, key=natural_key)}


def natural_key(s: str) -> list[object]:
    """Sort ``layers.10`` after ``layers.9``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s)]
