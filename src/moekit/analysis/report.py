"""The HTML report: one ``report/index.html`` with its PNG plots beside it.

It opens from the file system (no server, no scripts, no network): plots are
PNG files written with matplotlib's Agg backend, styles are inline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import categorized_validation, load_corpus
from .compare import compare, final_val_loss, median_step_time
from .plots import (
    plot_coactivation,
    plot_drop_rate,
    plot_entropy,
    plot_load,
    plot_loss_curves,
    plot_specialisation,
    plot_training_curves,
    style_plots,
)
from .routing import collect_routing, top_tokens
from .views import RunView, load_run

PROMPTS = ("def ", "import os\n", "class ")
ANALYSIS_TOKENS = 16_384


def _generate_samples(view: RunView, max_new_tokens: int) -> list[tuple[str, str]]:
    samples = []
    for i, prompt in enumerate(PROMPTS):
        ids = view.tokenizer.encode(prompt)
        generator = torch.Generator().manual_seed(1234 + i)
        new = []
        for token in view.model.generate(torch.tensor([ids]), max_new_tokens, temperature=0.8, top_k=50,
                                         generator=generator):
            if int(token) == view.tokenizer.eot_id:
                break
            new.append(int(token))
        samples.append((prompt, view.tokenizer.decode(new)))
    return samples


def _fmt(value, spec: str = ".3f", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f7f8fa; --moe:#d1495b; --dense:#00798c; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background:linear-gradient(120deg,#22313f,#3b4a5a); color:#fff; padding:28px 0 22px; }
header .wrap { display:flex; justify-content:space-between; align-items:flex-end; gap:20px; flex-wrap:wrap; }
header h1 { margin:0; font-size:26px; letter-spacing:-0.01em; }
header p { margin:4px 0 0; color:#cbd2d9; }
.wrap { max-width:1160px; margin:0 auto; padding:0 24px; }
nav a { color:#e4e7eb; margin-left:14px; text-decoration:none; font-size:14px; }
nav a:hover { text-decoration:underline; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px 20px; margin:22px 0; }
h2 { margin:0 0 6px; font-size:19px; }
h3 { margin:18px 0 6px; font-size:15px; }
p.lead, p.note { color:var(--muted); margin:0 0 12px; max-width:860px; }
.kpis { display:grid; grid-template-columns:repeat(auto-fit,minmax(190px,1fr)); gap:12px; margin:14px 0 4px; }
.kpi { border:1px solid var(--line); border-radius:8px; padding:10px 14px; background:#fcfcfd; }
.kpi .v { font-size:22px; font-weight:650; }
.kpi .k { color:var(--muted); font-size:12.5px; text-transform:uppercase; letter-spacing:.04em; }
.good { color:#2f7d32; } .bad { color:#b3261e; }
table { border-collapse:collapse; width:100%; font-size:14px; }
th, td { text-align:left; padding:6px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12.5px; text-transform:uppercase; letter-spacing:.03em; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
img { max-width:100%; height:auto; display:block; margin:8px 0; }
.tag { display:inline-block; padding:1px 8px; border-radius:10px; color:#fff; font-size:12px; font-weight:600; }
.tag.MoE { background:var(--moe); } .tag.dense { background:var(--dense); } .tag.other { background:#52606d; }
code, pre, .tok { font-family:"JetBrains Mono", "SFMono-Regular", Menlo, Consolas, monospace; }
.tok { background:#eef2f7; border-radius:4px; padding:0 4px; margin:1px 2px; display:inline-block; font-size:12.5px; white-space:pre; }
.tok small { color:var(--muted); }
pre { background:#1f2933; color:#e4e7eb; padding:12px 14px; border-radius:8px; overflow-x:auto; font-size:12.5px; line-height:1.45; white-space:pre-wrap; }
pre b { color:#f7c948; font-weight:600; }
.cols { display:grid; grid-template-columns:1fr 1fr; gap:18px; }
@media (max-width: 900px) { .cols { grid-template-columns:1fr; } }
footer { color:var(--muted); font-size:13px; padding:4px 0 36px; }
"""


