"""Teacher-output cache: the frozen teacher's logits (and the teacher-side features of the feature
pairs) computed once over the training set, so training skips the teacher's forward pass.

When it is exact. The teacher is frozen (eval mode: BatchNorm uses its running statistics; no
grad), so its output for a sample depends on that sample's input only. With deterministic training
inputs (no random augmentation) a sample's output is the same at every step: computing it once is
exact up to float rounding (another batch size may round differently, ~1e-6).

Under random augmentation the outputs differ at every step and nothing can be cached. With
`views=K` the cache draws K fixed augmented views per sample once (crop offsets and flip bits, kept
with the outputs) and training replays one of them per sample and step, the student seeing the same
view as the teacher. The student then sees K views per sample instead of fresh random crops: a trade
of augmentation diversity for speed that the user asks for explicitly.

Storage: tensors on the training device, row i = training sample i (with views: row i*K + v).
`float16` halves the memory (logits within ~1e-3 relative). `topk=k` keeps, per row, the k largest
logits, their classes and one fill value for the other C - k classes (see `TOPK_FILL`).

On disk (teacher_cache=disk): one safetensors file (no code runs on loading) per key, written
atomically, in `<teacher_store>/cache/`. The key is the sha256 of everything that decides the
cached values: the teacher's class and weights (every tensor's bytes), the dataset config (minus
the keys that change labels only: labelled_per_class, exclude_classes, download), the split
("train"), a sha256 of the training inputs themselves (so any change of data, split or hidden
classes, which changes the sample indices, gets a new key), the augmentation and views, the feature
layers, the autocast dtype, and the storage dtype / top-k (with top-k, the temperature too). A file
that is unreadable, truncated, fails its checksum or holds another key is rejected with a UserError
by `load`; `obtain` then logs the reason and rebuilds it (the cache is derived data: rebuilding is
always safe, and a run should not fail for a stale or torn cache file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from kdtrain.checkpoint import save_weights
from kdtrain.data import TensorSet, data_identity
from kdtrain.data.batches import make_batches
from kdtrain.errors import UserError, WriteError, write_error
from kdtrain.features import Capture
from kdtrain.locks import file_lock

log = logging.getLogger("kdtrain")

# Bump when a change to the code changes what a cache holds for the same key.
CACHE_VERSION = 1
# Dataset keys that change labels (or where files come from), not the training inputs.
NOT_INPUT_KEYS = {"labelled_per_class", "exclude_classes", "download"}
# The views' crop offsets and flips are drawn from this seed (not the run's seed): every job of a
# sweep over `seed` shares one cache.
VIEW_SEED = 0
POLICIES = ("auto", "off", "memory", "disk")
META = "kdtrain_teacher_cache"

TOPK_FILL = """
Top-k logits, and what the other classes get. KD at temperature T compares p_t = softmax(t/T) with
the student's softmax(s/T). Keeping the k largest logits leaves the other C - k unknown; they are
rebuilt as one value f per sample, chosen so the tail keeps its exact probability mass at T:

    (C - k) * exp(f / T) = sum over the tail of exp(t_j / T),   f = T * log(mean_tail exp(t_j / T))

Then softmax(rebuilt / T) gives each top-k class exactly its true probability, and the tail its true
total mass, spread evenly over the tail classes. KD = T^2 * KL(p_t || p_s) changes only through how
the tail mass is spread within the tail. That is still lossy at T = 4: measured on 100 classes with a
confident teacher whose other logits spread with std 1, k = 20 gives the KD loss within ~3 % and its
gradient at cosine 0.97 (k = 10: ~4 %, 0.95; std 1.5: ~6-8 %); filling with the tail's mean logit is
~1.5x worse. So top-k is for many classes (1,000+), where full logits would not fit; for 100 classes
teacher_cache_dtype=float16 (2 bytes per logit, ~1e-3 relative) costs 200 bytes per sample.
Why not the alternatives: -inf (or "min(top-k) - 20") sets the tail mass to ~0 at T = 1 but not at
T = 4 (each tail class keeps exp(-5) of the smallest top-k class), so its mass is arbitrary: too little
teaches the student to push every tail class to -inf (the "dark knowledge" in it is lost); -inf itself
also makes kl_div(log_target=True) return NaN (0 * inf). f depends on T, so a top-k cache is keyed by T.
"""


def tensor_digest(tensors: list[tuple[str, Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes of tensors (copied to the CPU)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha256 of a model's weights and buffers (its state dict), in key order."""
    return tensor_digest(sorted(model.state_dict().items()))


