"""Compiled engines for the Generator's components: `python export/build_engine.py` builds, `runtime` loads.

    build_engine.py    CLI and build_engine(): export, check against eager, manifest, summary table
    components.py      what is exported per component: signature, dynamic axes, example inputs
    field.py           the tri-plane field as gathers from a projected tri-plane (AOTInductor on CPUs)
    aoti_engine.py     torch.export -> AOTInductor .pt2 packages
    onnx_engine.py     ONNX export (opset 18, reference kernel maths), ONNX Runtime sessions
    tensorrt_engine.py TensorRT plans from the ONNX graphs: profiles, cache keys (engine build unverified)
    manifest.py        manifest.json: schema, versions, the checks made on load
    runtime.py         engine directory -> ln3diff_rt.pipeline.Components
"""