def html_table(markdown: str) -> str:
    """A Markdown table (header, separator, rows) as the report's HTML table."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if not line.startswith("|--")]
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td class=num>{html.escape(c.strip())}</td>" for c in row) + "</tr>"
                   for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def write_page(out: Path, title: str, subtitle: str, sections: list[tuple[str, str, str]], results: dict) -> Path:
    """out/index.html with ``sections`` ((heading, lead, HTML content) each) and out/results.json;
    the page of the application demos."""
    body = "".join(f"<section><h2>{html.escape(heading)}</h2><p class=lead>{html.escape(lead)}</p>{content}</section>"
                   for heading, lead, content in sections)
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><header><div class=wrap><div><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(subtitle)}</p></div></div></header><main class=wrap>{body}</main></body></html>")
    (out / "index.html").write_text(page, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return out / "index.html"


def _tag(label: str) -> str:
    cls = label if label in ("MoE", "dense") else "other"
    return f'<span class="tag {cls}">{html.escape(label)}</span>'


def _run_table(views: list[RunView]) -> str:
    rows = []
    for v in views:
        mc, tc = v.model_config, v.train_config
        ffn = (f"MoE {mc.moe.router}, E={mc.moe.num_experts}, K={mc.moe.top_k}, expert d_ff={mc.moe.d_ff}"
               + (f", capacity {mc.moe.capacity_factor}" if mc.moe.capacity_factor else ", dropless")
               + (f", every {mc.moe_every} blocks" if mc.moe_every > 1 else "")) if v.is_moe else f"dense SwiGLU d_ff={mc.d_ff}"
        tokens = v.metrics[-1]["tokens"] if v.metrics else 0
        rows.append(
            f"<tr><td>{_tag(v.label)}</td><td>{html.escape(ffn)}</td>"
            f"<td class=num>{v.model.num_parameters() / 1e6:.2f} M</td>"
            f"<td class=num>{v.model.num_parameters(active=True) / 1e6:.2f} M</td>"
            f"<td class=num>{tokens / 1e6:.2f} M</td>"
            f"<td class=num>{_fmt(final_val_loss(v.metrics))}</td>"
            f"<td class=num>{_fmt(median_step_time(v.metrics) and 1000 * median_step_time(v.metrics), '.0f')} ms</td></tr>"
        )
    head = ("<tr><th>run</th><th>feed-forward</th><th>parameters</th><th>active / token</th>"
            "<th>tokens seen</th><th>final val loss</th><th>step time (median)</th></tr>")
    first = views[0]
    mc, tc = first.model_config, first.train_config
    common = (f"{mc.n_layer} blocks, d_model {mc.d_model}, {mc.n_head} heads, context {mc.context_length}, "
              f"vocabulary {mc.vocab_size} ({first.data_info.get('tokenizer')}); {tc.steps} steps of "
              f"{tc.batch_size}×{mc.context_length} tokens, AdamW lr {tc.lr:g} (warmup {tc.warmup_steps}, cosine), "
              f"seed {tc.seed}.")
    return f"<table>{head}{''.join(rows)}</table><p class=note>Shared: {html.escape(common)}</p>"


def _kpis(views: list[RunView], comparison: dict | None, seeds: dict | None) -> str:
    if comparison is None:
        v = views[0]
        return (f'<div class=kpis><div class=kpi><div class=k>final validation loss</div>'
                f'<div class=v>{_fmt(final_val_loss(v.metrics))}</div></div></div>')
    better = comparison["moe_val_loss"] is not None and comparison["dense_val_loss"] is not None and \
        comparison["moe_val_loss"] < comparison["dense_val_loss"]
    reach = comparison["moe_steps_to_dense_loss"]
    reach_text = "not reached" if reach is None else f"{reach} of {comparison['dense_steps']}"
    cards = [
        ("MoE final val loss", _fmt(comparison["moe_val_loss"]), "good" if better else "bad"),
        ("dense final val loss", _fmt(comparison["dense_val_loss"]), ""),
        ("MoE steps to dense's final loss", reach_text, "good" if reach is not None else "bad"),
        # A slower step is a cost, never coloured as a win.
        ("step time MoE ÷ dense", _fmt(comparison["step_time_ratio"], ".2f") + "×",
         "good" if (comparison["step_time_ratio"] or 9) <= 1.0 else ""),
    ]
    if seeds and "dense_minus_moe" in seeds:
        d = seeds["dense_minus_moe"]
        cards.append((f"dense − MoE over {d['n']} seeds", f"{d['mean']:+.3f} ± {d['std']:.3f}",
                      "good" if d["moe_better_in"] == d["n"] else ""))
    else:
        cards.append(("seeds", "one seed: no spread measured", ""))
    return "<div class=kpis>" + "".join(
        f'<div class=kpi><div class=k>{html.escape(k)}</div><div class="v {c}">{html.escape(v)}</div></div>'
        for k, v, c in cards) + "</div>" + f"<p>{html.escape(_in_words(comparison))}</p>"


def _in_words(c: dict) -> str:
    """Steps and wall-clock to the dense model's final loss, side by side."""
    if c["moe_steps_to_dense_loss"] is None:
        return "The MoE did not reach the final validation loss of the dense model within its steps."
    steps = f"{c['moe_steps_to_dense_loss']} of {c['dense_steps']} steps"
    seconds, total = c.get("moe_seconds_to_dense_loss"), c.get("dense_seconds")
    wall = ("" if seconds is None or not total else
            f" and {seconds:.0f} s of training, against {total:.0f} s for the dense model ({seconds / total:.2f}×)")
    return (f"The MoE reached the final validation loss of the dense model after {steps} "
            f"({c['moe_steps_to_dense_loss'] / c['dense_steps']:.2f}×){wall}.")


