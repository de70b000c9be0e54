"""Extract the numbers of BackdoorBench's leaderboard pages into ``backdoorbench_leaderboard_html.csv``
and count where they differ from ``backdoorbench_results.csv``.

Usage (GIT_DIR: a clone of github.com/backdoorbench/backdoorbench.github.io):
    python results/published/extract_html.py GIT_DIR [COMMIT]

Each page ``leaderboard-<dataset>.html`` holds one table per poisoning ratio in a
``<div id="pratio-0_1">`` pane (the id names the ratio: the 0.1% pane's numbers equal the CSV's
0.001 rows). Rows: architecture, attack, then CA/ASR/RA for the 16 defenses of the header
(No Defense, FT, FP, NAD, NC, ANP, AC, SS, ABL, DBD, CLP, D-BR, D-ST, DDE, i-BAU, MBNS), in percent
with two decimals, 'N/A' where not run. Written in the CSV's own names and columns (fractions), so
``results.published`` reads both files alike.
"""
from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGES = {"leaderboard-cifar10.html": "cifar10", "leaderboard-cifar100.html": "cifar100",
         "leaderboard-gtsrb.html": "gtsrb", "leaderboard-tinyimagenet.html": "tiny"}
HEADER = ["No Defense", "FT", "FP", "NAD", "NC", "ANP", "AC", "SS", "ABL", "DBD", "CLP", "D-BR", "D-ST", "DDE",
          "i-BAU", "MBNS"]
DEFENSES = ["no defense", "ft", "fp", "nad", "nc", "anp", "ac", "spectral", "abl", "dbd", "clp", "d-br", "d-st",
            "dde", "i-bau", "mbns"]  # the CSV's names, in the header's order
MODELS = {"PreActResNet-18": "preactresnet18", "VGG19_BN": "vgg19_bn", "ConvNext_tiny": "convnext_tiny",
          "ViT_b_16": "vit_b_16"}
ATTACKS = {"BadNet": "badnet", "Blended": "blended", "LC": "lc", "SIG": "sig", "LF": "lf", "SSBA": "ssba",
           "WaNet": "wanet", "InputAware": "inputaware", "BPP": "bpp", "TrojanNN": "trojannn", "Blind": "blind",
           "LIRA": "lira"}


def rows_of(page: str, dataset: str) -> list[dict]:
    heads = re.findall(r'colspan="3">([^<]+)<', page)[:16]
    if heads != HEADER:
        raise SystemExit(f"{dataset}: unexpected defense header {heads}")
    out = []
    parts = re.split(r'<div id="pratio-([0-9_]+)"', page)
    for i in range(1, len(parts), 2):
        ratio = float(parts[i].replace("_", "."))
        for model, attack, rest in re.findall(
                r'<td class="td_attack">([^<]+)</td><td class="td_attack">([^<]+)</td>(.*?)</tr>', parts[i + 1]):
            vals = re.findall(r"<td>([^<]*)</td>", rest)
            if len(vals) != 48 or model not in MODELS or attack not in ATTACKS:
                raise SystemExit(f"{dataset} {ratio}: unexpected row {model} / {attack} with {len(vals)} values")
            for j, d in enumerate(DEFENSES):
                v = vals[3 * j:3 * j + 3]
                if "N/A" in v:
                    continue
                out.append({"dataset": dataset, "backbone": MODELS[model], "attack_name": ATTACKS[attack],
                            "defense_name": d, "ratio": ratio,
                            **{k: round(float(x) / 100, 6) for k, x in zip(("test_acc", "test_asr", "test_ra"), v)}})
    return out


def main(git_dir: str, commit: str = "HEAD") -> None:
    rows = []
    for page, dataset in PAGES.items():
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{page}"], check=True,
                              capture_output=True, text=True).stdout
        rows += rows_of(text, dataset)
    with open(HERE / "backdoorbench_leaderboard_html.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    # where both have a number: equal to the page's two decimals?
    with open(HERE / "backdoorbench_results.csv") as f:
        ref = {(r["dataset"], r["backbone"], r["attack_name"], r["defense_name"], float(r["ratio"])): r
               for r in csv.DictReader(f)}
    same = differ = only_html = 0
    for r in rows:
        c = ref.get((r["dataset"], r["backbone"], r["attack_name"], r["defense_name"], r["ratio"]))
        cv = [float(c[k]) if c and c[k] not in ("",) else -1.0 for k in ("test_acc", "test_asr", "test_ra")]
        if min(cv) < 0:
            only_html += 1
        elif all(abs(round(a * 100, 2) - b * 100) < 0.011 for a, b in
                 zip(cv, (r["test_acc"], r["test_asr"], r["test_ra"]))):
            same += 1
        else:
            differ += 1
    on_pages = {(r["dataset"], r["backbone"], r["attack_name"], r["defense_name"], r["ratio"]) for r in rows}
    only_csv = sum(1 for k, c in ref.items() if k not in on_pages and c["test_acc"] not in ("", "-1.0", "-1"))
    print(f"{len(rows)} cells with numbers on the pages: {same} equal to the CSV (2 decimals), {differ} differ, "
          f"{only_html} not in the CSV; {only_csv} CSV cells with numbers are not on the pages")


if __name__ == "__main__":
    main(*sys.argv[1:])
