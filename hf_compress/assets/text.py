"""Offline English text: a Wikipedia excerpt (calibration / evaluation splits) and a news corpus.

Both come from the test data of the ``gensim==4.4.0`` wheel, read straight from the zip (gensim is
never installed or imported). Fetch the wheel once with::

    pip download --no-deps gensim==4.4.0 -d "${HF_COMPRESS_CACHE:-~/.cache/hf_compress}/wheels"

Wikipedia markup is stripped by a fixed sequence of regular expressions (:func:`strip_wikitext`), so
the text, and therefore every perplexity, is reproducible. Articles are split whole: an article is in
the evaluation split if ``sha1(title) % 4 == 0``, else in the calibration split, so the two never
share text.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import html
import io
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from datasets import Dataset

from ..utils import InvalidArgumentTypeError, check_int, get_logger, read_user_text
from .catalog import GENSIM_INSTALL, GENSIM_WHEEL_GLOB
from .locate import file_in_wheel


logger = get_logger(__name__)


_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
WIKI_SPLITS = ("calibration", "eval")
_MIN_ARTICLE_CHARS = 500  # drop stubs and leftovers of redirects/disambiguation pages


def load_wikipedia(split: str = "eval") -> Dataset:
    """The English Wikipedia excerpt as a ``Dataset`` of articles (columns ``id``, ``title``, ``text``).

    ``split`` is ``"calibration"`` or ``"eval"`` (disjoint by article) or ``"all"``.

    Example:
        >>> eval_set = load_wikipedia("eval")
        >>> eval_set.column_names
        ['id', 'title', 'text']
    """
    if not isinstance(split, str) or split not in (*WIKI_SPLITS, "all"):
        raise ValueError(f"Unknown split {split!r}; choose 'calibration', 'eval' or 'all'.")
    articles = [a for a in _wikipedia_articles() if split == "all" or _wiki_split_of(a["title"]) == split]
    return Dataset.from_list(articles)


def load_news() -> Dataset:
    """The Lee news corpus (300 short Australian news articles), an out-of-domain evaluation set.

    Example:
        >>> load_news().num_rows
        300
    """
    raw = file_in_wheel(GENSIM_WHEEL_GLOB, _NEWS_MEMBER, GENSIM_INSTALL, "The Lee news corpus (gensim test data)")
    lines = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
    return Dataset.from_list([{"id": i, "title": f"lee-{i}", "text": line} for i, line in enumerate(lines)])


def load_text(name: str = "wikipedia", split: str = "eval") -> Dataset:
    """Load an offline text set by name: ``"wikipedia"`` (with ``split``) or ``"news"``.

    Example:
        >>> calibration = load_text("wikipedia", "calibration")
    """
    if name == "wikipedia":
        return load_wikipedia(split)
    if name == "news":
        return load_news()
    raise ValueError(f"Unknown text set (name) {name!r}; choose 'wikipedia' or 'news'.")


CALIBRATION_TEXTS = ("wikipedia", "news")


def load_calibration_text(spec: str | os.PathLike = "wikipedia") -> Dataset | list[str]:
    """Calibration text by name or file: ``"wikipedia"`` (its calibration split), ``"news"``, or the path of a
    UTF-8 text file (split into paragraphs at blank lines).

    ``"news"`` is the whole news corpus, which is also the ``"news"`` perplexity set (there is no other offline news
    text to hold out), so choosing it logs a warning: a news perplexity measured afterwards is on calibration data.

    Example:
        >>> load_calibration_text("no-such-file.txt")
        Traceback (most recent call last):
        ...
        ValueError: calibration text 'no-such-file.txt' is neither 'wikipedia', 'news' nor a readable text file.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise InvalidArgumentTypeError(
            f"calibration text (spec) must be 'wikipedia', 'news' or the path of a UTF-8 text file, got {spec!r}."
        )
    name = os.fspath(spec)
    if name == "wikipedia":
        return load_text("wikipedia", "calibration")
    if name == "news":
        logger.warning("Calibrating on the news corpus, which is also the 'news' perplexity set: a news perplexity "
                       "measured after this is on calibration data, not held-out text. Quote the Wikipedia "
                       "perplexity (its eval split is disjoint from calibration) for an out-of-sample number.")
        return load_text("news")
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"calibration text {name!r} is neither 'wikipedia', 'news' nor a readable text file.")
    paragraphs = [p.strip() for p in read_user_text(path, "calibration text file").split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError(f"calibration text file {name} is empty.")
    return paragraphs


def _wiki_split_of(title: str) -> str:
    return "eval" if int(hashlib.sha1(title.encode()).hexdigest(), 16) % 4 == 0 else "calibration"


@functools.lru_cache(maxsize=1)
def _wikipedia_articles() -> tuple[dict, ...]:
    raw = file_in_wheel(GENSIM_WHEEL_GLOB, _WIKI_MEMBER, GENSIM_INSTALL, "The Wikipedia excerpt (gensim test data)")
    articles = []
    for _, elem in ET.iterparse(io.BytesIO(bz2.decompress(raw)), events=("end",)):
        if _local(elem.tag) != "page":
            continue
        fields = {_local(child.tag): child for child in elem}
        namespace = fields["ns"].text if "ns" in fields else "0"
        revision = fields.get("revision")
        text_elem = next((c for c in revision if _local(c.tag) == "text"), None) if revision is not None else None
        raw_text = (text_elem.text or "") if text_elem is not None else ""
        if namespace == "0" and "redirect" not in fields and not raw_text.lstrip().upper().startswith("#REDIRECT"):
            text = strip_wikitext(raw_text)
            if len(text) >= _MIN_ARTICLE_CHARS:
                articles.append({"id": int(fields["id"].text), "title": fields["title"].text, "text": text})
        elem.clear()
    return tuple(articles)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*?/>|<ref[^>]*?>.*?</ref>", re.S | re.I)
_BLOCK_TAGS = re.compile(r"<(gallery|math|timeline|score|syntaxhighlight|source|code|imagemap)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK_START = re.compile(r"\[\[(?:File|Image|Category|Media):", re.I)
_INTERWIKI = re.compile(r"\[\[[a-z]{2,3}(?:-[a-z]+)?:[^\]]*\]\]")
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_BARE_URL = re.compile(r"(?:https?|ftp)://\S+")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_EMPHASIS = re.compile(r"'{2,}")
_LIST_PREFIX = re.compile(r"^[*#:;]+\s*", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
_SPACES = re.compile(r"[ \t]+")
_BLANKS = re.compile(r"\n{3,}")


def strip_wikitext(text: str) -> str:
    """Turn MediaWiki markup into plain prose with a fixed, deterministic sequence of rules.

    Templates, tables, references, files/categories and HTML are dropped; links keep their label;
    headings keep their text on a line of their own; paragraphs are separated by a blank line.

    Example:
        >>> strip_wikitext("'''Anarchism''' is a [[political philosophy|philosophy]].{{cite}}<ref>x</ref>")
        'Anarchism is a philosophy.'
    """
    text = html.unescape(text)  # the dump escapes markup once (&lt;ref&gt;); entities inside resolve later
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _BLOCK_TAGS.sub("", text)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    text = _drop_file_links(text)
    text = _INTERWIKI.sub("", text)
    for _ in range(2):  # a link label may itself contain a link
        text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _BARE_URL.sub("", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    text = _HEADING.sub(r"\1", text)
    text = _EMPHASIS.sub("", text)
    text = _MAGIC.sub("", text)
    text = _LIST_PREFIX.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    # Drop lines that are leftovers of markup (lone pipes, braces) rather than prose.
    lines = [line for line in lines if not line or re.search(r"[A-Za-z0-9]", line)]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def _drop_nested(text: str, open_token: str, close_token: str) -> str:
    # Templates and tables nest, which one regular expression cannot match; walk the delimiters with
    # a depth counter and keep only the text at depth 0.
    pattern = re.compile(f"{re.escape(open_token)}|{re.escape(close_token)}")
    out, depth, kept_from = [], 0, 0
    for match in pattern.finditer(text):
        if match.group() == open_token:
            if depth == 0:
                out.append(text[kept_from : match.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                kept_from = match.end()
    if depth == 0:
        out.append(text[kept_from:])
    return "".join(out)


def _drop_file_links(text: str) -> str:
    # [[File:x.jpg|thumb|caption with [[links]]]] nests, so find the matching brackets by depth.
    while (match := _FILE_LINK_START.search(text)) is not None:
        depth, i = 0, match.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth += 1
                i += 2
            elif text.startswith("]]", i):
                depth -= 1
                i += 2
                if depth == 0:
                    break
            else:
                i += 1
        text = text[: match.start()] + text[i:]
    return text


def speed_prompts(count: int = 10, chars: int = 200) -> list[str]:
    """Fixed prompts for generation-speed runs: the opening ``chars`` characters of eval articles.

    Cut at the last space before ``chars`` so no prompt ends inside a word.

    Example:
        >>> [prompt.split(" (")[0] for prompt in speed_prompts(2)]
        ['In Greek mythology, Achilles', 'Abraham Lincoln']
    """
    check_int("count", count, minimum=0)
    check_int("chars", chars, minimum=1, hint="Prompts are the first chars characters of each article.")
    articles = load_wikipedia("eval")
    if count > articles.num_rows:
        raise ValueError(f"Only {articles.num_rows} evaluation articles; ask for at most that many prompts.")
    return [text[:chars].rsplit(" ", 1)[0] for text in articles["text"][:count]]
