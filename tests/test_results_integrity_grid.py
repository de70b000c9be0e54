"""End to end on a tiny real grid (synthetic data, tiny_cnn, real Ray): one bit flipped in a value
of an eval's result file is detected by the next ``bdgrid run``, which recomputes that eval alone,
sets the damaged file aside and writes the original number back."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

import results
from grid.run import execute_plan
from grid.spec import parse_spec
from grid.validate import validate
from results.writer import stage_path

SPEC = """\
name: g
datasets:
  - name: synthetic
    params: {n_train: 400, n_test: 200}
archs: [tiny_cnn]
attacks: [badnets]
pratios: [0.1]
seeds: [0]
defenses: [none]
recipe: fast
epochs: 1
retries: 0
resources:
  attack: {cpus: 1}
"""


def run(out: Path):
    ls, probs = parse_spec(SPEC, "spec.yaml", out.parent)
    assert not probs and not validate(ls, 0)
    return execute_plan(ls, out, show_progress=False)


def executed(out: Path) -> list[str]:
    return [ln.split()[0] for ln in (out / "executed.log").read_text().splitlines()]


@pytest.mark.slow
def test_bit_flip_in_an_eval_result_is_recomputed_with_the_original_number(ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    res = run(out)
    assert res.ok, res.failed
    (ev,) = res.plan.of_kind("eval")
    before = results.load(out).sort_values("split").reset_index(drop=True)
    acc = float(before.loc[before.split == "test", "acc"].iloc[0])
    path = stage_path(out, "eval", ev.key)
    blob = bytearray(path.read_bytes())
    i = blob.find(struct.pack("<d", acc))
    assert i >= 0
    blob[i + 6] ^= 0x04  # a mantissa bit: the value stays a plausible fraction
    path.write_bytes(bytes(blob))
    damaged = bytes(blob)
    n_exec = len(executed(out))

    again = run(out)
    assert again.ok, again.failed
    # only the eval ran again (with the in-memory data stage it reads); the backdoored model was reused
    assert ev.key in again.done and {again.plan.stages[k].kind for k in again.done} == {"data", "eval"}
    assert sorted(executed(out)[n_exec:]) == ["data", "eval"]
    assert str(path) in capsys.readouterr().err
    after = results.load(out).sort_values("split").reset_index(drop=True)
    for c in ("acc", "asr", "ra", "der", "bd_acc", "bd_asr", "bd_ra"):
        assert after[c].tolist() == before[c].tolist(), c  # the exact numbers are back
    (kept,) = (out / "damaged" / "results").iterdir()
    assert kept.read_bytes() == damaged  # set aside, not deleted
    assert not run(out).done  # and now everything counts as done again