def _active_parameters_lead(views: list[RunView]) -> str:
    """The summary's question, claiming equal active parameters only when they are equal."""
    counts = {v.label: v.model.num_parameters(active=True) for v in views}
    # Within 1 %: the routers' few weights aside, the runs spend the same parameters on a token.
    if max(counts.values()) <= 1.01 * min(counts.values()):
        return "Same tokens, same active parameters per token (within 1 %): does routing buy quality?"
    return ("Same tokens; active parameters per token differ: "
            + ", ".join(f"{label} {n / 1e6:.3f} M" for label, n in counts.items()) + ".")


def _seed_table(seeds: dict) -> str:
    rows = []
    for c in seeds["runs"]:
        rows.append(
            f"<tr><td class=num>{c['seed']}</td><td class=num>{_fmt(c['moe_val_loss'])}</td>"
            f"<td class=num>{_fmt(c['dense_val_loss'])}</td>"
            f"<td class=num>{_fmt(c['dense_val_loss'] - c['moe_val_loss'], '+.3f')}</td>"
            f"<td class=num>{c['moe_steps_to_dense_loss'] if c['moe_steps_to_dense_loss'] is not None else 'not reached'}</td>"
            f"<td class=num>{_fmt(c['step_time_ratio'], '.2f')}×</td></tr>")
    s = seeds["summary"]

    def stat(key: str, spec: str) -> str:
        if key not in s:
            return "–"
        return f"{format(s[key]['mean'], spec)} ± {format(s[key]['std'], spec)}"

    rows.append(f"<tr><th>mean ± sd</th><td class=num>{stat('moe_val_loss', '.3f')}</td>"
                f"<td class=num>{stat('dense_val_loss', '.3f')}</td><td class=num>{stat('dense_minus_moe', '+.3f')}</td>"
                f"<td class=num>{stat('moe_steps_to_dense_loss', '.0f')}</td><td class=num>{stat('step_time_ratio', '.2f')}</td></tr>")
    head = ("<tr><th>seed</th><th>MoE val loss</th><th>dense val loss</th><th>dense − MoE</th>"
            "<th>MoE steps to dense loss</th><th>step-time ratio</th></tr>")
    return f"<h3>Run-to-run spread</h3><table>{head}{''.join(rows)}</table>"


def _finetune_table(rows: list[dict], data: str | None) -> str:
    """The demo's fine-tuning comparison (``moekit.apps.finetune.finetune_comparison``)."""
    mib = 1 / 2**20
    body = []
    for r in rows:
        memory = r.get("memory")
        share = r["trainable_parameters"] / r["parameters"]
        body.append(
            f"<tr><td>{html.escape(r['label'])}</td><td class=num>{r['trainable_parameters']:,}</td>"
            f"<td class=num>{100 * share:.1f} %</td><td class=num>{_fmt(r['val_loss'])}</td>"
            f"<td class=num>{_fmt(r['step_time'] and 1000 * r['step_time'], '.0f')} ms</td>"
            f"<td class=num>{_fmt(memory and memory['total'] * mib, '.1f')} MiB</td>"
            f"<td class=num>{_fmt(memory and memory['activations'] * mib, '.1f')} MiB</td></tr>")
    head = ("<tr><th>model, method</th><th>trainable parameters</th><th>share</th><th>held-out loss</th>"
            "<th>step time (median)</th><th>training memory</th><th>of which activations</th></tr>")
    source = html.escape(str(data or "the embedded corpus"))
    return (f"<table>{head}{''.join(body)}</table><p class=note>Each trained model adapted to <code>{source}</code> "
            "for the same steps and tokens; held-out loss on that text's held-out files. Training memory counts the "
            "weights, the gradients and AdamW's two moments of what trains, and the activations one step saves for "
            "backward. MixLoRA turns dense FFNs into mixtures of LoRA experts, so it adapts the dense model.</p>")


