"""The running batch's key/value cache in preallocated buffers, written in place.

Same left-padded layout as kv.BatchCache (every row's newest token sits in the same column, a
[rows, columns] mask hides each row's left padding), but the buffers have spare rows and
columns: a decode step writes one column in place instead of concatenating a new copy of the
whole cache per layer, which on a small model was the largest cost of a step after the matmuls.

- The live window is columns [start, end) of rows [0, rows). A step writes column `end`.
- Joining rows are copied in right-aligned to `end`; the window widens to the left if their
  prompts are longer than it (moving everything right first when there is no room).
- Leaving rows are filled by moving the last rows into their places (swap-remove: at most as
  many row copies as rows left), so `remove` returns the new row order for the batcher.
- Columns that became padding for every row are dropped by moving `start`; when `end` reaches
  the capacity the window is moved back to column 0 (and the capacity doubled if it is needed).

Cells outside a row's real tokens are masked, but masked is not enough: attention multiplies
their values by a zero weight, and a stale NaN (a row whose model output diverged) times zero
is NaN. Every cell that enters the window for a row that did not write it is zeroed first.
"""

from __future__ import annotations

import torch

from tunedesk.serve.engines.local.fastpath import LeanCache


def _round_up(n: int, quantum: int) -> int:
    return max(quantum, -(-n // quantum) * quantum)


class SlabCache:
    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        row_quantum: int = 8,
        col_quantum: int = 256,
    ) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.row_quantum, self.col_quantum = row_quantum, col_quantum
        self.rows = 0
        self.start = 0
        self.end = 0
        self._alloc(row_quantum, col_quantum)

    def _alloc(self, row_cap: int, col_cap: int) -> None:
        shape = (row_cap, self.kv_heads, col_cap, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device)]
        self.keys += [torch.zeros_like(self.keys[0]) for _ in range(self.layers - 1)]
        self.values = [torch.zeros_like(self.keys[0]) for _ in range(self.layers)]
        self.mask = torch.zeros((row_cap, col_cap), dtype=torch.bool, device=self.device)

    @property
    def row_cap(self) -> int:
        return self.mask.shape[0]

    @property
    def col_cap(self) -> int:
        return self.mask.shape[1]

    @property
    def width(self) -> int:
        return self.end - self.start

    def _relayout(self, row_cap: int, col_cap: int, lead: int) -> None:
        """The live window moves to start at column `lead`, in bigger buffers if asked."""
        if (row_cap, col_cap) == (self.row_cap, self.col_cap):
            self._move_window(lead)
            return
        old_k, old_v, old_mask = self.keys, self.values, self.mask
        rows, s, e = self.rows, self.start, self.end
        self._alloc(row_cap, col_cap)
        w = e - s
        if rows and w:
            for new, old in zip(self.keys + self.values, old_k + old_v, strict=True):
                new[:rows, :, lead : lead + w] = old[:rows, :, s:e]
            self.mask[:rows, lead : lead + w] = old_mask[:rows, s:e]
        self.start, self.end = lead, lead + w

    def _move_window(self, lead: int) -> None:
        """Move the live window within the same buffers. Fresh buffers would cost more than
        the copy: their pages fault in on first touch (~70 ms for 64 rows x 512 columns on the
        tiny model, a stall in every running stream). Cells the move leaves behind lie past
        the window's end, and are written (next_column) or cleared (join) before they re-enter
        it."""
        rows, s, e = self.rows, self.start, self.end
        w = e - s
        if rows and w and s != lead:
            for buf in self.keys + self.values:
                buf[:rows, :, lead : lead + w] = buf[:rows, :, s:e].clone()  # may overlap
            self.mask[:rows, lead : lead + w] = self.mask[:rows, s:e].clone()
        self.start, self.end = lead, lead + w

    def join(self, new: LeanCache, mask: torch.Tensor) -> None:
        """Append a prefilled group's rows (cache [n, kv, W, d], mask [n, W], right-aligned)."""
        n, w_new = mask.shape
        if self.rows == 0:
            # An empty batch: put the window's end just past the prompt, buffers reused as-is.
            self.start = self.end = min(w_new, max(0, self.col_cap - 1))
        rows = self.rows
        row_cap = self.row_cap
        if rows + n > row_cap:
            row_cap = _round_up(2 * (rows + n), self.row_quantum)
        if self.end - w_new < 0 or self.end + 1 > self.col_cap or row_cap != self.row_cap:
            # No room on the left for the prompt (or none for the next step): move the window.
            lead = max(0, w_new - self.width)
            col_cap = max(self.col_cap, _round_up(2 * (lead + self.width + 1), self.col_quantum))
            self._relayout(row_cap, col_cap, lead)
        s, e = self.start, self.end
        new_start = min(s, e - w_new)
        if new_start < s and rows:
            self._clear(slice(0, rows), new_start, s)
        self._clear(slice(rows, rows + n), new_start, e - w_new)
        self.mask[rows : rows + n, new_start : e - w_new] = False
        for buf, layer in zip(self.keys, new.layers, strict=True):
            buf[rows : rows + n, :, e - w_new : e] = layer.keys
        for buf, layer in zip(self.values, new.layers, strict=True):
            buf[rows : rows + n, :, e - w_new : e] = layer.values
        self.mask[rows : rows + n, e - w_new : e] = mask.bool()
        self.rows += n
        self.start = new_start

    def _clear(self, rows: slice, c0: int, c1: int) -> None:
        if c1 <= c0:
            return
        for buf in self.keys + self.values:
            buf[rows, :, c0:c1] = 0
        self.mask[rows, c0:c1] = False

    def next_column(self) -> int:
        """Make room for one more column and mark it real for every row; the caller writes it
        (see LeanDecoder.decode) and then calls `advance`."""
        if self.end + 1 > self.col_cap:
            col_cap = self.col_cap
            if self.width + 1 > col_cap // 2:
                col_cap = _round_up(2 * (self.width + 1), self.col_quantum)
            self._relayout(self.row_cap, col_cap, lead=0)
        self.mask[: self.rows, self.end] = True
        return self.end

    def advance(self) -> None:
        self.end += 1

    def remove(self, dead: list[int]) -> list[int]:
        """Drop these rows; return the surviving rows' old indices in their new order."""
        dead_set = set(dead)
        alive = [i for i in range(self.rows) if i not in dead_set]
        keep = len(alive)
        holes = sorted(i for i in dead_set if i < keep)
        movers = [i for i in alive if i >= keep]
        order = list(range(keep))
        if holes:
            s, e = self.start, self.end
            to, frm = torch.tensor(holes), torch.tensor(movers)
            to, frm = to.to(self.device), frm.to(self.device)
            for buf in self.keys + self.values:
                buf[to, :, s:e] = buf[frm, :, s:e]
            self.mask[to, s:e] = self.mask[frm, s:e]
            for h, m in zip(holes, movers, strict=True):
                order[h] = m
        self.rows = keep
        if keep == 0:
            self.start = self.end = 0
        else:
            used = self.mask[:keep, self.start : self.end].any(dim=0).nonzero()
            self.start += int(used[0]) if used.numel() else self.width
        return order

    def reset(self) -> None:
        self.rows = self.start = self.end = 0
