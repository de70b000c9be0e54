"""ResourceCache: content keys, reuse on the second call, checksums, atomic writes; the shared
clean reference model is trained once."""
from __future__ import annotations

import torch

from defense.resources import ResourceCache, clean_reference_model, get_resource, resource_key


def test_key_is_canonical_and_sensitive():
    a = resource_key("k", {"x": 1, "y": [1, 2]}, "1")
    assert a == resource_key("k", {"y": (1, 2), "x": 1}, "1")  # key order and tuple/list do not matter
    assert a != resource_key("k", {"x": 2, "y": [1, 2]}, "1")
    assert a != resource_key("k", {"x": 1, "y": [1, 2]}, "2")  # code version
    assert a != resource_key("other", {"x": 1, "y": [1, 2]}, "1")
    assert len(a) == 64


def test_second_call_reuses_and_corrupt_entry_is_recomputed(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(3)}

    cache = ResourceCache(tmp_path)
    a = cache.get_or_compute("thing", {"p": 1}, compute)
    b = ResourceCache(tmp_path).get_or_compute("thing", {"p": 1}, compute)  # a fresh instance reads from disk
    assert len(calls) == 1
    assert torch.equal(a["w"], b["w"]) and int(b["n"]) == 3
    cache.get_or_compute("thing", {"p": 2}, compute)  # another config is another resource
    assert len(calls) == 2
    # no temporary files are left behind, and the checksum sits beside the payload
    key = resource_key("thing", {"p": 1})
    files = sorted(q.name for q in (tmp_path / "thing").iterdir())
    assert f"{key}.pt" in files and f"{key}.sha256" in files and not any(f.endswith(".tmp") for f in files)
    # flip a byte: the checksum fails, the entry is recomputed and rewritten
    p = cache.path("thing", key)
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    p.write_bytes(bytes(blob))
    assert cache.load("thing", key) is None
    c = cache.get_or_compute("thing", {"p": 1}, compute)
    assert len(calls) == 3 and torch.equal(c["w"], a["w"])
    assert cache.load("thing", key) is not None


def test_no_cache_computes_every_time_and_logs():
    calls, log = [], {}
    for _ in range(2):
        get_resource(None, "k", {"a": 1}, lambda: calls.append(1) or {"t": torch.zeros(1)}, log=log)
    assert len(calls) == 2
    assert [r["computed"] for r in log["resources"]] == [True, True]


def test_clean_reference_model_is_cached(tmp_path, small_data):
    from defense.attacks import AttackContext
    from defense.train import get_recipe

    train, _ = small_data
    sub = train.subset(torch.arange(256))
    ctx = AttackContext(arch="tiny_cnn", device="cpu", resources=ResourceCache(tmp_path),
                        recipe=get_recipe("fast", batch_size=64, lr=0.1))
    log: dict = {}
    m1 = clean_reference_model(sub, ctx, epochs=1, log=log)
    m2 = clean_reference_model(sub, ctx, epochs=1, log=log)
    assert [r["computed"] for r in log["resources"]] == [True, False]
    for (k, v), (_, w) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(v, w), k
    clean_reference_model(sub, ctx, epochs=2, log=log)  # other epochs: another model
    assert log["resources"][-1]["computed"]
