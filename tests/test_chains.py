"""Chains of earlier patches: the index entries, the planner's routes, the publisher's carry."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifest.download_plan import MAX_ROUTE_OBJECTS, make_plan
from manifest.entries import MAX_GROUP_CHAIN, ChainStep
from manifest.errors import FormatError, OversizeError
from manifest.metadata import GroupEntry, ObjectRef, PatchRef, ReleaseIndex
from publisher.release_plan import MAX_CHAIN_STEPS, carry_chain

from ._signed_docs import NOW, sha


def c(name: str) -> str:
    """The sha256 of content ``name``."""
    return sha(f"content {name}".encode())


def obj(name: str, length: int) -> ObjectRef:
    return ObjectRef(sha(f"object {name}".encode()), length, "dspatch")


def step(base: str, target: str, length: int) -> ChainStep:
    """A chain step from content ``base`` to ``target`` whose object is ``length`` bytes."""
    return ChainStep(c(base), c(target), 1000, obj(f"{base}>{target}", length))


def group(target: str = "T", full: int = 1000, patches: dict[str, int] | None = None,
          chain: tuple[ChainStep, ...] = (), name: str = "g") -> GroupEntry:
    ps = tuple(PatchRef("v1", c(b), obj(f"{b}>{target}", n)) for b, n in (patches or {}).items())
    return GroupEntry(name, f"{name}.safetensors", c(target), 1000, (), obj(f"full {name}", full),
                      ps, chain=chain)


def plan_of(*groups: GroupEntry, have: tuple[str, ...] = ("A",)) -> Any:
    index = ReleaseIndex("v9", NOW, groups, (), repository_id="0" * 32)
    return make_plan(index, {c(h) for h in have})


# -- the index entry ------------------------------------------------------------------------


def test_chain_round_trips_and_keeps_unknown_fields() -> None:
    g = group(patches={"B": 10}, chain=(step("A", "B", 20),))
    d = g.to_dict()
    d["chain"][0]["note"] = "from v2"
    back = GroupEntry.from_dict(d, "g")
    assert back == g and back.to_dict() == d
    assert "chain" not in group(patches={"B": 10}).to_dict()  # old indexes stay byte for byte


@pytest.mark.parametrize(("edit", "error"), [
    (lambda s: s["object"].update(encoding="zstd"), FormatError),
    (lambda s: s.update(sha256=s["base_sha256"]), FormatError),
    (lambda s: s.update(length=1 << 41), OversizeError),
    (lambda s: s.pop("object"), FormatError),
])
def test_bad_chain_steps_are_refused(edit: Any, error: type[Exception]) -> None:
    d = group(patches={"B": 10}, chain=(step("A", "B", 20),)).to_dict()
    edit(d["chain"][0])
    with pytest.raises(error):
        GroupEntry.from_dict(d, "g")


def test_a_chain_over_the_cap_is_refused() -> None:
    d = group().to_dict()
    d["chain"] = [step("A", "B", 1).to_dict()] * (MAX_GROUP_CHAIN + 1)
    with pytest.raises(OversizeError, match="chain"):
        GroupEntry.from_dict(d, "g")


# -- the planner ----------------------------------------------------------------------------

CASES = [
    # (patches to T, chain, what the device has, expected kind, expected bytes)
    ({"A": 300}, (), ("A",), "patch", 300),
    ({"C": 100}, (step("A", "B", 50), step("B", "C", 50)), ("A",), "chain", 200),
    ({"A": 150, "C": 100}, (step("A", "B", 50), step("B", "C", 50)), ("A",), "patch", 150),
    ({"C": 100}, (step("A", "B", 50), step("B", "C", 50)), ("B",), "chain", 150),
    ({"C": 100}, (step("A", "B", 500), step("B", "C", 500)), ("A",), "full", 1000),
    ({"C": 100}, (step("A", "C", 80), step("A", "B", 10), step("B", "C", 10)), ("A",),
     "chain", 120),
    ({"Z": 100}, (step("A", "B", 50),), ("A",), "full", 1000),
    ({}, (step("A", "T", 70),), ("A",), "patch", 70),  # a step that ends at the content
]


@pytest.mark.parametrize(("patches", "chain", "have", "kind", "size"), CASES)
def test_routes(patches: dict[str, int], chain: tuple[ChainStep, ...], have: tuple[str, ...],
                kind: str, size: int) -> None:
    s = plan_of(group(patches=patches, chain=chain), have=have).groups[0]
    assert (s.kind, s.download) == (kind, size)
    if kind == "chain":
        assert s.base_sha256 in {c(h) for h in have}
        assert all(a.sha256 == b.base_sha256 for a, b in itertools.pairwise(s.chain))
        assert s.patch_base == s.chain[-1].sha256


def test_routes_are_bounded() -> None:
    names = [f"n{i}" for i in range(MAX_ROUTE_OBJECTS + 1)]
    long = tuple(step(a, b, 1) for a, b in itertools.pairwise(names))
    fits = group(patches={names[-2]: 1}, chain=long[:-1])
    assert plan_of(fits, have=("n0",)).groups[0].kind == "chain"
    too_long = group(patches={names[-1]: 1}, chain=long)
    assert plan_of(too_long, have=("n0",)).groups[0].kind == "full"


def test_intermediate_steps_never_share_an_object_with_other_downloads() -> None:
    shared = step("A", "B", 10)
    g1 = group(patches={"B": 10}, chain=(shared,), name="g1", target="T1")
    g2 = group(patches={"B": 10}, chain=(shared,), name="g2", target="T2")
    p = plan_of(g1, g2)
    assert [s.kind for s in p.groups] == ["chain", "full"]
    # and never another group's patch or full object
    other = group(patches={"A": 5}, name="g0", target="B")
    g3 = group(patches={"B": 10}, chain=(ChainStep(c("A"), c("B"), 1000, other.patches[0].object),),
               name="g3", target="T3")
    assert [s.kind for s in plan_of(other, g3).groups] == ["patch", "full"]


@st.composite
def graphs(draw: Any) -> tuple[GroupEntry, set[str]]:
    nodes = [f"n{i}" for i in range(draw(st.integers(2, 7)))] + ["T"]
    edges = draw(st.lists(st.tuples(st.sampled_from(nodes[:-1]), st.sampled_from(nodes),
                                    st.integers(1, 400)), max_size=14))
    chain = tuple(step(a, b, n) for a, b, n in edges if a != b and b != "T")
    patches = {a: n for a, b, n in edges if b == "T"}
    have = set(draw(st.lists(st.sampled_from(nodes[:-1]), min_size=1, max_size=3)))
    return group(full=draw(st.integers(1, 1500)), patches=patches, chain=chain), have


def _brute_force(g: GroupEntry, have: set[str]) -> int:
    """The cheapest download to ``g`` by trying every route of at most MAX_ROUTE_OBJECTS."""
    edges = [(p.base_sha256, g.sha256, p.object) for p in g.patches]
    edges += [(s.base_sha256, s.sha256, s.object) for s in g.chain]
    held = {c(h) for h in have}
    best = g.full.length

    def walk(at: str, cost: int, used: tuple[ObjectRef, ...]) -> None:
        nonlocal best
        if at == g.sha256:
            best = min(best, cost)
            return
        if len(used) == MAX_ROUTE_OBJECTS:
            return
        for a, b, o in edges:
            if a == at and o not in used and b not in held:
                walk(b, cost + o.length, (*used, o))

    for h in held:
        walk(h, 0, ())
    return best


@settings(max_examples=300, deadline=None)
@given(graphs())
def test_the_planner_finds_the_cheapest_route(case: tuple[GroupEntry, set[str]]) -> None:
    g, have = case
    s = plan_of(g, have=tuple(have)).groups[0]
    assert s.download == _brute_force(g, have)
    if s.kind in ("patch", "chain"):
        hops = [*s.chain, None]
        assert s.base_sha256 in {c(h) for h in have} and len(s.objects) <= MAX_ROUTE_OBJECTS
        assert all(a.sha256 == b.base_sha256 for a, b in itertools.pairwise(s.chain))
        assert hops[0] is None or hops[0].base_sha256 == s.base_sha256


# -- the publisher's carry ------------------------------------------------------------------


def prev(version_content: str, patches: dict[str, int],
         chain: tuple[ChainStep, ...] = ()) -> GroupEntry:
    return group(target=version_content, patches=patches, chain=chain)


def test_earlier_patches_become_steps_and_dead_ends_go() -> None:
    v3 = prev("C", {"B": 30, "X": 99}, chain=(step("A", "B", 20), step("Q", "R", 5)))
    kept = carry_chain(c("D"), (PatchRef("v3", c("C"), obj("C>D", 40)),), [v3])
    assert {(s.base_sha256, s.sha256) for s in kept} == {
        (c("B"), c("C")), (c("X"), c("C")), (c("A"), c("B"))}
    assert [s.sha256 for s in kept][:2] == [c("C"), c("C")]  # nearest first
    # an unchanged group: the patches it keeps are not listed again as steps
    same = carry_chain(c("C"), tuple(v3.patches), [v3])
    assert {(s.base_sha256, s.sha256) for s in same} == {(c("A"), c("B"))}


def test_carried_chains_are_bounded() -> None:
    names = [f"n{i}" for i in range(12)]
    long = tuple(step(a, b, 1) for a, b in itertools.pairwise(names))
    kept = carry_chain(c("T"), (PatchRef("v", c(names[-1]), obj("last", 1)),),
                       [prev("Z", {}, chain=long)])
    assert len(kept) == MAX_ROUTE_OBJECTS - 1  # a longer route could never be planned
    wide = tuple(step(f"w{i}", "B", 1) for i in range(40))
    kept = carry_chain(c("T"), (PatchRef("v", c("B"), obj("B>T", 1)),), [prev("Z", {}, wide)])
    assert len(kept) == MAX_CHAIN_STEPS
