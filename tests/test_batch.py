"""`ln3diff batch` in one process: list formats, the manifest against the files, resume, and bad input as one line.

The model is conftest.py's `cube_checkpoint` (every seed gives a rounded cube, a surface to mesh and export)
with the cheapest settings; the Ray Data path is in test_ray_app.py.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ln3diff_rt.batch import MANIFEST, BatchInputError, Item, read_items
from ln3diff_rt.cli import main

REPO = Path(__file__).resolve().parents[1]
CHEAP = ["--steps", "1", "--guidance", "1", "--resolution", "16", "--views", "1", "--preview-size", "16"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def test_list_formats_give_the_same_items(tmp_path):
    Image.new("RGBA", (8, 8), (200, 0, 0, 255)).save(tmp_path / "red.png")
    text = read_items(write(tmp_path / "p.txt", "a red cube\n\n  a wooden chair  \n"), seed=10)
    assert text == [Item(0, "a red cube", 10), Item(1, "a wooden chair", 11)]  # blank lines skipped, seed + i
    jsonl = read_items(write(tmp_path / "p.jsonl", '{"prompt": "a red cube"}\n{"prompt": "a wooden chair", '
                                                   '"seed": 7}\n{"image": "red.png"}\n'), seed=10)
    assert jsonl[:2] == [Item(0, "a red cube", 10), Item(1, "a wooden chair", 7)]
    assert jsonl[2] == Item(2, "", 12, str((tmp_path / "red.png").resolve()))  # relative to the list
    assert len({item.key for item in jsonl}) == 3 and read_items(tmp_path / "p.jsonl", 10)[1].key == jsonl[1].key
    pa, pq = pytest.importorskip("pyarrow", reason="Parquet lists need pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"prompt": ["a red cube", "a wooden chair"], "seed": [None, 7]}), tmp_path / "p.parquet")
    assert read_items(tmp_path / "p.parquet", seed=10) == jsonl[:2]


@pytest.mark.parametrize("name, text, where, says", [
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b",\n', "p.jsonl:2", "not JSON"),
    ("p.jsonl", '{"prompt": "a", "colour": "red"}\n', "p.jsonl:1", "unknown field 'colour'"),
    ("p.jsonl", '{"prompt": "a", "seed": -1}\n', "p.jsonl:1", "seed=-1"),
    ("p.jsonl", '{"prompt": "a", "image": "missing.png"}\n', "p.jsonl:1", "no such file"),
    ("p.jsonl", '["a red cube"]\n', "p.jsonl:1", "expected an object"),
    ("p.jsonl", '{"prompt": "a", "seed": 1}\n{"prompt": "a", "seed": 1, "image": "p.jsonl"}\n', "p.jsonl:2",
     "same prompt and seed"),
    ("p.txt", "\n\n", "p.txt", "no prompts"),
    ("p.parquet", "not parquet", "p.parquet", "not a Parquet file"),
])
def test_bad_list_is_one_line_naming_it(tmp_path, capsys, name, text, where, says):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow", reason="Parquet lists need pyarrow")
    path = write(tmp_path / name, text)
    assert main(["batch", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / where) in err and says in err, err
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_missing_list_and_bad_flags(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "none.txt"), "--out", str(tmp_path)]) == 2
    assert "none.txt: no such file" in capsys.readouterr().err
    prompts = write(tmp_path / "p.txt", "a red cube\n")
    assert main(["batch", str(prompts), "--out", str(tmp_path), "--format", "glb,fbx"]) == 2
    assert "--format 'glb,fbx'" in capsys.readouterr().err
    assert main(["batch", str(prompts), "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps=0" in capsys.readouterr().err
    assert main(["batch", str(prompts), "--out", str(tmp_path), "--backend", "onnx", "--precision", "bf16"]) == 2
    assert "precision='bf16': expected fp32 with backend 'onnx'" in capsys.readouterr().err  # reached the Generator
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(BatchInputError, match="not UTF-8"):
        read_items(tmp_path / "bin.txt")


def test_batch_writes_files_and_manifest_and_resumes(tmp_path, capsys, cube_checkpoint):
    prompts = write(tmp_path / "p.jsonl", '{"prompt": "a red cube"}\n{"prompt": "a wooden chair", "seed": 42}\n'
                                          '{"prompt": "a blue teapot"}\n')
    out = tmp_path / "out"
    argv = ["batch", str(prompts), "--out", str(out), "--ckpt", str(cube_checkpoint), "--format", "glb,ply",
            "--batch-size", "2", "--object-threads", "1", *CHEAP]  # one thread: records in item order
    assert main(argv) == 0
    assert "made 3, skipped 0 of 3 items" in capsys.readouterr().out
    first = records(out)
    assert [(r["index"], r["prompt"], r["seed"]) for r in first] == [(0, "a red cube", 0), (1, "a wooden chair", 42),
                                                                     (2, "a blue teapot", 2)]
    for r in first:
        assert sorted(Path(f["path"]).suffix for f in r["files"]) == [".glb", ".ply", ".png"]
        for f in r["files"]:
            data = (out / f["path"]).read_bytes()
            assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"]
        assert r["faces"] > 0 and not r["mesh_empty"] and r["options"]["steps"] == 1
        assert r["timings"]["sample"] > 0 and r["timings"]["wall"] >= r["timings"]["mesh"]
    assert [r["batch_size"] for r in first] == [2, 2, 1]
    assert {f.name for f in out.iterdir()} == {f["path"] for r in first for f in r["files"]} | {
        MANIFEST, "manifest.parquet"}
    pq = pytest.importorskip("pyarrow.parquet", reason="the Parquet manifest needs pyarrow")
    assert pq.read_table(out / "manifest.parquet").column("key").to_pylist() == [r["key"] for r in first]

    # A crash: the last record half written, the second item's mesh gone. The rerun keeps item 0 as it is.
    kept = (out / first[0]["files"][0]["path"]).stat().st_mtime_ns
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in first[:2]) + json.dumps(first[2])[:40])
    (out / first[1]["files"][0]["path"]).unlink()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "3 items, 1 already in the manifest, 2 to make" in captured.err
    assert "made 2, skipped 1 of 3 items" in captured.out
    again = records(out)  # one record per item: the cut line and the stale record are gone
    assert [r["key"] for r in again] == [r["key"] for r in first]
    assert (out / first[0]["files"][0]["path"]).stat().st_mtime_ns == kept
    assert again[1]["files"] == first[1]["files"]  # deterministic: the same bytes again
    assert main(argv) == 0 and "made 0, skipped 3 of 3 items" in capsys.readouterr().out

    assert main([*argv[:-len(CHEAP)], *CHEAP[:-2], "--preview-size", "32"]) == 2  # other settings, same folder
    assert "written with other settings" in capsys.readouterr().err


def test_one_process_batch_does_not_import_ray():
    code = "import sys, ln3diff_rt.cli, ln3diff_rt.batch, serve.entry, serve.__main__; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
