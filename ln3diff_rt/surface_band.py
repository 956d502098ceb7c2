"""The density lattice refined coarse to fine only along the surface, held in bricks, and marched there.

A level is a lattice of nodes `step` finest cells apart. Refining a level by x2 splits a set of its
cells (the band) and evaluates the field at the new nodes of split cells only; every other node of
the finer lattice is the trilinear interpolation of the coarser one. The band starts from the seed
cells (those whose corners straddle the threshold) and grows until neither rule adds a cell:
- the surface leads into a neighbour: one of its finer cells straddles the threshold with the values
  known so far, so every finer cell that straddles it has all eight corners evaluated and the band
  holds the surface dense sampling finds wherever the band reaches;
- a neighbour comes close: its corners are nearer the threshold than NEAR_FACTOR x the interpolation
  error seen at the nodes beside it, so a small piece of surface of its own (a floater next to the
  body, dense sampling finds them) may hide inside.

Finer values live in bricks of BRICK^3 nodes that the band touches (a table from brick to slot), so
memory and work follow the surface area, not the volume. Marching cubes runs once over the bricks
that hold split cells, packed side by side into one compact array (at most a few hundred nodes per
axis, so float32 vertex coordinates keep ~1e-5 of a cell); skimage's `mask` (True marks the cell
whose upper corner is that node) leaves out the seams between packed bricks, cells outside the band
(no surface there: their values interpolate corners on one side) and cells past the grid. Vertices
on brick faces come out once per brick; they are welded by the grid edge they lie on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from skimage.measure import marching_cubes

DensityFn = Callable[[torch.Tensor], torch.Tensor]  # points [N, 3] -> density [N]

BRICK_SHIFT = 3
BRICK = 2 ** BRICK_SHIFT  # finer nodes a brick owns per axis (even: a split cell's finer cells lie in one brick)
# A cell beside the band (it or a face neighbour has evaluated nodes) is split too when its corners
# come within NEAR_FACTOR x the largest |evaluated - interpolated| seen there: 1 lost an 8-face floater
# that dense sampling finds on the bench's random tri-plane field at 256^3, 2 finds every one at 128^3
# and 256^3.
NEAR_FACTOR = 2.0
WELD_EPS = 1e-4  # a vertex this close to a node (in cells) is the node: duplicates agree on it, float32 or not

_CUBE = torch.stack(torch.meshgrid(*(torch.arange(3),) * 3, indexing="ij"), dim=-1).reshape(-1, 3)  # [27, 3]
_CORNERS = _CUBE[(_CUBE < 2).all(dim=1)]  # [8, 3] the 2x2x2 finer cells of a split cell
_FACES = _CUBE[(_CUBE - 1).abs().sum(dim=1) <= 1] - 1  # [7, 3] a cell and its six face neighbours

# Node lists are int64 keys x << 42 | y << 21 | z: one column per op instead of three, and an offset
# is one addition (coordinates stay far below 2^21, so no field carries into the next).
_BITS = 21
_FIELD = (1 << _BITS) - 1


def _pack(nodes: torch.Tensor) -> torch.Tensor:
    return (nodes[..., 0] << 2 * _BITS) | (nodes[..., 1] << _BITS) | nodes[..., 2]


def _axes(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return keys >> 2 * _BITS, (keys >> _BITS) & _FIELD, keys & _FIELD


def _unpack(keys: torch.Tensor) -> torch.Tensor:
    return torch.stack(_axes(keys), dim=-1)


def _flat(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, n: int) -> torch.Tensor:
    return (x * n + y) * n + z


def _unflat(keys: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([keys // (n * n), keys // n % n, keys % n], dim=-1)


def _outer(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, combine: Callable) -> torch.Tensor:
    """combine(combine(x, y), z) over every choice of one column of each of x, y, z [S, 2] -> [S * 8], x slowest."""
    xy = combine(x[:, :, None], y[:, None, :]).reshape(-1, 4)
    return combine(xy[:, :, None], z[:, None, :]).reshape(-1)


def _grid(side: int) -> torch.Tensor:
    """Offsets [side^3, 3] of a cube of nodes, row-major."""
    axis = torch.arange(side)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)


_OWN_OFFSETS = (_CORNERS[:, 0] << 2 * BRICK_SHIFT) | (_CORNERS[:, 1] << BRICK_SHIFT) | _CORNERS[:, 2]  # in a brick
_FAR_CUBE = _CUBE[(_CUBE == 2).any(dim=1)]  # [19, 3] a cell's finer nodes on its upper sides
_FAR_KEYS = _pack(_FAR_CUBE)
# A far node is also a node of the cells above along its far axes (_CORNERS[1:] within those axes).
_FAR_SHARED = ((_CORNERS[None, 1:, :] == 1) <= (_FAR_CUBE[:, None, :] == 2)).all(dim=2)  # [19, 7]
_ABOVE_BITS = 1 << torch.arange(7)  # which of a cell's 7 upper neighbours are split, as one 7-bit code
# The far nodes a cell still owns for each code [128, 19]: one lookup per cell instead of a [19, 7] test.
_FAR_OWNED = ~(((torch.arange(128)[:, None] & _ABOVE_BITS) > 0)[:, None, :] & _FAR_SHARED[None]).any(dim=2)
_LOCAL_KEYS = _pack(_grid(BRICK))  # [BRICK^3] a brick's nodes, in the order of its values


def upsample2(values: torch.Tensor) -> torch.Tensor:
    """Trilinear x2 refinement of node values [..., a, b, c] -> [..., 2a-1, 2b-1, 2c-1]: midpoints averaged."""
    for dim in range(values.dim() - 3, values.dim()):
        v = values.movedim(dim, 0)
        out = v.new_empty((2 * v.shape[0] - 1, *v.shape[1:]))
        out[0::2] = v
        out[1::2] = (v[:-1] + v[1:]) / 2
        values = out.movedim(0, dim)
    return values.contiguous()


def dilate(values: torch.Tensor, reduce: Callable = torch.maximum) -> torch.Tensor:
    """`reduce` (largest by default) over each node's 3x3x3 neighbourhood within a grid [a, b, c]."""
    for dim in range(3):
        v = values.movedim(dim, 0)
        out = v.clone()
        out[1:] = reduce(out[1:], v[:-1])
        out[:-1] = reduce(out[:-1], v[1:])
        values = out.movedim(0, dim)
    return values


