"""LN3Diff text/image-to-3D for Blender: a prompt or an image, an ln3diff.v1 server makes the mesh, Blender imports it.

Install: `python -m serve.blender_addon --out ln3diff_blender.zip` builds an add-on zip that carries the
client and its generated stubs; Edit > Preferences > Add-ons > Install... and pick the zip (Blender 3.6 /
4.x). Blender's own Python needs grpcio and protobuf, once (the one pip step):
    <blender>/<version>/python/bin/python3.* -m pip install grpcio grpcio-health-checking protobuf
The add-on preferences take the server address (`ln3diff-serve --host 0.0.0.0`) and the token, if the
server has one (an ln3diff-rt checkout path is needed only when this single file is installed instead
of the zip). Then: 3D Viewport > sidebar (N) > LN3Diff > Generate. Esc cancels; the server stops too.

Untested here: this project's tests run without Blender. `GenerationJob`, the part that talks to the
server, is plain Python and is tested against a real server in tests/test_serve.py; the operator,
panel and preferences below `register()` only run inside Blender and were not run by those tests.
"""

import sys
import tempfile
import threading
from pathlib import Path

bl_info = {
    "name": "LN3Diff text to 3D",
    "author": "ln3diff-rt",
    "version": (0, 1, 0),
    "blender": (3, 6, 0),
    "location": "View3D > Sidebar > LN3Diff",
    "description": "Generate a mesh from a text prompt on an ln3diff.v1 gRPC server and import it",
    "category": "Import-Export",
}

VENDOR = Path(__file__).resolve().parent / "vendor"  # the client and its stubs, in the add-on zip

# Share of the whole job each stage ends at; sampling fills the span before "decode".
STAGE_END = {"queued": 0.02, "encode_text": 0.05, "sample": 0.7, "decode": 0.72, "mesh": 0.8, "uv_unwrap": 0.88,
             "bake_texture": 0.94, "export": 0.97, "preview": 1.0}


class GenerationJob:
    """One Generate call on a background thread, so Blender's UI stays responsive: poll `done`, `fraction`."""

    def __init__(self, server: str, prompt: str, out_dir: str | Path, token: str = "", seed: int | None = None,
                 steps: int | None = None, mesh_resolution: int | None = None, timeout: float = 600.0,
                 repo_path: str = "", image: bytes | None = None, texture: int | None = None):
        self.server, self.prompt, self.out_dir, self.token, self.image = server, prompt, Path(out_dir), token, image
        self.seed, self.steps, self.mesh_resolution, self.timeout = seed, steps, mesh_resolution, timeout
        self.repo_path, self.texture = repo_path, texture  # texture size; 0: vertex colours, None: the server's
        self.fraction, self.status = 0.0, "starting"
        self.path: Path | None = None  # the GLB, once done without error
        self.error: str | None = None
        self.result = None  # the server's Result message (seed, steps, timings, ...)
        self._call = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="ln3diff-job", daemon=True)

    def start(self) -> "GenerationJob":
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return not self._thread.is_alive() and (self.path is not None or self.error is not None)

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def _on_progress(self, stage: str, step: int, total: int) -> None:
        if stage == "queued":
            self.status = f"queued, {total} ahead"
            return
        stages = list(STAGE_END)
        if stage in STAGE_END:
            start = STAGE_END[stages[stages.index(stage) - 1]]
            self.fraction = start + (STAGE_END[stage] - start) * (step / total if total else 1.0)
        self.status = f"{stage} {step}/{total}"

    def _run(self) -> None:
        try:
            for path in (self.repo_path, str(VENDOR)):  # a checkout, else the zip's own copy of the client
                if path and Path(path).is_dir() and path not in sys.path:
                    sys.path.insert(0, path)
            from serve.client import Client, assemble, build_request

            with Client(self.server, self.token or None) as client:
                request = build_request(self.prompt, seed=self.seed, steps=self.steps, formats=["glb"],
                                        mesh_resolution=self.mesh_resolution, preview_views=0, image=self.image,
                                        texture=self.texture)
                self._call = client.stub.Generate(request, timeout=self.timeout, metadata=client.metadata)
                if self._cancelled:
                    self._call.cancel()
                generation = assemble(self._call, self._on_progress)
            self.result = generation.result
            if generation.result.mesh_empty:
                raise ValueError(f"no surface for seed {generation.result.seed}; try another seed or prompt")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / f"ln3diff_{generation.result.seed}.glb"
            path.write_bytes(generation.meshes["glb"])
            self.fraction, self.status, self.path = 1.0, "done", path
        except ImportError as e:
            self.error = (f"{e}: install grpcio and protobuf into Blender's Python and set the ln3diff-rt "
                          "checkout path in the add-on preferences")
        except Exception as e:  # shown in Blender's status bar; never raised into Blender's UI thread
            code = getattr(e, "code", None)
            self.error = f"{code().name}: {e.details()}" if callable(code) else str(e)


