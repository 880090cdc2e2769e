"""Peak host memory while loading a ~1.4B-parameter preset from fp32 shards in bf16.

Each step runs in its own process so that ru_maxrss (the process's peak resident set, mapped
file pages included) measures that step alone. The loader must hold the model once, in bf16,
plus a tensor at a time: holding an fp32 copy, or reading a shard through one long-lived
mapping, would each pass 1.5x.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESET = "nexus-base"  # 1.43B parameters: A and M mixers, learned MoE, tied embeddings

WRITE = """
import sys, torch
from hybridlm import HybridLM, ModelConfig
torch.manual_seed(0)
HybridLM(ModelConfig.from_preset(sys.argv[1])).save_pretrained(sys.argv[2])  # fp32, as trained
"""

LOAD = """
import json, resource, sys, torch
from hybridlm import HybridLM
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after imports
model = HybridLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
fp32 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
print(json.dumps({"peak": peak, "imports": before, "parameters": model.num_parameters(),
                  "model_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                  "fp32_parameters": fp32}))
"""


def run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow  # writes ~5.7 GB of fp32 shards; a few minutes on 2 CPU cores
def test_loading_a_1b_preset_from_shards_in_bf16_stays_under_one_and_a_half_its_size(tmp_path):
    model_dir = tmp_path / "model"
    run(WRITE, PRESET, str(model_dir))
    assert len(list(model_dir.glob("model-*-of-*.safetensors"))) > 1  # 5.7 GB > 5GB shards
    found = json.loads(run(LOAD, str(model_dir)))
    bf16_bytes = 2 * found["parameters"]
    ratio = found["peak"] / bf16_bytes
    print(f"\n{PRESET}: {found['parameters'] / 1e9:.2f}B parameters, bf16 size "
          f"{bf16_bytes / 1e9:.2f} GB (as loaded, Mamba's and the gates' fp32 parameters and "
          f"buffers included: {found['model_bytes'] / 1e9:.2f} GB), peak RSS "
          f"{found['peak'] / 1e9:.2f} GB (after imports {found['imports'] / 1e9:.2f} GB): "
          f"{ratio:.2f}x")
    assert found["fp32_parameters"] < 0.01 * found["parameters"]  # the rest is bf16
    assert ratio < 1.5
