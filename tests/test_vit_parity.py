"""eval/vit_parity.py on a tiny architecture on CPU: the fast ViT equals the stock one in fp32 and in bf16 (tiny
shapes need no padding, so it is bit-exact there), and the bf16 noise floor is reported beside it."""
import json

from eval.vit_parity import main


def test_vit_parity_tiny_cpu(tmp_path):
    assert main(["--arch", "tiny_qwen2_5_vl", "--tokens", "64", "--device", "cpu", "--out_dir", str(tmp_path),
                 "--tag", "t"]) == 0
    res = json.loads((tmp_path / "vit_parity_t.json").read_text())
    assert res["fp32_fast_vs_stock"] < 1e-6 and res["bf16_fast_vs_stock"] < 1e-6
    assert 1e-4 < res["bf16_stock_vs_fp32_stock"] < 0.1
