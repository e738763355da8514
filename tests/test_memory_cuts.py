"""Peak-memory cuts of the finetune script: glibc's mmap threshold stays fixed (limit_malloc_caching)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_grass import report

ROOT = Path(__file__).resolve().parents[1]
needs_glibc = pytest.mark.skipif(report._glibc() is None, reason="needs glibc (mallopt)")

# In a fresh process: free one 8 MiB tensor (glibc then raises its mmap threshold to 8 MiB unless
# it is fixed), then allocate 200 tensors of 1 MiB, free every other one and report how much
# memory stayed resident (the 100 MiB kept, plus the freed holes that glibc's heap keeps).
PROBE = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from hf_grass.report import limit_malloc_caching

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

applied = limit_malloc_caching() if sys.argv[2] == "1" else False
big = torch.ones(8 << 18)  # 8 MiB
del big
before = rss()
pairs = [(torch.ones(1 << 18), torch.ones(1 << 18)) for _ in range(100)]  # 200 x 1 MiB
keep = [second for _, second in pairs]
del pairs  # frees every other 1 MiB tensor: holes between the kept ones
print(json.dumps({"applied": applied, "kept": rss() - before}))
"""


def probe(limit: bool, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.pop(report.MALLOC_ENV, None)
    environ.update(OMP_NUM_THREADS="1", **env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), "1" if limit else "0"],
        capture_output=True,
        text=True,
        env=environ,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@needs_glibc
def test_fixed_threshold_returns_freed_tensors_to_the_system():
    default = probe(limit=False)
    limited = probe(limit=True)
    assert limited["applied"] and not default["applied"]
    # glibc's dynamic threshold keeps the freed 100 MiB in the heap; the fixed one unmaps them.
    assert default["kept"] > 180 * 2**20
    assert limited["kept"] < 120 * 2**20


@needs_glibc
@pytest.mark.parametrize(
    "env", [{report.MALLOC_ENV: "0"}, {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}]
)
def test_opt_out_and_the_users_own_setting_win(env):
    assert probe(limit=True, **env)["applied"] is False


def test_without_glibc_it_does_nothing(monkeypatch):
    monkeypatch.delenv(report.MALLOC_ENV, raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(report, "_glibc", lambda: None)
    assert report.limit_malloc_caching() is False


def test_finetune_limits_malloc_caching_before_loading_data_when_asked(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "scripts" / "finetune.py")
    finetune = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "finetune", finetune)
    spec.loader.exec_module(finetune)
    calls = []

    class Stop(Exception):
        pass

    def load_raw_data(*args, **kwargs):
        calls.append("load_raw_data")
        raise Stop

    monkeypatch.setattr(finetune, "limit_malloc_caching", lambda: calls.append("limit"))
    monkeypatch.setattr(finetune, "load_raw_data", load_raw_data)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    flags = ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(Stop):
        finetune.main(flags)
    assert calls == ["load_raw_data"]  # off by default: it costs CPU time
    calls.clear()
    with pytest.raises(Stop):
        finetune.main([*flags, "--limit_malloc_caching"])
    assert calls == ["limit", "load_raw_data"]
