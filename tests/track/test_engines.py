"""`rayssd export` and ONNX Runtime as an engine: a briefly trained tiny model exported as ONNX
and TorchScript gives the torch detector's detections on real photographs, at any batch size;
the file carries what labelling and serving need; bad files get one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from PIL import Image

from jobs.cli import build_parser
from jobs.options import call_job
from pipelines.data.builtin import write_builtin
from pipelines.track import engines
from pipelines.track.models import load_model
from ssd import checkpoint, export
from ssd.detector import Detector
from tests.photos import photo_crops
from tests.trained_tiny import train_tiny

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notice


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("builtin")
    write_builtin(root, seed=0, train_images=64, val_images=8, image_size=160)
    return train_tiny(root, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[str, Path]:
    ckpt = checkpoint.load(trained)
    model, cfg = checkpoint.build_model(ckpt)
    out = tmp_path_factory.mktemp("exported")
    files = {fmt: out / f"m{export.SUFFIXES[fmt]}" for fmt in export.FORMATS}
    for fmt, path in files.items():
        export.export(model, cfg, ckpt["dataset"], path, fmt=fmt)
    return files


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("batch", [1, 5])
def test_an_export_detects_what_the_torch_model_detects_on_real_photos(trained, exported, fmt, batch):
    loaded = load_model(trained)
    size = loaded.cfg.model.image_size
    images = photo_crops(size, batch, seed=batch)
    sizes = [(480, 640), (size, size), (333, 200), (1000, 90), (64, 64)][:batch]  # original (h, w)
    run = engines.exported_detector(exported[fmt])
    ours = run(images, sizes)
    want = Detector(loaded.model, loaded.cfg)(torch.from_numpy(images), sizes)
    assert sum(len(d["labels"]) for d in want) > 10 * batch  # not a comparison of empties
    for got, ref, (h, w) in zip(ours, want, sizes):
        assert torch.equal(got["labels"], ref["labels"])
        torch.testing.assert_close(got["scores"], ref["scores"], atol=1e-5, rtol=0)
        # within 1e-3 of the input size, in the original image's pixels
        tolerance = 1e-3 * torch.tensor([w, h, w, h], dtype=torch.float32)
        assert ((got["boxes"] - ref["boxes"]).abs() <= tolerance).all()
    strict = run(images, sizes, score_threshold=0.3, max_detections=3)
    for got, ref in zip(strict, want):
        keep = ref["scores"] > 0.3
        assert torch.equal(got["labels"], ref["labels"][keep][:3])


def test_the_onnx_file_has_a_dynamic_batch_and_the_models_metadata(trained, exported):
    model = onnx.load(str(exported["onnx"]))
    onnx.checker.check_model(model)
    (image_input,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in image_input.type.tensor_type.shape.dim]
    assert image_input.name == "images" and isinstance(dims[0], str) and dims[1:] == [3, 128, 128]
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in model.graph.output] == list(export.OUTPUT_NAMES)
    assert "NonMaxSuppression" in {node.op_type for node in model.graph.node}
    meta = export.read_metadata(exported["onnx"])
    ckpt = checkpoint.load(trained)
    assert json.loads(meta["class_names"]) == list(ckpt["dataset"]["class_names"])
    assert json.loads(meta["category_ids"]) == list(ckpt["dataset"]["category_ids"])
    assert meta["image_size"] == "128" and json.loads(meta["config"])["model"]["backbone"] == "tiny"
    assert export.read_metadata(exported["torchscript"]) == meta

    loaded = load_model(str(exported["onnx"]))  # what label and serve load
    assert loaded.engine == "onnxruntime" and loaded.model is None
    assert loaded.dataset["class_names"] == list(ckpt["dataset"]["class_names"])
    assert loaded.cfg.model.image_size == 128
    assert engines.CPU_PROVIDER in loaded.detector().providers


def test_rayssd_export_writes_a_checked_file(trained, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    args = build_parser().parse_args(
        [
            "export",
            "--model",
            trained,
            "--out",
            str(out),
            "--score-threshold",
            "0.2",
            "--max-detections",
            "50",
        ]
    )
    assert call_job("rayssd export", args.func, args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (onnx" in printed and "checked on 8 built-in scenes" in printed
    meta = export.read_metadata(out)
    assert (float(meta["score_threshold"]), meta["max_detections"]) == (0.2, "50")
    _, scores, _, counts = engines.OnnxDetector(out).session.run(None, {"images": photo_crops(128, 2)})
    assert scores.shape == (2, 50) and (scores[0, : counts[0]] > 0.2).all()


def test_bad_files_get_one_line_naming_them(exported, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(exported["onnx"].read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"{corrupt} is not a readable ONNX model"):
        load_model(str(corrupt))
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(exported["onnx"]))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    with pytest.raises(ValueError, match=f"{foreign} is an ONNX model but not a rayssd export"):
        load_model(str(foreign))
    with pytest.raises(FileNotFoundError, match="no ONNX model file"):
        load_model(str(tmp_path / "missing.onnx"))
    (tmp_path / "in").mkdir()
    Image.fromarray(photo_crops(64, 1)[0].transpose(1, 2, 0)).save(tmp_path / "in" / "a.jpg")
    args = build_parser().parse_args(
        ["label", "--model", str(corrupt), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")]
    )
    assert call_job("rayssd label", args.func, args) == 2
    assert "is not a readable ONNX model" in capsys.readouterr().err