def cache_identity(
    teacher: nn.Module,
    train: TensorSet,
    dataset_cfg: dict[str, Any],
    amp_dtype: torch.dtype | None,
    feature_paths: list[str],
    dtype: str,
    topk: int | None,
    temperature: float,
    views: int,
    augment: Any = None,
) -> dict[str, Any]:
    """Everything that decides what a cache holds, as plain data (its sha256 is the key)."""
    return {
        "version": CACHE_VERSION,
        "teacher": {
            "class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
            "weights": weights_digest(teacher),
        },
        "dataset": {k: v for k, v in sorted(data_identity(dataset_cfg).items()) if k not in NOT_INPUT_KEYS},
        "split": "train",
        "inputs": {"n": len(train), "shape": list(train.x.shape[1:]), "sha256": tensor_digest([("x", train.x)])},
        "augment": None if views == 0 else {"views": views, "seed": VIEW_SEED, **_augment_params(augment)},
        "layers": list(feature_paths),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "off",
        "dtype": dtype,
        "topk": topk,
        "temperature": float(temperature) if topk else None,  # only top-k's fill value depends on T
    }


def cache_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _augment_params(augment: Any) -> dict[str, Any]:
    if augment is None or not all(hasattr(augment, a) for a in ("draw", "at", "describe")):
        raise UserError(
            "teacher_cache_views needs kdtrain's crop/flip augmentation (dataset.augment=true on an image "
            "dataset); this dataset's augmentation cannot replay fixed views: set teacher_cache_views=0"
        )
    return augment.describe()


