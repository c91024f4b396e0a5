"""`ChannelGroup`: DepGraph's propagation that keeps every root of every channel it reaches, so
channels that must go together (one value concatenated twice, one group of a grouped conv, one
offset of every `chunk` piece) are found from one traversal, and channels that cannot be removed
consistently (a reshape that mixes channels, a fixed-size split) are named.
"""
from __future__ import annotations

from collections import Counter, deque
from typing import Iterable

import torch
import torch.nn as nn

from .. import _tp
from .maps import DependencyGraph, _Runs


def _components(n: int, group: torch.Tensor, root: torch.Tensor, groups: int) -> torch.Tensor:
    """Connected components of roots ``0..n-1`` joined by shared groups (root ``root[i]`` is in
    group ``group[i]``): each root's label is the smallest root of its component. Minimum
    labels spread through the groups, with pointer jumping, until they settle."""
    lab = torch.arange(n)
    while True:
        low = torch.full((groups,), n, dtype=torch.long).scatter_reduce(0, group, lab[root], "amin")
        new = lab.scatter_reduce(0, root, low[group], "amin")
        new = new[new]
        if torch.equal(new, lab):
            return lab
        lab = new


class ChannelGroup:
    """Everything that pruning channels ``0..n-1`` of `module` (``direction`` 'out' or 'in')
    drags along, as DepGraph propagates it: for every node and pruning handler reached, which
    of its channels each *root* channel reaches. torch-pruning's own groups keep one root per
    channel; keeping all of them is what ties channels together. One traversal for all roots
    (not one group per channel), on (channel, root) pairs held as tensors.

    `classes` partitions the roots into the sets that can only be removed together and says
    which sets cannot be removed at all (and why); `items` lists, for chosen roots, the
    channels of every parameter-holding layer to remove.
    """

    def __init__(self, dg: DependencyGraph, module: nn.Module, direction: str, n: int):
        self.dg, self.n = dg, n
        root = dg.module2node[module]
        pruner = dg.get_pruner_of_module(module)
        fn = pruner.prune_out_channels if direction == "out" else pruner.prune_in_channels
        self.lost_roots = False
        ar = torch.arange(n)
        #: (node, handler) -> codes ``channel * n + root`` of the pairs reached (unique)
        self.facts: dict[tuple, torch.Tensor] = {}
        # DepGraph's propagation on batches of (channel, root) pairs, breadth first; what reaches
        # a node is merged until the node's turn, so each node is expanded few times.
        pending: dict[tuple, list] = {(root, fn): [ar * n + ar]}
        bits: dict[tuple, torch.Tensor] = {}  # membership bitmaps of the keys reached densely
        queue = deque(pending)
        while queue:
            key = queue.popleft()
            codes = pending.pop(key)
            codes = torch.unique(torch.cat(codes)) if len(codes) > 1 or len(codes[0]) > 1 else codes[0]
            old = self.facts.get(key)
            if old is not None:
                codes = self._new(key, codes, old, bits, n)
                if not len(codes):
                    continue
                self.facts[key] = torch.cat([old, codes])
            else:
                self.facts[key] = codes
            node, fn = key
            idx, roots = codes // n, codes % n
            span = (int(idx.min()), int(idx.max()))
            for dep in node.dependencies:
                if not dep.is_triggered_by(fn):
                    continue
                i2, r2 = idx, roots
                for mapping in dep.index_mapping:
                    if mapping is not None and len(i2):
                        i2, r2 = self._map(mapping, i2, r2, span if i2 is idx else None)
                if not len(i2):
                    continue
                target = (dep.target, dep.handler)
                if target in pending:
                    pending[target].append(i2 * n + r2)
                else:
                    pending[target] = [i2 * n + r2]
                    queue.append(target)

    @staticmethod
    def _new(key, codes: torch.Tensor, old: torch.Tensor, bits: dict, n: int) -> torch.Tensor:
        """The ``codes`` not in ``old`` (both distinct). A key reached by many (channel, root)
        pairs (attention ties every channel of a head to every root) is revisited often: its
        membership is kept as a bitmap over the codes of its channels so far, once the bitmap is
        no bigger than the codes (a sort-based ``isin`` per visit cost minutes)."""
        mask = bits.get(key)
        top = int(codes.max()) + 1
        if mask is not None and top > len(mask):
            mask = None
        if mask is None:
            size = (max(top, int(old.max()) + 1) + n - 1) // n * n  # whole channels' codes
            if len(old) < 4096 or size > 8 * len(old):
                return codes[~torch.isin(codes, old, assume_unique=True)]
            mask = bits[key] = torch.zeros(size, dtype=torch.bool)
            mask[old] = True
        codes = codes[~mask[codes]]
        mask[codes] = True
        return codes

    def _map(self, mapping, idx: torch.Tensor, roots: torch.Tensor,
             span: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply one DepGraph index map to (channel, root) pairs; ``span`` (lowest, highest
        channel), when known, skips the runs that cannot match without touching the tensors."""
        if isinstance(mapping, _Runs):
            runs = mapping.runs if span is None else \
                [(a, b, k) for a, b, k in mapping.runs if a <= span[1] and a + k > span[0]]
            if not runs:
                return idx[:0], roots[:0]
            if len(runs) == 1 and span is not None and runs[0][0] <= span[0] and span[1] < runs[0][0] + runs[0][2]:
                return idx + (runs[0][1] - runs[0][0]), roots  # the whole batch lies in one run
            parts_i, parts_r = [], []
            for src, dst, length in runs:
                keep = (idx >= src) & (idx < src + length)
                parts_i.append(idx[keep] - src + dst)
                parts_r.append(roots[keep])
            return torch.cat(parts_i), torch.cat(parts_r)
        if isinstance(mapping, _tp.FlattenIndexMapping):
            stride = mapping._stride
            if mapping.reverse:
                return idx // stride, roots
            return ((idx * stride).repeat_interleave(stride) + torch.arange(stride).repeat(len(idx)),
                    roots.repeat_interleave(stride))
        if isinstance(mapping, _tp.SplitIndexMapping):  # a slice [lo, hi) of the channels
            lo, hi = int(mapping.offset[0]), int(mapping.offset[1])
            if mapping.reverse:
                return idx + lo, roots
            keep = (idx >= lo) & (idx < hi)
            return idx[keep] - lo, roots[keep]
        # any other torch-pruning map: element by element
        mapped = mapping([_tp.HybridIndex(idx=int(i), root_idx=int(r)) for i, r in zip(idx, roots)])
        if any(h.root_idx is None for h in mapped):  # torch-pruning's grouped-query map drops roots
            self.lost_roots = True
            mapped = [h for h in mapped if h.root_idx is not None]
        return (torch.as_tensor([h.idx for h in mapped], dtype=torch.long),
                torch.as_tensor([h.root_idx for h in mapped], dtype=torch.long))

    @property
    def maps_indices(self) -> bool:
        """True when channel indices are renumbered or tied on the way (concatenations,
        splits, reshapes, grouped convs): one root may stand for several channels of a layer."""
        return any(node in self.dg.index_mapped for node, _ in self.facts)

    def classes(self) -> tuple[list[list[int]], Counter]:
        """``(removable, refused)``: removable classes of roots (sorted lists), and a count of
        refused roots per reason."""
        n = self.n
        groups: list[torch.Tensor] = []  # per (node, key): an id shared by the roots that reach it
        members_of: list[torch.Tensor] = []
        count = 0

        def share(keys: torch.Tensor, roots: torch.Tensor) -> None:
            """The roots that share a key go together."""
            nonlocal count
            pairs = torch.unique(keys * n + roots)
            _, gid = torch.unique_consecutive(pairs // n, return_inverse=True)
            groups.append(gid + count)
            members_of.append(pairs % n)
            count += int(gid.max()) + 1 if len(gid) else 0

        for (node, _), codes in self.facts.items():
            idx, roots = codes // n, codes % n
            share(idx, roots)  # one channel reached from several roots
            tie = self.dg.channel_ties.get(node)
            if tie is not None:
                share(tie.key(idx), roots)
        cls = _components(n, torch.cat(groups), torch.cat(members_of), count) if groups else torch.arange(n)
        bad: dict[int, str] = {}
        for (node, _), codes in self.facts.items():
            reason = self.dg.width_barriers.get(node)
            tie = self.dg.channel_ties.get(node)
            if reason is not None:
                for c in torch.unique(cls[codes % n]).tolist():
                    bad.setdefault(c, reason)
            elif tie is not None:  # every set a class touches must be whole
                pairs = torch.unique(cls[codes % n] * (codes.max() + 1) + codes // n)
                c, idx = pairs // (codes.max() + 1), pairs % (codes.max() + 1)
                sets, counts = torch.unique(c * (int(idx.max()) + 1) + tie.key(idx), return_counts=True)
                for s in torch.unique(sets[counts != tie.size] // (int(idx.max()) + 1)).tolist():
                    bad.setdefault(s, "channels tied to channels outside this group "
                                      "(a grouped convolution or split piece only partly reached)")
        members: dict[int, list[int]] = {}
        for r, c in enumerate(cls.tolist()):
            members.setdefault(c, []).append(r)
        if self.lost_roots:
            bad = {c: "channels whose origin torch-pruning does not track" for c in members}
        removable = [m for c, m in members.items() if c not in bad]
        refused = Counter()
        for c, reason in bad.items():
            refused[reason] += len(members[c])
        return sorted(removable), refused

    def layer_tables(self) -> list[tuple[nn.Module, str, list[int], list[int]]]:
        """(module, 'out'|'in', channels, one root of each channel) for every parameter-holding
        layer reached (the roots of one channel are always in one class)."""
        out = []
        for (node, handler), codes in self.facts.items():
            if not _tp.is_module_node(node):
                continue
            direction = "out" if self.dg.is_out_channel_pruning_fn(handler) else "in"
            codes = torch.sort(codes).values
            idx = codes // self.n
            first = torch.ones(len(idx), dtype=torch.bool)
            first[1:] = idx[1:] != idx[:-1]
            out.append((node.module, direction, idx[first].tolist(), (codes[first] % self.n).tolist()))
        return out

    def items(self, roots: Iterable[int]) -> list[tuple[nn.Module, str, list[int]]]:
        """(module, direction, channels) to remove so that the roots `roots` go."""
        chosen = torch.zeros(self.n, dtype=torch.bool)
        chosen[torch.as_tensor(sorted(roots), dtype=torch.long)] = True
        out = []
        for (node, handler), codes in self.facts.items():
            if not _tp.is_module_node(node):
                continue
            idxs = torch.unique(codes[chosen[codes % self.n]] // self.n).tolist()
            if idxs:
                direction = "out" if self.dg.is_out_channel_pruning_fn(handler) else "in"
                out.append((node.module, direction, idxs))
        return out
