"""HTML to text: which extractor keeps a page's content whole, in paragraphs, without its boilerplate,
and at what cost in time and memory?

    .venv/bin/python bench/html_extract.py                 # quality, speed, peak memory
    .venv/bin/python bench/html_extract.py --repeat 5      # fewer timing rounds (a quick look)

The comparison rows need libraries the project does not: `pip install beautifulsoup4 inscriptis`
into the virtualenv (a row whose library is missing is skipped with a message).

Pages: examples/web/*.html (an <article> in nav and footer) and bench/pages/*.html (written to look
like real pages: a WordPress post with sidebar, comments, share and related-post blocks and a cookie
bar; a Sphinx page with a code block, a table and a long navigation; a news story with ads and "most
read"; a two-sentence notice). For each page, GOLD names the content (XPath) and the parts inside it
that are boilerplate or neither; every block of content (p, li, h1-h6, table row, code line) is then
checked against each extractor's output:

- kept: its words appear in order in the output (anywhere);
- whole: its words appear in order within one line (inline tags did not break it);
- own paragraph (p only) and own heading (h1-h6): the block is a paragraph of its own (blank lines
  around it), so the chunker's strongest boundary falls between blocks; "marked": a "# " line;
- boilerplate: the share of the text outside the content (phrases of 3+ words: menus, footers,
  sidebars, comments, scripts) that appears in the output.

Speed: the mean time per page over all pages, and one big page (the blog post's content x 400, 1.5 MB).
Peak memory: each extractor in a fresh process, the growth of its RSS during the extraction alone
(sampled every millisecond), on the big page and on 99,000 tiny tags (just under the loader's bound).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOLD: dict[str, dict[str, list[str]]] = {
    "blog-kettle-descaling.html": {
        "content": ["//h1[@class='entry-title']", "//div[contains(@class,'entry-content')]"],
        "boilerplate": ["//div[contains(@class,'sharedaddy')]", "//div[contains(@class,'jp-relatedposts')]"],
        "neither": ["//div[@class='entry-meta']", "//figcaption"],
    },
    "docs-retry-policy.html": {
        "content": ["//div[@itemprop='articleBody']"],
        "boilerplate": [],
        "neither": ["//a[@class='headerlink']", "//p[@class='admonition-title']"],
    },
    "news-river-survey.html": {
        "content": ["//h1", "//p[@class='standfirst']", "//div[@class='story-body']"],
        "boilerplate": ["//div[contains(@class,'ad-slot')]"],
        "neither": ["//aside", "//p[@class='byline']", "//p[@class='kicker']", "//figcaption"],
    },
    "short-notice.html": {"content": ["//main"], "boilerplate": [], "neither": []},
}
ARTICLE = {"content": ["//article"], "boilerplate": [], "neither": ["//p[@class='byline']"]}
BLOCKS = {"p", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "pre", "dt", "dd"}
WORDS = re.compile(r"\w+")


# --- the extractors ---------------------------------------------------------------------------
def bs4_get_text(html: str) -> str:
    """The loader before: BeautifulSoup's get_text("\\n") inside main/article, boilerplate tags dropped."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg", "nav", "footer", "header", "form"]):
        tag.decompose()
    main = soup.find("main") or soup.find("article") or soup.body or soup
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    body = main.get_text("\n", strip=True)
    return f"{title}\n\n{body}" if title and not body.startswith(title) else body


def trafilatura_rendered(html: str) -> str:
    from workers.extract_html import html_to_text

    return html_to_text(html)


def trafilatura_markdown(html: str) -> str:
    """trafilatura's own Markdown output (bold and code marks in the text)."""
    import trafilatura

    return trafilatura.extract(html, output_format="markdown", include_comments=False, include_tables=True) or ""


def inscriptis_page(html: str) -> str:
    import inscriptis

    return inscriptis.get_text(html)


