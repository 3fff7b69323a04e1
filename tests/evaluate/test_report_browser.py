"""The report in headless Chromium (Debian's `chromium`): no console errors, every image renders, and
nothing is fetched from the network (all name resolution is made to fail).

A probe script is injected into a copy of the page (the report itself carries no script): it records
JavaScript errors, console.error calls and failed resource loads, and on `load` writes them and the
images' naturalWidth checks into the DOM, which Chromium then dumps. A control page with a broken
image, a network image and a script error shows the probe catches each.
"""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from diffkd.evaluate.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="Debian chromium not installed (/usr/bin/chromium); CI installs it with apt-get")

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__errors.push(t && t !== window ? 'failed to load ' + String(t.src || t.href).slice(0, 80)
                                         : String(e.message));
}, true);
var originalError = console.error;
console.error = function () {
  window.__errors.push(Array.prototype.join.call(arguments, ' '));
  originalError.apply(console, arguments);
};
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.alt || String(i.src).slice(0, 60); });
  var out = document.createElement('pre');
  out.id = '__probe';
  out.textContent = JSON.stringify({images: imgs.length, broken: broken, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def render(page: Path, tmp_path: Path) -> tuple[dict, str]:
    probed = tmp_path / f"probed_{page.name}"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="__probe">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"probe did not run; chromium exit {proc.returncode}, stderr tail:\n{proc.stderr[-2000:]}"
    text = match.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    console = "\n".join(line for line in proc.stderr.splitlines() if ":CONSOLE" in line)
    return json.loads(text), console


def test_probe_catches_broken_pages(tmp_path):
    page = tmp_path / "control.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
                    '<img alt="net" src="http://example.com/x.png"><img alt="bad" src="data:image/png;base64,AAAA">'
                    "<script>notDefined();</script></body></html>")
    result, console = render(page, tmp_path)
    assert result["images"] == 2 and sorted(result["broken"]) == ["bad", "net"]
    assert any("notDefined" in e for e in result["errors"]) and "notDefined" in console


def test_report_renders_without_errors(tmp_path, simulate_report):
    preds, reads, inputs = simulate_report(tmp_path)
    files = write_report(tmp_path / "run", preds, inputs, readers=reads)
    shutil.rmtree(tmp_path / "run" / "report" / "grids")  # the page must not depend on files beside it
    result, console = render(files.index, tmp_path)
    assert result["errors"] == [], result["errors"]
    assert result["broken"] == []
    assert result["images"] >= 8
    assert "Uncaught" not in console and "Failed to load" not in console, console
