"""Packing samples into fixed-length training sequences, each sample seeing only itself.

Several short samples share one sequence of the stage's length: their tokens are laid end to
end, position ids restart at 0 for every sample, and a block-diagonal causal mask keeps each
token's attention inside its own sample, so a packed sequence trains exactly as its samples
would one by one (a test checks loss and gradients). Targets are shifted here, per sample: a
sample's last token predicts nothing (never the next sample's first token).

The mask is a dense additive [T, T] tensor, which sdpa and eager attention both honour; it is
meant for short packs. (In transformers 5.24 neither infers sample boundaries from restarting
position ids alone.) flash_attention_2 needs no mask: `collate` lays a micro-batch end to end
in one row and the kernel reads sample boundaries from the restarting position ids (varlen).
flex_attention takes the same row with a block-sparse mask built from block bounds, never
[T, T]. A lone unpadded sample needs no mask at all: plain causal attention is what it wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longctx.train.loss import IGNORE_INDEX

ROW_KERNELS = ("flash_attention_2", "flex_attention")  # a micro-batch end to end in one row


@dataclass(frozen=True)
class Sample:
    """Token ids and, per token, whether the model learns to produce it (the loss rule:
    long samples learn every token, short samples only their target)."""

    input_ids: list[int]
    learn: list[bool]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.learn):
            raise ValueError(f"{len(self.input_ids)} tokens but {len(self.learn)} learn flags")
        if not self.input_ids:
            raise ValueError("a sample needs at least one token")


def to_samples(input_ids: list[int], learn: list[bool], sample_lengths: list[int]
               ) -> list[Sample]:
    """A row of the sequences file (longctx.sequences) split back into its samples."""
    if sum(sample_lengths) != len(input_ids) or len(learn) != len(input_ids):
        raise ValueError(f"{len(input_ids)} tokens, {len(learn)} learn flags, sample lengths "
                         f"summing to {sum(sample_lengths)}")
    out, start = [], 0
    for n in sample_lengths:
        out.append(Sample(list(input_ids[start:start + n]), list(learn[start:start + n])))
        start += n
    return out


@dataclass
class Packed:
    """One training sequence: [1, T] ids, shifted targets and position ids, [1, 1, T, T]
    additive mask, and the sample index of every position (-1: padding). `block_mask`: the
    mask is flex_attention's, built on the device from the segments (see `model_inputs`)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    segments: torch.Tensor
    block_mask: bool = False

    def model_inputs(self, device: torch.device | str) -> tuple:
        """(input_ids, position_ids, attention mask, targets) on `device`."""
        if self.block_mask:
            mask = document_block_mask(self.segments.to(device))
        else:
            mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return (self.input_ids.to(device), self.position_ids.to(device), mask,
                self.targets.to(device))


def pack_samples(samples: list[Sample], length: int, pad_id: int,
                 dtype: torch.dtype = torch.float32, mask: bool = True) -> Packed:
    """Lay `samples` end to end in one sequence of `length` tokens (padding after them);
    `mask=False` leaves the [T, T] mask out (flash attention, or one unpadded sample)."""
    total = sum(len(s.input_ids) for s in samples)
    if total > length:
        raise ValueError(f"{len(samples)} samples hold {total} tokens, more than the "
                         f"sequence length {length}")
    ids, targets, positions, segments = [], [], [], []
    for k, s in enumerate(samples):
        n = len(s.input_ids)
        ids += s.input_ids
        # position t predicts token t+1 of the same sample, if that token is learnt
        targets += [s.input_ids[t + 1] if s.learn[t + 1] else IGNORE_INDEX
                    for t in range(n - 1)] + [IGNORE_INDEX]
        positions += range(n)
        segments += [k] * n
    pad = length - total
    ids += [pad_id] * pad
    targets += [IGNORE_INDEX] * pad
    positions += [0] * pad
    segments += [-1] * pad
    seg = torch.tensor(segments)
    if not mask:
        return Packed(torch.tensor([ids]), torch.tensor([targets]), torch.tensor([positions]),
                      None, seg[None])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0)
    allowed |= torch.eye(length, dtype=torch.bool)  # padding attends to itself: no empty rows
    mask = torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return Packed(torch.tensor([ids]), torch.tensor([targets]), torch.tensor([positions]),
                  mask[None, None], seg[None])