def evaluate_nodes(fn: DensityFn, nodes: torch.Tensor, step: int, spacing: float, bound: float,
                   chunk: int) -> torch.Tensor:
    """fn at lattice nodes [K, 3] (`step` finest cells apart) -> [K] float32, `chunk` points a call."""
    out = torch.empty(len(nodes), dtype=torch.float32)
    for start in range(0, len(nodes), chunk):
        idx = nodes[start:start + chunk] * step
        # Nodes past the last sample (padding up to a whole coarse cell) sit on the box face.
        points = (idx.to(torch.float64) * spacing - bound).clamp(-bound, bound).to(torch.float32)
        out[start:start + len(idx)] = fn(points).reshape(-1).to(torch.float32)
    return out


def straddling_cells(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cells [n-1]^3 of a node grid [n]^3 whose corners lie on both sides of the threshold (or on it)."""

    def all_corners(b: torch.Tensor) -> torch.Tensor:
        b = b[1:] & b[:-1]
        b = b[:, 1:] & b[:, :-1]
        return b[:, :, 1:] & b[:, :, :-1]

    return ~(all_corners(values > threshold) | all_corners(values < threshold))


class BrickLattice:
    """The x2 finer lattice [n]^3, n = 2m - 1, of a level [m]^3: evaluated values in bricks, the rest interpolated."""

    def __init__(self, coarse: torch.Tensor, coarse_known: torch.Tensor):
        self.coarse, self.coarse_known = coarse, coarse_known  # [m]^3 float32, [m]^3 bool
        self.m = coarse.shape[0]
        self.n = 2 * self.m - 1
        self.bricks_per_axis = math.ceil(self.n / BRICK)
        self.table = torch.full((self.bricks_per_axis ** 3,), -1, dtype=torch.int64)  # brick -> slot
        # Held bricks are the first K slots of storage that doubles as it fills (no copy per new brick).
        self._storage = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, BRICK, BRICK, BRICK),
                         torch.zeros(0, BRICK, BRICK, BRICK, dtype=torch.bool))
        self.origins, self.values, self.exact = self._storage  # [K] first node's key, [K, BRICK^3] values, evaluated?

    def _coarse_blocks(self, origins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interpolated values [k, BRICK + 1, ...] over bricks whose first nodes are `origins` (keys [k]),
        and which of their even nodes the coarser level evaluated [k, BRICK / 2 + 1, ...]."""
        side = BRICK // 2 + 1
        span = _unpack(origins)[:, None, :] // 2 + _grid(side)[None]  # [k, side^3, 3] coarse nodes under a brick
        inside = (span < self.m).all(dim=2).reshape(-1)
        key = _flat(*span.clamp(max=self.m - 1).reshape(-1, 3).unbind(1), self.m)
        values = upsample2(self.coarse.view(-1)[key].view(-1, side, side, side))
        known = (self.coarse_known.view(-1)[key] & inside).view(-1, side, side, side)
        return values, known

    def _add_bricks(self, bricks: torch.Tensor) -> None:
        """Slots for bricks [k] (flat brick indices, distinct, not held yet), filled from the coarser level."""
        held, total = len(self.origins), len(self.origins) + len(bricks)
        self.table[bricks] = torch.arange(held, total)
        per_axis = self.bricks_per_axis
        origins = _pack(torch.stack([bricks // per_axis ** 2, bricks // per_axis % per_axis, bricks % per_axis],
                                    dim=1) * BRICK)
        values, known = self._coarse_blocks(origins)
        exact = torch.zeros(len(bricks), BRICK, BRICK, BRICK, dtype=torch.bool)
        exact[:, ::2, ::2, ::2] = known[:, :-1, :-1, :-1]
        if total > len(self._storage[0]):
            capacity = max(total, 2 * len(self._storage[0]))
            self._storage = tuple(torch.cat([t[:held], t.new_zeros(capacity - held, *t.shape[1:])])
                                  for t in self._storage)
        for t, new in zip(self._storage, (origins, values[:, :-1, :-1, :-1], exact), strict=True):
            t[held:total] = new
        self.origins, self.values, self.exact = (t[:total] for t in self._storage)

    def index(self, keys: torch.Tensor, create: bool) -> torch.Tensor:
        """Flat index into `values` of finer nodes (keys [K]); -1 where their brick is not held (create=False)."""
        x, y, z = _axes(keys)
        bricks = _flat(x >> BRICK_SHIFT, y >> BRICK_SHIFT, z >> BRICK_SHIFT, self.bricks_per_axis)
        slots = self.table[bricks]
        if create and (slots < 0).any():
            wanted = torch.zeros(len(self.table), dtype=torch.bool)
            wanted[bricks[slots < 0]] = True
            self._add_bricks(wanted.nonzero()[:, 0])
            slots = self.table[bricks]
        low = BRICK - 1
        local = (((x & low) << BRICK_SHIFT | (y & low)) << BRICK_SHIFT) | (z & low)
        return torch.where(slots >= 0, slots << 3 * BRICK_SHIFT | local, -1)

    def halo(self, slots: torch.Tensor) -> torch.Tensor:
        """Values [k, BRICK + 1, ...] of held bricks plus the far faces their last cells need (from the
        bricks above where held, else interpolated)."""
        values = self._coarse_blocks(self.origins[slots])[0]  # interpolated everywhere first
        values[:, :-1, :-1, :-1] = self.values[slots]
        per_axis = self.bricks_per_axis
        brick = _unpack(self.origins[slots]) >> BRICK_SHIFT
        for step in _CORNERS[1:]:
            above = brick + step
            held = (above < per_axis).all(dim=1)
            index = torch.full_like(slots, -1)
            index[held] = self.table[_flat(*above[held].unbind(1), per_axis)]
            held = (index >= 0).nonzero()[:, 0]
            face = tuple(BRICK if a else slice(0, BRICK) for a in step.tolist())
            first = tuple(0 if a else slice(None) for a in step.tolist())
            values[(held, *face)] = self.values[(index[held], *first)]
        return values

    def fill(self, index: torch.Tensor, evaluate: Callable[[torch.Tensor], torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate the held nodes at `index` [K] (repeats allowed) not evaluated yet -> their keys, values
        and the values the coarser level interpolated there."""
        index = index[~self.exact.view(-1)[index]]
        todo = torch.unique(index)
        fresh = self.origins[todo >> 3 * BRICK_SHIFT] + _LOCAL_KEYS[todo & (BRICK ** 3 - 1)]
        values = evaluate(_unpack(fresh))
        guessed = self.values.view(-1)[todo]
        self.values.view(-1)[todo] = values
        self.exact.view(-1)[todo] = True
        return fresh, values, guessed

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole finer lattice [n]^3 and which of its nodes are evaluated (for the next level)."""
        n = self.n
        values = upsample2(self.coarse)
        known = torch.zeros(n, n, n, dtype=torch.bool)
        known[::2, ::2, ::2] = self.coarse_known
        index = self.exact.view(-1).nonzero()[:, 0]
        x, y, z = _axes(self.origins[index >> 3 * BRICK_SHIFT] + _LOCAL_KEYS[index & (BRICK ** 3 - 1)])
        values[x, y, z] = self.values.view(-1)[index]
        known[x, y, z] = True
        return values, known


@dataclass
class Band:
    """A refined level: its lattice, the split cells of the coarser level [m-1]^3 and the evaluations made."""

    lattice: BrickLattice
    split: torch.Tensor  # [m-1]^3 bool
    evaluations: int


def refine(lattice: BrickLattice, seed: torch.Tensor, threshold: float, valid_cells: int, valid_nodes: int,
           evaluate: Callable[[torch.Tensor], torch.Tensor]) -> Band:
    """Split the seed cells [m-1]^3 of the coarser level, then every cell the two rules (module doc) add.

    A cell c is split only if 2c < valid_cells, and only finer nodes below valid_nodes are evaluated
    (the padding past the last sample is never asked for at the finest level). The seed holds every
    straddling cell, so a cell that is not split has its corners on one side of the threshold and
    its interpolated finer nodes on that side too: one of its finer cells straddles exactly when a
    node it shares with a split cell was evaluated on the other side (or on the threshold). So only
    the nodes just evaluated need checking, and only the cells whose error just grew.
    """
    m = lattice.m
    split = torch.zeros_like(seed)
    limit = min(m - 1, (valid_cells + 1) // 2)  # cells from here on hold no valid finer cell
    new = seed[:limit, :limit, :limit].nonzero()
    coarse_inside = lattice.coarse > threshold
    cell_inside = coarse_inside[:-1, :-1, :-1].reshape(-1)  # a cell's side: its lower corner's
    coarse_inside = coarse_inside.view(-1)
    evaluations = 0
    error = torch.zeros(split.shape)  # [m-1]^3 largest |evaluated - interpolated| at a cell's lower nodes
    gap = (lattice.coarse - threshold).abs()
    gap = torch.minimum(gap[1:], gap[:-1])
    gap = torch.minimum(gap[:, 1:], gap[:, :-1])
    near = torch.minimum(gap[:, :, 1:], gap[:, :, :-1])  # [m-1]^3 how close a cell's corners come to the threshold
    near[limit:], near[:, limit:], near[:, :, limit:] = math.inf, math.inf, math.inf  # never split
    nearest_around = dilate(torch.where(seed, math.inf, near), torch.minimum)  # skips most cells in one look
    near, nearest_around = near.view(-1), nearest_around.view(-1)
    while len(new):
        split[new[:, 0], new[:, 1], new[:, 2]] = True
        first = _pack(2 * new)  # each cell's lowest finer node; its 2x2x2 nodes lie in the same brick
        own = (lattice.index(first, create=True)[:, None] + _OWN_OFFSETS[None]).reshape(-1)
        # A node on a cell's upper side is left to a split cell above that shares it (as a 2x2x2 node or
        # on its own upper side), so most nodes come once.
        above = new[:, None, :] + _CORNERS[None, 1:]  # [L, 7, 3]
        inside = (above < m - 1).all(dim=2)
        above = above.clamp(max=m - 2)
        taken = split[above[..., 0], above[..., 1], above[..., 2]] & inside
        far = (first[:, None] + _FAR_KEYS[None])[_FAR_OWNED[(taken * _ABOVE_BITS).sum(dim=1)]]
        x, y, z = _axes(far)
        far = far[(x < valid_nodes) & (y < valid_nodes) & (z < valid_nodes)]
        fresh, values, guessed = lattice.fill(torch.cat([own, lattice.index(far, create=True)]), evaluate)
        evaluations += len(fresh)
        # A cell touching a node holds the coarse node below it: a node on that node's side and off the
        # threshold grows nothing (cells around it on the other side straddle, so they are split already).
        x, y, z = (a >> 1 for a in _axes(fresh))  # the coarse node below each node
        inside = values > threshold
        surprise = (values == threshold) | (coarse_inside[_flat(x, y, z, m)] != inside)
        # The 2x2x2 cells around each such node, per axis first ([S, 2]: (a - 1) >> 1 and a >> 1), then combined.
        around = [torch.stack([(a - 1) >> 1, a >> 1], dim=1) for a in _axes(fresh[surprise])]
        ok = _outer(*((a >= 0) & (a < limit) for a in around), torch.logical_and)
        cells = _outer(*around, lambda i, j: i * (m - 1) + j)[ok]
        grow = [cells[cell_inside[cells] != inside[surprise].repeat_interleave(8)[ok]]]
        # A cell whose corners come closer to the threshold than NEAR_FACTOR x the interpolation error
        # seen at a neighbour's nodes may hold a small piece of surface of its own (a floater beside the band).
        lower = _flat(x.clamp(max=m - 2), y.clamp(max=m - 2), z.clamp(max=m - 2), m - 1)
        error.view(-1).scatter_reduce_(0, lower, (values - guessed).abs(), "amax")
        touched = torch.unique(lower)
        reach = NEAR_FACTOR * error.view(-1)[touched]
        keep = reach >= nearest_around[touched]
        around = _unflat(touched[keep], m - 1)[:, None, :] + _FACES[None]  # [E, 7, 3] the cell and its face neighbours
        ok = ((around >= 0) & (around < m - 1)).all(dim=2)
        cells = _flat(*around.clamp(0, m - 2).unbind(2), m - 1)
        grow.append(cells[ok & (near[cells] <= reach[keep][:, None])])
        grow = torch.cat(grow)
        grow = torch.unique(grow[~split.view(-1)[grow]])
        new = _unflat(grow, m - 1)
    return Band(lattice, split, evaluations)


def march_band(band: Band, threshold: float, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes over the finest level's split cells -> welded vertices [V, 3] float64 in cells, faces [F, 3].

    Faces wind as skimage winds them (clockwise seen from the high side).
    """
    lattice = band.lattice
    empty = np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    cells = band.split.nonzero()  # [L, 3] split cells of the coarser level
    if len(cells) == 0:
        return empty
    per_axis = lattice.bricks_per_axis
    x, y, z = (cells * 2 >> BRICK_SHIFT).unbind(1)
    brick_keys, brick_of_cell = torch.unique(_flat(x, y, z, per_axis), return_inverse=True)
    k = len(brick_keys)
    side = BRICK + 1  # a brick's nodes and the far faces its last cells need
    across = math.ceil(k ** (1 / 3))
    grid = (math.ceil(k / across ** 2), across, across)  # packed bricks per axis, about a cube
    slots = lattice.table[brick_keys]
    origins = _unpack(lattice.origins[slots])  # [k, 3]
    volume = torch.full((math.prod(grid), side, side, side), threshold - 1.0)
    volume[:k] = lattice.halo(slots)
    # The 8 finer cells of each split cell, marked at their upper corner (skimage's mask convention).
    fine = ((cells * 2)[:, None, :] + _CORNERS[None]).reshape(-1, 3)
    brick = brick_of_cell.repeat_interleave(8)
    keep = (fine < resolution - 1).all(dim=1)
    upper = fine[keep] - origins[brick[keep]] + 1
    mask = torch.zeros(math.prod(grid), side, side, side, dtype=torch.bool)
    mask[brick[keep], upper[:, 0], upper[:, 1], upper[:, 2]] = True

    def pack(t: torch.Tensor) -> np.ndarray:  # [bricks, side, side, side] -> one 3-D array [grid * side]
        t = t.view(*grid, side, side, side).permute(0, 3, 1, 4, 2, 5)
        return np.ascontiguousarray(t.reshape(grid[0] * side, grid[1] * side, grid[2] * side).numpy())

    packed = pack(volume)
    if not mask.any() or not packed.min() < threshold < packed.max():
        return empty
    try:
        verts, faces, _, _ = marching_cubes(packed, level=threshold, mask=pack(mask), allow_degenerate=True)
    except RuntimeError:  # skimage: no surface in the marched cells
        return empty
    return _weld(verts.astype(np.float64), faces.astype(np.int64), packed, grid, origins.numpy(), threshold,
                 lattice.n)


def _weld(verts: np.ndarray, faces: np.ndarray, packed: np.ndarray, grid: tuple[int, int, int],
          origins: np.ndarray, threshold: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One vertex per grid edge (or node) from the packed vertices [V, 3]; faces re-indexed, degenerate ones dropped.

    Two copies of a vertex on a brick face share the two integer coordinates of their edge exactly but
    not the rounding of the third (float32, different packed offsets), so the key is the edge, and
    the position is recomputed in float64 from the edge's two values, the same for both copies.
    """
    side = BRICK + 1
    slot3 = np.minimum(np.floor(verts / side), np.array(grid) - 1).astype(np.int64)
    slot = (slot3[:, 0] * grid[1] + slot3[:, 1]) * grid[2] + slot3[:, 2]
    local = verts - slot3 * side  # in [0, BRICK]; integer on all axes but the edge's
    base = np.floor(local).astype(np.int64)
    frac = local - base
    axis = np.argmax(frac, axis=1)
    rows = np.arange(len(verts))
    along = frac[rows, axis]  # > 0 on an edge, 0 on a node (numpy's max along a short axis is 10x slower)
    lo = slot3 * side + base  # packed index of the edge's lower node
    hi = lo.copy()
    hi[rows, axis] += 1
    hi = np.minimum(hi, np.array(packed.shape) - 1)
    v0 = packed[lo[:, 0], lo[:, 1], lo[:, 2]].astype(np.float64)
    v1 = packed[hi[:, 0], hi[:, 1], hi[:, 2]].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(along > 0, (threshold - v0) / (v1 - v0), 0.0)
    node = origins[slot] + base  # global lower node of the edge
    at_hi = t > 1.0 - WELD_EPS
    node[rows[at_hi], axis[at_hi]] += 1
    on_node = at_hi | (t < WELD_EPS)
    keys = ((node[:, 0] * n + node[:, 1]) * n + node[:, 2]) * 4 + np.where(on_node, 3, axis)
    keys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    position = node[first].astype(np.float64)
    edge = ~on_node[first]
    position[np.flatnonzero(edge), axis[first][edge]] += t[first][edge]
    faces = np.take(inverse.reshape(-1), faces)  # np.take gathers ~1.5x faster than fancy indexing
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    return referenced(position, faces)


def referenced(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [V, 3] that faces [F, 3] use, in their order, and the faces re-indexed."""
    used = np.zeros(len(vertices), dtype=bool)
    used[faces] = True
    return vertices[used], np.take(np.cumsum(used) - 1, faces)
