"""Batches for the finetuning loop (lit_llama/training.py): which examples each micro-batch holds (seeded, every
example once per epoch, optionally of similar lengths: --group_by_length), and the tensors made of them: padded
to the longest example, or packed into full rows (--packing) with positions that restart at each example."""

from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from lit_llama.data import IGNORE_INDEX

Sample = Dict[str, Any]


def batch_indices(
    n: int, batch: int, iter_num: int, rank: int, world_size: int, seed: int, lengths: Optional[Tuple[int, ...]] = None
) -> List[int]:
    """Example indices of micro-batch `iter_num` on device `rank`: consecutive slices of a seeded
    permutation per epoch. With `lengths` (the examples' token counts: --group_by_length), each epoch's
    permutation is rearranged so that a micro-batch holds examples of similar length (see
    `grouped_epoch_order`). A pure function of its arguments, so a resumed run sees the same batches."""
    start = (iter_num * world_size + rank) * batch
    indices = []
    while len(indices) < batch:
        epoch, offset = divmod(start + len(indices), n)
        if lengths is None:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        else:
            order = grouped_epoch_order(lengths, batch, seed, epoch)
        indices.extend(order[offset : offset + batch - len(indices)])
    return indices


def example_lengths(data: List[Sample], max_seq_length: int) -> Tuple[int, ...]:
    """Each example's token count in a batch (cut at max_seq_length), for --group_by_length."""
    return tuple(min(len(s["input_ids"]), max_seq_length) for s in data)

GROUP_WINDOW = 64  # --group_by_length: micro-batches whose examples are sorted by length together


@lru_cache(maxsize=4)  # one order per epoch, asked for once per iteration
def grouped_epoch_order(lengths: Tuple[int, ...], batch: int, seed: int, epoch: int) -> List[int]:
    """The epoch's seeded permutation (the one `batch_indices` uses without grouping), in windows of
    GROUP_WINDOW micro-batches: within a window the examples are sorted by length, cut into micro-batches,
    and those micro-batches shuffled, so that each holds examples of similar length (little padding) while
    an optimizer step still mixes short and long ones. Every example stays once in its epoch."""
    n = len(lengths)
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    # the micro-batch slices of the stream start at multiples of `batch`: this epoch's first examples finish
    # the micro-batch the previous epoch's last ones started, and the windows begin at the next boundary
    first = (-epoch * n) % batch
    grouped = order[:first]
    window = GROUP_WINDOW * batch
    for start in range(first, n, window):
        by_length = sorted(order[start : start + window], key=lambda i: lengths[i])
        groups = [by_length[i : i + batch] for i in range(0, len(by_length), batch)]
        full, partial = [g for g in groups if len(g) == batch], [g for g in groups if len(g) < batch]
        shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
        grouped += [i for group in shuffled + partial for i in group]  # a partial one continues next epoch
    return grouped


def pad_batch(samples: List[Sample], max_seq_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pads to the longest example in the batch (not to the block size): inputs with 0, labels
    with IGNORE_INDEX, so padding is neither attended to by real tokens (causal) nor scored."""
    inputs = [s["input_ids"][:max_seq_length] for s in samples]
    labels = [s["labels"][:max_seq_length] for s in samples]
    length = max(len(x) for x in inputs)
    input_ids = torch.stack([F.pad(x, (0, length - len(x)), value=0) for x in inputs])
    label_ids = torch.stack([F.pad(y, (0, length - len(y)), value=IGNORE_INDEX) for y in labels])
    return input_ids, label_ids


def pack_batch(samples: List[Sample], max_seq_length: int, one_row: bool = True
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """--packing: the examples (cut at max_seq_length) concatenated. Returns inputs, labels and positions (B, T):
    each token's position within its example, restarting at 0, from which the model builds its per-example
    attention (lit_llama.packed_attention). An example's first label is not scored: alone nothing predicts it.

    one_row: all the examples in one row, in order, with no padding at all. Attention runs example by example
    (or over the examples' offsets), so a row's length only shapes the tensor, and the linear layers, most of
    a step's work, see only real tokens. Otherwise rows of at most max_seq_length (see `pack_rows` for which
    example goes where), right-padded to the longest (the padding a span of its own): for compiled blocks,
    whose block mask grows with the square of the row."""
    cut = [min(len(s["input_ids"]), max_seq_length) for s in samples]
    rows = [list(range(len(samples)))] if one_row else pack_rows(cut, max_seq_length)
    length = max(sum(cut[i] for i in row) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            end = start + cut[i]
            input_ids[r, start:end] = samples[i]["input_ids"][: cut[i]]
            labels[r, start + 1 : end] = samples[i]["labels"][1 : cut[i]]
            positions[r, start:end] = torch.arange(cut[i])
            start = end
        positions[r, start:] = torch.arange(length - start)
    return input_ids, labels, positions


def pack_rows(lengths: List[int], max_seq_length: int) -> List[List[int]]:
    """Which examples share a row: first-fit decreasing (longest first, each into the first row with room) into
    rows of a capacity between the longest example and max_seq_length, the capacity that leaves the fewest
    positions (rows x the fullest row's tokens). Rows of max_seq_length are not always best: four examples of
    400, 150, 100 and 50 tokens take two rows of 500 positions with a capacity of 512 ([400, 100], [150, 50]),
    two rows of 400 with a capacity of 400 ([400], [150, 100, 50]). The capacities tried are the longest
    example, max_seq_length, and for k rows the total / k and a little above (where k rows could hold it all):
    a few dozen first-fit passes instead of one per capacity; on the 102 Alpaca records of ../shared (micro
    batches of 4 to 32, 256 to 2,048 tokens) their padding is within 0.2 points of the best capacity's."""
    longest, total = max(lengths), sum(lengths)
    capacities = {longest, max_seq_length} | {
        c for k in range(1, len(lengths) + 1) for slack in range(0, 64, 8)
        if longest <= (c := -(-total // k) + slack) <= max_seq_length}
    best, best_positions = [], None
    for capacity in sorted(capacities):  # ties: the smaller capacity (shorter rows: less attention to compute)
        rows, room = first_fit_decreasing(lengths, capacity)
        positions = len(rows) * (capacity - min(room))
        if best_positions is None or positions < best_positions:
            best, best_positions = rows, positions
    return best


def first_fit_decreasing(lengths: List[int], capacity: int) -> Tuple[List[List[int]], List[int]]:
    """Rows of example indices, and each row's room left, longest example first (stable: equal lengths keep
    their order), each into the first row with room for it."""
    rows: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows, room
