"""The A/B comparison written out: ``ab.json``, ``report.md`` and a self-contained ``report.html``.

The HTML page has no scripts and loads nothing: styles inline, the chart an
inline SVG, so it can be mailed or opened from an archive years later.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_reports(result: dict[str, Any], out: Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "ab.json", "markdown": out / "report.md", "html": out / "report.html"}
    _write(paths["json"], json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    _write(paths["markdown"], markdown(result))
    _write(paths["html"], html_page(result))
    return paths


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _labels(result: dict[str, Any]) -> list[str]:
    return [b["label"] for b in result["backends"]]


# ------------------------------------------------------------------- markdown


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def markdown(result: dict[str, Any]) -> str:
    labels = _labels(result)
    lines = [
        "# Music Flamingo A/B",
        "",
        f"mirwatch {result['mirwatch_version']}, {result['created']}. Reference backend: "
        f"**{result['reference']}**. Similarity: "
        f"{result['similarity_model'] or 'not measured (sentence-embedding model not installed)'}; "
        f"tempo agrees within ±{result['tempo_tolerance'] * 100:.0f} % of the measured bpm.",
        "",
        "## Backends",
        "",
        "| backend | mean similarity | tempo agrees | genres overlap | s/prompt | tokens/s | peak GPU MiB | load s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backend in result["backends"]:
        label = backend["label"]
        s = result["summary"].get(label, {})
        if backend.get("error"):
            lines.append(f"| {_md_cell(label)} | {_md_cell(backend['error'])} |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {_md_cell(label)} | {_fmt(s.get('mean_similarity'), 3)} "
            f"| {_ratio(s.get('tempo_agreement'), s.get('tempo_texts'))} "
            f"| {_ratio(s.get('genre_overlap'), s.get('genre_tracks'))} "
            f"| {_fmt(s.get('mean_seconds_per_prompt'), 3)} | {_fmt(s.get('mean_tokens_per_second'), 1)} "
            f"| {_fmt(s.get('peak_gpu_mib'), 0)} | {_fmt(backend.get('load_seconds'), 1)} |"
        )
    for entry in result["tracks"]:
        lines += ["", f"## {_md_cell(entry['name'])}", "",
                  f"`{entry['path']}`: {_fmt(entry.get('duration'), 1)} s, measured bpm {_fmt(entry.get('bpm'), 1)}, "
                  f"essentia_genre {_md_cell(', '.join(entry.get('essentia_genre') or []) or 'n/a')}", ""]
        for label in labels:
            error = entry["results"].get(label, {}).get("error")
            if error:
                lines.append(f"- **{_md_cell(label)}** failed: {_md_cell(error)}")
        for name in result["prompts"]:
            lines += ["", f"### {name}", "", "| backend | text | s | tokens/s | peak GPU MiB | similarity | tempo | genres |",
                      "|---|---|---|---|---|---|---|---|"]
            for label in labels:
                res = entry["results"].get(label, {})
                if "prompts" not in res:
                    continue
                row, m = res["prompts"][name], entry["metrics"][label][name]
                tempo = m["tempo"]
                lines.append(
                    f"| {_md_cell(label)} | {_md_cell(row['text'] or '(empty)')} | {_fmt(row['seconds'], 3)} "
                    f"| {_fmt(row['tokens_per_second'], 1)} | {_fmt(res.get('peak_gpu_mib'), 0)} "
                    f"| {_fmt(m['similarity'], 3)} "
                    f"| {_md_cell(', '.join(_fmt(t, 0) for t in tempo['stated']) or '-')} ({_fmt(tempo['agrees'])}) "
                    f"| {_md_cell(', '.join(m['genres']['named']) or '-')} ({_fmt(m['genres']['overlap'])}) |"
                )
    return "\n".join(lines) + "\n"


def _ratio(value: float | None, count: int | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f} % of {count}"


# ----------------------------------------------------------------------- html

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1,h2,h3{font-weight:600}table{border-collapse:collapse;width:100%;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;white-space:nowrap}.text{max-width:560px}
.muted{color:#777}.bad{color:#a00}svg text{font:12px system-ui,sans-serif}
"""

_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1")


