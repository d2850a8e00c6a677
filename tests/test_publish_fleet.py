"""Channels and promote through the real ``deltaship-publish`` processes (issue 11, items 1-2):
a beta release never changes stable's manifest, promote moves exactly one version and uploads
nothing, a stable device refuses beta's manifest, drafts carry their channel, and every
refusal is one line with its exit code and leaves the store as it was.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from manifest.constants import MANIFEST_KEY, OBJECTS_PREFIX, manifest_key, release_record_key
from manifest.errors import MixAndMatchError
from manifest.metadata import ReleasePointer
from manifest.storage.store import StoreOptions, open_store
from manifest.trust import verify_manifest, verify_record, verify_root

from ._fleet_helpers import Fleet, one_line_error
from .conftest import BIN, Cli, MoEFamily


@pytest.fixture(params=["dir", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('bucket')}/m"
    (tmp_path / "store").mkdir()
    return str(tmp_path / "store")


@pytest.fixture
def dir_store(tmp_path: Path) -> str:
    (tmp_path / "store").mkdir()
    return str(tmp_path / "store")


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_channels_are_isolated_and_promote_moves_exactly_one_version(
        cli: Cli, any_store: str, moe_family: MoEFamily) -> None:
    f = Fleet.init(cli, any_store)
    f.release(moe_family.v1, "v1")
    stable_before = f.raw(MANIFEST_KEY)
    f.release(moe_family.v2, "v2", "--channel", "beta")
    f.release(moe_family.v3, "v3", "--channel", "beta")
    # Beta's releases wrote beta's keys only.
    assert f.raw(MANIFEST_KEY) == stable_before
    assert f.raw(release_record_key("v2")) is None
    assert f.manifest().current.version == "v1"
    beta = f.manifest("beta")
    assert (beta.channel, beta.current.version, beta.sequence) == ("beta", "v3", 2)
    # A device following stable refuses beta's manifest served at stable's key.
    root = verify_root(f.raw("root.json") or b"", now=None)
    with pytest.raises(MixAndMatchError, match="channel 'beta'"):
        verify_manifest(f.raw(manifest_key("beta")) or b"", root, now=beta.published_at)
    hist = f.json("history", "--channel", "beta", key=False)
    assert [r["version"] for r in hist["releases"]] == ["v2", "v3"]
    assert hist["channels"] == ["stable", "beta"] and hist["current"] == "v3"

    objects = set(f.store.list(OBJECTS_PREFIX))
    beta_bytes = f.raw(manifest_key("beta"))
    out = f.json("promote", "--from", "beta", "--to", "stable", "--version", "v2")
    assert (out["kind"], out["channel"], out["current"]) == ("promote", "stable", "v2")
    assert out["written"] == [MANIFEST_KEY, release_record_key("v2")]
    stable = f.manifest()
    assert (stable.current.version, stable.action, stable.sequence) == ("v2", "promote", 2)
    assert stable.current == beta_pointer(f, "v2")
    assert set(f.store.list(OBJECTS_PREFIX)) == objects  # nothing uploaded
    assert f.raw(manifest_key("beta")) == beta_bytes  # the source channel is untouched
    assert f.raw(release_record_key("v3")) is None  # exactly the one version moved
    assert [r["version"] for r in f.json("history", key=False)["releases"]] == ["v1", "v2"]
    # Promoting it again is refused (already current); after a revert it is allowed again
    # and reuses stable's record.
    one_line_error(f.run("promote", "--from", "beta", "--to", "stable", "--version", "v2",
                         check=False), 2, "already current")
    f.run("revert", "--to", "v1")
    record = f.raw(release_record_key("v2"))
    f.run("promote", "--from", "beta", "--to", "stable", "--version", "v2")
    assert f.manifest().current.version == "v2" and f.raw(release_record_key("v2")) == record


def beta_pointer(f: Fleet, version: str) -> ReleasePointer:
    root = verify_root(f.raw("root.json") or b"", now=None)
    data = f.raw(release_record_key(version, "beta")) or b""
    return verify_record(data, root, version, "beta record").pointer


def test_channel_env_revert_refresh_and_a_draft_made_for_beta(
        cli: Cli, dir_store: str, moe_family: MoEFamily, tmp_path: Path) -> None:
    f = Fleet.init(cli, dir_store)
    f.release(moe_family.v1, "v1")
    stable = f.raw(MANIFEST_KEY)
    env = cli.env(DELTASHIP_CHANNEL="beta")
    cli.publish("release", moe_family.v2, "--store", dir_store, "--version", "v2", "--key",
                f.key, "--cache-dir", tmp_path / "cache", env=env)
    cli.publish("release", moe_family.v3, "--store", dir_store, "--version", "v3", "--key",
                f.key, "--cache-dir", tmp_path / "cache", env=env)
    assert f.manifest("beta").current.version == "v3" and f.raw(MANIFEST_KEY) == stable
    f.run("revert", "--channel", "beta", "--to", "v2")
    assert f.manifest("beta").current.version == "v2" and f.raw(MANIFEST_KEY) == stable
    out = f.json("refresh", "--channel", "beta")
    assert (out["channel"], out["sequence"], out["timestamp_sequence"]) == ("beta", 3, 4)
    # A draft made for beta names its channel and beta's keys; publish writes it there.
    draft = tmp_path / "d.json"
    one_line_error(f.run("rollout", "--channel", "beta", "--percent", "5", "--draft", draft,
                         check=False), 2, "no rollout in progress")
    f.release(moe_family.v4, "v4", "--channel", "beta", "--rollout", "1")
    f.run("rollout", "--channel", "beta", "--percent", "5", "--draft", draft, key=False)
    d = json.loads(draft.read_bytes())
    assert d["kind"] == "rollout" and d["base"]["channel"] == "beta"
    assert {doc["key"] for doc in d["documents"]} == {manifest_key("beta")}
    f.publish("sign", draft, "--key", f.key)
    f.publish("publish", draft, "--store", dir_store)
    beta = f.manifest("beta")
    assert beta.rollout is not None and beta.rollout.basis_points == 500
    assert (beta.current.version, beta.rollout.candidate.version) == ("v2", "v4")
    assert f.raw(MANIFEST_KEY) == stable


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_refusals_are_one_line_and_change_nothing(cli: Cli, dir_store: str,
                                                  moe_family: MoEFamily) -> None:
    f = Fleet.init(cli, dir_store)
    # Nothing released yet: nothing to stage or change.
    one_line_error(f.run("rollout", "--percent", "5", check=False), 2, "no release yet")
    f.release(moe_family.v1, "v1")
    f.release(moe_family.v2, "v2", "--channel", "beta")
    store = open_store(dir_store, StoreOptions())
    before = {k: store.get(k, 1 << 24) for k in store.list("") if not k.startswith("objects/")}
    cases: list[tuple[tuple[object, ...], tuple[str, ...]]] = [
        (("rollout", "--channel", "Beta", "--halt"), ("--channel", "not a channel name")),
        (("rollout", "--channel", "../x", "--halt"), ("not a channel name",)),
        (("rollout", "--channel", "gamma", "--halt"),
         ("channel 'gamma'", "no release yet", "stable, beta")),
        (("rollout", "--percent", "150"), ("--percent", "out of range")),
        (("rollout", "--percent", "-1"), ("--percent", "out of range")),
        (("rollout", "--percent", "0.001"), ("--percent", "basis point")),
        (("rollout", "--percent", "five"), ("not a percentage",)),
        (("rollout", "--complete"), ("no rollout in progress",)),
        (("rollout", "--halt", "--revoke"), ("exactly one of",)),
        (("rollout", "--ramp", "soon"), ("--ramp", "not a duration")),
        (("rollout", "--advance", "--stages", "5,1"), ("--stages", "increasing")),
        (("promote", "--from", "beta", "--to", "stable", "--version", "v9"),
         ("'v9'", "never released to channel 'beta'")),
        (("promote", "--from", "stable", "--to", "beta", "--version", "v2"),
         ("'v2'", "never released")),
        (("promote", "--from", "beta", "--to", "beta", "--version", "v2"), ("both 'beta'",)),
        (("promote", "--from", "nochan", "--to", "stable", "--version", "v2"),
         ("channel 'nochan'", "no release yet")),
    ]
    for args, needles in cases:
        one_line_error(f.run(*map(str, args), check=False), 2, *needles)
    for args, needles in [
        (("--channel", "Beta"), ("not a channel name",)),
        (("--rollout", "101"), ("--rollout", "out of range")),
        (("--channel", "fresh", "--rollout", "5"), ("no release yet", "nothing to fall back")),
    ]:
        one_line_error(f.release(moe_family.v3, "v3", *args, check=False), 2, *needles)
    # A version name is released once per store: promote it instead.
    one_line_error(f.release(moe_family.v3, "v2", check=False), 2,
                   "already released to channel 'beta'", "promote --from beta --to stable")
    one_line_error(f.publish("history", "--store", dir_store, "--channel", "B", check=False),
                   2, "not a channel name")
    after = {k: store.get(k, 1 << 24) for k in store.list("") if not k.startswith("objects/")}
    assert after == before


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_the_readme_fleet_commands_run_as_written(cli: Cli, bucket: str,
                                                  moe_family: MoEFamily) -> None:
    """Every shell block of README "Running a fleet", in order, against S3, then its crontab
    line once (schedule fields dropped)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Running a fleet", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### On the devices", 1)[0]  # the publisher's part
    blocks = [b.split("```", 1)[0] for b in section.split("```sh\n")[1:]]
    cron = section.split("```crontab\n", 1)[1].split("```", 1)[0].strip().splitlines()[-1]
    assert len(blocks) == 3
    store = f"s3://{bucket}/llm"
    for name, model in (("v1", moe_family.v1), ("v5", moe_family.v2), ("v6", moe_family.v3)):
        (cli.cwd / f"checkpoint-{name}").symlink_to(model)
    cli.publish("keygen", "--out", cli.cwd / "keys", "--name", "release")
    key = cli.cwd / "keys" / "release.key"
    cli.publish("init", "--store", store, "--key", key)
    cli.publish("release", cli.cwd / "checkpoint-v1", "--store", store, "--version", "v1",
                "--key", key)
    advance = " ".join(cron.split()[5:]).replace("\\%", "%").replace(
        "/etc/deltaship/release.key", str(key))
    script = "\n".join([*blocks, advance]).replace("s3://models/llm", store)
    env = cli.env(PATH=f"{BIN}:/usr/bin:/bin")
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cli.cwd, env=env,
                       text=True, capture_output=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("none: no rollout in progress")
    f = Fleet(cli, store, key)
    m = f.manifest()
    assert (m.current.version, m.rollout, f.manifest("beta").current.version) == \
        ("v6", None, "v5")
