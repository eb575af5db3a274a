"""Data of the training entry: each worker its own disjoint shard, deterministic batches, a fixed test split.

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, values scaled
  to [0, 1]); a stratified held-out test split fixed by the seed; in memory.
* ``cifar10`` / ``imagenet``: torchvision datasets read from ``data.path``
  (torchvision is imported only here, only for them).

Sharding: the training indices are permuted once by the seed and cut into
``world_size`` contiguous, disjoint shards; rank r trains only on shard r.
Within its shard a worker reshuffles every epoch from (seed, rank, epoch), and
the batch of global step k is a pure function of k (drop-last epochs of
``len(shard) // batch_size`` steps), so a resumed run sees the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from lookahead_dist.errors import ConfigError
from lookahead_dist.train.models import import_torchvision

__all__ = [
    "Data",
    "build_data",
    "check_data_path",
    "epoch_order",
    "load_digits_split",
    "shard_batches",
    "shard_indices",
    "steps_per_epoch",
]

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def shard_indices(n: int, rank: int, world_size: int, seed: int) -> np.ndarray:
    """Rank ``rank``'s shard of ``range(n)``: a seed-fixed permutation cut into ``world_size`` disjoint parts."""
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.array_split(perm, world_size)[rank]


def epoch_order(shard: np.ndarray, seed: int, rank: int, epoch: int) -> np.ndarray:
    """The shard's order in ``epoch``: a permutation drawn from (seed, rank, epoch) alone."""
    return shard[np.random.default_rng([seed, rank, epoch]).permutation(len(shard))]


def load_digits_split(test_fraction: float, seed: int):
    """(x_train, y_train, x_test, y_test): float32 (N, 1, 8, 8) images in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ConfigError(
            f"data.name digits needs scikit-learn, which is not installed ({exc}); pip install scikit-learn"
        ) from None

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    as_t = torch.from_numpy
    return as_t(xtr), as_t(ytr.astype(np.int64)), as_t(xte), as_t(yte.astype(np.int64))


def shard_batches(
    x: torch.Tensor, y: torch.Tensor, shard: np.ndarray, seed: int, rank: int, batch_size: int, start: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The digits batch stream: (x[idx], y[idx]) of steps start, start + 1, ... of in-memory data.

    Drop-last epochs of ``shard`` (indices into x and y), each in the order
    :func:`epoch_order` draws from (seed, rank, epoch); the batch of step k is
    a pure function of k, so a resumed run continues with the same batches.
    """
    spe = steps_per_epoch(len(shard), batch_size, "digits")
    step = start
    while True:
        epoch, pos = divmod(step, spe)
        order = torch.from_numpy(epoch_order(shard, seed, rank, epoch)).to(x.device)
        for i in range(pos, spe):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield x[idx], y[idx]
        step = (epoch + 1) * spe


@dataclass
class Data:
    """One rank's view of the data.

    ``batches(start)`` yields the (inputs, labels) of steps start, start + 1, ... on the device;
    ``test()`` yields this rank's slice of the test set (rank r: items r, r + W, ...).
    """

    batches: Callable[[int], Iterator]
    test: Callable[[], Iterator]
    shard_size: int
    test_size: int
    steps_per_epoch: int


def steps_per_epoch(shard_size: int, batch_size: int, name: str) -> int:
    """Steps of a drop-last epoch of a shard; a ConfigError when the shard is smaller than one batch."""
    steps = shard_size // batch_size
    if steps < 1:
        raise ConfigError(
            f"batch_size: {batch_size} is larger than this worker's shard of {name} ({shard_size} examples); "
            "lower batch_size or use fewer workers"
        )
    return steps


def _digits(cfg, rank: int, world: int, device, part: tuple[int, int]) -> Data:
    xtr, ytr, xte, yte = load_digits_split(cfg.data.test_fraction, cfg.seed)
    shard = shard_indices(len(xtr), part[0], part[1], cfg.seed)
    spe = steps_per_epoch(len(shard), cfg.batch_size, "digits")
    xtr, ytr = xtr.to(device), ytr.to(device)
    mine = torch.arange(rank, len(xte), world)
    xte, yte = xte[mine].to(device), yte[mine].to(device)

    def batches(start: int):
        return shard_batches(xtr, ytr, shard, cfg.seed, rank, cfg.batch_size, start)

    def test():
        for i in range(0, len(xte), 1024):
            yield xte[i : i + 1024], yte[i : i + 1024]

    return Data(batches, test, len(shard), len(yte), spe)


