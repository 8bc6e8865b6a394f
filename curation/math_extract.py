"""HTML -> text that keeps formulas as TeX and code blocks as fenced code (OpenWebMath / FineMath style).

Plain trafilatura drops a formula rendered as an image or MathML and collapses a code block's whitespace
(indentation, a pretty-printed fraction). Here the page is rewritten before trafilatura: every formula becomes a
placeholder word (display formulas a paragraph of their own) and every `<pre>` block a placeholder paragraph;
trafilatura then chooses the main text as usual, and the placeholders that survive are replaced by `$tex$`,
`$$tex$$` and fenced code. A formula or block that trafilatura judges boilerplate goes with its paragraph.

Formulas recognised (the TeX source is always taken from the page, never re-rendered):
  <script type="math/tex">, "math/tex; mode=display"        MathJax 2 source
  <math alttext=...>, <annotation encoding="application/x-tex"> MathML (and KaTeX, which embeds MathML)
  <span|div class="math">\\(..\\) \\[..\\] $..$ $$..$$</span>    Sphinx mathjax / arithmatex output
  <img alt="TeX"> with class math/latex/tex, inside a `math` element, or a TeX-looking alt   Sphinx imgmath, wikis
Rendered copies (MathJax_Preview, MathJax / mjx-container output, katex-html) are removed so that a formula is
not kept twice.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike
from mixlab.curation.extract import EXTRACT_TIMEOUT_S, QuarantiningTrafilatura

# rendered output whose TeX is kept elsewhere on the page (a script or a MathML annotation)
RENDERED_CLASSES = frozenset({"MathJax_Preview", "MathJax", "MathJax_Display", "MathJax_SVG", "MathJax_CHTML",
                              "katex-html"})
MATH_IMG_CLASSES = frozenset({"math", "latex", "tex", "mwe-math-fallback-image-inline",
                              "mwe-math-fallback-image-display"})
_TEX_LOOKING = re.compile(r"\\[A-Za-z]+|[_^]\{|[_^][A-Za-z0-9]")
_DELIMITED = [(re.compile(r"^\$\$(.+)\$\$$", re.S), True), (re.compile(r"^\\\[(.+)\\\]$", re.S), True),
              (re.compile(r"^\\\((.+)\\\)$", re.S), False), (re.compile(r"^\$(.+)\$$", re.S), False)]
_HIGHLIGHT_LANGUAGE = re.compile(r"\bhighlight-([A-Za-z0-9_+-]+)")
_LANGUAGE_CLASS = re.compile(r"\b(?:language|lang)-([A-Za-z0-9_+-]+)")
_FENCE = "```"


@dataclass
class MathPage:
    """A page rewritten for trafilatura: placeholders in `html`, and what each stands for."""

    html: str
    token: str  # placeholders are f"{token}T{n}Z" (a formula) and f"{token}C{n}Z" (a code block)
    formulas: list[tuple[str, bool]] = field(default_factory=list)  # (tex, display)
    code_blocks: list[tuple[str, str]] = field(default_factory=list)  # (code, language or "")


class MathText(str):
    """Extracted text that also says how many formulas and code blocks it kept (it crosses the extractor's
    process boundary as one picklable value)."""

    formulas: int
    display_formulas: int
    code_blocks: int

    def __new__(cls, text: str, formulas: int = 0, display_formulas: int = 0, code_blocks: int = 0) -> MathText:
        value = super().__new__(cls, text)
        value.formulas, value.display_formulas, value.code_blocks = formulas, display_formulas, code_blocks
        return value

    def __reduce__(self) -> tuple[Any, ...]:
        return MathText, (str(self), self.formulas, self.display_formulas, self.code_blocks)


def _classes(element: Any) -> set[str]:
    return set((element.get("class") or "").split())


def _clean_tex(tex: str) -> str:
    return " ".join(tex.split())


def _strip_delimiters(text: str) -> tuple[str, bool | None]:
    """TeX without its `$`, `\\(`, `\\[` delimiters, and whether they made it a display formula (None: none)."""
    text = text.strip()
    for pattern, display in _DELIMITED:
        if match := pattern.match(text):
            return match.group(1).strip(), display
    return text, None


def _in_math_container(element: Any) -> bool:
    parent = element.getparent()
    for _ in range(3):  # Sphinx imgmath: <div class="math"><p><img alt=...>
        if parent is None:
            return False
        if "math" in _classes(parent):
            return True
        parent = parent.getparent()
    return False


def _display_context(element: Any) -> bool:
    """Inside a display wrapper: Sphinx's `<div class="math">` or KaTeX's `katex-display` (three levels up)."""
    parent = element.getparent()
    for _ in range(3):
        if parent is None or parent.tag in ("li", "td", "body"):
            return False
        if parent.tag == "div" and "math" in _classes(parent) or "katex-display" in _classes(parent):
            return True
        parent = parent.getparent()
    return False


def formula_of(element: Any) -> tuple[str, bool] | None:
    """(TeX, display) of an element that holds a formula, or None when it does not hold one."""
    tag = element.tag if isinstance(element.tag, str) else ""
    tag = tag.rsplit("}", 1)[-1].lower()
    classes = _classes(element)
    if tag == "script":
        kind = (element.get("type") or "").lower()
        if kind.startswith("math/tex"):
            tex = _clean_tex(element.text or "")
            return (tex, "mode=display" in kind) if tex else None
        return None
    if tag == "math":
        annotation = next((a for a in element.iter() if isinstance(a.tag, str) and a.tag.endswith("annotation")
                           and (a.get("encoding") or "").lower() in ("application/x-tex", "tex")), None)
        tex = _clean_tex(annotation.text or "") if annotation is not None else _clean_tex(element.get("alttext") or "")
        if not tex:
            return None
        return tex, (element.get("display") or "").lower() == "block" or _display_context(element)
    if tag == "img":
        alt = element.get("alt") or ""
        src = (element.get("src") or "").lower()
        if not alt.strip():
            return None
        if classes & MATH_IMG_CLASSES or _in_math_container(element) or "latex" in src or "mathtex" in src \
                or _TEX_LOOKING.search(alt):
            tex, display = _strip_delimiters(alt)
            tex = _clean_tex(tex)
            if not tex:
                return None
            return tex, bool(display) or _display_context(element)
        return None
    if tag in ("span", "div") and "math" in classes and not element.xpath(".//img|.//math|.//script"):
        tex, display = _strip_delimiters(element.text_content())
        tex = _clean_tex(tex)
        if not tex:
            return None
        return tex, display if display is not None else tag == "div"
    return None


def _code_language(pre: Any) -> str:
    element, depth = pre, 0
    while element is not None and depth < 4:
        classes = element.get("class") or ""
        if match := _HIGHLIGHT_LANGUAGE.search(classes) or _LANGUAGE_CLASS.search(classes):
            language = match.group(1).lower()
            return "" if language in ("default", "none", "text") else language
        for child in element.iter("code") if depth == 0 else ():
            if match := _LANGUAGE_CLASS.search(child.get("class") or ""):
                return match.group(1).lower()
        element, depth = element.getparent(), depth + 1
    return ""


def _replace(element: Any, new: Any | None, text: str = "") -> None:
    """Put `new` (or the plain `text`) where `element` was, keeping the element's tail text."""
    parent = element.getparent()
    if parent is None:
        return
    tail = element.tail or ""
    if new is not None:
        new.tail = tail
        element.addprevious(new)
    else:
        previous = element.getprevious()
        if previous is not None:
            previous.tail = (previous.tail or "") + text + tail
        else:
            parent.text = (parent.text or "") + text + tail
    parent.remove(element)


