"""`benchmarks/gpu_check.py` must run on a bare GPU machine: torch and torchvision only. Here
(no GPU) its rows run on the CPU, so the code paths a GPU run takes are exercised."""

from __future__ import annotations

import subprocess
import sys

import torch

from benchmarks import gpu_check


def test_it_imports_nothing_but_torch_torchvision_and_rayssds_own_numerics():
    code = (
        "import sys, benchmarks.gpu_check\n"
        "absent = ('ray', 'mlflow', 'yaml', 'pycocotools', 'pyarrow', 'pandas')\n"
        "extra = [m for m in absent if m in sys.modules]\n"
        "print(extra)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_training_row_an_inference_row_and_the_table(tmp_path):
    cpu = torch.device("cpu")
    train = gpu_check.train_rate("ssdlite320", 2, "bf16+cl", cpu, 1)
    # fp32 in channels-last: bf16 is emulated on CPUs without AVX-512 BF16 (one step at batch 1
    # took 437 s on an AVX2-only EPYC); the bf16 path is the ssdlite320 row's
    theirs = gpu_check.train_rate("torchvision ssd300_vgg16", 2, "cl", cpu, 1)
    infer = gpu_check.infer_rate("ssdlite320", 2, "bf16", cpu, 1)
    assert train["images_per_s"] > 0 and theirs["images_per_s"] > 0 and infer["images_per_s"] > 0
    assert train["gpu_idle_share"] is None  # measured on CUDA only
    rows = [
        {"kind": "train", "model": "ssd300_vgg16", "batch": 32, "mode": "bf16", "images_per_s": 300.0},
        {
            "kind": "train",
            "model": "torchvision ssd300_vgg16",
            "batch": 32,
            "mode": "bf16",
            "images_per_s": 200.0,
        },
    ]
    facts = {"device": "x", "torch": "t", "cuda": None, "bf16_supported": None, "seconds": 1.0}
    table = gpu_check.markdown(facts, rows, ["infer ssdlite320 batch 64 fp32: out of time"])
    assert "| train | ssd300_vgg16 | 32 | bf16 | 300.00 | 1.50x | - |" in table
    assert "n/a (no GPU" in table and "- skipped infer ssdlite320 batch 64 fp32: out of time" in table
