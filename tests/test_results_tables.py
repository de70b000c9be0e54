"""Paper tables on a small hand-made fixture: every expected number below is worked out by hand
from the rows in ``fixture`` (percent, mean and sample std over seeds)."""
from __future__ import annotations

import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pandas as pd
import pytest

import results
from results.published import load_published
from results.tables import pivot, render

BASE = dict(dataset="synthetic", arch="tiny_cnn", pratio=0.1, target=0, split="test")

# (attack, defense, seed, acc, asr, der)
ROWS = [
    ("badnets", "none", 0, 0.90, 0.95, 0.5), ("badnets", "none", 1, 0.92, 0.97, 0.5),
    ("badnets", "ft", 0, 0.88, 0.10, 0.90), ("badnets", "ft", 1, 0.86, 0.20, 0.85),
    ("badnets", "tsbd", 0, 0.89, 0.02, 0.95), ("badnets", "tsbd", 1, 0.90, 0.04, 0.96),
    ("blended", "none", 0, 0.93, 0.99, 0.5), ("blended", "none", 1, 0.93, 0.99, 0.5),
    # blended / ft is missing on purpose; blended / tsbd has one seed of two
    ("blended", "tsbd", 0, 0.91, 0.05, 0.97),
]


@pytest.fixture()
def fixture(tmp_path):
    for i, (a, d, s, acc, asr, der) in enumerate(ROWS):
        results.write_stage(tmp_path, "eval", f"k{i}", [dict(BASE, attack=a, defense=d, seed=s, acc=acc, asr=asr,
                                                             der=der, ra=acc - 0.1)])
    # rows that must not enter the default table: the tuning split, and another dataset
    results.write_stage(tmp_path, "eval", "val", [dict(BASE, attack="badnets", defense="tsbd", seed=0, split="val",
                                                       acc=0.10, asr=0.10, der=0.10)])
    results.write_stage(tmp_path, "eval", "c10", [dict(BASE, dataset="cifar10", attack="badnets", defense="ft",
                                                       seed=0, acc=0.80, asr=0.30, der=0.70)])
    return tmp_path


def test_pivot_values_by_hand(fixture):
    p = pivot(results.load(fixture), filters={"dataset": ["synthetic"]})
    assert p.row_keys == [("badnets",), ("blended",)]
    assert p.col_keys == [("none",), ("ft",), ("tsbd",)]  # none first, TSBD last
    c = p.cells
    ft_asr = c[(("badnets",), ("ft",), "asr")]
    assert (ft_asr.mean, ft_asr.n) == (pytest.approx(15.0), 2)
    assert ft_asr.std == pytest.approx(7.0710678)  # sample std of 10, 20
    assert c[(("badnets",), ("none",), "acc")].mean == pytest.approx(91.0)
    assert c[(("badnets",), ("none",), "acc")].std == pytest.approx(1.4142136)
    assert c[(("badnets",), ("tsbd",), "der")].mean == pytest.approx(95.5)
    one = c[(("blended",), ("tsbd",), "acc")]
    assert (one.mean, one.n) == (pytest.approx(91.0), 1) and one.std != one.std  # NaN std for one seed
    assert (("blended",), ("ft",), "acc") not in c
    assert (("badnets",), ("none",), "der") not in c  # DER is not defined without a defense
    assert p.expected_n == 2


def test_markdown_table_marks_best_counts_seeds_and_names_missing_cells(fixture):
    md = results.markdown(results.load(fixture), filters={"dataset": ["synthetic"]})
    lines = md.splitlines()
    # no "No defense DER" column: DER is not defined without a defense, a column of dashes says nothing
    assert lines[0] == ("| Attack | No defense ACC | No defense ASR | FT ACC | FT ASR | FT DER "
                        "| TSBD ACC | TSBD ASR | TSBD DER |")
    assert lines[2] == ("| BadNets | 91.0 ± 1.4 | 96.0 ± 1.4 | 87.0 ± 1.4 | 15.0 ± 7.1 | 87.5 ± 3.5 "
                        "| **89.5 ± 0.7** | **3.0 ± 1.4** | **95.5 ± 0.7** |")
    # only one defense with numbers for Blended: nothing to mark best; one seed of two: (n=1)
    assert lines[3] == "| Blended | 93.0 ± 0.0 | 99.0 ± 0.0 | — | — | — | 91.0 (n=1) | 5.0 (n=1) | 97.0 (n=1) |"
    assert "no result for: (attack=blended, defense=ft)" in md
    assert "(n=k)" in md
    assert results.paper_table is results.markdown


