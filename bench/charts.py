"""Which charting library the dashboard's Usage page vendors: uPlot 1.6 against Chart.js 4.6,
on size (minified, gzipped) and on the time Chromium takes to draw 3 series of 10,000 points
(median of 7 draws in a fresh 1200x300 canvas, until the next frame has been painted;
Chart.js without animation, its fastest settings: no parsing, normalized data).

    python bench/charts.py /path/to/uPlot.iife.min.js /path/to/uPlot.min.css \
        /path/to/chart.umd.min.js
"""

from __future__ import annotations

import gzip
import shutil
import statistics
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
POINTS, SERIES, RUNS = 10_000, 3, 7

DATA = f"""
window.xs = Array.from({{length: {POINTS}}}, (_, i) => 1.7e9 + i * 60);
window.ys = Array.from({{length: {SERIES}}}, (_, s) =>
  window.xs.map((_, i) => 50 + 40 * Math.sin(i / 300 + s) + (i * 7919 % 13)));
"""
UPLOT = """async () => {
  const el = document.createElement('div'); document.body.replaceChildren(el);
  const t0 = performance.now();
  new uPlot({width: 1200, height: 300, series: [{}, ...ys.map((_, i) => ({stroke: 'red'}))]},
            [xs, ...ys], el);
  await new Promise(r => requestAnimationFrame(() => setTimeout(r)));  // drawn, painted
  return performance.now() - t0;
}"""
CHARTJS = """async () => {
  const c = document.createElement('canvas'); c.width = 1200; c.height = 300;
  const box = document.createElement('div'); box.style.width = '1200px';
  box.style.height = '300px'; box.appendChild(c); document.body.replaceChildren(box);
  const t0 = performance.now();
  new Chart(c, {type: 'line', options: {animation: false, responsive: false,
      parsing: false, normalized: true, scales: {x: {type: 'linear'}}},
    data: {datasets: ys.map(y => ({data: xs.map((x, i) => ({x, y: y[i]})),
                                   pointRadius: 0, borderWidth: 1}))}});
  await new Promise(r => requestAnimationFrame(() => setTimeout(r)));  // drawn, painted
  return performance.now() - t0;
}"""


def size(path: Path) -> str:
    raw = path.read_bytes()
    return f"{len(raw) / 1024:.1f} KiB minified, {len(gzip.compress(raw, 9)) / 1024:.1f} KiB gzipped"


def main(uplot_js: str, uplot_css: str, chart_js: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for name, scripts, draw in (("uPlot", [uplot_js], UPLOT), ("Chart.js", [chart_js], CHARTJS)):
            page = browser.new_page()
            page.set_content("<html><body></body></html>")
            if name == "uPlot":
                page.add_style_tag(path=uplot_css)
            for script in scripts:
                page.add_script_tag(path=script)
            page.evaluate(DATA)
            times = [page.evaluate(draw) for _ in range(RUNS)]
            print(f"{name}: {size(Path(scripts[0]))}; draw {SERIES}x{POINTS} points: median "
                  f"{statistics.median(times):.1f} ms (min {min(times):.1f}, max {max(times):.1f})")
            page.close()
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