def rewrite_math_html(html: str) -> MathPage:
    """`html` with formulas and `<pre>` blocks replaced by placeholders (see the module docstring)."""
    import lxml.html

    token = "mxq" + hashlib.sha1(html.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    while token in html:
        token = "mxq" + hashlib.sha1(token.encode()).hexdigest()[:8]
    page = MathPage(html, token)
    try:
        try:
            root = lxml.html.document_fromstring(html)
        except ValueError:  # lxml refuses a str with an XML encoding declaration; the bytes parse
            root = lxml.html.document_fromstring(html.encode("utf-8", "surrogatepass"))
    except Exception:  # noqa: BLE001 - not parseable as HTML: trafilatura gets the page as it is
        return page
    for element in list(root.iter()):
        if not isinstance(element.tag, str) or element.getparent() is None:
            continue
        if _classes(element) & RENDERED_CLASSES or element.tag == "mjx-container":
            if element.tag == "mjx-container" and (math := element.find(".//math")) is not None \
                    and (found := formula_of(math)) is not None:  # MathJax 3 with assistive MathML
                _formula_placeholder(page, element, *found)
            else:
                _replace(element, None)
    for element in list(root.iter()):
        if not isinstance(element.tag, str) or element.getparent() is None or _detached(element, root):
            continue
        if element.tag == "pre":
            page.code_blocks.append((element.text_content().strip("\n"), _code_language(element)))
            block = lxml.html.Element("pre")
            block.text = f"{token}C{len(page.code_blocks) - 1}Z"
            _replace(element, block)
            continue
        found = formula_of(element)
        if found is not None:
            _formula_placeholder(page, element, *found)
    page.html = lxml.html.tostring(root, encoding="unicode")
    return page


def _detached(element: Any, root: Any) -> bool:
    """True when an ancestor was already replaced (its subtree is no longer in the document)."""
    top = element
    while top.getparent() is not None:
        top = top.getparent()
    return top is not root


def _formula_placeholder(page: MathPage, element: Any, tex: str, display: bool) -> None:
    import lxml.html

    page.formulas.append((tex, display))
    word = f"{page.token}T{len(page.formulas) - 1}Z"
    if display:
        paragraph = lxml.html.Element("p")
        paragraph.text = word
        container = element
        # a display formula's own wrapper (<div class="math"><p><img>) becomes the paragraph
        while (parent := container.getparent()) is not None and len(parent) == 1 \
                and not (parent.text or "").strip() and not (container.tail or "").strip() \
                and (parent.tag == "p" or parent.tag == "div" and "math" in _classes(parent)):
            container = parent
        _replace(container, paragraph)
    else:
        _replace(element, None, word)


def restore_math_text(text: str, page: MathPage) -> MathText:
    """Trafilatura's output with the placeholders it kept replaced by TeX and fenced code."""
    kept = {"T": set(), "C": set()}

    def substitute(match: re.Match) -> str:
        kind, n = match.group(1), int(match.group(2))
        if kind == "T":
            if n >= len(page.formulas):
                return match.group(0)
            kept["T"].add(n)
            tex, display = page.formulas[n]
            return f"$${tex}$$" if display else f"${tex}$"
        if n >= len(page.code_blocks):
            return match.group(0)
        kept["C"].add(n)
        code, language = page.code_blocks[n]
        return f"\n{_FENCE}{language}\n{code}\n{_FENCE}\n"

    pattern = re.compile(rf"{page.token}([TC])(\d+)Z")
    restored = pattern.sub(substitute, text)
    restored = re.sub(r"[ \t]+\n", "\n", re.sub(r"\n{3,}", "\n\n", restored)).strip()
    display = sum(1 for n in kept["T"] if page.formulas[n][1])
    return MathText(restored, len(kept["T"]), display, len(kept["C"]))


def extract_math_html(html: str, favour_precision: bool = True, deduplicate: bool = False,
                      **trafilatura_options: Any) -> MathText | None:
    """The main text of `html` with its formulas as TeX and its code blocks fenced; None when trafilatura
    finds no main text."""
    from trafilatura import extract

    page = rewrite_math_html(html)
    text = extract(page.html, favor_precision=favour_precision, include_comments=False,
                   deduplicate=deduplicate, **trafilatura_options)
    return None if text is None else restore_math_text(text, page)


class MathTrafilatura(QuarantiningTrafilatura):
    """`QuarantiningTrafilatura` (same quarantine, timeout and deep-HTML handling) whose extraction keeps
    formulas as `$tex$` / `$$tex$$` and `<pre>` blocks as fenced code. Counts, per step, the formulas
    (`tex_formulas`, `tex_display_formulas`) and code blocks (`code_blocks`) kept, and the documents that kept
    any (`tex_docs`); these land in the manifest's step counts."""

    name = "⛏ Trafilatura (keeps TeX and code)"
    manifest_counts = ("tex_", "code_")

    def __init__(self, quarantine_folder: DataFolderLike, timeout: float = EXTRACT_TIMEOUT_S, **kwargs: Any):
        super().__init__(quarantine_folder, timeout=timeout, **kwargs)

    def extract(self, text: str) -> str | None:
        return extract_math_html(text, favour_precision=self.favour_precision, deduplicate=self.deduplicate,
                                 **self.kwargs)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in super().run(data, rank, world_size):
            if isinstance(doc.text, MathText):
                counts = doc.text
                for key, n in (("tex_formulas", counts.formulas), ("tex_display_formulas", counts.display_formulas),
                               ("code_blocks", counts.code_blocks), ("tex_docs", int(counts.formulas > 0))):
                    if n:
                        self.stat_update(key, value=n)
                doc.text = str(doc.text)
            yield doc