@dataclass
class TeacherCache:
    """Teacher outputs per training sample (and view): `lookup(idx, view)` -> (logits, [features])."""

    num_classes: int
    key: str
    identity: dict[str, Any]
    logits: Tensor | None = None  # (R, C); None with top-k
    topk_values: Tensor | None = None  # (R, k)
    topk_indices: Tensor | None = None  # (R, k) int32
    topk_fill: Tensor | None = None  # (R,): the value of the other C - k logits (see TOPK_FILL)
    features: list[Tensor] = field(default_factory=list)  # one (R, ...) tensor per feature layer
    views: int = 0  # 0: one row per sample (deterministic inputs); K: rows i*K .. i*K + K-1 for sample i
    view_dy: Tensor | None = None  # (N, K) uint8 crop offsets
    view_dx: Tensor | None = None
    view_flip: Tensor | None = None  # (N, K) bool

    @property
    def temperature(self) -> float | None:
        return self.identity.get("temperature")

    @property
    def rows(self) -> int:
        return len(self.logits if self.logits is not None else self.topk_fill)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def rows_of(self, idx: Tensor, view: Tensor | None = None) -> Tensor:
        if self.views == 0:
            return idx
        if view is None:
            raise ValueError("a cache of augmented views needs the view of each sample")
        return idx * self.views + view

    def draw_views(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """A view in [0, K) for each of `n` samples (from the global RNG of the cache's device, unless given)."""
        return torch.randint(0, self.views, (n,), device=self.view_dy.device, generator=generator)

    def view_params(self, idx: Tensor, view: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(dy, dx, flips) of the given views of samples `idx`, for `CropFlip.at`."""
        return self.view_dy[idx, view], self.view_dx[idx, view], self.view_flip[idx, view]

    def lookup(self, idx: Tensor, view: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Teacher logits (B, C) and features of samples `idx` (a tensor on the cache's device), as float32."""
        rows = self.rows_of(idx, view)
        if self.logits is not None:
            logits = self.logits[rows].float()
        else:
            logits = self.topk_fill[rows].float().unsqueeze(1).repeat(1, self.num_classes)
            logits.scatter_(1, self.topk_indices[rows].long(), self.topk_values[rows].float())
        return logits, [f[rows].float() for f in self.features]

    # --- build -------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        teacher: nn.Module,
        train: TensorSet,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        feature_paths: list[str] | tuple[str, ...] = (),
        fp16: bool = False,
        topk: int | None = None,
        temperature: float = 4.0,
        views: int = 0,
        augment: Any = None,
        batch_size: int = 512,
        identity: dict[str, Any] | None = None,
        channels_last: bool = False,
    ) -> TeacherCache:
        """Run the teacher (eval mode, no grad, under the run's autocast) once over `train` (and K views)."""
        feature_paths = list(feature_paths)
        dtype = torch.float16 if fp16 else torch.float32
        if identity is None:
            identity = cache_identity(
                teacher,
                train,
                {},
                amp_dtype,
                feature_paths,
                "float16" if fp16 else "float32",
                topk,
                temperature,
                views,
                augment if views else None,
            )
        n, k_views = len(train), max(views, 1)
        cache = cls(num_classes=0, key=cache_key(identity), identity=identity, views=views)
        if views:
            params = augment.draw((n, views), torch.Generator().manual_seed(VIEW_SEED))
            cache.view_dy, cache.view_dx, cache.view_flip = (p.to(device) for p in params)
        was_training = teacher.training
        teacher.eval()
        capture = Capture(teacher, feature_paths, "teacher") if feature_paths else None
        autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
        store: dict[str, Tensor] = {}
        try:
            for x, _, idx in make_batches(train, batch_size, device, shuffle=False).epoch():
                for v in range(k_views):
                    xin = augment.at(x, *cache.view_params(idx, torch.full_like(idx, v))) if views else x
                    if channels_last and xin.dim() == 4:
                        xin = xin.contiguous(memory_format=torch.channels_last)
                    with autocast:
                        out = teacher(xin)
                    rows = idx * views + v if views else idx
                    values = cls._reduce(out, topk, temperature) + (capture.pop() if capture else [])
                    names = (["topk_values", "topk_indices", "topk_fill"] if topk else ["logits"]) + [
                        f"feature.{i}" for i in range(len(feature_paths))
                    ]
                    for name, value in zip(names, values):
                        if name not in store:
                            shape, kind = (
                                (n * k_views, *value.shape[1:]),
                                value.dtype if name == "topk_indices" else dtype,
                            )
                            store[name] = torch.empty(shape, dtype=kind, device=device)
                        store[name][rows] = value.to(store[name].dtype)
                    cache.num_classes = out.shape[1]
        finally:
            if capture is not None:
                capture.remove()
            teacher.train(was_training)
        cache.logits = store.get("logits")
        cache.topk_values, cache.topk_indices, cache.topk_fill = (
            store.get(k) for k in ("topk_values", "topk_indices", "topk_fill")
        )
        cache.features = [store[f"feature.{i}"] for i in range(len(feature_paths))]
        if fp16 and not all(bool(t.isfinite().all()) for t in cache._tensors().values() if t.is_floating_point()):
            raise UserError(
                "teacher_cache_dtype=float16 cannot hold this teacher's outputs (some exceed float16's range "
                "of 65504); use teacher_cache_dtype=float32"
            )
        return cache

    @staticmethod
    def _reduce(logits: Tensor, topk: int | None, temperature: float) -> list[Tensor]:
        """[logits] or [top-k values, their classes (int32), the tail's fill value] (see TOPK_FILL)."""
        if not topk:
            return [logits]
        z = logits.float()
        values, indices = z.topk(topk, dim=1)
        tail = z.scatter(1, indices, float("-inf")) / temperature
        rest = z.shape[1] - topk
        fill = temperature * (torch.logsumexp(tail, dim=1) - torch.log(torch.tensor(float(rest), device=z.device)))
        return [values, indices.to(torch.int32), fill]

    # --- disk --------------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, Tensor]:
        named = {
            "logits": self.logits,
            "topk_values": self.topk_values,
            "topk_indices": self.topk_indices,
            "topk_fill": self.topk_fill,
            "view_dy": self.view_dy,
            "view_dx": self.view_dx,
            "view_flip": self.view_flip,
        }
        named.update({f"feature.{i}": f for i, f in enumerate(self.features)})
        return {k: v for k, v in named.items() if v is not None}

    def save(self, path: Path) -> None:
        """Write the cache as one safetensors file (atomically), with its key, identity and a checksum."""
        tensors = self._tensors()
        meta = {
            "key": self.key,
            "identity": self.identity,
            "num_classes": self.num_classes,
            "views": self.views,
            "features": len(self.features),
            "digest": tensor_digest(sorted(tensors.items())),
        }
        save_weights(tensors, Path(path), {META: meta})

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu", key: str | None = None) -> TeacherCache:
        """Read a cache written by `save` (safetensors: no code runs); UserError when it is unreadable,
        fails its checksum, is incomplete or (with `key`) holds another key."""
        path = Path(path)
        what = f"teacher cache {path}"
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(META)
            tensors = load_file(str(path))
            meta = json.loads(raw) if raw is not None else None
        except (SafetensorError, OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
            first = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise UserError(f"{what} is unreadable ({first}): it is truncated or corrupt") from None
        if not isinstance(meta, dict) or not {"key", "identity", "num_classes", "views", "features", "digest"} <= set(
            meta
        ):
            raise UserError(f"{what} is not a kdtrain teacher cache (no {META} metadata)")
        if key is not None and meta["key"] != key:
            raise UserError(
                f"{what} holds the cache of another teacher, dataset or setting (key {meta['key'][:12]}, "
                f"expected {key[:12]})"
            )
        if tensor_digest(sorted(tensors.items())) != meta["digest"]:
            raise UserError(f"{what} fails its checksum: its contents were changed or damaged")
        views, n_feat = int(meta["views"]), int(meta["features"])
        needed = (
            ["logits"] if meta["identity"].get("topk") in (None, 0) else ["topk_values", "topk_indices", "topk_fill"]
        )
        needed += [f"feature.{i}" for i in range(n_feat)] + (["view_dy", "view_dx", "view_flip"] if views else [])
        if any(k not in tensors for k in needed):
            raise UserError(f"{what} is incomplete (no {next(k for k in needed if k not in tensors)!r} tensor)")
        t = {k: v.to(device) for k, v in tensors.items()}
        return cls(
            num_classes=int(meta["num_classes"]),
            key=meta["key"],
            identity=meta["identity"],
            logits=t.get("logits"),
            topk_values=t.get("topk_values"),
            topk_indices=t.get("topk_indices"),
            topk_fill=t.get("topk_fill"),
            features=[t[f"feature.{i}"] for i in range(n_feat)],
            views=views,
            view_dy=t.get("view_dy"),
            view_dx=t.get("view_dx"),
            view_flip=t.get("view_flip"),
        )


def cache_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"teacher-{key[:24]}.safetensors"


def obtain(
    policy: str,
    teacher: nn.Module,
    train: TensorSet,
    num_classes: int,
    dataset_cfg: dict[str, Any],
    cache_dir: Path,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    feature_paths: list[str],
    dtype: str = "float32",
    topk: int | None = None,
    temperature: float = 4.0,
    views: int = 0,
    augment: Any = None,
    channels_last: bool = False,
) -> TeacherCache | None:
    """The cache a run uses under `teacher_cache=policy` (None: the teacher runs every step), logging the choice.

    auto: in memory when the training inputs are deterministic (or `views` > 0); under random augmentation
    without views, no cache. memory / disk: the same, with disk reusing (or writing) a file in `cache_dir`;
    asked for under random augmentation without views, they raise a UserError naming the fix.
    """
    if policy not in POLICIES:
        raise UserError(f"teacher_cache={policy} is not accepted: use one of {', '.join(POLICIES)}")
    if policy == "off":
        return None
    if views and augment is None:
        raise UserError(
            f"teacher_cache_views={views} caches augmented views, but this run's training inputs are not "
            "augmented (dataset.augment=false, or a dataset without augmentation); set teacher_cache_views=0"
        )
    if augment is not None and not views:
        if policy == "auto":
            log.info(
                "teacher cache: off, the training inputs are randomly augmented so the teacher runs every step "
                "(teacher_cache_views=K caches K fixed augmented views per sample instead)"
            )
            return None
        raise UserError(
            f"teacher_cache={policy} needs deterministic training inputs, but dataset.augment is on; "
            "set teacher_cache_views=K (K fixed augmented views per sample), dataset.augment=false, "
            "or teacher_cache=auto"
        )
    if topk is not None and not 1 <= topk < num_classes:
        raise UserError(
            f"teacher_cache_topk={topk} is out of range for {num_classes} classes: it must be in "
            f"1..{num_classes - 1}, or null to keep every logit"
        )
    identity = cache_identity(
        teacher, train, dataset_cfg, amp_dtype, feature_paths, dtype, topk, temperature, views, augment
    )
    key = cache_key(identity)

    def build() -> TeacherCache:
        start = time.perf_counter()
        cache = TeacherCache.build(
            teacher,
            train,
            device,
            amp_dtype,
            feature_paths,
            fp16=dtype == "float16",
            topk=topk,
            temperature=temperature,
            views=views,
            augment=augment,
            identity=identity,
            channels_last=channels_last,
        )
        log.info(
            "teacher cache: teacher outputs for %d samples%s computed once in %.1f s (%.1f MB on %s); "
            "the teacher's forward pass is skipped in training",
            len(train),
            f" x {views} views" if views else "",
            time.perf_counter() - start,
            cache.nbytes() / 2**20,
            device,
        )
        return cache

    if policy != "disk":
        cache = build()
    else:
        path = cache_file(cache_dir, key)
        lock = path.with_name(f".{path.name}.lock")
        with contextlib.ExitStack() as held:
            writable = True
            try:
                held.enter_context(file_lock(lock, f"the teacher cache {path.name}"))
            except OSError as e:
                error = write_error(e, lock)
                if error is None:
                    raise
                writable = False  # derived data: the run goes on with the cache in memory
                log.warning("teacher cache: %s; the cache is not written this time", error)
            cache = None
            if path.is_file():
                try:
                    cache = TeacherCache.load(path, device, key)
                    log.info("teacher cache: reusing %s (%.1f MB)", path, cache.nbytes() / 2**20)
                except UserError as e:
                    log.warning("%s; rebuilding it", e)
            if cache is None:
                cache = build()
                try:
                    if writable:
                        cache.save(path)
                        log.info("teacher cache: wrote %s", path)
                except WriteError as e:
                    log.warning("teacher cache: not written (%s); this run goes on with it in memory", e)
    return cache
