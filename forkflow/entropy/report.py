"""The files `forkflow entropy report` and `compare` write: JSON numbers, a markdown summary, PNG figures,
and a self-contained HTML page showing every token coloured by its entropy (value on hover)."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import torch

from forkflow.entropy import plots
from forkflow.entropy.lexicon import TokenCount, frequent_tokens
from forkflow.entropy.overlap import entropy_change_by_bucket, top_overlap
from forkflow.entropy.score import ScoredResponse
from forkflow.entropy.stats import NEAR_ZERO, PERCENTILES, entropy_summary, top_fraction

COLOR_LEVELS = 10
EXAMPLES = 3  # responses quoted in report.md with their forking tokens marked


def pooled(scored: list[ScoredResponse], values: str) -> list:
    """`entropies` or `tokens` of every sampled position (forced thinking-budget suffixes left out)."""
    return [v for s in scored for v, keep in zip(getattr(s, values), s.sampled(), strict=True) if keep]


def write_report(
    scored: list[ScoredResponse],
    out_dir: str | os.PathLike,
    rho: float = 0.2,
    top: int = 30,
    max_responses: int = 200,
) -> dict:
    """Write summary.json, report.md, entropy_histogram.png, wordcloud_high.png, wordcloud_low.png and
    report.html into out_dir; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entropies = torch.tensor(pooled(scored, "entropies"), dtype=torch.float64)  # [N]
    tokens = pooled(scored, "tokens")
    summary = {"responses": len(scored), **entropy_summary(entropies), "rho": rho}
    forks = top_fraction(entropies, rho)
    high = frequent_tokens(tokens, entropies, forks, top)
    low = frequent_tokens(tokens, entropies, top_fraction(entropies, rho, largest=False), top)
    summary["high_entropy_tokens"] = [vars(t) for t in high]
    summary["low_entropy_tokens"] = [vars(t) for t in low]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    plots.entropy_histogram(entropies.numpy(), summary["percentiles"], out / "entropy_histogram.png")
    plots.word_cloud(high, out / "wordcloud_high.png", f"top {rho:.0%} highest-entropy positions", "#c44e52")
    plots.word_cloud(low, out / "wordcloud_low.png", f"{rho:.0%} lowest-entropy positions", "#4c72b0")
    fork_threshold = entropies[forks].min().item()
    examples = [marked_text(s, fork_threshold) for s in scored[:EXAMPLES]]
    (out / "report.md").write_text(_markdown(summary, high, low, rho, examples))
    (out / "report.html").write_text(_page(scored, summary, out, fork_threshold, max_responses))
    return summary


def _stats_rows(summary: dict) -> list[tuple[str, str]]:
    rows = [
        ("responses", str(summary["responses"])),
        ("tokens", str(summary["tokens"])),
        ("mean entropy", f"{summary['mean']:.4f}"),
    ]
    rows += [(f"p{q}", f"{summary['percentiles'][str(q)]:.4f}") for q in PERCENTILES]
    rows += [
        (f"fraction with H < {NEAR_ZERO}", f"{summary[f'fraction_below_{NEAR_ZERO}']:.2%}"),
        ("fraction above p80", f"{summary['fraction_above_p80']:.2%}"),
    ]
    return rows


def _token_table(counts: list[TokenCount]) -> str:
    lines = ["| rank | token | count | share | mean H |", "|---:|---|---:|---:|---:|"]
    for rank, c in enumerate(counts, 1):
        word = c.token.replace("|", "\\|").replace("`", "ˋ")
        lines.append(f"| {rank} | `{word}` | {c.count} | {c.share:.1%} | {c.mean_entropy:.3f} |")
    return "\n".join(lines)


def marked_text(s: ScoredResponse, fork_threshold: float) -> str:
    """The response as text with every forking token (entropy ≥ the top-ρ cut, and > 0) in ⟦ ⟧."""
    return "".join(
        f"⟦{text}⟧" if sampled and h >= fork_threshold and h > 0 else text
        for text, h, sampled in zip(s.tokens, s.entropies, s.sampled(), strict=True)
    )


