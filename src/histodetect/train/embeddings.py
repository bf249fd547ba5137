"""The embedding cache behind ``--freeze frozen --cache-embeddings``: a frozen backbone runs once per patch.

A frozen backbone maps each patch to the same embedding in every epoch, run and fold, so it is computed once,
for every labeled patch of the store, and kept on disk as a memory-mapped float32 array ``(patches, views,
features)``. With ``aug_dihedral`` the 8 dihedral views of each patch are embedded (the head then sees a random
view per patch per epoch, the augmentation a frozen backbone allows); without it, only the patch as it is. Colour
augmentation and MixUp/CutMix act on pixels, so they have no cached counterpart (the config refuses mixing).

A cache is one folder named by its key, a hash of everything that decides the numbers in it: the backbone's
weights and normalisation (hashed tensor by tensor, so ``--pretrained auto``, a file and a hub model are told
apart by what was loaded, not by a name), the image size, the views, the precision, and the store's fingerprint
(its ``manifest.json`` and ``index.csv``). It is written in a hidden sibling folder and renamed into place when
complete, so a folder under its key is always whole; a killed run leaves only a hidden folder, which the next
run ignores (it starts a new one). Two processes building the same key both finish; the second rename loses and
its copy is deleted.

DEVELOPERS.md documents the layout (``embeddings.f32``, ``rows.npy``, ``meta.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histodetect import __version__
from histodetect.data.augment import dihedral, to_float
from histodetect.data.store import Store
from histodetect.device import Hardware
from histodetect.errors import ConfigError
from histodetect.models import Classifier

CACHE_VERSION = 1
EMBEDDINGS = "embeddings.f32"
ROWS = "rows.npy"
META = "meta.json"
ENV = "HISTODETECT_CACHE"
PROGRESS_S = 60.0


def cache_root(cache_dir: str | os.PathLike[str] | None = None, kind: str = "embeddings") -> Path:
    """Where caches live: ``cache_dir``, else ``$HISTODETECT_CACHE/<kind>``, else ``~/.cache/histodetect/<kind>``
    (``$XDG_CACHE_HOME`` when set): beside no store, since a store may sit on read-only or shared storage, and one
    cache serves every copy of the same store. ``kind``: ``embeddings``, or ``onnx`` (``infer.export``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser() / kind
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "histodetect" / kind


def weights_fingerprint(model: Classifier) -> str:
    """SHA-256 of what the embedding depends on: every backbone tensor (name, dtype, shape, bytes) and the
    model's normalisation."""
    digest = hashlib.sha256()
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    state |= {"mean": model.mean, "std": model.std}
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):  # a training counter: no part of what the network computes
            continue
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class EmbeddingCache:
    """An opened cache: ``embeddings[i, v]`` is view ``v`` (``dihedral(·, v)``) of store row ``rows[i]``."""

    path: Path
    rows: np.ndarray  # sorted store rows
    embeddings: np.ndarray  # float32 (len(rows), views, features), memory-mapped read-only
    meta: dict[str, Any]
    built: bool  # computed by this call rather than found

    @property
    def views(self) -> int:
        return int(self.embeddings.shape[1])

    def index_of(self, store_rows: np.ndarray) -> np.ndarray:
        """Positions in the cache of ``store_rows``; every row must be in it."""
        positions = np.searchsorted(self.rows, store_rows)
        positions = np.minimum(positions, len(self.rows) - 1)
        if len(store_rows) and not np.array_equal(self.rows[positions], store_rows):
            raise ConfigError(f"{self.path}: lacks some of the requested store rows; delete the folder to rebuild it")
        return positions


def cache_key(model: Classifier, store: Store, *, views: int, precision: str) -> dict[str, Any]:
    """Everything that decides a cache's numbers; its hash names the cache folder."""
    return {
        "cache_version": CACHE_VERSION,
        "backbone": model.name,
        "image_size": model.image_size,
        "weights": weights_fingerprint(model),
        "views": views,
        "precision": precision,
        "store": store.fingerprint,
    }


def open_or_build(
    model: Classifier,
    store: Store,
    *,
    views: int,
    hardware: Hardware,
    batch_size: int,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> EmbeddingCache:
    """The cache of ``model``'s embeddings of every labeled patch of ``store``, computed on first use."""
    key = cache_key(model, store, views=views, precision=hardware.precision)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    root = cache_root(cache_dir)
    final = root / f"{_safe(model.name)}-{model.image_size}px-{digest}"
    if not (final / META).is_file():
        _build(model, store, key, final, views=views, hardware=hardware, batch_size=batch_size, log=log)
        built = True
    else:
        built = False
        log(f"embeddings: reusing {final}")
    return _open(final, built=built)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _open(path: Path, *, built: bool) -> EmbeddingCache:
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    rows = np.load(path / ROWS)
    shape = (len(rows), meta["views"], meta["features"])
    embeddings = np.memmap(path / EMBEDDINGS, dtype=np.float32, mode="r", shape=shape)
    return EmbeddingCache(path, rows, embeddings, meta, built)


def _build(
    model: Classifier,
    store: Store,
    key: dict[str, Any],
    final: Path,
    *,
    views: int,
    hardware: Hardware,
    batch_size: int,
    log: Callable[[str], None],
) -> None:
    rows = store.rows(labeled=True)
    if len(rows) == 0:
        raise ConfigError(f"{store.path}: no labeled patches to embed")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        log(f"embeddings: {model.name} at {model.image_size} px, {len(rows):,} patches x {views} view(s) -> {final}")
        started = time.perf_counter()
        features = _embed_all(
            model, store, rows, tmp / EMBEDDINGS, views=views, hardware=hardware, batch=batch_size, log=log
        )
        seconds = time.perf_counter() - started
        np.save(tmp / ROWS, rows)
        meta = {
            **key,
            "features": features,
            "patches": len(rows),
            "seconds": round(seconds, 1),
            "histodetect": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")  # written last: marks it complete
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same cache first: keep theirs
            if not (final / META).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"embeddings: {len(rows) * views:,} in {seconds:.0f} s ({len(rows) * views / max(seconds, 1e-9):.0f}/s)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@torch.inference_mode()
def _embed_all(
    model: Classifier,
    store: Store,
    rows: np.ndarray,
    target: Path,
    *,
    views: int,
    hardware: Hardware,
    batch: int,
    log: Callable[[str], None],
) -> int:
    """Write ``(len(rows), views, features)`` float32 embeddings to ``target``; returns ``features``. Says how far
    it got every ``PROGRESS_S`` seconds: a large backbone over a large store takes hours."""
    device = torch.device(hardware.accelerator)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(hardware.precision)
    was_training, was_on = model.training, next(model.parameters()).device
    model.eval().to(device)
    out: np.memmap | None = None
    said = time.perf_counter()
    try:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            x = to_float(torch.from_numpy(store.read(chunk)).to(device), channels_last=hardware.channels_last)
            autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
            for view in range(views):
                with autocast:
                    embedding = model.features(dihedral(x, view)).float().cpu().numpy()
                if out is None:
                    out = np.memmap(target, dtype=np.float32, mode="w+", shape=(len(rows), views, embedding.shape[1]))
                out[start : start + len(chunk), view] = embedding
            if time.perf_counter() - said > PROGRESS_S:
                said = time.perf_counter()
                log(f"embeddings: {start + len(chunk):,} of {len(rows):,} patches")
        assert out is not None
        out.flush()
        with open(target, "rb+") as fh:
            os.fsync(fh.fileno())
        return int(out.shape[2])
    finally:
        model.train(was_training).to(was_on)
