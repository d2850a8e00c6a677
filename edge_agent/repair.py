"""``verify --repair``: fetch damaged files of a version again and put them back in place."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from manifest.constants import WEIGHT_INDEX_FILE
from manifest.download_plan import GroupStep, wanted_groups

from .fetch import download
from .install import install_file, install_group
from .layout import weight_index
from .service import open_agent_source
from .updater import Agent

__all__ = ["repair_version"]


async def repair_version(agent: Agent, version: str, bad: list[str]) -> None:
    """Re-fetch each damaged file in full, verify it, and relink it into the version."""
    root = agent.root()
    index = agent.local_index(version, root)
    layout = agent.layout
    source = open_agent_source(agent.cfg)
    sem = asyncio.Semaphore(1)
    try:
        with ThreadPoolExecutor(2) as ex:
            for name in bad:
                if name == WEIGHT_INDEX_FILE:  # made from the index, not downloaded
                    groups = {g.name for g in wanted_groups(index, agent.cfg.include)}
                    layout.rewrite_file(version, name, weight_index(index, groups))
                    continue
                group = next((g for g in index.groups if g.file == name), None)
                if group is not None:
                    layout.remove_object(group.sha256)
                    obj = await download(layout, source, sem, group.full, group.name, _ignore)
                    step = GroupStep(group, "full", group.full)
                    await asyncio.to_thread(install_group, layout, step, obj, ex)
                    sha, fetched = group.sha256, group.full.sha256
                else:
                    entry = next(f for f in index.files if f.path == name)
                    layout.remove_object(entry.sha256)
                    obj = await download(layout, source, sem, entry.object, name, _ignore)
                    await asyncio.to_thread(install_file, layout, entry, obj)
                    sha, fetched = entry.sha256, entry.object.sha256
                layout.discard_download(fetched)
                layout.replace_file(version, name, sha)
        layout.save_stamps()
        agent.verify_version(version, root)
    finally:
        await source.close()


def _ignore(n: int) -> None:
    pass
