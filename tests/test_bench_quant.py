"""braid-bench --quant (bench/quant.py): variant names, and one CPU run of a quantized pair end to end."""
from __future__ import annotations

import json

import pytest
import torch
from bench_common import rows_of, run_cli

from braid_backend.bench import cli, report
from braid_backend.bench.presets import build_peaked
from braid_backend.bench.quant import QUANT, parse_quant_list, quant_variants, split_variant


def test_variant_names_and_bad_options():
    assert split_variant("braid-int4") == ("braid", "int4") and split_variant("stock-fp8-channel") == ("stock", "fp8-channel")
    assert split_variant("braid-eager") == ("braid-eager", None) and split_variant("braid") == ("braid", None)
    assert quant_variants(["fp8"]) == ["stock-fp8", "braid-fp8"] and set(QUANT) >= {"fp8", "int4"}
    with pytest.raises(ValueError, match="fp8"):
        parse_quant_list("int3")
    args = cli.build_parser().parse_args(["--quant", "int4", "--variants", "braid", "--device", "cpu"])
    s, _ = cli.resolve(args, cli.build_parser())
    assert s["variants"] == ["braid", "stock-int4", "braid-int4"]
    for bad in (["--quant", "int3"], ["--quant", "int4", "--dtype", "fp32"], ["--variants", "braid-int5"]):
        with pytest.raises(SystemExit):
            p = cli.build_parser()
            cli.resolve(p.parse_args(bad + ["--device", "cpu"]), p)


def test_quantized_pair_runs_on_cpu(tmp_path):
    """braid-int4 patches the int4 checkpoint of the run's own model (bytes counted quantized, logits within 2x
    of the bf16-dequantised model's error); stock-fp8's rows say why stock cannot run FineGrainedFP8 offline."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (braid-backend[test])")
    rc, out, err = run_cli(["--device", "cpu", "--variants", "braid-int4,stock-fp8", "--new-tokens", "3", "--reps", "1",
                            "--warmup", "0", "--chat", "none", "--no-bar", "--out-dir", str(tmp_path)])
    assert rc == 0, err[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert report.validate(doc) == []
    (b,) = rows_of(doc, "braid-int4").values()
    assert b["status"] == "ok" and b["quant"] == "int4" and b["patch"]["dict"]["ok"], b
    assert "int4, group 128" in b["patch"]["text"]
    c = b["correctness"]
    assert c["yardstick"].startswith("dequantised") and c["err_ratio"] <= 2, c
    assert b["greedy_agreement"] is not None
    dense = sum(p.numel() * p.element_size() for p in build_peaked(torch.bfloat16).parameters())
    assert b["bytes_per_step"] < 0.6 * dense, (b["bytes_per_step"], dense)
    (s,) = rows_of(doc, "stock-fp8").values()
    assert s["status"] == "error" and "finegrained-fp8" in s["error"], s
    assert any(n.startswith("stock-Q / braid-Q rows") for n in doc["notes"])