def _top_tokens_html(view: RunView) -> str:
    rec = view.routing
    parts = []
    for layer, indices_NK in enumerate(rec.indices_LNK):
        best = top_tokens(indices_NK, rec.ids_N, rec.num_experts)
        load_E = np.bincount(indices_NK.ravel(), minlength=rec.num_experts) / indices_NK.size
        rows = []
        for e, tokens in enumerate(best):
            chips = "".join(
                f'<span class=tok>{html.escape(_visible(view.tokenizer.token_text(t)))} <small>{share:.0%}</small></span>'
                for t, _, share in tokens)
            rows.append(f"<tr><td class=num>{e}</td><td class=num>{load_E[e]:.0%}</td><td>{chips or '–'}</td></tr>")
        parts.append(f"<h3>block {rec.moe_layers[layer]}</h3><table><tr><th style='width:70px'>expert</th>"
                     f"<th style='width:70px'>load</th>"
                     f"<th>top tokens (share of that token's occurrences sent here)</th></tr>{''.join(rows)}</table>")
    return "".join(parts)


def _visible(text: str) -> str:
    return text.replace("\n", "↵").replace("\t", "⇥").replace(" ", "·")


def write_report(runs: dict[str, Path], out_dir: Path, *, seeds: dict | None = None,
                 title: str = "moekit report", max_new_tokens: int = 120, progress: bool = True,
                 finetune: dict | None = None) -> Path:
    """Write out_dir/index.html and its PNGs for the runs (label → run folder); return the HTML path.

    With a run labelled "MoE" and one labelled "dense", the report compares them.
    ``seeds`` (from the demo) adds the run-to-run table, ``finetune`` (``{"data", "rows"}``,
    from the demo) the fine-tuning comparison.
    """
    style_plots()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    views = [load_run(label, path) for label, path in runs.items()]
    steps = tqdm(total=2 + 5 * len(views), desc="report", unit="part", disable=not progress)
    moe_views = [v for v in views if v.is_moe]
    if moe_views:
        # Categories need the validation text; the corpus is re-read, the token streams are not.
        first = moe_views[0]
        corpus = load_corpus(first.data_info.get("data"), first.data_info.get("val_fraction", 0.05))
    for v in moe_views:
        v.routing_layers = v.model.moe_layers
        tokens = categorized_validation(corpus, v.tokenizer, ANALYSIS_TOKENS)
        v.routing = collect_routing(v.model, tokens)
        steps.update(1)
    sections = []
    by_label = {v.label: v for v in views}
    comparison = None
    if "MoE" in by_label and "dense" in by_label:
        comparison = compare(by_label["MoE"].metrics, by_label["dense"].metrics)
    loss_png = plot_loss_curves(views, out_dir)
    steps.update(1)
    summary = _kpis(views, comparison, seeds) + _run_table(views)
    if seeds:
        summary += _seed_table(seeds)
    sections.append(("summary", "Summary", _active_parameters_lead(views) if comparison else "", summary))
    sections.append(("loss", "Validation loss",
                      "Mean next-token cross-entropy on held-out files, evaluated on the same fixed windows for every run. "
                      "Lower is better; the right panel charges each run for its own training time.",
                      f'<img src="{loss_png}" alt="validation loss curves">'
                      f'<img src="{plot_training_curves(views, out_dir)}" alt="auxiliary loss, learning rate and '
                      'gradient norm">'))
    for v in moe_views:
        load_png = plot_load(v, out_dir)
        entropy_png = plot_entropy(v, out_dir)
        steps.update(2)
        body = (f'<h3>Expert load over training</h3><p class=note>Each cell: an expert\'s share of the routed '
                f'assignments over one logging interval, divided by the fair share 1/E. White is balanced, red '
                f'overloaded, blue starved.</p><img src="{load_png}" alt="expert load heatmap">'
                f'<h3>Routing entropy</h3><p class=note>How spread out each token\'s router distribution is. '
                f'Falling entropy means the router has become confident about where tokens go.</p>'
                f'<img src="{entropy_png}" alt="routing entropy">')
        if v.model_config.moe.capacity_factor is not None:
            body += (f'<h3>Drop rate</h3><p class=note>Assignments over an expert\'s capacity skip the expert '
                     f'(the token passes through the residual).</p>'
                     f'<img src="{plot_drop_rate(v, out_dir)}" alt="drop rate">')
        else:
            body += "<p class=note>No capacity factor is set (dropless routing), so no assignment is dropped.</p>"
        sections.append((f"routing-{v.slug}", f"Routing during training {_tag(v.label)}", "", body))
        spec_png = plot_specialisation(v, out_dir)
        co_png = plot_coactivation(v, out_dir)
        steps.update(2)
        body = (f'<h3>Specialisation: expert × token category</h3><p class=note>Token categories come from Python\'s '
                f'<code>tokenize</code> (or character classes for other text), analysed on {v.routing.ids_N.size:,} '
                f'validation tokens. Each cell is how over- (red) or under-represented (blue) a category is at an '
                f'expert relative to that expert\'s overall load; 1.0 means no preference.</p>'
                f'<img src="{spec_png}" alt="specialisation matrix">'
                f'<h3>Expert co-activation</h3><p class=note>How often a token that picks expert i also picks expert j '
                f'(top-{v.model_config.moe.top_k}). Dark red pairs are experts that work as a team.</p>'
                f'<img src="{co_png}" alt="expert co-activation">'
                f'<h3>Top tokens of each expert</h3><p class=note>Ranked by count × share, so each expert shows tokens '
                f'that are both frequent there and mostly sent there. · marks a space, ↵ a newline.</p>'
                + _top_tokens_html(v))
        sections.append((f"experts-{v.slug}", f"What the experts learned {_tag(v.label)}", "", body))
    if finetune:
        sections.append(("finetune", "Fine-tuning", "The trained models adapted to text they saw little of: frozen, "
                         "LoRA on the experts, full fine-tuning, and a mixture of LoRA experts.",
                         _finetune_table(finetune["rows"], finetune.get("data"))))
    gen_cols = []
    for v in views:
        samples = _generate_samples(v, max_new_tokens)
        steps.update(1)
        text = "\n\n".join(f"<b>{html.escape(p)}</b>{html.escape(s)}" for p, s in samples)
        gen_cols.append(f"<div><h3>{_tag(v.label)}</h3><pre>{text}</pre></div>")
    sections.append(("samples", "Sample generations",
                     f"Temperature 0.8, top-k 50, {max_new_tokens} tokens at most, fixed seeds; the prompt is in yellow.",
                     f"<div class=cols>{''.join(gen_cols)}</div>"))
    steps.update(steps.total - steps.n)
    steps.close()
    nav = "".join(f'<a href="#{sid}">{html.escape(name.split("<")[0].strip())}</a>' for sid, name, _, _ in sections
                  if not sid.startswith("experts-") or sid == f"experts-{moe_views[0].slug}")
    body = "".join(
        f'<section id="{sid}"><h2>{name}</h2>' + (f"<p class=lead>{html.escape(lead)}</p>" if lead else "") + content
        + "</section>" for sid, name, lead, content in sections)
    data = views[0].data_info
    source = "the Python standard library" if data.get("source") == "stdlib" else f"<code>{html.escape(str(data.get('source')))}</code>"
    subtitle = (f"Trained on {source} (Python {data.get('python_version')}, {data.get('train_files')} training and "
                f"{data.get('val_files')} validation files, file-list hash {data.get('file_list_sha256')}).")
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content='width=device-width'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><div class=wrap><div><h1>{html.escape(title)}</h1><p>{subtitle}</p></div><nav>{nav}</nav></div></header>"
            f"<main class=wrap>{body}</main><footer class=wrap>Written by <code>moekit report</code>. Runs: "
            + ", ".join(f"{html.escape(v.label)} = <code>{html.escape(str(v.run_dir))}</code>" for v in views)
            + "</footer></body></html>")
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps({"comparison": comparison, "seeds": seeds}, indent=2))
    return index