def condition_image(context, path: str, scratch: str) -> bytes | None:
    """The image file's bytes, or the image shown in an Image Editor saved as PNG, or None (text only)."""
    if path:
        return Path(path).read_bytes()
    for area in getattr(context.screen, "areas", ()):
        image = getattr(area.spaces.active, "image", None) if area.type == "IMAGE_EDITOR" else None
        if image is not None:
            png = Path(scratch) / "condition.png"
            image.save_render(str(png))  # works for packed, generated and file images alike
            return png.read_bytes()
    return None


# -- Blender UI: defined on register(), so the module imports without bpy ----------------------------

_classes: list = []


def _make_classes() -> list:
    import bpy
    from bpy.props import IntProperty, StringProperty

    class LN3DiffPreferences(bpy.types.AddonPreferences):
        bl_idname = __name__
        server: StringProperty(name="Server", default="localhost:50051")
        token: StringProperty(name="Token", subtype="PASSWORD", default="")
        repo_path: StringProperty(name="ln3diff-rt checkout", subtype="DIR_PATH", default="")

        def draw(self, context):
            for name in ("server", "token", "repo_path"):
                self.layout.prop(self, name)

    class LN3DIFF_OT_generate(bpy.types.Operator):
        """Generate a mesh from a text prompt and/or an image and import it"""

        bl_idname = "ln3diff.generate"
        bl_label = "Generate 3D from text or image"
        prompt: StringProperty(name="Prompt", default="a red cube")
        image_path: StringProperty(name="Image (empty: the Image Editor's image, if any)", subtype="FILE_PATH")
        # Blender properties cannot be unset: -1 / 0 stand for "the server's choice" (a seed of 0 is a seed).
        seed: IntProperty(name="Seed (-1: random)", default=-1, min=-1)
        steps: IntProperty(name="Steps (0: server default)", default=0, min=0, max=1000)
        texture: IntProperty(name="Texture size (-1: server default, 0: vertex colours)", default=-1, min=-1,
                             max=8192)

        def invoke(self, context, event):
            return context.window_manager.invoke_props_dialog(self)

        def execute(self, context):
            prefs = context.preferences.addons[__name__].preferences
            out_dir = tempfile.mkdtemp(prefix="ln3diff_")
            try:
                image = condition_image(context, bpy.path.abspath(self.image_path) if self.image_path else "", out_dir)
            except OSError as e:
                self.report({"ERROR"}, f"LN3Diff: cannot read the image: {e}")
                return {"CANCELLED"}
            self.job = GenerationJob(prefs.server, self.prompt, out_dir, prefs.token,
                                     None if self.seed < 0 else self.seed, self.steps or None,
                                     repo_path=bpy.path.abspath(prefs.repo_path), image=image,
                                     texture=None if self.texture < 0 else self.texture).start()
            self.timer = context.window_manager.event_timer_add(0.2, window=context.window)
            context.window_manager.modal_handler_add(self)
            return {"RUNNING_MODAL"}

        def modal(self, context, event):
            if event.type == "ESC":
                self.job.cancel()
                return self._finish(context, {"CANCELLED"}, "LN3Diff: cancelled")
            if event.type != "TIMER":
                return {"PASS_THROUGH"}
            context.workspace.status_text_set(f"LN3Diff: {self.job.status} ({100 * self.job.fraction:.0f}%)")
            if not self.job.done:
                return {"RUNNING_MODAL"}
            if self.job.error:
                self.report({"ERROR"}, f"LN3Diff: {self.job.error}")
                return self._finish(context, {"CANCELLED"})
            bpy.ops.import_scene.gltf(filepath=str(self.job.path))  # a textured GLB comes in with its material
            for obj in context.selected_objects:
                obj["ln3diff_prompt"], obj["ln3diff_seed"] = self.prompt, int(self.job.result.seed)
            self.report({"INFO"}, f"LN3Diff: imported seed {self.job.result.seed}")
            return self._finish(context, {"FINISHED"})

        def _finish(self, context, result, message=None):
            context.window_manager.event_timer_remove(self.timer)
            context.workspace.status_text_set(message)
            return result

    class VIEW3D_PT_ln3diff(bpy.types.Panel):
        bl_label = "LN3Diff"
        bl_space_type = "VIEW_3D"
        bl_region_type = "UI"
        bl_category = "LN3Diff"

        def draw(self, context):
            self.layout.operator(LN3DIFF_OT_generate.bl_idname, text="Generate", icon="MESH_MONKEY")

    return [LN3DiffPreferences, LN3DIFF_OT_generate, VIEW3D_PT_ln3diff]


def register() -> None:
    import bpy

    _classes[:] = _make_classes()
    for cls in _classes:
        bpy.utils.register_class(cls)


def unregister() -> None:
    import bpy

    for cls in reversed(_classes):
        bpy.utils.unregister_class(cls)
    _classes.clear()
