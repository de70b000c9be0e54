"""A test-only defense that misbehaves on purpose, registered the way a user's plugin is
(``imports: [grid_faults]``, found in the spec's folder): the grid's fault tests inject failures
through it instead of hooks in product code.

``mode``: ``fail`` raises (until ``<dir>/fixed`` exists); ``hang`` blocks until the stage is cancelled (or an hour passes);
``die_once`` kills its worker process (os._exit, as an OOM kill would) the first time, once per
``dir``; ``die_always`` kills it every time, after appending a line to ``<dir>/kills``.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from defense.methods import DEFENSES, DefenseOutput, register_defense


@dataclass
class FaultParams:
    mode: str = "fail"
    dir: str = ""

    def check(self):
        if self.mode not in ("fail", "hang", "die_once", "die_always"):
            yield f"mode must be fail, hang, die_once or die_always, got {self.mode!r}"


if "fault" not in DEFENSES:
    @register_defense("fault", params=FaultParams)
    def fault(model, clean, p: FaultParams, ctx):
        d = Path(p.dir)
        if p.mode == "hang":
            threading.Event().wait(3600)  # only the runner's timeout (ray.cancel) ends it
        if p.mode == "die_always":
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "kills", "a") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(17)
        if p.mode == "die_once":
            d.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(d / "died", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os._exit(17)
            except FileExistsError:
                return DefenseOutput(model, {"survived": True})
        if (d / "fixed").exists():  # the user fixed the cause: a rerun of the same stage succeeds
            return DefenseOutput(model, {"fixed": True})
        ctx.log("fault: about to fail (a line the failure log keeps)")
        raise RuntimeError("injected failure in a defense stage (grid_faults)")
