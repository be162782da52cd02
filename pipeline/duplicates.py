"""Content found more than once in a dataset: in more than one split, or under more than one label."""

from __future__ import annotations


def find_duplicates(hashes: list[str | None], splits: list[str], labels: list[int], paths: list[str]) -> dict:
    """Content found more than once: in more than one split, and under more than one label (with examples)."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h is not None:
            groups.setdefault(h, []).append(i)
    cross, conflict = [], []
    for members in groups.values():
        if len(members) > 1:
            if len({splits[i] for i in members}) > 1:
                cross.append(members)
            if len({labels[i] for i in members if labels[i] >= 0}) > 1:
                conflict.append(members)

    def examples(found: list[list[int]]) -> list[str]:
        return [" = ".join(f"{paths[i]} ({splits[i]})" for i in m[:3]) for m in found[:3]]

    return {"cross_split": len(cross), "cross_split_files": sum(map(len, cross)),
            "conflicting_labels": len(conflict), "conflicting_files": sum(map(len, conflict)),
            "examples": examples(cross) + examples(conflict)}


def duplicates_line(d: dict) -> str:
    """One line for users, empty when there is nothing to say."""
    if not d.get("cross_split") and not d.get("conflicting_labels"):
        return ""
    return (f"duplicates: {d['cross_split']} images in more than one split ({d['cross_split_files']} files), "
            f"{d['conflicting_labels']} under conflicting labels ({d['conflicting_files']} files); e.g. "
            + "; ".join(d["examples"][:2]) + "; `headstart train --drop-duplicates` leaves them out")
