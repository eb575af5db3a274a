"""A compressed exact average: bfloat16 or int8 on the wire, with error feedback.

:func:`compressed_average_` is :func:`lookahead_dist.engine.exact_average_`,
x_bar = sum_r w_r x_r / sum_r w_r, with the values sent compressed. SlowMo and
DiLoCo call it on the pseudo-gradient Delta_r = z - x_r (every rank holds the
same z, so the average of Delta_r is z - x_bar); it works for any buffers.
Compress Delta, not x: a block's quantisation step is relative to the block's
largest value, so it is a fraction of the update, not of the weights.

Error feedback. Each rank keeps what compression dropped and adds it the next
time (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD). With the numerator
n_r = w_r x_r, a rank sends C(v_r) with v_r = n_r + e_r and keeps
e_r <- v_r - D(C(v_r)), where D(C(.)) is what the receivers decode. The
average is compressed a second time on its way back (below), and the rank that
computed a chunk of it keeps that chunk's residual E the same way
(DoubleSqueeze, Tang et al. 2019). Summed over T rounds with a constant weight
sum S, the decoded averages telescope:

    sum_t out_t = sum_t x_bar_t - (sum_r e_r,T) / S - E_T,

so the running sum of what is applied tracks the running sum of the exact
averages within (W / S) s_1 / 2 + s_2 / 2 per element, where s_1 and s_2 are
the steps of the two quantisations (one step when every weight is 1), however
many rounds there are. Without error feedback the two sums drift apart by up
to a step per round. The residuals live in :class:`Residuals`: the sent one in
numerator units, the length of the buffer; the owned one the length of this
rank's chunk (it depends on the ranks and their number: a resume must keep
them). :class:`CompressedSync` holds them between calls and checkpoints them.

The sync (W ranks, a buffer of n elements, in the order it runs):

1. The weight sum S = sum_r w_r travels in one all-reduce of a float64 scalar
   (or the caller passes it, e.g. W). Weights multiply the values before
   compression (n_r = w_r x_r, as in ``exact_average_``), so a rank of weight 0
   sends only its residual (zero unless its weight changed), and the exact S
   divides the decoded sum. The residual is in numerator units.
2. The buffer is padded with zeros to W chunks of c elements, each chunk cut
   into m blocks of b <= ``block_size`` (<= 4096) elements, as evenly as
   possible (:func:`block_layout`: the padding is under W (m + 1) elements;
   neither n nor c need be a multiple of anything).
3. int8 only: the ranks agree on one scale per block, s = max_r absmax_r / 127,
   through a MAX all-reduce of the W m per-block absmax values (float32).
   With one scale per block the ranks' int8 codes can be summed as integers.
   A non-finite value (or one beyond float32's range) makes a scale infinite
   on every rank, and every rank raises :class:`DivergenceError` at the same
   point, before anything else is sent. bfloat16 passes non-finite values
   through to the average, as ``exact_average_`` does.
4. Encode: int8 q = clamp(round(v / s), -127, 127) (round half to even); bf16:
   a cast (round to nearest even). The sent residual is e = v - D(q).
5. All-to-all: chunk j of the codes goes to rank j, so each rank receives its
   own chunk from every rank. Summing in int8 would overflow silently (gloo
   computed 100 + 100 = -56), so the owner sums int8 codes in int32 (|sum| <=
   127 W, exact), then multiplies by the block scale and divides by S; bf16
   codes are upcast (float32 or float64, exactly) and summed there. This is
   a reduce-scatter whose sum is never in the wire format.
6. The owner adds its owned residual E to its chunk of the average, encodes it
   again (int8: with scales of its own, one per block of its chunk, which
   travel with it as float32), keeps E <- u - D(q2), and an all-gather gives
   every rank every chunk. Every rank decodes the same codes with the same
   scales, so every rank ends with bitwise the same average.

Why not an all-reduce in bf16: its partial sums are rounded to bf16 at every
hop (the error grows with W and is not the rank's own, so error feedback
cannot cancel it). An all-gather of everyone's bf16 values sends (W - 1) n x 2
bytes, W / 4 times the float32 all-reduce's 2 (W - 1) / W n x 4. The
all-to-all and all-gather above send half of the float32 all-reduce, and the
only rounding is the two encodings, both fed back. Re-encoding the average in
int8 (not sending it back in bf16 or float32) is what brings int8 to a quarter
of float32: the way back is half of the traffic.

Bytes. ``bytes_sent`` counts the payload this rank puts on the wire: an
all-to-all sends W - 1 of its W chunks; an all-gather of a chunk of B bytes
sends (W - 1) B (ring: each rank forwards every other chunk once); an
all-reduce of B bytes counts 2 (W - 1) B / W, rounded up (ring: a
reduce-scatter, then an all-gather, the least any all-reduce sends per rank;
gloo and NCCL send that for large tensors, a tiny one may cost more in
latency, not bytes). Per buffer, with c and m from :func:`block_layout`:

    float32 (exact_average_):  ceil(2 (W - 1) n e / W)     e = the buffer's element size
    bfloat16:                  4 (W - 1) c                  (2 c on the way out, 2 c back)
    int8:                      (W - 1) (2 c + 12 m)         (c out, c back, 4 m scales back,
                                                             8 m for the MAX all-reduce of W m scales)

plus ceil(16 (W - 1) / W) per call for the weight sum unless ``weight_sum`` is
given. With full blocks (c = 4096 m) int8 sends 1/4 + 1.5/4096 of float32's
bytes (0.2504), bf16 exactly 1/2 (when c = n / W, e.g. n = W c with c <= 4096).

Relation to torchft. torchft's quantized all-reduce (its FP8 path) has the same
shape: quantize, all-to-all of chunks, a reduction on the owner in higher
precision, re-quantize, all-gather. There each sender sends its own per-row
scales with its codes and the owner dequantizes before summing; here the scales
are agreed first (one small MAX all-reduce), so the owner sums integers, and
both encodings are fed back. Only the ideas were taken; no code.

``sync_dtype`` None or "float32" means no compression: ``exact_average_``
itself in each buffer's own dtype (bitwise its result; float64 buffers stay
float64), and no residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from lookahead_dist.comm import Comm
from lookahead_dist.engine import exact_average_
from lookahead_dist.errors import ConfigError, DivergenceError
from lookahead_dist.validation import check_choice, check_int

__all__ = [
    "BLOCK_SIZE",
    "SYNC_DTYPES",
    "CompressedSync",
    "Residuals",
    "SyncResult",
    "block_absmax",
    "block_layout",
    "check_sync_dtype",
    "compressed_average_",
    "dequantize_int8",
    "expected_bytes",
    "quantize_int8",
    "scales_from_absmax",
]

BLOCK_SIZE = 4096  # the largest block that shares one int8 scale
SYNC_DTYPES = (None, "float32", "bfloat16", "int8")
_INT8_MAX = 127


def check_sync_dtype(value, name: str = "sync_dtype") -> str:
    """One of :data:`SYNC_DTYPES`, canonical: None becomes "float32" (no compression)."""
    value = check_choice(value, name, SYNC_DTYPES)
    return "float32" if value is None else value


# -- layout and codecs (pure functions) ---------------------------------------------------------------------


def block_layout(n: int, world: int, block_size: int = BLOCK_SIZE) -> tuple[int, int, int]:
    """(c, m, b): n elements padded to ``world`` chunks of c = m b elements, m blocks of b <= block_size each.

    c0 = ceil(n / world) elements per chunk are cut into m = ceil(c0 / block_size)
    blocks of b = ceil(c0 / m); the padding world c - n is under world (m + 1).
    """
    c0 = max(1, -(-n // world))
    m = -(-c0 // block_size)
    b = -(-c0 // m)
    return m * b, m, b


def block_absmax(v: torch.Tensor, b: int) -> torch.Tensor:
    """max |v| over each block of b elements of the 1-D ``v``, as float32; NaN becomes +inf (see the MAX all-reduce:
    a NaN may be dropped by a max, an infinity never)."""
    amax = v.view(-1, b).abs().amax(dim=1).float()
    return amax.masked_fill_(torch.isnan(amax), math.inf)


def scales_from_absmax(amax: torch.Tensor) -> torch.Tensor:
    """The int8 step per block, absmax / 127 (float32); 1 where that is 0 (an all-zero block stays 0)."""
    scale = amax / _INT8_MAX
    return scale.masked_fill_(scale == 0, 1.0)


def quantize_int8(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 codes clamp(round(v / s), -127, 127) of the 1-D ``v``, one scale s per block (len(v) / len(scale)
    elements each); the division is in v's dtype. |v - q s| <= s / 2 wherever |v| <= 127.5 s."""
    q = v.view(scale.numel(), -1) / scale.to(v.dtype)[:, None]
    return q.round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8).view(-1)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q s per block, in ``dtype`` (q: int8 codes or their int32 sums)."""
    return (q.view(scale.numel(), -1).to(dtype) * scale.to(dtype)[:, None]).view(-1)


def _all_reduce_bytes(nbytes: int, world: int) -> int:
    return -(-2 * (world - 1) * nbytes // world)


def expected_bytes(
    numels: Sequence[int],
    world: int,
    sync_dtype,
    *,
    element_size: int = 4,
    weight_sum_given: bool = False,
    block_size: int = BLOCK_SIZE,
) -> int:
    """The bytes one call sends per rank, from the formulas in the module docstring (for planning and benches)."""
    sync_dtype = check_sync_dtype(sync_dtype)
    total = 0 if weight_sum_given else _all_reduce_bytes(8, world)
    for n in numels:
        if n == 0:
            continue
        c, m, _ = block_layout(n, world, block_size)
        if sync_dtype == "float32":
            total += _all_reduce_bytes(n * element_size, world)
        elif sync_dtype == "bfloat16":
            total += 4 * (world - 1) * c
        else:
            total += (world - 1) * (2 * c + 12 * m)
    return total


# -- state -----------------------------------------------------------------------------------------------


@dataclass
class Residuals:
    """What compression dropped, per buffer index: ``sent[i]`` (this rank's numerators, the buffer's length) and
    ``owned[i]`` (this rank's chunk of the average, c elements). Created as zeros on first use."""

    sent: dict[int, torch.Tensor] = field(default_factory=dict)
    owned: dict[int, torch.Tensor] = field(default_factory=dict)

    def for_buffer(self, kind: str, i: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The ``kind`` ("sent" or "owned") residual of buffer i: n elements of ``dtype``, zeros the first time."""
        store = self.sent if kind == "sent" else self.owned
        t = store.get(i)
        if t is None:
            t = store[i] = torch.zeros(n, dtype=dtype, device=device)
        elif t.numel() != n or t.dtype != dtype:
            raise ConfigError(
                f"residuals: the {kind} residual of buffer {i} holds {t.numel()} {t.dtype} elements but the "
                f"sync needs {n} {dtype} (the buffers, their dtype or the ranks changed since it was kept)"
            )
        return t

    def state_dict(self) -> dict:
        return {
            "sent": {i: t.clone() for i, t in self.sent.items()},
            "owned": {i: t.clone() for i, t in self.owned.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            sent, owned = dict(state["sent"]), dict(state["owned"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"residuals: a state must hold 'sent' and 'owned', got {sorted(state)!r}") from exc
        self.sent = {int(i): t.clone() for i, t in sent.items()}
        self.owned = {int(i): t.clone() for i, t in owned.items()}


class SyncResult(NamedTuple):
    weight_sum: float  # sum_r w_r, as exact_average_ returns it
    bytes_sent: int  # what this rank sent, all collectives of the call included


# -- the sync --------------------------------------------------------------------------------------------


@torch.no_grad()
def compressed_average_(
    buffers: list[torch.Tensor],
    weight: float,
    comm: Comm,
    *,
    sync_dtype,
    residual: Residuals | None = None,
    weight_sum: float | None = None,
    ranks=None,
    block_size: int = BLOCK_SIZE,
) -> SyncResult:
    """In place: ``buffers`` <- the exact weighted average of the ranks' compressed values (module docstring).

    Every rank of ``ranks`` (default: all; every rank of the world must have created that group first, see
    :meth:`lookahead_dist.comm.Comm.group`) calls it with buffers of the same sizes and dtypes (floating, no
    push-sum slot: pass :func:`lookahead_dist.flat.without_weight`), its weight w_r, and its ``residual``
    (None: no error feedback). ``sync_dtype``: None or "float32" (no compression: exactly ``exact_average_``),
    "bfloat16" or "int8". Returns the weight sum and the bytes this rank sent.
    """
    sync_dtype = check_sync_dtype(sync_dtype)
    block_size = check_int(block_size, "block_size")
    if block_size > BLOCK_SIZE:
        raise ConfigError(f"block_size must be an integer in [1, {BLOCK_SIZE}], got {block_size}")
    for i, b in enumerate(buffers):
        if not b.is_floating_point():
            raise ConfigError(f"buffers[{i}] must be a floating-point tensor, got dtype {b.dtype}")
    ranks = sorted(range(comm.world_size) if ranks is None else (int(r) for r in ranks))
    world = len(ranks)
    if sync_dtype == "float32":
        nbytes = 0 if weight_sum is not None else _all_reduce_bytes(8, world)
        nbytes += sum(_all_reduce_bytes(b.numel() * b.element_size(), world) for b in buffers)
        return SyncResult(exact_average_(buffers, weight, comm, ranks, weight_sum=weight_sum), nbytes)
    weight = float(weight)
    nbytes = 0
    if weight_sum is None:
        total = torch.tensor([weight], dtype=torch.float64, device=comm.device_for_collectives())
        comm.all_reduce_sum(total, ranks)
        weight_sum = float(total)
        nbytes += _all_reduce_bytes(8, world)
    if not (math.isfinite(weight_sum) and weight_sum > 0):
        raise DivergenceError(f"compressed average: the weights sum to {weight_sum} over ranks {ranks}")
    if comm.rank not in ranks:
        raise ConfigError(f"ranks must include this rank ({comm.rank}) to take part in the average, got {ranks}")
    me = ranks.index(comm.rank)
    for i, buf in enumerate(buffers):
        if buf.numel():
            nbytes += _sync_buffer(buf, i, weight, weight_sum, comm, ranks, me, sync_dtype, residual, block_size)
    return SyncResult(weight_sum, nbytes)


def _sync_buffer(buf, index, weight, weight_sum, comm, ranks, me, sync_dtype, residual, block_size) -> int:
    n, world = buf.numel(), len(ranks)
    work = torch.promote_types(buf.dtype, torch.float32)
    c, m, b = block_layout(n, world, block_size)
    v = torch.zeros(world * c, dtype=work, device=buf.device)
    v[:n].copy_(buf.reshape(-1))
    if weight != 1.0:
        v[:n].mul_(weight)
    if residual is not None:
        v[:n].add_(residual.for_buffer("sent", index, n, work, buf.device))
    nbytes = 0
    int8 = sync_dtype == "int8"
    if int8:
        scale = block_absmax(v, b)
        comm.all_reduce_max(scale, ranks)
        nbytes += _all_reduce_bytes(scale.numel() * scale.element_size(), world)
        if not torch.isfinite(scale).all():
            raise DivergenceError(
                f"int8 sync of buffer {index}: a value is not finite or beyond float32's range on some rank"
            )
        scale = scales_from_absmax(scale)
        q = quantize_int8(v, scale)
        sent = dequantize_int8(q, scale, work)
    else:
        q = v.to(torch.bfloat16)
        sent = q.to(work)
    recv = torch.empty_like(q)
    comm.all_to_all_single(recv, q, ranks)
    nbytes += (world - 1) * c * q.element_size()
    rows = recv.view(world, c)
    if int8:
        avg = dequantize_int8(rows.to(torch.int32).sum(dim=0, dtype=torch.int32), scale.view(world, m)[me], work)
    else:
        avg = rows.to(work).sum(dim=0)
    avg.div_(weight_sum)
    if residual is not None:
        avg.add_(residual.for_buffer("owned", index, c, work, buf.device))
    full = torch.empty_like(q)
    if int8:
        scale2 = scales_from_absmax(block_absmax(avg, b))
        q2 = quantize_int8(avg, scale2)
        kept = avg - dequantize_int8(q2, scale2, work)
        comm.all_gather_into(full, q2, ranks)
        scales = torch.empty(world * m, dtype=torch.float32, device=buf.device)
        comm.all_gather_into(scales, scale2, ranks)
        nbytes += (world - 1) * (c + 4 * m)
        if not torch.isfinite(scales).all():
            raise DivergenceError(f"int8 sync of buffer {index}: the average is beyond float32's range")
        out = dequantize_int8(full, scales, work)
    else:
        q2 = avg.to(torch.bfloat16)
        kept = avg - q2.to(work)
        comm.all_gather_into(full, q2, ranks)
        nbytes += (world - 1) * c * 2
        out = full.to(work)
    buf.copy_(out[:n].view(buf.shape))
    if residual is not None:  # only once everything was sent: a failed sync leaves the residuals as they were
        residual.sent[index].copy_((v - sent)[:n])
        residual.owned[index].copy_(kept)
    return nbytes


class CompressedSync:
    """:func:`compressed_average_` with its error-feedback residuals kept between calls.

    >>> sync = CompressedSync("int8")                                   # doctest: +SKIP
    >>> sync.average_([delta], 1.0, comm, weight_sum=comm.world_size)   # doctest: +SKIP
    >>> sync.bytes_sent, sync.total_bytes_sent                           # doctest: +SKIP

    (``delta`` becomes its compressed average over the ranks.)

    ``bytes_sent``: what the last call sent from this rank; ``total_bytes_sent``: since construction (or the last
    :meth:`load_state_dict`, which restores it). ``error_feedback=False`` keeps no residual. :meth:`state_dict`
    holds the residuals (a resume with the same buffers and ranks is bitwise).
    """

    def __init__(self, sync_dtype, *, error_feedback: bool = True, block_size: int = BLOCK_SIZE):
        self.sync_dtype = check_sync_dtype(sync_dtype)
        self.block_size = check_int(block_size, "block_size")
        if self.block_size > BLOCK_SIZE:
            raise ConfigError(f"block_size must be an integer in [1, {BLOCK_SIZE}], got {block_size}")
        self.residual = Residuals() if error_feedback and self.sync_dtype != "float32" else None
        self.bytes_sent = 0
        self.total_bytes_sent = 0

    @property
    def compressed(self) -> bool:
        return self.sync_dtype != "float32"

    def average_(
        self, buffers: list[torch.Tensor], weight: float, comm: Comm, *, weight_sum: float | None = None, ranks=None
    ) -> float:
        """``buffers`` <- their compressed exact average over ``ranks``; returns the weight sum."""
        res = compressed_average_(
            buffers,
            weight,
            comm,
            sync_dtype=self.sync_dtype,
            residual=self.residual,
            weight_sum=weight_sum,
            ranks=ranks,
            block_size=self.block_size,
        )
        self.bytes_sent = res.bytes_sent
        self.total_bytes_sent += res.bytes_sent
        return res.weight_sum

    def state_dict(self) -> dict:
        return {
            "sync_dtype": self.sync_dtype,
            "residual": self.residual.state_dict() if self.residual is not None else None,
            "total_bytes_sent": self.total_bytes_sent,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("sync_dtype") != self.sync_dtype:
            raise ConfigError(
                f"sync_dtype: the state was saved with {state.get('sync_dtype')!r}, this sync uses {self.sync_dtype!r}"
            )
        if (state.get("residual") is None) != (self.residual is None):
            raise ConfigError("error_feedback: the state and this sync differ in whether they keep residuals")
        if self.residual is not None:
            self.residual.load_state_dict(state["residual"])
        self.total_bytes_sent = int(state.get("total_bytes_sent", 0))
