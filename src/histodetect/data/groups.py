"""Which slide each patch comes from, from the data's own metadata, so that a split can keep a slide on one side.

Three sources, each giving a patch its :class:`~histodetect.data.store.Place` (slide and position) in the store:

- the PCam release's ``camelyonpatch_level_2_split_<split>_meta.csv`` beside each HDF5 split (``coord_y,
  coord_x, tumor_patch, center_tumor_patch, wsi``, row for row with the HDF5 ``x`` file), read whenever a PCam
  source is ingested (:func:`read_pcam_meta`);
- ``ingest --pcam-meta DIR`` for the competition layout, whose ids are the SHA-1 of the pixels: DIR's PCam patches
  are hashed a chunk at a time and matched to the pixels ingested (:func:`pcam_places_by_sha1`);
- ``ingest --groups FILE``, a CSV of ``id,group`` for any other grouping (:func:`read_groups_file`).

No label is ever taken from metadata, and groups are recorded for labeled patches only (:class:`Placer`): grouped
splits use nothing else, a slide's name can tell the label (PCam's slides are named ``normal_*`` or ``tumor_*``),
and mapping the competition's test set back to PCam would recover its labels, which is a leak, not a method; a
test patch found in PCam is reported as such and its slide is not recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import h5py

from histodetect.data.ids import group_problem, shown
from histodetect.data.sources import PCAM_X, Item, Problems, csv_table, pcam_meta_path, pcam_patch_count
from histodetect.data.store import Place
from histodetect.errors import IngestError

META_COLUMNS = ("wsi", "coord_x", "coord_y")  # of PCam's meta CSV, the ones read; tumor_patch etc. never are
GROUP_COLUMNS = ("id", "group")
SHOWN_IDS = 3  # ids quoted in a summary warning; the count covers the rest


def read_pcam_meta(path: Path, root: Path, split: str, count: int, problems: Problems) -> list[Place | None] | None:
    """The place of each of a PCam split's ``count`` patches, row for row, from its meta CSV; None when the file
    cannot be used (recorded in ``problems``): a missing column, or rows that do not pair one to one with the
    patches. A row with an unusable slide name or position is an error and gives that patch no place."""
    table = csv_table(path, root, split, META_COLUMNS, problems, "coord_y,coord_x,tumor_patch,center_tumor_patch,wsi")
    if table is None:
        return None
    file, at, body = table
    if len(body) != count:
        detail = f"{len(body)} rows for {count} patches: not row for row with the HDF5 file; no slide recorded"
        problems.error("bad_meta", split, None, file, detail)
        return None
    places: list[Place | None] = []
    for line, row in body:
        wsi, x_text, y_text = (row[i].strip() if i < len(row) else "" for i in at)
        x, y = _coordinate(x_text), _coordinate(y_text)
        if reason := group_problem(wsi):
            problems.error("bad_meta", split, None, file, f"line {line}: wsi {shown(wsi)}: {reason}")
            places.append(None)
        elif x is None or y is None:
            detail = f"line {line}: coord_x, coord_y {shown(x_text)}, {shown(y_text)} are not whole numbers >= 0"
            problems.error("bad_meta", split, None, file, detail)
            places.append(None)
        else:
            places.append(Place(wsi, x, y))
    return places


def _coordinate(text: str) -> int | None:
    """A pixel position written as a whole number (also ``1008.0``, as pandas writes some); None otherwise."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and 0 <= value < 1e9 else None


def pcam_places_by_sha1(folder: Path, root: Path, problems: Problems, chunk: int) -> dict[str, Place]:
    """The place of every PCam patch in ``folder`` (``*_x.h5`` files with their ``*_meta.csv``), by the SHA-1 of
    its uint8 (96, 96, 3) pixels, row-major: the competition's ids. Each file is read ``chunk`` patches at a time,
    never whole (the train split is 262,144 patches, 7 GB)."""
    if not folder.is_dir():
        raise IngestError(f"--pcam-meta {folder}: not a folder; give the one holding PCam's HDF5 and meta CSV files")
    xs = sorted(path for path in folder.iterdir() if PCAM_X.match(path.name) and pcam_meta_path(path).is_file())
    if not xs:
        raise IngestError(
            f"--pcam-meta {folder}: no camelyonpatch_level_2_split_<split>_x.h5 with its _meta.csv beside it"
        )
    places: dict[str, Place] = {}
    for x in xs:
        split = PCAM_X.match(x.name)["split"]  # type: ignore[index]
        count = pcam_patch_count(x, split, root, problems)
        meta = None if count is None else read_pcam_meta(pcam_meta_path(x), root, split, count, problems)
        if count is None or meta is None:
            continue
        with h5py.File(x, "r") as fh:
            for start in range(0, count, chunk):
                for place, pixels in zip(meta[start : start + chunk], fh["x"][start : start + chunk], strict=True):
                    if place is not None:
                        places.setdefault(hashlib.sha1(pixels).hexdigest(), place)
    return places