def html_page(result: dict[str, Any]) -> str:
    e = html.escape
    labels = _labels(result)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>Music Flamingo A/B</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>Music Flamingo A/B</h1>",
        f"<p class=muted>mirwatch {e(result['mirwatch_version'])}, {e(result['created'])}. "
        f"Reference backend: <b>{e(result['reference'])}</b>. Similarity model: "
        f"{e(result['similarity_model'] or 'not installed')}. Tempo agrees within "
        f"±{result['tempo_tolerance'] * 100:.0f} % of the measured bpm.</p>",
        "<h2>Backends</h2>", chart(result),
        "<table><tr><th>backend</th><th>mean similarity</th><th>tempo agrees</th><th>genres overlap</th>"
        "<th>s/prompt</th><th>tokens/s</th><th>peak GPU MiB</th><th>load s</th></tr>",
    ]
    for backend in result["backends"]:
        s = result["summary"].get(backend["label"], {})
        if backend.get("error"):
            parts.append(f"<tr><td>{e(backend['label'])}</td><td colspan=7 class=bad>{e(backend['error'])}</td></tr>")
            continue
        parts.append(
            f"<tr><td>{e(backend['label'])}</td><td class=num>{_fmt(s.get('mean_similarity'), 3)}</td>"
            f"<td class=num>{e(_ratio(s.get('tempo_agreement'), s.get('tempo_texts')))}</td>"
            f"<td class=num>{e(_ratio(s.get('genre_overlap'), s.get('genre_tracks')))}</td>"
            f"<td class=num>{_fmt(s.get('mean_seconds_per_prompt'), 3)}</td>"
            f"<td class=num>{_fmt(s.get('mean_tokens_per_second'), 1)}</td>"
            f"<td class=num>{_fmt(s.get('peak_gpu_mib'), 0)}</td>"
            f"<td class=num>{_fmt(backend.get('load_seconds'), 1)}</td></tr>"
        )
    parts.append("</table>")
    for entry in result["tracks"]:
        genres = ", ".join(entry.get("essentia_genre") or []) or "n/a"
        parts += [f"<h2>{e(entry['name'])}</h2>",
                  f"<p class=muted>{e(entry['path'])}: {_fmt(entry.get('duration'), 1)} s, measured bpm "
                  f"{_fmt(entry.get('bpm'), 1)}, essentia_genre {e(genres)}</p>"]
        for label in labels:
            error = entry["results"].get(label, {}).get("error")
            if error:
                parts.append(f"<p class=bad>{e(label)} failed: {e(error)}</p>")
        for name in result["prompts"]:
            parts += [f"<h3>{e(name)}</h3>",
                      f"<p class=muted>{e(result['prompts'][name]['text'])}</p>",
                      "<table><tr><th>backend</th><th>text</th><th>s</th><th>tokens/s</th><th>peak GPU MiB</th>"
                      "<th>similarity</th><th>tempo</th><th>genres</th></tr>"]
            for label in labels:
                res = entry["results"].get(label, {})
                if "prompts" not in res:
                    continue
                row, m = res["prompts"][name], entry["metrics"][label][name]
                tempo = ", ".join(_fmt(t, 0) for t in m["tempo"]["stated"]) or "-"
                named = ", ".join(m["genres"]["named"]) or "-"
                parts.append(
                    f"<tr><td>{e(label)}</td><td class=text>{e(row['text'] or '(empty)')}</td>"
                    f"<td class=num>{_fmt(row['seconds'], 3)}</td><td class=num>{_fmt(row['tokens_per_second'], 1)}</td>"
                    f"<td class=num>{_fmt(res.get('peak_gpu_mib'), 0)}</td><td class=num>{_fmt(m['similarity'], 3)}</td>"
                    f"<td>{e(tempo)} ({_fmt(m['tempo']['agrees'])})</td>"
                    f"<td>{e(named)} ({_fmt(m['genres']['overlap'])})</td></tr>"
                )
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def chart(result: dict[str, Any]) -> str:
    """Grouped bars, one group per prompt: mean seconds per prompt of each backend (inline SVG)."""
    labels = [b["label"] for b in result["backends"] if not b.get("error")]
    prompts = list(result["prompts"])
    means: dict[tuple[str, str], float] = {}
    for label in labels:
        for name in prompts:
            values = [entry["results"][label]["prompts"][name]["seconds"] for entry in result["tracks"]
                      if "prompts" in entry["results"].get(label, {})
                      and entry["results"][label]["prompts"][name]["seconds"] is not None]
            if values:
                means[(label, name)] = sum(values) / len(values)
    if not means:
        return "<p class=muted>(no timings to chart)</p>"
    top = max(means.values()) or 1.0
    bar, gap, height, left, plot_h = 14, 18, 220, 50, 160
    group_w = len(labels) * bar + gap
    width = left + len(prompts) * group_w + 20
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20 * len(labels)}" '
           f'role="img" aria-label="mean seconds per prompt by backend">',
           f'<text x="4" y="14">seconds per prompt (mean over tracks; max {top:.3f} s)</text>',
           f'<line x1="{left}" y1="{20 + plot_h}" x2="{width - 10}" y2="{20 + plot_h}" stroke="#999"/>']
    for p_index, name in enumerate(prompts):
        x0 = left + p_index * group_w
        for b_index, label in enumerate(labels):
            value = means.get((label, name))
            if value is None:
                continue
            h = max(1.0, plot_h * value / top)
            x = x0 + b_index * bar
            svg.append(f'<rect x="{x}" y="{20 + plot_h - h:.1f}" width="{bar - 2}" height="{h:.1f}" '
                       f'fill="{_COLOURS[b_index % len(_COLOURS)]}"><title>{html.escape(label)} / '
                       f'{html.escape(name)}: {value:.3f} s</title></rect>')
        svg.append(f'<text x="{x0}" y="{20 + plot_h + 16}">{html.escape(name[:12])}</text>')
    for b_index, label in enumerate(labels):
        y = height + 20 * b_index
        svg.append(f'<rect x="{left}" y="{y - 10}" width="10" height="10" fill="{_COLOURS[b_index % len(_COLOURS)]}"/>')
        svg.append(f'<text x="{left + 16}" y="{y}">{html.escape(label)}</text>')
    svg.append("</svg>")
    return "\n".join(svg)
