"""`minisparse cache ls | rm KEY... | rm --all`: the documents `ask` saved, and the temporary
folders a killed process left behind (shown by ls, removed by rm --all)."""
from __future__ import annotations

import os
import shutil

from ..ask import fmt_bytes
from ..persist import cache_dir, list_caches, temp_folders
from .flags import CLIError


def add_parser(sub):
    c = sub.add_parser("cache", help="list or remove saved document caches")
    c.add_argument("action", choices=["ls", "rm"])
    c.add_argument("keys", nargs="*", help="with rm: the keys (folder names) to remove")
    c.add_argument("--all", action="store_true",
                   help="with rm: remove every cached document and every stale temporary folder")
    c.set_defaults(func=run)


def run(args):
    if args.action == "ls":
        if args.keys or args.all:
            raise CLIError("cache ls: takes no keys and no --all")
        return ls()
    if not args.keys and not args.all:
        raise CLIError("cache rm: nothing named to remove; give keys (see `minisparse cache ls`) "
                       "or --all")
    if args.keys and args.all:
        raise CLIError("cache rm: give keys or --all, not both")
    return rm(set(args.keys))   # an empty set: --all


def ls():
    total = 0
    rows = list_caches()
    for folder, header, size in rows:
        total += size
        extra = (header or {}).get("extra", {})
        what = (f"{extra.get('tokens', '?')} tokens of {', '.join(extra.get('files', [])) or '?'} "
                f"with {os.path.basename(extra.get('model', '?'))}, cache {extra.get('cache', '?')}"
                if header else "unreadable header")
        print(f"{folder.name}  {fmt_bytes(size):>10}  {what}")
    temps = temp_folders()
    for folder, pid, stale, size in temps:
        total += size
        what = ("stale temporary folder (its process is gone; `cache rm --all` removes it)" if stale
                else f"being written by process {pid}")
        print(f"{folder.name}  {fmt_bytes(size):>10}  {what}")
    print(f"{len(rows)} cached documents, {len(temps)} temporary folders, {fmt_bytes(total)} "
          f"in {cache_dir()}")
    return 0


def rm(keys):
    """Remove the named caches, or with no names (--all) every cache and every stale temporary
    folder; a temporary folder of a live process is its writer's to remove. Every name is
    checked before anything is removed."""
    rows = [(f, size) for f, _, size in list_caches() if not keys or f.name in keys]
    absent = keys - {f.name for f, _ in rows}
    if absent:
        raise CLIError(f"cache rm: no cached document named {', '.join(sorted(absent))} in {cache_dir()}")
    if not keys:
        rows += [(f, size) for f, _, stale, size in temp_folders() if stale]
    for folder, size in rows:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"removed {folder.name} ({fmt_bytes(size)})")
    return 0