def inscriptis_pruned(html: str) -> str:
    """inscriptis on main/article/body with the boilerplate tags dropped and headings marked "# "."""
    from inscriptis import Inscriptis
    from inscriptis.css_profiles import CSS_PROFILES
    from inscriptis.model.config import ParserConfig
    from lxml import html as lxml_html

    tree = lxml_html.fromstring(html)
    for el in tree.xpath("//script|//style|//noscript|//template|//svg|//nav|//footer|//header|//form|//aside"):
        el.drop_tree()
    for level in range(1, 7):
        for h in tree.iter(f"h{level}"):
            h.text = "#" * level + " " + (h.text or "")
    main = next(iter(tree.xpath("//main|//article")), None)
    config = ParserConfig(css=CSS_PROFILES["strict"])
    return Inscriptis(main if main is not None else tree, config).get_text()


EXTRACTORS = {
    "bs4 get_text (before)": bs4_get_text,
    "trafilatura, rendered (chosen)": trafilatura_rendered,
    "trafilatura markdown": trafilatura_markdown,
    "inscriptis, page": inscriptis_page,
    "inscriptis, pruned": inscriptis_pruned,
}


# --- quality --------------------------------------------------------------------------------------
def gold(path: Path) -> tuple[list[tuple[str, list[str]]], list[list[str]]]:
    """(content blocks as (tag, words), boilerplate phrases as words) of one page."""
    from lxml import html as lxml_html

    spec = GOLD.get(path.name, ARTICLE)
    tree = lxml_html.fromstring(path.read_text())
    for xpath in spec["neither"]:
        for el in tree.xpath(xpath):
            el.drop_tree()
    boiler_roots = [el for xpath in spec["boilerplate"] for el in tree.xpath(xpath)]
    content_roots = [el for xpath in spec["content"] for el in tree.xpath(xpath)]
    # the elements themselves, not id(): lxml makes a new proxy object per access, and ids are reused
    inside = {el for root in content_roots for el in root.iter()}
    inside -= {el for root in boiler_roots for el in root.iter()}
    blocks: list[tuple[str, list[str]]] = []
    for root in content_roots:
        for el in root.iter():
            if el.tag in BLOCKS and el in inside and not any(d.tag in BLOCKS for d in el.iterdescendants()):
                if el.tag == "pre":
                    blocks += [("pre", w) for line in el.text_content().splitlines() if (w := WORDS.findall(line))]
                elif el.tag == "tr":  # cells apart: text_content() runs "a</td><td>b" together
                    blocks.append(("tr", [w for cell in el for w in WORDS.findall(cell.text_content())]))
                elif words := WORDS.findall(el.text_content()):
                    in_cell = any(a.tag in ("li", "td", "th") for a in el.iterancestors())
                    blocks.append(("p in a cell" if el.tag == "p" and in_cell else el.tag, words))
    phrases = []
    body = tree.find("body")
    for el in body.iter() if body is not None else ():
        if el in inside or not isinstance(el.tag, str):
            continue
        for text in (el.text, el.tail if el.getparent() is not None and el.getparent() not in inside else None):
            if text and len(words := WORDS.findall(text)) >= 3:
                phrases.append(words[:12])
    return blocks, phrases


def contains(haystack: list[str], needle: list[str]) -> bool:
    return f" {' '.join(needle)} " in f" {' '.join(haystack)} "


def score(text: str, blocks: list[tuple[str, list[str]]], phrases: list[list[str]]) -> dict[str, float]:
    lines = text.split("\n")
    line_words = [WORDS.findall(line) for line in lines]
    all_words = [w for ws in line_words for w in ws]
    kept = whole = paras = para_total = heads = marked = head_total = 0
    for tag, words in blocks:
        kept += contains(all_words, words)
        at = next((i for i, ws in enumerate(line_words) if contains(ws, words)), None)
        whole += at is not None
        alone = (
            at is not None
            and (at == 0 or not lines[at - 1].strip())
            and (at == len(lines) - 1 or not lines[at + 1].strip())
        )
        if tag == "p":
            para_total += 1
            paras += alone
        if tag[0] == "h" and tag[1:].isdigit():
            head_total += 1
            heads += alone and line_words[at] == words
            marked += at is not None and lines[at].lstrip().startswith("#")
    leaked = sum(contains(all_words, p) for p in phrases)
    return {
        "kept": kept / len(blocks),
        "whole": whole / len(blocks),
        "own_paragraph": paras / para_total if para_total else 1.0,
        "own_heading": heads / head_total if head_total else 1.0,
        "marked": marked / head_total if head_total else 1.0,
        "boilerplate": leaked / len(phrases) if phrases else 0.0,
    }


