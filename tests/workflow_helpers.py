"""Running the real workflow in tests: a config in a temporary folder, Snakemake as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def workdir(tmp: Path, config: dict) -> Path:
    """Write ``config`` as ``tmp/config/config.yaml`` (the Snakefile's configfile)."""
    (tmp / "config").mkdir(parents=True, exist_ok=True)
    (tmp / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp


def snakemake(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the repository's Snakefile in ``work``; raise with its stderr when ``check`` fails."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
           "--directory", str(work), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


class ReportPage(HTMLParser):
    """Ids, image sources, non-inline references and text of an HTML report."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.img_src: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.img_src.append(a.get("src", ""))
        for key in ("src", "href"):
            v = a.get(key) or ""
            if tag != "a" and v and not v.startswith("data:"):
                self.external.append(v)

    def handle_data(self, data):
        self.text.append(data)
