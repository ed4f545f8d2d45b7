"""The host description and the host-aware constants (leanvit.ops.host): caches read from a sysfs tree, the rule
for explicit attention's slice, stored calibrations (in a temporary cache folder, never the user's), the switch that
ignores them, and exactness of every path whatever the slice."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import leanvit
from leanvit.ops import host
from leanvit.ops.fused_score import torch_scores
from leanvit.ops.host import MIB, Cache, Host
from leanvit.reduce import attention


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    """Calibrations go to a temporary cache folder; the rule's memo is cleared around every test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(host.ENV_CALIBRATION, raising=False)
    host._chunk_for.cache_clear()
    yield tmp_path / "cache" / "leanvit"
    host._chunk_for.cache_clear()


def fake_sysfs(root, layout: dict[int, list[tuple[int, str, str, str]]]) -> None:
    """``layout``: cpu -> [(level, type, size, shared_cpu_list)] written as sysfs cache entries."""
    for cpu, caches in layout.items():
        for i, (level, kind, size, shared) in enumerate(caches):
            d = root / f"cpu{cpu}" / "cache" / f"index{i}"
            d.mkdir(parents=True)
            for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
                (d / name).write_text(f"{value}\n")


def two_core_host(l2: str = "1024K", l3: str = "32768K") -> Host:
    return Host("Test CPU", "x86_64", (0, 1), (Cache(1, "Data", 32 << 10, (0,)), Cache(1, "Data", 32 << 10, (1,)),
                                               Cache(2, "Unified", host._size(l2), (0,)),
                                               Cache(2, "Unified", host._size(l2), (1,)),
                                               Cache(3, "Unified", host._size(l3), (0, 1))))


def test_caches_read_from_sysfs(tmp_path):
    fake_sysfs(tmp_path, {
        0: [(1, "Data", "48K", "0,2"), (1, "Instruction", "32K", "0,2"), (2, "Unified", "2048K", "0,2"),
            (3, "Unified", "105M", "0-3")],
        1: [(1, "Data", "48K", "1,3"), (2, "Unified", "2048K", "1,3"), (3, "Unified", "105M", "0-3")],
    })
    caches = host.read_caches((0, 1), root=tmp_path)
    assert [(c.level, c.size, c.cpus) for c in caches] == [
        (1, 48 << 10, (0, 2)), (1, 48 << 10, (1, 3)), (2, 2 * MIB, (0, 2)), (2, 2 * MIB, (1, 3)), (3, 105 * MIB,
                                                                                                    (0, 1, 2, 3))]
    assert host.read_caches((0,), root=tmp_path / "missing") == ()  # no sysfs: no caches, no error
    smt = Host("Xeon", "x86_64", (0, 1), caches)  # two CPUs of two cores whose L2 each serves two SMT siblings
    assert smt.summary() == "Xeon (2 cores; L2 2 MiB per 2 CPUs, L3 105 MiB)"
    assert host.derived_chunk_bytes(smt, 2) == 4 * MIB  # one L2 per thread: the two L2 caches of CPUs 0 and 1


def test_slice_rule_follows_the_reported_caches():
    amd = two_core_host()  # the project's host: L2 1 MiB per core, L3 32 MiB
    assert host.derived_chunk_bytes(amd, 1) == 1 * MIB
    assert host.derived_chunk_bytes(amd, 2) == 2 * MIB
    assert host.derived_chunk_bytes(amd, 8) == 2 * MIB  # one L2 per thread, up to the L2 caches there are
    assert host.derived_chunk_bytes(two_core_host("4096K"), 2) == 8 * MIB  # larger L2, larger slices
    assert host.derived_chunk_bytes(two_core_host("4096K", "8M"), 2) == 4 * MIB  # at most half the L3
    assert host.derived_chunk_bytes(two_core_host("64K", "1M"), 1) == host.MIN_CHUNK
    bare = Host("Unknown", "arm64", (0, 1, 2, 3))
    assert host.derived_chunk_bytes(bare, 3) == 3 * host.FALLBACK_L2  # no caches reported: the fallback per thread
    assert "L2 1 MiB per core, L3 32 MiB" in amd.summary() and "2 cores" in amd.summary()
    assert "caches not reported" in bare.summary()


def test_this_host_is_described():
    h = host.describe()
    assert h.cpus and h.processor
    assert host.probs_chunk_bytes(1) == host.derived_chunk_bytes(h, 1)  # nothing stored: the rule
    assert host.threads() == min(torch.get_num_threads(), len(h.cpus))