def check_data_path(cfg) -> Path:
    """``data.path`` of a torchvision dataset, or a ConfigError when it is missing or absent."""
    if not cfg.data.path:
        raise ConfigError(f"data.path: required for data.name {cfg.data.name}")
    path = Path(cfg.data.path).expanduser()
    if not path.exists():
        raise ConfigError(
            f"data.path: {str(path)!r} does not exist (data.name {cfg.data.name}); point data.path at the "
            "dataset directory (--set data.path=DIR)"
        )
    return path


def _torchvision_sets(cfg, path: Path):
    tv = import_torchvision(f"data.name {cfg.data.name}")
    T = tv.transforms
    if cfg.data.name == "cifar10":
        norm = T.Normalize(_CIFAR_MEAN, _CIFAR_STD)
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test_tf = T.Compose([T.ToTensor(), norm])
        if (path / "cifar-10-batches-py").is_dir():
            return (
                tv.datasets.CIFAR10(str(path), train=True, transform=train_tf, download=False),
                tv.datasets.CIFAR10(str(path), train=False, transform=test_tf, download=False),
            )
    else:
        norm = T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
        train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    test_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    if not (path / "train").is_dir() or test_dir is None:
        layout = "cifar-10-batches-py/ or " if cfg.data.name == "cifar10" else ""
        raise ConfigError(
            f"data.path: {str(path)!r} holds neither {layout}an ImageFolder layout (train/ and val/ or test/, "
            "one sub-directory per class)"
        )
    return (
        tv.datasets.ImageFolder(str(path / "train"), transform=train_tf),
        tv.datasets.ImageFolder(str(test_dir), transform=test_tf),
    )


def _torchvision(cfg, rank: int, world: int, device, part: tuple[int, int]) -> Data:
    path = check_data_path(cfg)
    train_set, test_set = _torchvision_sets(cfg, path)
    shard = shard_indices(len(train_set), part[0], part[1], cfg.seed)
    spe = steps_per_epoch(len(shard), cfg.batch_size, cfg.data.name)
    bs, nw = cfg.batch_size, cfg.data.num_workers
    pin = torch.device(device).type == "cuda"

    def loader(dataset, indices: Sequence[int], batch_size: int, drop_last: bool):
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=list(indices), num_workers=nw, pin_memory=pin, drop_last=drop_last
        )

    def batches(start: int):
        step = start
        while True:
            epoch, pos = divmod(step, spe)
            order = epoch_order(shard, cfg.seed, rank, epoch)[pos * bs : spe * bs]
            for x, y in loader(train_set, order.tolist(), bs, True):
                yield x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
            step = (epoch + 1) * spe

    mine = list(range(rank, len(test_set), world))

    def test():
        for x, y in loader(test_set, mine, max(bs, 64), False):
            yield x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)

    return Data(batches, test, len(shard), len(mine), spe)


def build_data(cfg, rank: int, world_size: int, device="cpu", shard: tuple[int, int] | None = None) -> Data:
    """Rank ``rank``'s data for the run config ``cfg`` (a :class:`~lookahead_dist.train.config.Config`).

    ``shard``: (index, count) of this rank's training shard when not every rank trains (a rank that
    hosts only slow agents takes no data); default (rank, world_size). The test set is always split
    over all ``world_size`` ranks.
    """
    part = shard if shard is not None else (rank, world_size)
    if cfg.data.name == "digits":
        return _digits(cfg, rank, world_size, device, part)
    if cfg.data.name in ("cifar10", "imagenet"):
        return _torchvision(cfg, rank, world_size, device, part)
    raise ConfigError(f"data.name: unknown dataset {cfg.data.name!r} (known: digits, cifar10, imagenet)")