# --- speed and memory ------------------------------------------------------------------------------
def big_page() -> str:
    page = (ROOT / "bench" / "pages" / "blog-kettle-descaling.html").read_text()
    start, end = page.index('<div class="entry-content">'), page.index('<div class="sharedaddy')
    body = page[start + len('<div class="entry-content">') : end]
    return page.replace(body, body * 400)


def tags_page() -> str:
    return "<html><body>" + "<b>x</b> " * 49_500 + "</body></html>"  # 99,000 tags


def peak_rss(name: str, which: str) -> dict[str, float]:
    """In a fresh process: the extraction's growth of the peak RSS, MiB, and its seconds."""
    code = f"""
import json, os, sys, threading, time
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / "bench")!r})
import html_extract as h
html = h.big_page() if {which!r} == "big" else h.tags_page()
fn = h.EXTRACTORS[{name!r}]
fn("<html><body><p>warm up: imports and lazy set-up are not counted.</p></body></html>")
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
before, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.001)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter(); text = fn(html); seconds = time.perf_counter() - t
done.set(); peak[0] = max(peak[0], rss())
print(json.dumps({{"mib": (peak[0] - before) / 2**20, "s": seconds, "chars": len(text)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:120]}  # type: ignore[dict-item]
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="timing rounds over all pages")
    parser.add_argument("--json", dest="out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    pages = sorted((ROOT / "examples" / "web").glob("*.html")) + sorted((ROOT / "bench" / "pages").glob("*.html"))
    golds = {p: gold(p) for p in pages}
    htmls = {p: p.read_text() for p in pages}
    results: dict[str, dict[str, object]] = {}
    for name, fn in EXTRACTORS.items():
        try:
            fn(htmls[pages[0]])  # imports
        except ImportError as e:
            print(f"{name}: skipped ({e.name} is not installed)", flush=True)
            continue
        per_page = {p.name: score(fn(htmls[p]), *golds[p]) for p in pages}
        mean = {k: sum(s[k] for s in per_page.values()) / len(per_page) for k in next(iter(per_page.values()))}
        t = time.perf_counter()
        for _ in range(args.repeat):
            for p in pages:
                fn(htmls[p])
        ms_per_page = (time.perf_counter() - t) * 1000 / (args.repeat * len(pages))
        results[name] = {
            "quality": mean,
            "worst_page": {k: min(per_page.items(), key=lambda kv, k=k: kv[1][k])[0] for k in ("kept", "whole")},
            "ms_per_page": ms_per_page,
            "big_page": peak_rss(name, "big"),
            "tags_99k": peak_rss(name, "tags"),
        }
        print(name, json.dumps(results[name]), flush=True)
    print(f"\n{len(pages)} pages; big page {len(big_page()) / 1e6:.1f} MB; one thread\n")
    print(
        "| extractor | kept | whole | own paragraph | own heading | heading marked | boilerplate kept |"
        " ms/page | big page: s, MiB | 99k tags: s, MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        q = r["quality"]
        big, tags = r["big_page"], r["tags_99k"]

        def cost(m: dict[str, float]) -> str:
            return m["error"] if "error" in m else f"{m['s']:.2f} s, {m['mib']:.0f} MiB"

        print(
            f"| {name} | {q['kept']:.2f} | {q['whole']:.2f} | {q['own_paragraph']:.2f} | {q['own_heading']:.2f} |"
            f" {q['marked']:.2f} | {q['boilerplate']:.2f} | {r['ms_per_page']:.1f} | {cost(big)} | {cost(tags)} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
