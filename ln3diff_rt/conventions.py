"""Conventions every layer shares, each stated once: plane axes, chunk sizes, preview cameras.

A leaf module (no imports from the project), so kernels, models, rendering, the pipeline and
the exporters can all read it without pointing a layer the wrong way.
"""

from __future__ import annotations

import math

# Which two coordinates of a point index each plane, in the plane order (xy, xz, yz); the first
# coordinate indexes the plane's width (last) axis, as in `grid_sample`.
PLANE_AXES = ((0, 1), (0, 2), (1, 2))

# Points per field call in mesh extraction (and per call of an exported field engine on a CPU):
# measured 2.4x faster than 2^18-point calls on a CPU, whose [N, hidden] intermediates leave the cache.
FIELD_CHUNK = 2 ** 14
# Rays per call of the preview renderer; each ray carries up to num_samples + num_importance points.
RAY_CHUNK = 4096
# Points per field call when the occupancy grid of a preview is built (32^3 cells: one or two calls).
OCCUPANCY_CHUNK = 2 ** 16
# The most points one field call can carry: a ray chunk at the largest sample count of any preset (64 + 64).
MAX_FIELD_POINTS = RAY_CHUNK * 128

# Turntable previews: cameras on a circle around the object, looking at its centre.
PREVIEW_ELEVATION = 20.0  # degrees above the horizon
PREVIEW_RADIUS = 3.2  # in the normalised box's units; objects fit in [-0.9, 0.9]^3
PREVIEW_FOV = math.radians(50.0)
# Samples per preview ray as fractions of the renderer's (coarse, importance) counts: 32 + 32 -> 16 + 8 on the
# shipped model, whose 128 px frames then differ from renders of every sample at full counts by under 0.1 of 255
# on average, 0.4-0.7 over the object (benchmarks/bench_previews.py).
PREVIEW_SAMPLE_FRACTIONS = (0.5, 0.25)
