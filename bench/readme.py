"""Rewrites the README's benchmark tables from the published results
(bench/results/NAME.json): each scenario's tables stand between the markers
<!-- bench:NAME --> and <!-- /bench:NAME -->, under a line saying where and when they
were measured."""

import json
import re

from lib import RESULTS, ROOT

README = ROOT / "README.md"


def provenance(machine):
    return (f"_Measured on {machine['nproc']} cores ({machine['cpu']}), {machine['memory_gib']} GiB, "
            f"PostgreSQL {machine['postgres'].split()[0]}, commit {machine['commit']}, "
            f"{machine['when'][:10]}._")


def update(scenarios):
    text = README.read_text()
    for name, scenario in scenarios.items():
        # NAME.json, and NAME.TAG.json of tagged runs (run.py --tag; smoke runs are not published).
        paths = [p for p in sorted(RESULTS.glob(f"{name}.*json"))
                 if p.name == f"{name}.json" or p.name.count(".") == 2 and not p.name.endswith(".smoke.json")]
        if not paths:
            print(f"  {name}: no results yet, README left as it is")
        for path in paths:
            result = json.loads(path.read_text())
            block = provenance(result["machine"]) + "\n\n" + scenario.tables(result)
            key = re.escape(path.name[: -len(".json")])
            marker = re.compile(rf"(<!-- bench:{key} -->\n).*?(\n<!-- /bench:{key} -->)", re.S)
            text, found = marker.subn(lambda m: m.group(1) + block + m.group(2), text)
            if found != 1:
                raise SystemExit(f"README.md needs one pair of <!-- bench:{path.name[:-5]} --> markers")
            print(f"  {name}: tables from {path.relative_to(ROOT)}")
    README.write_text(text)
