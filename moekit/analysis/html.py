"""One self-contained HTML page for the routing report: inline CSS, PNGs embedded as ``data:`` URIs, no script,
no external resource, so it opens offline and can be mailed as one file."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.colors import hsv_to_rgb, to_hex

from .labels import CLASS_NAMES
from .stats import RoutingStats

CAPTIONS = {
    "load": "Each cell is an expert's share of the routed slots divided by an even share (1/E): 1.00 is fair, "
            "red cells are overloaded experts, blue ones underused. Computed from the router's choices before "
            "capacity.",
    "balance": "The trainer's balance metric (max / mean tokens per expert in the last batch, averaged over "
               "layers) at each logged step, with the auxiliary balancing loss. Lower is better; 1.0 is perfect.",
    "router": "Per layer: the router's mean entropy as a fraction of log2(E) (1 = uniform, unsure), the mean "
              "probability of its top choice, and the normalised mutual information between the chosen expert "
              "and the token class or domain (0 = experts see the same mix, 1 = the expert determines the label).",
    "classes": "Rows are token classes (with their byte counts), columns experts. The number is the percentage of "
               "that class's bytes the expert takes; the colour compares it with the expert's share of all bytes "
               "(orange: the expert prefers this class, purple: it avoids it).",
    "domains": "Like the token-class map, for the corpus domains (top-level packages or your labels), the "
               "largest domains first.",
    "coactivation": "For top-k > 1: the percentage of bytes that choose both experts; the colour compares it with "
                    "what random choices of distinct experts would give (red: pairs that work together, blue: pairs that avoid "
                    "each other).",
    "paths": "Consecutive MoE layers: cosine overlap of the sets of bytes two experts take (1 = exactly the same "
             "bytes). Bright cells are routing paths that persist from one layer to the next.",
}
TITLES = {"load": "Load per expert", "balance": "Balance over training", "router": "Router certainty and "
          "information", "classes": "Specialisation by token class", "domains": "Specialisation by domain",
          "coactivation": "Co-activation", "paths": "Experts across layers"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.meta{color:#555;font-size:.92em} ul.summary li{margin:.35em 0}
table{border-collapse:collapse;font-size:.88em;margin:.5em 0} th,td{border:1px solid #ddd;padding:.3em .55em;
text-align:right} th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
figure{margin:1.2em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:.9em;max-width:900px}
pre.sample{white-space:pre-wrap;word-break:break-all;font-size:.85em;line-height:1.6;background:#fafafa;
padding:.6em;border:1px solid #eee} pre.sample span{border-radius:2px}
.legend span{display:inline-block;padding:0 .5em;margin:0 .2em .2em 0;border-radius:3px;font-size:.85em}
.dropped{background:#bbb;text-decoration:line-through} .noexpert{background:#fff;color:#999}
dl dt{font-weight:600;margin-top:.6em} dl dd{margin-left:1.2em}
"""


# tab20 without its greys (grey marks dropped bytes): the 9 strong colours first, then their 9 light partners
_TAB20_ORDER = [0, 2, 4, 6, 8, 10, 12, 16, 18, 1, 3, 5, 7, 9, 11, 13, 17, 19]


def expert_colours(n: int) -> list[str]:
    """Light background colours, one per expert (tab20 blended with white; golden-ratio hues beyond 18)."""
    if n <= len(_TAB20_ORDER):
        base = [colormaps["tab20"](i) for i in _TAB20_ORDER[:n]]
        return [to_hex(tuple(0.45 * c + 0.55 for c in rgba[:3])) for rgba in base]
    return [to_hex(hsv_to_rgb(((i * 0.618034) % 1.0, 0.35, 0.97))) for i in range(n)]