def read_groups_file(path: Path, root: Path, problems: Problems, split_of: Mapping[str, str]) -> dict[str, str] | None:
    """{id: group} from a CSV with ``id`` and ``group`` columns, parsed and checked as the labels CSVs are; None
    when the file cannot be read (a fatal problem is recorded). An id listed in two groups or with an empty or
    unprintable group is an error for that id (``split_of`` says in which split it is, where known)."""
    if not path.is_file():
        raise IngestError(f"--groups {path}: no such file")
    table = csv_table(path, root, None, GROUP_COLUMNS, problems)
    if table is None:
        return None
    file, (id_col, group_col), body = table
    seen: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for line, row in body:
        raw = row[id_col] if id_col < len(row) else ""
        id_ = raw.strip()
        if id_ != raw:
            detail = f"line {line}: id {shown(raw)} has spaces around it; read as {shown(id_)}"
            problems.warning("csv_spaces", split_of.get(id_), id_, file, detail)
        seen[id_].append((line, (row[group_col] if group_col < len(row) else "").strip()))
    groups: dict[str, str] = {}
    for id_, entries in seen.items():
        split, (line, group) = split_of.get(id_), entries[0]
        lines = ", ".join(str(n) for n, _ in entries)
        if len(names := {name for _, name in entries}) > 1:
            detail = f"lines {lines}: listed in several groups ({', '.join(map(shown, sorted(names)))})"
            problems.error("bad_group", split, id_, file, detail)
        elif reason := group_problem(group):
            problems.error("bad_group", split, id_, file, f"line {line}: group {shown(group)}: {reason}")
        else:
            if len(entries) > 1:
                detail = f"listed {len(entries)} times (lines {lines}) with the same group; kept once"
                problems.warning("duplicate_id", split, id_, file, detail)
            groups[id_] = group
    return groups


@dataclasses.dataclass
class Placer:
    """Gives each patch ingested its place from the metadata given, to labeled patches only, and says afterwards
    what it placed nowhere and what it refused to use.

    Without ``by_id`` (``--groups FILE``) or ``by_sha1`` (``--pcam-meta``; at most one is given) the item keeps
    the place a PCam source's own meta CSV gave it; ``by_id`` replaces its group and keeps its position.
    ``expected`` says some grouping was asked for, so that labeled patches left without one are worth a warning.
    """

    by_id: dict[str, str] | None = None
    by_sha1: dict[str, Place] | None = None
    expected: bool = False
    groups_file: str | None = None
    unlabeled: list[str] = dataclasses.field(default_factory=list)
    unplaced: list[str] = dataclasses.field(default_factory=list)
    seen_ids: set[str] = dataclasses.field(default_factory=set)

    def place(self, item: Item, sha1: str | None) -> Item:
        """``item`` with the place its metadata gives, or none (an unlabeled patch never gets one)."""
        place = item.place
        if self.by_id is not None:
            self.seen_ids.add(item.id)
            group = self.by_id.get(item.id)
            place = None if group is None else item.place._replace(group=group) if item.place else Place(group)
        elif self.by_sha1 is not None:
            place = self.by_sha1.get(sha1) if sha1 is not None else None
        if item.label is None:
            if place is not None:
                self.unlabeled.append(item.id)
            place = None
        elif place is None and self.expected:
            self.unplaced.append(item.id)
        return item if place == item.place else dataclasses.replace(item, place=place)

    def problems(self) -> Problems:
        """One warning per kind of patch not placed: test patches found in PCam (a leak, not used), unlabeled
        patches with a group, labeled patches without one, ids of the groups file that no patch has."""
        found = Problems()
        if self.unlabeled and self.by_sha1 is not None:
            detail = (
                f"{len(self.unlabeled)} unlabeled (test) patch(es) are PCam patches, "
                f"e.g. {self._some(self.unlabeled)}: "
                "mapping the competition's test set back to PCam would leak its labels; it is not used, and no "
                "slide is recorded for them"
            )
            found.warning("pcam_test_leak", None, None, None, detail)
        elif self.unlabeled:
            detail = (
                f"{len(self.unlabeled)} unlabeled patch(es) have a group, e.g. {self._some(self.unlabeled)}: groups "
                "are recorded for labeled patches only (a slide's name can tell the label)"
            )
            found.warning("group_not_recorded", None, None, self.groups_file, detail)
        if self.unplaced:
            detail = (
                f"{len(self.unplaced)} labeled patch(es) have no group, e.g. {self._some(self.unplaced)}; "
                "`train --groups auto` needs one for every labeled patch"
            )
            found.warning("no_group", None, None, self.groups_file, detail)
        if self.by_id is not None and (unknown := sorted(self.by_id.keys() - self.seen_ids)):
            detail = f"{len(unknown)} id(s) listed here are not among the patches ingested, e.g. {self._some(unknown)}"
            found.warning("group_unknown_id", None, None, self.groups_file, detail)
        return found

    @staticmethod
    def _some(ids: list[str]) -> str:
        return ", ".join(shown(id_) for id_ in ids[:SHOWN_IDS]) + (" ..." if len(ids) > SHOWN_IDS else "")