def _markdown(summary: dict, high: list[TokenCount], low: list[TokenCount], rho: float, examples: list[str]) -> str:
    stats = "\n".join(f"| {name} | {value} |" for name, value in _stats_rows(summary))
    quoted = "\n\n".join(f"```text\n{text}\n```" for text in examples)
    return f"""# Token entropy report

| statistic | value |
|---|---:|
{stats}

![entropy histogram](entropy_histogram.png)

## Most frequent tokens at the top {rho:.0%} highest-entropy positions

{_token_table(high)}

![high-entropy tokens](wordcloud_high.png)

## Most frequent tokens at the {rho:.0%} lowest-entropy positions

{_token_table(low)}

![low-entropy tokens](wordcloud_low.png)

## Examples: the top {rho:.0%} tokens marked ⟦ ⟧ (every response, shaded by entropy: report.html)

{quoted}
"""


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; }
td, th { padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: left; }
.figures img { max-width: 49%; }
.response { margin: 1.2em 0; border: 1px solid #ddd; border-radius: 4px; padding: 0.6em; }
.meta { color: #666; font-size: 0.85em; margin-bottom: 0.4em; }
.tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-word;
          line-height: 1.6; }
.tokens span:hover { outline: 1px solid #000; }
.fork { border-bottom: 2px solid #8b0000; }
.forced { color: #999; font-style: italic; }
""" + "\n".join(
    f".h{i} {{ background: rgba(220, 60, 40, {i / (COLOR_LEVELS - 1):.2f}); }}" for i in range(COLOR_LEVELS)
)


def _page(
    scored: list[ScoredResponse], summary: dict, out: Path, fork_threshold: float, max_responses: int
) -> str:
    """Tokens shaded by entropy (full colour at p99 and above), forking positions (above the top-ρ cut)
    underlined; hovering shows the value."""
    scale = max(summary["percentiles"]["99"], 1e-6)
    stats = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _stats_rows(summary)
    )
    figures = "".join(
        f'<img alt="{name}" src="{_png_data_uri(out / name)}">'
        for name in ("entropy_histogram.png", "wordcloud_high.png", "wordcloud_low.png")
    )
    responses = []
    for s in scored[:max_responses]:
        spans = []
        for text, h, sampled in zip(s.tokens, s.entropies, s.sampled(), strict=True):
            if not sampled:
                spans.append(
                    f'<span class="forced" title="forced by the thinking budget">{html.escape(text)}</span>'
                )
                continue
            level = min(COLOR_LEVELS - 1, int(h / scale * (COLOR_LEVELS - 1) + 0.5))
            fork = " fork" if h >= fork_threshold and h > 0 else ""
            spans.append(f'<span class="h{level}{fork}" title="H = {h:.4f}">{html.escape(text)}</span>')
        mean = sum(s.entropies) / max(len(s.entropies), 1)
        responses.append(
            f'<div class="response"><div class="meta">line {s.line} · {len(s.entropies)} tokens · mean H '
            f'{mean:.3f}</div><div class="tokens">{"".join(spans)}</div></div>'
        )
    shown = f"{min(len(scored), max_responses)} of {len(scored)}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Token entropy report</title>
<style>{PAGE_STYLE}</style>
</head>
<body>
<h1>Token entropy report</h1>
<table>{stats}</table>
<div class="figures">{figures}</div>
<h2>Responses ({shown})</h2>
<p>Shading grows with entropy (full at p99 = {scale:.3f});
underlined tokens are in the top {summary["rho"]:.0%} (H &ge; {fork_threshold:.3f}).
Hover a token for its entropy.</p>
{"".join(responses)}
</body>
</html>
"""


def write_comparison(
    a: list[ScoredResponse],
    b: list[ScoredResponse],
    out_dir: str | os.PathLike,
    rho: float = 0.2,
    label_a: str = "A",
    label_b: str = "B",
) -> dict:
    """Write comparison.json, comparison.md and entropy_change.png; a and b must hold the same tokens."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampled = torch.tensor([keep for x in a for keep in x.sampled()])  # A's forced spans left out of both
    entropies_a = torch.tensor([h for x in a for h in x.entropies], dtype=torch.float64)[sampled]  # [N]
    entropies_b = torch.tensor([h for y in b for h in y.entropies], dtype=torch.float64)[sampled]
    changes = entropy_change_by_bucket(entropies_a, entropies_b)
    result = {
        "a": label_a,
        "b": label_b,
        "responses": len(a),
        "tokens": entropies_a.numel(),
        "rho": rho,
        "top_overlap": top_overlap(entropies_a, entropies_b, rho),
        "mean_entropy_a": entropies_a.mean().item(),
        "mean_entropy_b": entropies_b.mean().item(),
        "buckets": [vars(c) for c in changes],
    }
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    plots.entropy_change_bars(changes, out / "entropy_change.png", label_a, label_b)
    rows = "\n".join(
        f"| {c.low_percentile:.0f}–{c.high_percentile:.0f} % | {c.tokens} | {c.mean_entropy_a:.4f} "
        f"| {c.mean_change:+.4f} |"
        for c in changes
    )
    (out / "comparison.md").write_text(f"""# Entropy comparison: {label_a} vs {label_b}

{result["tokens"]} tokens in {result["responses"]} responses.
Overlap of the top {rho:.0%} high-entropy positions, |S_A ∩ S_B| / |S_A|: **{result["top_overlap"]:.2%}**.
Mean entropy: {result["mean_entropy_a"]:.4f} ({label_a}) → {result["mean_entropy_b"]:.4f} ({label_b}).

| bucket of {label_a}'s entropy | tokens | mean H ({label_a}) | mean change ({label_b} − {label_a}) |
|---|---:|---:|---:|
{rows}

![entropy change per bucket](entropy_change.png)
""")
    return result