def document_block_mask(segments: torch.Tensor, block: int = 128):
    """flex_attention's BlockMask for samples laid end to end in one row (`segments`: [1, T]
    sample index per token, non-decreasing): causal inside each sample, nothing across.

    Built from each block's first and last sample, so only (T/block)^2 flags exist (1K x 1K
    at 128K tokens), never a [T, T] mask. Blocks that lie wholly inside one sample, below the
    diagonal, are marked full: the kernel skips the mask there."""
    from torch.nn.attention.flex_attention import BlockMask

    seg = segments.reshape(-1)
    length = seg.numel()
    if length == 0 or bool((seg[1:] < seg[:-1]).any()) or bool((seg < 0).any()):
        raise ValueError("document_block_mask needs unpadded samples laid end to end")
    n = -(-length // block)
    blocks = torch.arange(n, device=seg.device)
    starts = blocks * block
    first, last = seg[starts], seg[(starts + block).clamp(max=length) - 1]
    q, kv = blocks[:, None], blocks[None, :]
    # samples only grow along the row: blocks kv <= q share a sample iff kv's last is q's first
    touched = (kv <= q) & (last[None, :] >= first[:, None])
    single = (first == last) & (starts + block <= length)  # one sample, not the short tail
    full = (kv < q) & single[:, None] & single[None, :] & (first[:, None] == first[None, :])

    def listed(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True)  # flagged first
        return flags.sum(-1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    # the kernel reads whole blocks: positions past the end get a sample of their own
    doc = torch.nn.functional.pad(seg, (0, n * block - length), value=-1)

    def same_sample_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return BlockMask.from_kv_blocks(*listed(touched & ~full), *listed(full), BLOCK_SIZE=block,
                                    mask_mod=same_sample_causal, seq_lengths=(length, length))


def collate(sequences: list[list[Sample]], attention: str, pad_id: int,
            dtype: torch.dtype = torch.float32) -> Packed:
    """A micro-batch (each sequence a list of samples) as model inputs and shifted targets.

    flash_attention_2 / flex_attention: every sample end to end in ONE row, no padding; no
    mask (FA2's varlen reads the position ids) or a block-sparse one (flex).
    sdpa/eager: one row per sequence, padded to the longest; the mask is left out only when it
    changes nothing (a single sequence holding a single sample).
    """
    if attention in ROW_KERNELS:
        flat = [s for seq in sequences for s in seq]
        row = pack_samples(flat, sum(len(s.input_ids) for s in flat), pad_id, dtype,
                           mask=False)
        row.block_mask = attention == "flex_attention" and len(flat) > 1
        return row
    longest = max(sum(len(s.input_ids) for s in seq) for seq in sequences)
    if len(sequences) == 1 and len(sequences[0]) == 1:
        return pack_samples(sequences[0], longest, pad_id, dtype, mask=False)
    rows = [pack_samples(seq, longest, pad_id, dtype) for seq in sequences]
    return Packed(*(torch.cat([getattr(r, f) for r in rows]) for f in
                    ("input_ids", "targets", "position_ids", "attention_mask", "segments")))


def shard(batch: Packed, parts: int, index: int, pad_id: int) -> Packed:
    """Slice `index` of `parts` equal slices along the sequence, for context parallelism: the
    processes of one group each hold a slice of the same rows. The rows are first padded to a
    multiple of `parts` (padding learns nothing and comes after every real token, so causal
    attention never reads it). Targets were shifted per sample before slicing, so every
    token keeps its own target across slice boundaries. No mask: sequence parallelism
    attends causally (sdpa) or through the position ids (flash_attention_2)."""
    length = batch.input_ids.shape[1]
    size = -(-length // parts)
    pad = size * parts - length

    def cut(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, pad), value=fill)[:, index * size:(index + 1) * size]

    return Packed(cut(batch.input_ids, pad_id), cut(batch.targets, IGNORE_INDEX),
                  cut(batch.position_ids, 0), None, cut(batch.segments, -1))