def test_best_is_lowest_asr_and_highest_acc():
    df = pd.DataFrame([dict(BASE, attack="badnets", defense=d, seed=0, acc=acc, asr=asr, der=0.5, key=d,
                            written_at=pd.Timestamp("2024-01-01", tz="UTC"))
                       for d, acc, asr in [("none", 0.95, 0.99), ("ft", 0.90, 0.30), ("fp", 0.80, 0.05)]])
    md = results.markdown(df, metrics=("acc", "asr"))
    row = md.splitlines()[2]
    assert row == "| BadNets | 95.0 | 99.0 | **90.0** | 30.0 | 80.0 | **5.0** |"  # none never bold


def test_split_and_filters_select_rows(fixture):
    df = results.load(fixture)
    val = pivot(df, split="val")
    assert val.cells[(("badnets",), ("tsbd",), "acc")].mean == pytest.approx(10.0)
    c10 = pivot(df, filters={"dataset": ["cifar10"], "pratio": ["0.10"]})  # numeric match: 0.10 == 0.1
    assert c10.row_keys == [("badnets",)] and c10.col_keys == [("ft",)]
    mixed = pivot(df)  # synthetic and cifar10 rows in one ft cell: the table says so
    assert any("differing dataset" in n for n in mixed.notes)
    with pytest.raises(ValueError, match="no such column"):
        pivot(df, filters={"nope": ["x"]})
    with pytest.raises(ValueError, match="unknown metric"):
        pivot(df, metrics=("accuracy",))


def test_filter_defense_matches_label_or_method_name():
    from results.tables import select

    # a swept tsbd (label + defense_name), and hand-written rows without defense_name (label only)
    df = pd.DataFrame({"defense": ["tsbd(n=0.1)", "tsbd(n=0.3)", "tsbd", "ft"],
                       "defense_name": ["tsbd", "tsbd", None, None], "split": "test"})
    assert list(select(df, {"defense": ["tsbd"]})["defense"]) == ["tsbd(n=0.1)", "tsbd(n=0.3)", "tsbd"]
    assert list(select(df, {"defense": ["tsbd(n=0.3)"]})["defense"]) == ["tsbd(n=0.3)"]
    assert list(select(df, {"defense_name": ["tsbd"]})["defense"]) == ["tsbd(n=0.1)", "tsbd(n=0.3)", "tsbd"]
    # without any defense_name column, defense_name falls back to the label, and is a valid column
    plain = df.drop(columns="defense_name")
    assert list(select(plain, {"defense_name": ["ft"]})["defense"]) == ["ft"]
    with pytest.raises(ValueError, match="no such column.*defense_name"):
        select(plain, {"nope": ["x"]})


def test_rows_and_cols_are_configurable(fixture):
    p = pivot(results.load(fixture), metrics=("ra",), rows="defense", cols="attack",
              filters={"dataset": ["synthetic"]})
    assert p.row_keys == [("none",), ("ft",), ("tsbd",)]
    assert p.cells[(("ft",), ("badnets",), "ra")].mean == pytest.approx(77.0)  # (0.78 + 0.76) / 2


def test_empty_selection_says_so(fixture):
    text, notes = render(results.load(fixture), "md", filters={"attack": ["nope"]})
    assert "No results match" in text and notes
    text, _ = render(pd.DataFrame(), "latex")
    assert text.startswith("% No results")


def _check_latex(tex: str) -> None:
    """Structural parse: one tabular, balanced braces, every row has as many cells as the spec."""
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    assert body.count(r"\begin{tabular}") == 1 and body.count(r"\end{tabular}") == 1
    unescaped = re.sub(r"\\[{}]", "", body)
    depth = 0
    for ch in unescaped:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    spec = re.search(r"\\begin\{tabular\}\{([^}]*)\}", body).group(1)
    ncols = len(re.findall(r"[lrc]", spec))
    for k in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert body.count(k) == 1
    rows = [line for line in body.splitlines() if line.rstrip().endswith(r"\\")]
    assert len(rows) >= 3
    for line in rows:
        cells = re.split(r"(?<!\\)&", line)
        spans = sum(int(m) for m in re.findall(r"\\multicolumn\{(\d+)\}", line))
        n_multi = len(re.findall(r"\\multicolumn", line))
        assert len(cells) - n_multi + spans == ncols, line


