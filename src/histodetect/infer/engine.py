"""The one batched inference path: runs (or exported ``.onnx`` files) x uint8 patches -> probabilities.

Every command that scores patches (predict, evaluate, slide, serve, cross-validation, the benchmarks) goes
through :class:`Predictor`, so batching, precision, test-time augmentation and ensembling are decided once.
Patches stay uint8 NHWC until a batch is on its way into the model: 57,458 test patches are 1.6 GB as uint8 but
6.4 GB as float, so only one batch at a time is ever converted.

Averaging is over probabilities, not logits: an ensemble or TTA mean of sigmoid outputs is what the
competition's AUC sees, and it keeps one over-confident member from dominating the way a logit mean can.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from histodetect.data.augment import dihedral, to_float
from histodetect.data.stain import METHODS as STAIN_METHODS
from histodetect.data.stain import StainFit, StainNormalizer, fit_stains, read_reference, spread
from histodetect.device import cpu_has_bf16, resolve_accelerator
from histodetect.errors import InferError
from histodetect.infer.onnx_graph import ONNX_SUFFIX, cached_onnx, cached_run_onnx
from histodetect.models import Classifier
from histodetect.runs import TrainConfig, load_model
from histodetect.runs.layout import STAIN, run_stain

# Indices into histodetect.data.augment.dihedral: k % 4 quarter turns, then a left-right flip when k >= 4.
# flips = identity, left-right (4), top-bottom (6 = half turn + left-right), both (2 = half turn).
TTA_TRANSFORMS: dict[str, tuple[int, ...]] = {"none": (0,), "flips": (0, 4, 6, 2), "d4": tuple(range(8))}
PRECISIONS = ("auto", "fp32", "bf16")
# What runs the network: PyTorch, onnxruntime on the project's export (infer.export), or OpenVINO on it. "auto" is
# CPU_ENGINE on a CPU (unless bf16 is asked for) and PyTorch on accelerators.
ENGINES = ("auto", "torch", "onnx", "openvino")
# benchmarks/cpu_engines.py (docs/evaluation-and-prediction.md, "CPU engines"): onnxruntime fp32 ran Lite0
# 3.8-4.0x as fast as PyTorch eager fp32 and 2-3.7x PyTorch bf16 on the AVX-512/AMX machine, within 1.1e-6 of fp32;
# OpenVINO within 5% of it either way (and a new dependency); int8 and bf16 moved probabilities by 0.09 and 0.03.
CPU_ENGINE = "onnx"
# On a CPU small batches stay in cache: on the project's 2-core AVX-512 machine (bf16, 96 px) 64 runs
# tf_efficientnet_lite0 at ~1,600 images/s and 256 at ~850 (resnet18: ~990 vs ~760). A GPU needs large batches.
DEFAULT_BATCH = {"cpu": 64, "cuda": 1024}
STAIN_FITS = ("patch", "set")  # --stain-fit: each patch its own fit, or one for the whole input


class PatchReader(Protocol):
    """What the engine reads from: a numpy array or memmap ``(N, 96, 96, 3)`` uint8, or any object that hands
    out such arrays for slices (a store's rows, a folder of image files decoded on demand)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice) -> np.ndarray: ...


class _Member(Protocol):
    """One ensemble member: the summed probabilities of a uint8 NHWC batch over the TTA transforms ``ks``."""

    def __call__(self, pixels: torch.Tensor, ks: Sequence[int]) -> torch.Tensor: ...


class Predictor:
    """Probabilities from one or more runs, averaged over runs and over TTA transforms.

    ``runs``: run folders (loaded with :func:`histodetect.train.run.load_model`), ``.onnx`` files written by
    ``histodetect export``, or ``Classifier`` objects already in memory (benchmarks, notebooks; they are put in
    eval mode and moved to the device and memory layout in place).

    ``precision`` (PyTorch): ``auto`` is bf16 autocast with channels_last on CUDA and on CPUs with native bf16 and
    fp32 elsewhere; ``fp32`` forces
    full precision (exact comparisons with an ONNX export). ONNX members always run in fp32 on onnxruntime's CPU
    provider.

    ``engine``: what runs run folders and ``Classifier`` objects. ``torch``: PyTorch as above. ``onnx``: the
    project's ONNX export (made in memory and cached, :func:`histodetect.infer.onnx_graph.cached_run_onnx`) on
    onnxruntime, fp32. ``openvino``: the same graph on OpenVINO, fp32. ``auto``: ``CPU_ENGINE`` on a CPU unless
    ``precision`` is ``bf16`` (measured the fastest within 0.002 of PyTorch fp32, faster than PyTorch's bf16 too:
    ``benchmarks/cpu_engines.py``), PyTorch on accelerators. ``.onnx`` files run on onnxruntime (OpenVINO with
    ``openvino``) whatever the engine. ``precision`` applies to PyTorch: the ONNX engines compute fp32.

    The PyTorch members run channels_last, except on MPS: with autocast as always, and in fp32 too, where it moves
    probabilities by less than 1e-6 and on a CPU is 1.2-2x as fast (lite0, resnet50, baseline-cnn at 96 px; lite0
    41 against 94 ms for 8 patches).

    ``stain_norm``: ``none``, ``macenko`` or ``reinhard`` (:mod:`histodetect.data.stain`); None = what the runs were
    trained with (their ``config.yaml``; ``.onnx`` files and ``Classifier`` objects: none). ``stain_reference``: an
    image of the target lab, a ``stain.json`` or a :class:`StainFit`; None = the runs' own (``stain.json``, fitted
    on their training patches). Every batch is normalised here, once, before any member sees it, so predict,
    evaluate, slide, serve and explain agree with training. :meth:`fit_stain` fits one source (a slide's tissue)
    to pass to :meth:`predict_batch`.

    ``mpp``: the microns per pixel the runs were trained at (their ``config.yaml``); members that do not record it
    (``.onnx`` files, ``Classifier`` objects) are taken to be at the PCam/Kaggle default, and runs that disagree are
    refused, since one slide is resampled to one scale.
    """

    def __init__(
        self,
        runs: Sequence[str | os.PathLike[str] | Classifier],
        *,
        tta: str = "none",
        batch_size: int | None = None,
        precision: str = "auto",
        device: str = "auto",
        engine: str = "auto",
        progress: bool = True,
        stain_norm: str | None = None,
        stain_reference: str | os.PathLike[str] | StainFit | None = None,
    ) -> None:
        if not runs:
            raise InferError("no run given: pass at least one run folder or .onnx file")
        if tta not in TTA_TRANSFORMS:
            raise InferError(f"--tta {tta!r}: choose from {', '.join(TTA_TRANSFORMS)}")
        if precision not in PRECISIONS:
            raise InferError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
        if batch_size is not None and batch_size < 1:
            raise InferError(f"--batch-size {batch_size}: need at least 1")
        if engine not in ENGINES:
            raise InferError(f"--engine {engine!r}: choose from {', '.join(ENGINES)}")
        self.device = torch.device(resolve_accelerator(device))
        self.autocast_dtype = _autocast_dtype(self.device, precision)
        self.engine = _choose_engine(engine, self.device, precision)
        if self.engine != "torch":
            if precision == "bf16":
                raise InferError(f"--engine {self.engine} computes fp32; --precision bf16 needs --engine torch")
            self.autocast_dtype = None  # the export runs in fp32
        self.channels_last = self.device.type != "mps"
        self.transforms = TTA_TRANSFORMS[tta]
        self.batch_size = batch_size or DEFAULT_BATCH.get(self.device.type, DEFAULT_BATCH["cpu"])
        self.progress = progress
        self.tta = tta
        self.sources = [str(run) for run in runs if not isinstance(run, Classifier)]
        self._mpps: set[float] = set()
        self._stains: list[tuple[str, str, StainFit | None]] = []  # (run, its stain_norm, its reference)
        self.members: list[_Member] = [self._load(run) for run in runs]
        if len(self._mpps) > 1:
            raise InferError(f"the runs were trained at different scales ({sorted(self._mpps)} microns a pixel)")
        self.mpp = self._mpps.pop() if self._mpps else TrainConfig.mpp
        self.stain = choose_stain(self._stains, stain_norm, stain_reference)

    @property
    def precision(self) -> str:
        """What the PyTorch members compute in: ``bf16`` or ``fp16`` (autocast), or ``fp32``."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast_dtype, "fp32")

    def _load(self, run: str | os.PathLike[str] | Classifier) -> _Member:
        if isinstance(run, Classifier):
            self._stains.append((run.name, "none", None))
            return self._member(run)
        run = Path(run)
        if run.suffix.lower() == ONNX_SUFFIX:
            if not run.is_file():
                raise FileNotFoundError(f"{run}: no such ONNX file")
            self._stains.append((str(run), "none", None))
            return OpenVinoMember(run.read_bytes()) if self.engine == "openvino" else OnnxMember(run)
        if self.engine == "torch":
            model, config = load_model(run)
            member = self._member(model)
        else:
            graph, config = cached_run_onnx(run)  # a cached export: the network is never built in PyTorch
            member = OpenVinoMember(graph) if self.engine == "openvino" else OnnxMember(graph)
        self._mpps.add(config.mpp)
        self._stains.append((str(run), config.stain_norm, run_stain(run)))
        return member

    def _member(self, model: Classifier) -> _Member:
        """``model`` on this predictor's engine: as it is, or exported to ONNX (cached: ``onnx_graph.cached_onnx``)."""
        if self.engine == "torch":
            return _TorchMember(model, self.device, self.autocast_dtype, self.channels_last)
        graph = cached_onnx(model.eval())
        return OpenVinoMember(graph) if self.engine == "openvino" else OnnxMember(graph)

    def predict(self, patches: PatchReader, *, label: str = "predict", stain: StainFit | None = None) -> np.ndarray:
        """float32 probabilities ``(N,)`` for uint8 ``(N, H, W, 3)`` patches, read one batch at a time; ``stain``:
        normalise every patch with this one source fit (:meth:`fit_stain`) instead of each patch's own."""
        n = len(patches)
        total = np.zeros(n, dtype=np.float64)
        with progress_bar(self.progress, n, label) as advance:
            for start in range(0, n, self.batch_size):
                batch = np.asarray(patches[start : start + self.batch_size])
                total[start : start + len(batch)] = self._sum(batch, stain)
                advance(len(batch))
        return (total / (len(self.members) * len(self.transforms))).astype(np.float32)

    def predict_batch(self, batch: np.ndarray, stain: StainFit | None = None) -> np.ndarray:
        """float32 probabilities of one uint8 ``(N, H, W, 3)`` batch, without a progress bar (callers that stream
        their own batches, such as the slide scorer, report progress themselves); ``stain`` as in :meth:`predict`."""
        return (self._sum(batch, stain) / (len(self.members) * len(self.transforms))).astype(np.float32)

    def fit_stain(self, pixels: np.ndarray) -> StainFit | None:
        """The source fit of uint8 pixels that belong together (a slide's tissue windows), for :meth:`predict`'s
        ``stain``; None without normalisation. Raises :class:`~histodetect.data.stain.StainError` when they hold
        too little stain to fit."""
        return fit_stains(pixels) if self.stain is not None else None

    def fit_stain_set(self, patches: PatchReader, fit: str = "set") -> StainFit | None:
        """``fit="set"``: one fit for patches that come from one lab (up to 256 spread over them), as a slide is
        fitted once; ``"patch"`` (or no normalisation): None, each patch is fitted on its own."""
        if fit not in STAIN_FITS:
            raise InferError(f"--stain-fit {fit!r}: choose from {', '.join(STAIN_FITS)}")
        if self.stain is None or fit == "patch" or not len(patches):
            return None
        return self.fit_stain(np.concatenate([np.asarray(patches[i : i + 1]) for i in spread(len(patches), 256)]))

    def normalise(self, batch: np.ndarray, stain: StainFit | None = None) -> np.ndarray:
        """The uint8 ``(N, H, W, 3)`` patches as the members see them: stain-normalised, or as they are."""
        if self.stain is None:
            return batch
        _check_batch(batch)
        with torch.inference_mode():
            return self.stain(torch.from_numpy(np.array(batch)), stain).numpy()

    def _sum(self, batch: np.ndarray, stain: StainFit | None = None) -> np.ndarray:
        """float64 sums of every member's probabilities over the TTA transforms."""
        _check_batch(batch)
        # Decoded images are often read-only views (PIL, the raw-TIFF fast path); torch wants its own.
        pixels = torch.from_numpy(batch.copy() if not batch.flags.writeable else np.ascontiguousarray(batch))
        total = np.zeros(len(batch), dtype=np.float64)
        with torch.inference_mode():
            if self.stain is not None:
                pixels = self.stain(pixels.to(self.device, non_blocking=True), stain)
            for member in self.members:
                total += member(pixels, self.transforms).double().cpu().numpy()
        return total


def choose_stain(
    recorded: Sequence[tuple[str, str, StainFit | None]],
    stain_norm: str | None,
    stain_reference: str | os.PathLike[str] | StainFit | None,
) -> StainNormalizer | None:
    """The one normaliser for ``recorded`` (each run's name, ``stain_norm`` and reference), as
    :class:`Predictor` documents; runs that disagree are refused unless the flags decide."""
    if stain_norm is not None and stain_norm not in STAIN_METHODS:
        raise InferError(f"--stain-norm {stain_norm!r}: choose from {', '.join(STAIN_METHODS)}")
    methods = {method for _, method, _ in recorded}
    if stain_norm is None and len(methods) > 1:
        raise InferError(
            f"the runs were trained with different --stain-norm ({', '.join(sorted(methods))}); pass --stain-norm"
        )
    method = stain_norm if stain_norm is not None else methods.pop()
    if method == "none":
        return None
    if isinstance(stain_reference, StainFit):
        return StainNormalizer(method, stain_reference, reference_source="given")
    if stain_reference is not None:
        return StainNormalizer(method, read_reference(stain_reference), reference_source=str(stain_reference))
    missing = [name for name, _, fit in recorded if fit is None]
    if missing:
        raise InferError(
            f"--stain-norm {method}: {missing[0]} records no stain reference (an .onnx file, or a run trained "
            f"before runs recorded one); pass --stain-reference IMAGE"
        )
    references = {fit for _, _, fit in recorded}
    if len(references) > 1:
        raise InferError("the runs record different stain references; pass --stain-reference to choose one")
    return StainNormalizer(method, references.pop(), reference_source=f"{recorded[0][0]}/{STAIN}")


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def _choose_engine(engine: str, device: torch.device, precision: str) -> str:
    """``engine``, or for ``auto``: ``CPU_ENGINE`` on a CPU (with or without bf16: measured faster than PyTorch's
    bf16 too, and exact), PyTorch when ``--precision bf16`` is asked for and on accelerators."""
    if engine != "auto":
        if engine != "torch" and device.type != "cpu":
            raise InferError(f"--engine {engine} runs on the CPU; this predictor is on {device.type} (--engine torch)")
        return engine
    return CPU_ENGINE if device.type == "cpu" and precision != "bf16" else "torch"


def _check_batch(batch: np.ndarray) -> None:
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise InferError(f"patches must be uint8 (N, H, W, 3) RGB, got {batch.dtype} {batch.shape}")


class _TorchMember:
    def __init__(
        self, model: Classifier, device: torch.device, autocast_dtype: torch.dtype | None, channels_last: bool
    ) -> None:
        self.model = model.eval().to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last

    def __call__(self, pixels: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
        x = to_float(pixels.to(self.device, non_blocking=True), channels_last=self.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        total = torch.zeros(len(x), dtype=torch.float32, device=self.device)
        with autocast:
            for k in ks:
                total += torch.sigmoid(self.model(self._view(x, k)).float())
        return total

    def _view(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k``-th dihedral view in the memory layout the model runs in; the identity costs no copy
        (``torch.rot90`` by 0 would copy into NCHW)."""
        if k == 0:
            return x
        view = dihedral(x, k)
        return view.contiguous(memory_format=torch.channels_last) if self.channels_last else view


class _ExportMember:
    """An exported graph (uint8 NHWC in, probability out, see :mod:`histodetect.infer.export`) on a runtime that
    takes numpy arrays; TTA views are made here, since the graph has none."""

    def _run(self, batch: np.ndarray) -> np.ndarray: ...

    def __call__(self, pixels: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
        pixels = pixels.cpu().contiguous()
        nchw = pixels.permute(0, 3, 1, 2)  # dihedral acts on the last two axes
        total = np.zeros(len(pixels), dtype=np.float32)
        for k in ks:
            # The identity is the batch as it is: torch.rot90 by 0 and the copy back to NHWC cost ~8% of a slide's
            # CPU time (cProfile, --cell 96, fp32 onnxruntime).
            view = pixels if k == 0 else dihedral(nchw, k).permute(0, 2, 3, 1).contiguous()
            total += self._run(view.numpy()).reshape(-1)
        return torch.from_numpy(total)


class OnnxMember(_ExportMember):
    """An exported model on onnxruntime's CPU provider; ``model`` is an ``.onnx`` file or its bytes (export checks
    a graph before writing it)."""

    def __init__(self, model: Path | bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # No memory pattern: with it, the arena held ~440 MB after batches of 64 Lite0 windows, without it ~300 MB,
        # at the same CPU time per window (2-core AVX-512 machine); without the arena, ~20% more CPU time.
        options.enable_mem_pattern = False
        # No spinning: onnxruntime's idle threads would otherwise keep the cores busy for a while after each batch,
        # waiting for work, while torch stain-normalises or rotates the next batch on those cores (Macenko fitted
        # per patch cost 11% of a patch's scoring time with spinning, 5% without, at the same scoring time, and a
        # slide's time did not change; 2-core AVX-512 Xeon, fp32).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise InferError(
                f"{model if isinstance(model, Path) else 'export'}: not a loadable ONNX model ({exc})"
            ) from exc
        self.input = self.session.get_inputs()[0].name

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: batch})[0]


class OpenVinoMember(_ExportMember):
    """An exported model (the ONNX graph's bytes) compiled by OpenVINO for the CPU in fp32 (its default on a CPU
    with bf16 would be bf16)."""

    def __init__(self, graph: bytes) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise InferError("--engine openvino needs the openvino package (pip install openvino)") from exc
        core = ov.Core()
        self.model = core.compile_model(core.read_model(graph, b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(batch)[0])


class _Rate(ProgressColumn):
    """Items a second, e.g. ``812 cells/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} {self.unit}/s")


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, label: str, unit: str | None = None) -> Iterator[Callable[[int], None]]:
    """A progress bar on an interactive stderr (with the rate in ``unit``/s when given); silent in pipes, CI logs
    and tests."""
    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield lambda _n: None
        return
    rate = (_Rate(unit),) if unit else ()
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), *rate, TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