def _fmt(v, spec: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _stats_table(stats: RoutingStats) -> str:
    head = ("<tr><th>layer</th><th>module</th><th>E / K</th><th>tokens</th><th>max / mean load</th><th>CV</th>"
            "<th>entropy (bits, % of max)</th><th>top-1 prob.</th><th>dropped slots</th><th>tokens lost</th>"
            "<th>I(expert; class)</th><th>I(expert; domain)</th></tr>")
    rows = []
    for s in stats.layers:
        mc, mcn = s.mi_class
        md, mdn = s.mi_domain
        rows.append(
            f"<tr><td>{html.escape(s.label)}</td><td>{html.escape(s.name)}{' (soft)' if s.soft else ''}</td>"
            f"<td>{s.num_experts} / {s.top_k}</td><td>{s.tokens:,}</td><td>{_fmt(s.imbalance)}</td>"
            f"<td>{_fmt(s.cv)}</td><td>{_fmt(s.entropy_bits)} ({_fmt(100 * s.entropy_norm, '.0f')}%)</td>"
            f"<td>{_fmt(s.top1_confidence)}</td><td>{'n/a' if s.soft else _fmt(100 * s.drop_fraction, '.1f') + '%'}"
            f"</td><td>{'n/a' if s.soft else f'{s.tokens_dropped:,}'}</td>"
            f"<td>{_fmt(mc, '.3f')} bits ({_fmt(100 * mcn, '.0f')}%)</td>"
            f"<td>{_fmt(md, '.3f')} bits ({_fmt(100 * mdn, '.0f')}%)</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _sample_html(sample: dict, layer: dict, colours: list[str]) -> str:
    """The sample text, each character's background the colour of the expert its first byte went to."""
    raw, classes, experts = sample["bytes"], sample["classes"], layer["expert"]
    pieces, run, run_key = [], bytearray(), None

    def flush():
        if not run:
            return
        e, c = run_key
        text = html.escape(bytes(run).decode("utf-8", errors="replace"))
        cls_name = CLASS_NAMES[c] if 0 <= c < len(CLASS_NAMES) else "unlabelled"
        if e >= 0:
            pieces.append(f'<span style="background:{colours[e]}" title="expert {e} · {cls_name}">{text}</span>')
        elif e == -2:
            pieces.append(f'<span class="dropped" title="dropped for capacity · {cls_name}">{text}</span>')
        else:
            pieces.append(f'<span class="noexpert" title="no expert · {cls_name}">{text}</span>')
        run.clear()

    i = 0
    while i < len(raw):
        j = i + 1
        while j < len(raw) and 0x80 <= raw[j] < 0xC0:  # UTF-8 continuation bytes stay with their character
            j += 1
        key = (experts[i], classes[i])
        if key != run_key:
            flush()
            run_key = key
        run.extend(raw[i:j])
        i = j
    flush()
    return f'<pre class="sample">{"".join(pieces)}</pre>'


def render_html(info: dict, summary: list[str], stats: RoutingStats, pngs: dict[str, Path], sample: dict,
                json_name: str) -> str:
    cfg = info.get("model_config") or {}
    title = f"Routing report: {Path(info['checkpoint']).parent.name or info['checkpoint']}"
    cap = cfg.get("capacity_factor")
    meta = (f"checkpoint <code>{html.escape(info['checkpoint'])}</code> at step {info.get('step')}; "
            f"{cfg.get('n_layers', '?')} layers, {cfg.get('num_experts', '?')} experts, top-{cfg.get('top_k', '?')}"
            f", router <code>{html.escape(str(cfg.get('router', '?')))}</code>, "
            f"{'dropless' if cap is None else f'capacity factor {cap}'}. Analysed {info['bytes_analysed']:,} bytes "
            f"({info['windows']} windows of {info['seq_len']}) of the <b>{html.escape(info['split'])}</b> split of "
            f"<code>{html.escape(str(info.get('data_source')))}</code>.")
    if not info.get("same_data_as_training", True):
        meta += " <b>Note: this is not the data the model was trained on.</b>"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class='meta'>{meta}</p>",
             "<h2>Summary</h2><ul class='summary'>", *(f"<li>{html.escape(s)}</li>" for s in summary), "</ul>",
             "<h2>Per-layer statistics</h2>", _stats_table(stats)]
    for name, path in pngs.items():
        parts.append(f"<h2>{TITLES.get(name, name)}</h2><figure>{_img(path, TITLES.get(name, name))}"
                     f"<figcaption>{CAPTIONS.get(name, '')} <i>(also in {html.escape(path.name)})</i>"
                     "</figcaption></figure>")
    if sample["layers"]:
        n = max(layer["num_experts"] for layer in sample["layers"])
        colours = expert_colours(n)
        legend = "".join(f'<span style="background:{c}">expert {e}</span>' for e, c in enumerate(colours))
        parts.append(f"<h2>Text sample coloured by expert</h2><p>{len(sample['bytes'])} bytes of "
                     f"<code>{html.escape(sample['file'])}</code>. Each character's background is the expert that "
                     "took it (its highest-weight kept choice); hover for the token class. Grey struck-through: "
                     "dropped for capacity; white: no expert.</p>"
                     f"<p class='legend'>{legend}<span class='dropped'>dropped</span></p>")
        for layer in sample["layers"]:
            note = " (Soft MoE: dominant expert)" if layer.get("soft") else ""
            parts.append(f"<h3>{html.escape(layer['label'])}{note}</h3>{_sample_html(sample, layer, colours)}")
    parts.append(DEFINITIONS.format(json=html.escape(json_name)))
    parts.append("</body></html>")
    return "\n".join(parts)


DEFINITIONS = """<h2>Definitions</h2><dl>
<dt>Slot</dt><dd>One (token, chosen expert) pair; top-k routing gives each token k slots.</dd>
<dt>Load, max / mean, CV</dt><dd>Slots each expert is given by the router (before capacity); max / mean is 1.0
when balanced and E when one expert takes everything; CV is the standard deviation over the mean.</dd>
<dt>Router entropy, top-1 probability</dt><dd>Mean over tokens of -Σ p log2 p of the router distribution, and of
its largest probability.</dd>
<dt>Dropped slots, tokens lost</dt><dd>Slots removed because their expert was over capacity; tokens that lost all
their experts (they pass only through the residual connection and shared experts).</dd>
<dt>Mutual information</dt><dd>I(expert; class) = Σ p(c,e) log2 p(c,e) / (p(c) p(e)) over the slots, in bits; the
percentage divides it by H(class).</dd>
<dt>Token classes</dt><dd>Python source is labelled with Python's own tokenize module (keyword, identifier, number,
string literal, comment, whitespace/indent, operator/punct); other text by byte class (letter, digit, space,
punctuation, non-ASCII).</dd>
</dl><p class='meta'>All numbers are in <code>{json}</code>; every plot is also a PNG beside this file.</p>"""