def test_latex_is_booktabs_and_parses(fixture):
    tex, _ = render(results.load(fixture), "latex", filters={"dataset": ["synthetic"]})
    _check_latex(tex)
    # No defense has two columns (no DER), FT and TSBD three each: rules 2-3, 4-6, 7-9
    assert r"\multicolumn{2}{c}{No defense}" in tex and r"\cmidrule(lr){2-3}" in tex
    assert r"\multicolumn{3}{c}{TSBD}" in tex and r"\cmidrule(lr){7-9}" in tex
    assert r"\begin{table}" in tex and r"\caption{" in tex and r"\label{tab:bdgrid}" in tex
    assert r"\textbf{3.0 $\pm$ 1.4}" in tex
    assert "91.0 (n=1)" in tex and "---" in tex
    assert "% — no result for: (attack=blended, defense=ft)." in tex


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no TeX engine here; .ci/run installs texlive")
def test_latex_compiles_in_a_minimal_document(fixture, tmp_path):
    tex, _ = render(results.load(fixture), "latex", filters={"dataset": ["synthetic"]})
    tex2, _ = render(results.load(fixture), "latex", filters={"dataset": ["synthetic"]}, compare_with="backdoorbench")
    (tmp_path / "t1.tex").write_text(tex)
    (tmp_path / "t2.tex").write_text(tex2)
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                      "\\input{t1}\n\n\\input{t2}\n\\end{document}\n")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.bold = [], 0

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)
        self.bold += tag == "b"

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, tag


def test_html_is_well_formed(fixture):
    text, _ = render(results.load(fixture), "html", filters={"dataset": ["synthetic"]})
    t = _Tags()
    t.feed(text)
    assert t.stack == [] and t.bold == 3  # the three best TSBD cells of the BadNets row
    assert '<th colspan="3">FT</th>' in text


def test_csv_is_tidy(fixture):
    text, notes = render(results.load(fixture), "csv", filters={"dataset": ["synthetic"]})
    df = pd.read_csv(io.StringIO(text))
    r = df[(df.attack == "badnets") & (df.defense == "ft") & (df.metric == "asr")].iloc[0]
    assert (r["mean"], r["n"], r["best"]) == (pytest.approx(15.0), 2, 0)
    assert r["std"] == pytest.approx(7.0710678, rel=1e-5)
    assert not ((df.attack == "blended") & (df.defense == "ft")).any()
    assert any("no result for" in n for n in notes)


def test_tuned_on_marks_cells_and_lists_attacks(tmp_path):
    for i, (a, tuned) in enumerate([("badnets", "badnets,blended"), ("wanet", "badnets,blended")]):
        results.write_stage(tmp_path, "eval", f"t{i}", [dict(BASE, attack=a, defense="tsbd", seed=0, acc=0.9, asr=0.1,
                                                             der=0.9, tuned_on=tuned)])
        results.write_stage(tmp_path, "eval", f"n{i}", [dict(BASE, attack=a, defense="none", seed=0, acc=0.9, asr=0.9)])
    md = results.markdown(results.load(tmp_path))
    lines = md.splitlines()
    assert "90.0 †" in lines[2] and "†" not in lines[3]  # BadNets was tuned on, WaNet held out
    assert "Tuned on: TSBD: BadNets, Blended" in md


def test_published_backdoorbench_numbers():
    pub = load_published("backdoorbench")
    # 5242 cells of static/data/results.csv with numbers (of 15360 rows; the rest empty or -1) and 5696 cells
    # found only on the leaderboard pages (results/published/README.md)
    assert len(pub) == 5242 + 5696 and (pub.source == "bb-results.csv").sum() == 5242
    c10 = pub[(pub.dataset == "cifar10") & (pub.arch == "preact_resnet18") & (pub.pratio == 0.1)]
    c10 = c10.set_index(["attack", "defense"])
    # as published (fractions in the CSV, x100 here); the leaderboard page shows them to 2 decimals
    assert c10.loc[("badnets", "none"), "acc"] == pytest.approx(91.32)
    assert c10.loc[("sig", "none"), "asr"] == pytest.approx(98.27, abs=0.005)
    assert c10.loc[("inputaware", "none"), "acc"] == pytest.approx(90.67)
    ft = c10.loc[("badnets", "ft")]
    assert (ft["acc"], ft["asr"]) == (pytest.approx(89.96, abs=0.005), pytest.approx(1.48, abs=0.005))
    assert ft["der"] == pytest.approx(96.1, abs=0.01)  # derived, matches the leaderboard's 96.1
    assert {"badnets", "blended", "wanet", "inputaware", "lf", "ssba", "trojannn", "sig", "lc", "lira", "bpp",
            "blind"} == set(c10.index.get_level_values("attack"))
    assert set(pub.dataset) == {"cifar10", "cifar100", "gtsrb", "tiny-imagenet"}
    assert set(pub.arch) == {"preact_resnet18", "vgg19_bn", "vit_b_16", "convnext_tiny"}


