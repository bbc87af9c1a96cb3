"""A straightforward pure-Python FusionNet world, the way the seed wrote it.

List-of-lists edges, a window's present edges as a set of local cell pairs, and for every
pattern match: apply, depth-first search from (0, 0) over the whole grid, full crossing recount,
restore. Only the op tables (data) are shared with ``fusion.ops``; every rule is re-implemented
here, so the tests compare two independent implementations. The benchmark times it against
the vectorised environment.
"""
from __future__ import annotations

from fusion.ops import OPS


class ReferenceGrid:
    def __init__(self, zones, H, V) -> None:
        self.zones = [list(map(int, row)) for row in zones]
        self.h, self.w = len(self.zones), len(self.zones[0])
        self.H = [list(map(bool, row)) for row in H]
        self.V = [list(map(bool, row)) for row in V]

    def has_edge(self, p, q) -> bool:
        (x1, y1), (x2, y2) = p, q
        if y1 == y2 and abs(x1 - x2) == 1:
            return self.H[y1][min(x1, x2)]
        if x1 == x2 and abs(y1 - y2) == 1:
            return self.V[min(y1, y2)][x1]
        return False

    def set_edge(self, p, q, value: bool) -> None:
        (x1, y1), (x2, y2) = p, q
        if y1 == y2:
            self.H[y1][min(x1, x2)] = value
        else:
            self.V[min(y1, y2)][x1] = value

    def crossings(self) -> int:
        total = 0
        for y in range(self.h):
            for x in range(self.w):
                if x + 1 < self.w and self.H[y][x] and self.zones[y][x] != self.zones[y][x + 1]:
                    total += 1
                if y + 1 < self.h and self.V[y][x] and self.zones[y][x] != self.zones[y + 1][x]:
                    total += 1
        return total

    def connected(self) -> bool:
        seen, stack = set(), [(0, 0)]
        while stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            x, y = cur
            for nx, ny in ((x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)):
                if 0 <= nx < self.w and 0 <= ny < self.h and self.has_edge(cur, (nx, ny)):
                    stack.append((nx, ny))
        return len(seen) == self.w * self.h

    def window(self, spec, x, y):
        if x < 0 or y < 0 or x + spec.width > self.w or y + spec.height > self.h:
            return None
        return [(x + c, y + r) for r in range(spec.height) for c in range(spec.width)]

    def present(self, pts):
        out = set()
        for i, p in enumerate(pts):
            for j in range(i + 1, len(pts)):
                if self.has_edge(p, pts[j]):
                    out.add((i, j))
        return out

    def try_op(self, variant: int, y: int, x: int, *, keep: bool):
        """``None`` if the op does not apply, else its crossing delta (state kept if ``keep``)."""
        spec = OPS[variant]
        pts = self.window(spec, x, y)
        if pts is None or self.present(pts) != set(spec.old):
            return None
        before = self.crossings()
        for i, j in spec.old:
            self.set_edge(pts[i], pts[j], False)
        for i, j in spec.new:
            self.set_edge(pts[i], pts[j], True)
        ok = self.connected()
        delta = self.crossings() - before
        if not ok or not keep:
            for i, j in spec.new:
                self.set_edge(pts[i], pts[j], False)
            for i, j in spec.old:
                self.set_edge(pts[i], pts[j], True)
        return delta if ok else None

    def matches(self, variant: int, y: int, x: int) -> bool:
        spec = OPS[variant]
        pts = self.window(spec, x, y)
        return pts is not None and self.present(pts) == set(spec.old)

    def enumerate_ops(self):
        """``{(variant, y, x): delta}`` of every applicable op, one window at a time."""
        out = {}
        for spec in OPS:
            for y in range(self.h - spec.height + 1):
                for x in range(self.w - spec.width + 1):
                    delta = self.try_op(spec.index, y, x, keep=False)
                    if delta is not None:
                        out[(spec.index, y, x)] = delta
        return out
