"""How long the light commands take, and whether they import torch.

    python benchmarks/bench_cli_startup.py [--repeats 10]

Target (issue 2): `inferopt --help` and `inferopt plugins` each under 0.5 s, without torch.
Prints the median and max wall time of each over several runs, with `python -c pass` as the
interpreter's own start-up for reference.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the console script of the environment running this benchmark, else the one on PATH
_BESIDE = Path(sys.executable).with_name("inferopt")
SCRIPT = str(_BESIDE) if _BESIDE.exists() else (shutil.which("inferopt") or "inferopt")

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "inferopt --help": [SCRIPT, "--help"],
    "inferopt plugins": [SCRIPT, "plugins"],
    "inferopt plugins --json": [SCRIPT, "plugins", "--json"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not Path(SCRIPT).exists():
        sys.exit("the inferopt command was not found; install the package first")
    print(f"{'command':26} {'median s':>9} {'max s':>7}  torch imported")
    for label, cmd in COMMANDS.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        probe = "n/a"
        if cmd[0] == SCRIPT:
            code = ("import sys\nfrom inferopt._cli import main\n"
                    f"try:\n    main({cmd[1:]!r})\nexcept SystemExit:\n    pass\n"
                    "sys.stderr.write(str('torch' in sys.modules))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            probe = out.stderr.strip().splitlines()[-1]
        print(f"{label:26} {statistics.median(times):9.3f} {max(times):7.3f}  {probe}")


if __name__ == "__main__":
    main()