def test_compare_shows_ours_theirs_and_difference(fixture):
    md, notes = render(results.load(fixture), "md", filters={"dataset": ["synthetic"]}, compare_with="backdoorbench")
    lines = md.splitlines()
    assert lines[0].startswith("| Attack | Defense | ACC ours | ACC BackdoorBench | ACC Δ | ASR ours")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in lines[2:] if line.startswith("| ")}
    none = [c.strip() for c in rows[("BadNets", "No defense")].split("|")[3:-1]]
    assert none[:6] == ["91.0 ± 1.4", "91.32", "-0.3", "96.0 ± 1.4", "95.03", "+1.0"]
    ft = [c.strip() for c in rows[("BadNets", "FT")].split("|")[3:-1]]
    assert ft == ["87.0 ± 1.4", "89.96", "-3.0", "15.0 ± 7.1", "1.48", "+13.5", "87.5 ± 3.5", "96.10", "-8.6"]
    tsbd = [c.strip() for c in rows[("BadNets", "TSBD")].split("|")[3:-1]]
    assert tsbd[1] == "—" and tsbd[2] == "—"  # not published
    assert any("dataset=synthetic" in n for n in notes)  # comparing across settings is flagged
    with pytest.raises(ValueError, match="unknown published source"):
        render(results.load(fixture), "md", compare_with="nowhere")


def test_weak_backdoor_and_chance_accuracy_are_marked_and_their_der_hidden():
    rows = []
    for attack, bd_acc, bd_asr in (("badnets", 0.90, 0.401), ("blended", 0.12, 0.99), ("wanet", 0.90, 0.97)):
        for defense, acc, asr in (("none", bd_acc, bd_asr), ("tsbd", bd_acc - 0.02, 0.05)):
            rows.append(dict(BASE, attack=attack, defense=defense, seed=0, acc=acc, asr=asr, bd_acc=bd_acc,
                             bd_asr=bd_asr, der=0.618))
    p = pivot(pd.DataFrame(rows))
    assert p.weak == {(("badnets",), ("none",)), (("badnets",), ("tsbd",)), (("blended",), ("none",)),
                      (("blended",), ("tsbd",))}  # 40.1% ASR before: no backdoor; 12% ACC on 10 classes: no task
    text, notes = render(pd.DataFrame(rows), "md")
    line = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "61.8" not in line["BadNets"] and "‡" in line["BadNets"]  # the DER is not shown as if meaningful
    assert "61.8" in line["WaNet"] and "‡" not in line["WaNet"]
    assert any("not a meaningful starting point" in n and "below 50%" in n for n in notes)


def test_a_failed_stage_is_a_failed_cell_with_its_file_in_a_note():
    rows = [dict(BASE, attack="badnets", defense=d, seed=0, acc=0.9, asr=a, bd_acc=0.9, bd_asr=0.97, der=0.9)
            for d, a in (("none", 0.97), ("ft", 0.5))]
    failures = [{"stage": "defense[...]", "error": "RuntimeError: boom", "file": "/runs/x/failures/defense-abc.txt",
                 "info": {"dataset": "synthetic", "attack": "badnets", "defense": "tsbd"}}]
    p = pivot(pd.DataFrame(rows), failures=failures)
    assert (("badnets",), ("tsbd",)) in p.failed and ("tsbd",) in p.col_keys  # a column for it though nothing finished
    text, notes = render(pd.DataFrame(rows), "md", failures=failures)
    assert "| failed |" in text.replace("failed  ", "failed ") or " failed " in text
    assert any("defense-abc.txt" in n for n in notes)
    assert not any("no result for" in n and "tsbd" in n for n in notes)  # failed, not silently missing


def test_rnp_and_nwc_fp_have_their_names_and_places():
    rows = [dict(BASE, attack="badnets", defense=d, seed=0, acc=0.9, asr=0.1, der=0.9)
            for d in ("tsbd", "rnp", "none", "nwc_fp", "ft")]
    p = pivot(pd.DataFrame(rows))
    assert [k[0] for k in p.col_keys] == ["none", "ft", "rnp", "nwc_fp", "tsbd"]
    text, _ = render(pd.DataFrame(rows), "md")
    assert "RNP" in text and "NWC-FP" in text
