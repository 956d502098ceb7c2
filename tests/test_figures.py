"""The model card's mesh drawing: a red box seen from the front is red in the middle, white around it."""

import numpy as np
import trimesh

from ln3diff_rt.cameras import orbit_camera
from ln3diff_rt.meshing import MeshResult
from training.figures import draw_mesh, grid_image


def _box(colour=(200, 30, 30, 255)) -> MeshResult:
    box = trimesh.creation.box(extents=(0.8, 0.8, 0.8))  # faces wound counter-clockwise from outside
    colours = np.tile(np.array(colour, dtype=np.uint8), (len(box.vertices), 1))
    return MeshResult(np.asarray(box.vertices, np.float32), np.asarray(box.faces), colours,
                      np.asarray(box.vertex_normals, np.float32))


def test_draw_mesh_shows_the_front_faces_in_their_colour():
    image = draw_mesh(_box(), orbit_camera(-60.0, 20.0, 3.2), size=65)
    assert image.shape == (65, 65, 3)
    centre = image[32, 32].astype(int)
    assert centre[0] > 2 * centre[1] and centre[0] > 2 * centre[2]  # red, shaded
    assert (image[0, 0] == 255).all() and (image[-1, -1] == 255).all()
    assert 0.05 < (image.sum(-1) < 700).mean() < 0.6  # the box covers part of the frame


def test_draw_mesh_culls_back_faces():
    """A square facing the camera is drawn; wound the other way it faces away and is not."""
    camera = orbit_camera(-90.0, 0.0, 3.0)  # on the -y axis, looking along +y
    vertices = np.array([[-0.5, 0, -0.5], [0.5, 0, -0.5], [0.5, 0, 0.5], [-0.5, 0, 0.5]], np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]])  # counter-clockwise seen from -y
    colours = np.full((4, 4), 255, np.uint8)
    colours[:, 1:3] = 0
    normals = np.tile(np.array([0, -1, 0], np.float32), (4, 1))
    front = draw_mesh(MeshResult(vertices, faces, colours, normals), camera, size=33)
    back = draw_mesh(MeshResult(vertices, faces[:, ::-1].copy(), colours, -normals), camera, size=33)
    assert front[16, 16, 0] > 100 and front[16, 16, 1] < 50
    assert (back == 255).all()


def test_grid_image_tiles_rows():
    tiles = [[np.zeros((8, 8, 3), np.uint8)] * 3, [np.full((8, 8, 3), 255, np.uint8)]]
    image = grid_image(tiles, cell=10)
    assert image.size == (30, 20)
    pixels = np.asarray(image)
    assert (pixels[:10] == 0).all() and (pixels[10:, :10] == 255).all()