def test_stored_calibration_is_used_and_can_be_ignored(cache_folder, monkeypatch):
    path = host.calibration_path()
    assert path.parent == cache_folder and not path.exists()
    monkeypatch.setattr(host, "CALIBRATION_SHAPES", ((3, 2, 17, 8),))  # tiny: seconds would be too long here
    monkeypatch.setattr(host, "CALIBRATION_CHUNKS", (4096, 1 << 20))
    res = host.calibrate(n_threads=1, repeats=1)
    assert res["probs_chunk_bytes"] in (4096, 1 << 20) and set(res["times_ms"]) == {"4096", str(1 << 20)}
    stored = json.loads(path.read_text())
    assert stored["probs_chunk_bytes"] == {"1": res["probs_chunk_bytes"]}
    assert stored["host"]["cpus"] == len(host.describe().cpus)
    # a stored value wins over the rule for its thread count only
    path.write_text(json.dumps({**stored, "probs_chunk_bytes": {"1": 12345}}))
    host._chunk_for.cache_clear()
    assert host.probs_chunk_bytes(1) == 12345
    assert host.probs_chunk_bytes(2) == host.derived_chunk_bytes(host.describe(), 2)
    monkeypatch.setenv(host.ENV_CALIBRATION, "0")
    assert host.probs_chunk_bytes(1) == host.derived_chunk_bytes(host.describe(), 1)
    monkeypatch.delenv(host.ENV_CALIBRATION)
    assert "1 thread(s): 12.0557 KiB" in host.report(1)
    assert host.clear_calibration() and not path.exists() and not host.clear_calibration()
    assert host.probs_chunk_bytes(1) == host.derived_chunk_bytes(host.describe(), 1)


def test_a_broken_calibration_file_falls_back_to_the_rule(cache_folder):
    host.calibration_path().parent.mkdir(parents=True)
    host.calibration_path().write_text("{not json")
    assert host.probs_chunk_bytes(1) == host.derived_chunk_bytes(host.describe(), 1)


def test_inspect_command(capsys):
    host.main(["--threads", "1"])
    out = capsys.readouterr().out
    assert "explicit attention slice, rule:" in out and "in effect:" in out and str(host.calibration_path()) in out


def test_attention_reads_the_host_slice(monkeypatch):
    """``CPU_PROBS_CHUNK_BYTES`` unset: the host's value (here a stored calibration); set: that value."""
    q = torch.zeros(8, 3, 17, 4)
    per_image = 3 * 17 * 17 * 4
    monkeypatch.setattr(attention, "probs_chunk_bytes", lambda: 3 * per_image)
    assert attention.CPU_PROBS_CHUNK_BYTES is None and attention._slice_step(q) == 3
    monkeypatch.setattr(attention, "CPU_PROBS_CHUNK_BYTES", 1)
    assert attention._slice_step(q) == 1


@pytest.mark.parametrize("chunk", [1, 2 * 3 * 37 * 37 * 4, None, 1 << 30])  # one image, two, the host's, all
def test_every_method_path_is_exact_whatever_the_slice(monkeypatch, chunk):
    """GTP's sliced explicit attention, the compiled-CPU stats op and the fused score's torch pass give the same
    values at any slice (the whole batch at once as the reference)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=96, depth=3, embed_dim=48,
                              num_heads=3, num_classes=10).eval()
    leanvit.patch(model, "gtp", r=[4, 3, 5], alpha=0.3)
    x = torch.randn(5, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        monkeypatch.setattr(attention, "CPU_PROBS_CHUNK_BYTES", 1 << 40)
        whole = model(x)
        monkeypatch.setattr(attention, "CPU_PROBS_CHUNK_BYTES", chunk)
        sliced = model(x)
    assert torch.allclose(whole, sliced, atol=1e-5), (whole - sliced).abs().max()
    q, k, v = (torch.randn(5, 3, 37, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    bias = torch.rand(5, 37, generator=torch.Generator().manual_seed(4)).log()
    out, diag, col = attention.explicit_attention_stats(q, k, v, bias[:, None, None, :], 0.25)
    probs = ((q @ k.transpose(-1, -2)) * 0.25 + bias[:, None, None, :]).softmax(-1)
    assert torch.allclose(out, probs @ v, atol=1e-5)
    assert torch.allclose(diag, probs.diagonal(dim1=-2, dim2=-1), atol=1e-6)
    assert torch.allclose(col, probs.sum(-2), atol=1e-5)
    d, c = torch_scores(q, k, bias, 0.25, chunk_bytes=chunk)
    assert torch.allclose(d, diag, atol=1e-6) and torch.allclose(c, col, atol=1e-5)
