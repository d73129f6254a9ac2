"""Entropy toolkit: teacher-forced scoring against full logits, the statistics, and the three commands end to
end on a real scored file (PNGs, markdown, a self-contained HTML page), including their input errors."""

import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from forkflow.entropy import (
    ScoredResponse,
    entropy_change_by_bucket,
    entropy_summary,
    score_responses,
    top_fraction,
    top_overlap,
    write_report,
)
from forkflow.entropy.cli import main as entropy_cli
from forkflow.entropy.lexicon import display_token, frequent_tokens
from forkflow.entropy.stats import percentile, percentile_buckets
from forkflow.models import from_pretrained, save_pretrained
from forkflow.rollout.cli import main as generate_cli


def test_scores_equal_full_logits(tiny_checkpoint):
    path, ref = tiny_checkpoint(moe=True)
    model = from_pretrained(path)
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6]]
    responses = [[10, 11], [12, 13, 14, 15], [16]]
    scores = score_responses(model, prompts, responses, temperature=0.7, batch_size=2)
    for prompt, response, (logprobs, entropies) in zip(prompts, responses, scores, strict=True):
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].double()
        logp1, logp_t = torch.log_softmax(logits, -1), torch.log_softmax(logits / 0.7, -1)
        assert torch.allclose(
            logprobs.double(), logp1.gather(1, torch.tensor(response)[:, None])[:, 0], atol=1e-4
        )
        assert torch.allclose(entropies.double(), -(logp_t.exp() * logp_t).sum(-1), atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=200), st.floats(0, 100))
def test_percentile_matches_numpy(values, q):
    assert percentile(torch.tensor(values, dtype=torch.float64), q) == pytest.approx(np.percentile(values, q))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=300),
    st.sampled_from([0.05, 0.2, 0.5, 1.0]),
)
def test_top_fraction_is_exact_and_overlap_with_itself_is_one(values, rho):
    values = torch.tensor(values, dtype=torch.float64)
    mask = top_fraction(values, rho)
    k = int(np.ceil(rho * len(values)))
    assert mask.sum() == k
    assert values[mask].min() >= values[~mask].max() if k < len(values) else mask.all()
    assert top_overlap(values, values, rho) == 1.0
    buckets = percentile_buckets(values, 20)
    assert sorted(torch.cat(buckets).tolist()) == list(range(len(values)))


def test_summary_overlap_and_bucket_changes():
    h = torch.tensor([0.0, 0.001, 0.005, 0.2, 0.5, 0.9, 1.2, 2.0, 3.0, 4.0], dtype=torch.float64)
    s = entropy_summary(h)
    assert s["tokens"] == 10 and s["fraction_below_0.01"] == 0.3
    assert s["percentiles"]["50"] == pytest.approx(np.percentile(h.numpy(), 50))
    assert s["fraction_above_p80"] == 0.2
    assert top_overlap(h, -h, 0.2) == 0.0
    changes = entropy_change_by_bucket(h, 2 * h, buckets=5)  # B doubles every entropy
    assert [c.tokens for c in changes] == [2] * 5
    assert [c.mean_change for c in changes] == pytest.approx([c.mean_entropy_a for c in changes])
    assert all(a.mean_change <= b.mean_change for a, b in zip(changes, changes[1:], strict=False))


def test_lexicon_counts_words_at_selected_positions():
    tokens = [" Wait", "ing", " wait", " Wait", "\n\n", " so"]
    entropies = torch.tensor([2.0, 0.0, 1.5, 1.8, 1.0, 0.1])
    counts = frequent_tokens(tokens, entropies, top_fraction(entropies, 0.6), top=3)
    assert [(c.token, c.count) for c in counts] == [("Wait", 2), ("\\n\\n", 1), ("wait", 1)]
    assert counts[0].mean_entropy == pytest.approx(1.9) and counts[0].share == pytest.approx(0.5)
    assert display_token(" ") == "␣"


# ------------------------------------------------------------------------------------------ the CLI


class StrictHTML(HTMLParser):
    """Checks that every element closes in order, and collects what the page would fetch."""

    VOID = {"meta", "img", "br", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.open, self.external, self.hover_titles = [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])
        self.hover_titles += tag == "span" and "title" in attrs
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing open"


@pytest.fixture(scope="module")
def scored_files(qwen3_vocab_checkpoint, tmp_path_factory):
    """Generate with the tiny Qwen3-vocabulary model, then score the samples with it and a perturbed copy."""
    work = tmp_path_factory.mktemp("entropy")
    prompts = work / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Solve x + 1 = 3. Wait, then what?"}) + '\n{"prompt": "Hello"}\n'
    )
    generated = work / "generated.jsonl"
    common = ["--model", str(qwen3_vocab_checkpoint)]
    options = "--n 2 --max-new-tokens 12 --no-enable-thinking --temperature 0.9".split()
    assert generate_cli([*common, "--prompts", str(prompts), "--out", str(generated), *options]) == 0
    scored_a = work / "a.jsonl"
    assert entropy_cli(["score", *common, "--data", str(generated), "--out", str(scored_a)]) == 0
    other = work / "perturbed-model"  # stands in for a checkpoint after some RL steps
    shutil.copytree(qwen3_vocab_checkpoint, other)
    model = from_pretrained(other)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    save_pretrained(model, other)
    scored_b = work / "b.jsonl"
    assert (
        entropy_cli(["score", "--model", str(other), "--data", str(generated), "--out", str(scored_b)]) == 0
    )
    return generated, scored_a, scored_b


def test_score_agrees_with_generation(scored_files):
    generated, scored_a, _ = scored_files
    for g, s in zip(generated.read_text().splitlines(), scored_a.read_text().splitlines(), strict=True):
        g, s = json.loads(g), json.loads(s)
        assert s["token_ids"] == g["token_ids"] and s["tokens"] == g["tokens"] and "sample_logprobs" not in s
        assert np.allclose(s["logprobs"], g["logprobs"], atol=1e-4)
        # generation reported entropies at its temperature 0.9; scoring used the default T = 1
        assert not np.allclose(s["entropies"], g["entropies"], atol=1e-4)


def test_report_renders_pngs_markdown_and_a_self_contained_page(scored_files, tmp_path):
    _, scored_a, _ = scored_files
    out = tmp_path / "report"
    assert entropy_cli(["report", str(scored_a), "--out", str(out)]) == 0
    for name in ("entropy_histogram.png", "wordcloud_high.png", "wordcloud_low.png"):
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] >= 400
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["percentiles"]) == {"50", "80", "90", "95", "99"} and summary["high_entropy_tokens"]
    markdown = (out / "report.md").read_text()
    assert "| p80 |" in markdown and "wordcloud_high.png" in markdown
    page = (out / "report.html").read_text()
    parser = StrictHTML()
    parser.feed(page)
    parser.close()
    assert parser.open == [] and parser.external == []  # balanced, and nothing fetched from outside
    assert "<title>Token entropy report</title>" in page and "<h1>Token entropy report</h1>" in page
    assert parser.hover_titles == summary["tokens"]


def test_report_escapes_token_text_and_leaves_out_forced_tokens(tmp_path):
    tokens = ["<script>", "a&b", "\n", "Considering"]
    scored = [ScoredResponse(1, [1, 2, 3, 4], [0.0, 2.0, 0.5, 9.0], tokens, forced_span=(3, 4))]
    summary = write_report(scored, tmp_path)
    assert summary["tokens"] == 3 and summary["percentiles"]["99"] < 2.0  # the forced token's 9.0 is out
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "a&amp;b" in page
    assert 'class="forced"' in page
    # report.md quotes the response with the top-20 % token marked (1 of the 3 sampled: 2.0), not the forced 9.0
    assert "```text\n<script>⟦a&b⟧\nConsidering\n```" in (tmp_path / "report.md").read_text()


def test_compare_overlap_and_bucket_changes(scored_files, tmp_path):
    _, scored_a, scored_b = scored_files
    assert entropy_cli(["compare", str(scored_a), str(scored_a), "--out", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "comparison.json").read_text())
    assert same["top_overlap"] == 1.0 and all(b["mean_change"] == 0 for b in same["buckets"])
    out = tmp_path / "ab"
    assert entropy_cli(["compare", str(scored_a), str(scored_b), "--out", str(out), "--label-a", "base"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert 0.3 < result["top_overlap"] < 1 and len(result["buckets"]) == 20
    assert sum(b["tokens"] for b in result["buckets"]) == result["tokens"]
    with Image.open(out / "entropy_change.png") as image:
        image.verify()
    assert "base" in (out / "comparison.md").read_text()


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "lines,message",
    [
        (
            ['{"prompt_ids": [1], "token_ids": [2]}', '{"prompt_ids": [1], "token_ids": []}'],
            "data.jsonl line 2: response is empty",
        ),
        (['{"prompt_ids": [1]}'], "data.jsonl line 1: needs 'response'"),
        (['{"token_ids": [1]}'], "data.jsonl line 1: needs 'prompt'"),
        (
            [json.dumps({"prompt_ids": [1] * 500, "token_ids": [2] * 20})],
            "line 1: prompt + response have 520 tokens",
        ),
    ],
)
def test_score_names_the_bad_line(tiny_checkpoint, tmp_path, capsys, lines, message):
    path, _ = tiny_checkpoint()
    data = write(tmp_path / "data.jsonl", lines)
    assert (
        entropy_cli(["score", "--model", str(path), "--data", data, "--out", str(tmp_path / "o.jsonl")]) == 2
    )
    assert message in capsys.readouterr().err


def test_report_and_compare_name_the_bad_line(tmp_path, capsys):
    good = '{"token_ids": [1, 2], "tokens": ["a", "b"], "entropies": [0.1, 0.2]}'
    missing = write(tmp_path / "missing.jsonl", [good, '{"token_ids": [1], "tokens": ["a"]}'])
    assert entropy_cli(["report", missing, "--out", str(tmp_path / "r")]) == 2
    assert "missing.jsonl line 2: field 'entropies' is missing" in capsys.readouterr().err
    uneven = write(
        tmp_path / "uneven.jsonl", ['{"token_ids": [1, 2], "tokens": ["a", "b"], "entropies": [0.1]}']
    )
    assert entropy_cli(["report", uneven, "--out", str(tmp_path / "r")]) == 2
    assert "uneven.jsonl line 1: 'entropies' has 1 values but 'token_ids' has 2" in capsys.readouterr().err
    span = write(tmp_path / "span.jsonl", [good.replace("}", ', "forced_span": [1, 5]}')])
    assert entropy_cli(["report", span, "--out", str(tmp_path / "r")]) == 2
    assert (
        "span.jsonl line 1: 'forced_span' must be [start, end] within the 2 tokens" in capsys.readouterr().err
    )
    a = write(tmp_path / "a.jsonl", [good, good])
    b = write(tmp_path / "b.jsonl", [good, good.replace("[1, 2]", "[1, 3]")])
    assert entropy_cli(["compare", a, b, "--out", str(tmp_path / "c")]) == 2
    assert "b.jsonl line 2: token_ids differ from" in capsys.readouterr().err
