"""Text corpora and their tokenisation into fixed-length rows (SPEC section 2).

The paper trains on FineWeb sample-10BT (hub).  Offline we build a real
English corpus from Debian packages, once, under ``data_root()/corpus/debian-offline/``:
the World English Bible (narrative, verse prefixes stripped, one document per
chapter), Matthew Henry's Concise Commentary (expository prose; the module
repeats each comment once per verse, so paragraphs are de-duplicated; one
document per chapter) and the Python 3.11 documentation (technical prose, code
blocks stripped, one document per page).  A local folder of ``.txt`` files
(one document per file) works anywhere a corpus name does, and
``$METASAE_CORPUS`` points the offline name at such a folder.

Command line (run_all.sh calls it)::

    python -m metasae.activations.corpus --ensure debian-offline
"""

from __future__ import annotations

import argparse
import html.parser
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from metasae.io import apt_install, atomic_write_json, read_json
from metasae.paths import data_root

OFFLINE = "debian-offline"
DEBIAN_PACKAGES = ("sword-text-web", "sword-comm-mhcc", "diatheke", "python3.11-doc")
PYDOC_HTML = Path("/usr/share/doc/python3.11/html")
SHUFFLE_SEED = 0
"""Documents are shuffled with this seed before tokenising, so every split mixes
Bible, commentary and Python docs.  Recorded in the cache manifest."""
BIBLE_RANGE = "Genesis 1:1-Revelation 22:21"


class CorpusUnavailable(RuntimeError):
    """The corpus cannot be found or built here; the message says what to do instead."""


# ---------------------------------------------------------------------------
# Resolving a corpus name to documents
# ---------------------------------------------------------------------------


def corpus_dir(name: str = OFFLINE) -> Path:
    return data_root() / "corpus" / name


CORPUS_VERSION = 2
"""Version of the offline corpus builder, in its manifest and in the activation cache's key.
2: psalm headings no longer leak into verses (see :func:`_parse_diatheke`)."""


def ensure_corpus(name: str) -> Path:
    """Return the folder of the named corpus, building ``debian-offline`` if absent.

    ``name`` may also be a path to a local folder of .txt files.  For ``fineweb``
    (streamed from the hub) there is no folder; the hub id is returned as a Path.
    """
    override = os.environ.get("METASAE_CORPUS")
    if name == OFFLINE and override:
        name = override
    if name == "fineweb":
        return Path("HuggingFaceFW/fineweb")
    if name != OFFLINE:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise CorpusUnavailable(
                f"corpus {name!r} is neither {OFFLINE!r}, 'fineweb' nor a folder of .txt files")
        if not any(folder.rglob("*.txt")):
            raise CorpusUnavailable(f"corpus folder {folder} contains no .txt documents")
        return folder.resolve()
    folder = corpus_dir(OFFLINE)
    if (folder / "manifest.json").is_file():
        version = read_json(folder / "manifest.json").get("version", 1)
        if version == CORPUS_VERSION:
            return folder
        print(f"[metasae] the offline corpus in {folder} was built by builder version {version} "
              f"(now {CORPUS_VERSION}); rebuilding it", file=sys.stderr, flush=True)
    build_debian_offline(folder)
    return folder


def iter_documents(name: str) -> Iterator[str]:
    """Documents of a corpus in a fixed order (files sorted by path; FineWeb in stream order)."""
    if name == "fineweb" and not os.environ.get("METASAE_CORPUS"):
        from datasets import load_dataset

        ds = load_dataset("HuggingFaceFW/fineweb", name="sample-10BT", split="train", streaming=True)
        for row in ds:
            yield row["text"]
        return
    folder = ensure_corpus(name)
    for path in sorted(folder.rglob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            yield text


def load_documents(name: str, shuffle_seed: int | None = SHUFFLE_SEED) -> list[str]:
    """All documents of a local corpus, shuffled deterministically (None keeps file order)."""
    docs = list(iter_documents(name))
    if not docs:
        raise CorpusUnavailable(f"corpus {name!r} has no non-empty documents")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(docs)
    return docs


# ---------------------------------------------------------------------------
# Tokenisation into rows
# ---------------------------------------------------------------------------


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    try:  # special-token strings inside the text stay text, so only inserted BOS ids are BOS
        enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
    except TypeError:
        enc = tokenizer(texts, add_special_tokens=False)
    return enc["input_ids"]


def tokenize_rows(docs: Iterable[str], tokenizer: Any, ctx_len: int, n_rows: int | None = None,
                  bos_token_id: int | None = None, batch_docs: int = 64) -> torch.Tensor:
    """Tokenise documents into a LongTensor of ``n_rows`` x ``ctx_len`` token ids.

    As in the paper's pipeline, each document gets a BOS token prepended and
    the documents are concatenated into one stream cut into rows; each row also
    starts with BOS (as TransformerLens' ``tokenize_and_concatenate`` does), so
    no row begins on a context-free text token.  ``valid_mask(tokens, bos)``
    then excludes every BOS position from training and metrics: the paper's
    code kept BOS, but BOS residuals have a norm orders of magnitude above text
    tokens and carry no text.  ``n_rows=None`` tokenises everything; when the
    documents run out, fewer rows are returned (the caller checks).
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be at least 2 (BOS plus one token), not {ctx_len}")
    bos = bos_token_id if bos_token_id is not None else (tokenizer.bos_token_id or tokenizer.eos_token_id)
    if bos is None:
        raise ValueError("the tokenizer has no BOS or EOS token to prepend to documents")
    rows: list[list[int]] = []
    cur: list[int] = [bos]
    batch: list[str] = []

    def flush() -> bool:
        nonlocal cur
        for ids in _encode(tokenizer, batch):
            stream = [bos] + ids
            i = 0
            while i < len(stream):
                if len(cur) == 1 and stream[i] == bos and i == 0:
                    i += 1  # a document boundary at a row start: the row's BOS serves
                    continue
                take = min(ctx_len - len(cur), len(stream) - i)
                cur.extend(stream[i:i + take])
                i += take
                if len(cur) == ctx_len:
                    rows.append(cur)
                    cur = [bos]
                    if n_rows is not None and len(rows) >= n_rows:
                        return True
        batch.clear()
        return False

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_docs and flush():
            break
    else:
        if batch:
            flush()
    out = torch.tensor(rows, dtype=torch.long) if rows else torch.zeros(0, ctx_len, dtype=torch.long)
    return out


def valid_mask(tokens_RT: torch.Tensor, bos_token_id: int, pad_token_id: int | None = None) -> torch.Tensor:
    """True at positions used for training and metrics: not BOS, not padding."""
    m = tokens_RT != bos_token_id
    if pad_token_id is not None and pad_token_id != bos_token_id:
        m &= tokens_RT != pad_token_id
    return m


def rows_for_tokens(n_tokens: int, ctx_len: int) -> int:
    return -(-int(n_tokens) // ctx_len)


def split_row_ranges(sizes_tokens: dict[str, int], ctx_len: int) -> dict[str, tuple[int, int]]:
    """Consecutive, disjoint row ranges [start, stop) for each split, in the given order."""
    out, start = {}, 0
    for split, n in sizes_tokens.items():
        r = rows_for_tokens(n, ctx_len)
        out[split] = (start, start + r)
        start += r
    return out


# ---------------------------------------------------------------------------
# Building the offline corpus from Debian packages
# ---------------------------------------------------------------------------


def _tools_present() -> bool:
    return shutil.which("diatheke") is not None and PYDOC_HTML.is_dir() and _sword_module_present()


def _sword_module_present() -> bool:
    mods = Path("/usr/share/sword/mods.d")
    names = {p.name.lower() for p in mods.glob("*.conf")} if mods.is_dir() else set()
    return {"engweb2015eb.conf", "mhcc.conf"} <= names


def _install_packages() -> None:
    apt_install(DEBIAN_PACKAGES, "the offline corpus", CorpusUnavailable,
                "or set METASAE_CORPUS to a folder of .txt files")


# "Book C:V: text"; the book name is anchored at the line start so that inline
# references inside the commentary ("..., He 11:7") never start a new verse.
_VERSE = re.compile(r"^((?:[1-4] |I{1,3} )?[A-Z][\w'’]*(?: (?:of|to|the|and|[A-Z][\w'’]*)){0,4}(?: \(\w+\))?) (\d+):(\d+):\s?(.*)$")


_TAG = re.compile(r"<[^>]*>")
# engWEB2015eb leaks a stray psalm title (with its markup) in front of some verse prefixes
_LEAKED_TITLE = re.compile(r"<title\b[^>]*>.*?</title>")


def _sword_env(tmp: Path, module: str) -> dict[str, str] | None:
    """An environment in which diatheke reads ``module`` with the index format its files have.

    Debian's sword-comm-mhcc declares ``ModDrv=zCom4`` (12-byte verse index
    entries) but ships zCom files (10-byte entries: 4-byte block, 4-byte start,
    2-byte size).  Read as zCom4, every entry points at the wrong place: diatheke
    prints "Error reading ulCompOffset" and each verse gets a ~50 kB window of
    the wrong chapters.  When the index sizes show this mismatch, a private
    SWORD_PATH under ``tmp`` holds a copy of the module's .conf with
    ``ModDrv=zCom`` and a link to the installed modules.  None: use the system
    configuration as is.
    """
    root = Path("/usr/share/sword")
    conf = next((c for c in (root / "mods.d").glob("*.conf") if c.stem.lower() == module.lower()), None)
    if conf is None:
        return None
    text = conf.read_text(encoding="utf-8", errors="replace")
    drv = re.search(r"^ModDrv=(\S+)", text, re.M)
    data = re.search(r"^DataPath=\.?/?(\S+)", text, re.M)
    if not drv or drv.group(1).lower() != "zcom4" or not data:
        return None
    sizes = [f.stat().st_size for f in (root / data.group(1)).glob("*.bzv")]
    if not sizes or not all(n % 10 == 0 for n in sizes) or all(n % 12 == 0 for n in sizes):
        return None
    (tmp / "mods.d").mkdir(parents=True, exist_ok=True)
    (tmp / "mods.d" / conf.name).write_text(re.sub(r"^ModDrv=\S+", "ModDrv=zCom", text, flags=re.M),
                                           encoding="utf-8")
    (tmp / "modules").symlink_to(root / "modules")
    return dict(os.environ, SWORD_PATH=str(tmp))


def _diatheke_lines(module: str, env: dict[str, str] | None = None) -> Iterator[str]:
    proc = subprocess.Popen(["diatheke", "-b", module, "-f", "plain", "-k", BIBLE_RANGE],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8",
                            errors="replace", env=env)
    assert proc.stdout is not None
    yield from proc.stdout
    if proc.wait() != 0:
        raise CorpusUnavailable(f"diatheke failed on module {module} (exit {proc.returncode}); "
                                "set METASAE_CORPUS to a folder of .txt files")


def _parse_diatheke(lines: Iterable[str], module: str) -> Iterator[tuple[str, list[str]]]:
    """(``"Book C"``, verse texts) per chapter of diatheke's plain output, verse prefixes stripped.

    Each verse starts a line "Book C:V: text" (indented for poetry); the lines
    that follow without such a prefix continue that verse.  The output ends
    with "(module)".

    Headings: an indented verse line is preceded by one heading line.  Over a long
    range, engWEB2015eb keeps printing the last psalm title it met before every
    later indented verse ("A praise psalm by David." before each verse from Psalm
    145 on, then Psalm 151's title before every verse of the New Testament).  A
    heading is therefore never taken as verse text; it is kept only as a psalm's
    own title, before verse 1 of a Psalms chapter, when it differs from the title
    kept last (a title that merely repeats is the leak).
    """
    key, verses = None, []
    heading, kept_title = None, None  # the line before the next verse line, the last psalm title kept
    for raw in lines:
        line = _TAG.sub("", _LEAKED_TITLE.sub("", raw.rstrip("\n")))  # OSIS markup leaking into plain output
        m = _VERSE.match(line.lstrip())
        if m:
            title = None
            if line[:1].isspace() and heading is not None and verses and verses[-1].endswith("\n" + heading):
                verses[-1] = verses[-1][:-len(heading) - 1]  # the heading is not the previous verse's text
                title = heading
            ch = f"{m.group(1)} {m.group(2)}"
            if ch != key:
                if key is not None:
                    yield key, verses
                key, verses = ch, []
            text = m.group(4)
            if title is not None and m.group(1) == "Psalms" and m.group(3) == "1" and title != kept_title:
                text, kept_title = f"{title}\n{text}", title
            verses.append(text)
            heading = None
        elif line.strip() and line.strip() != f"({module})" and verses:
            verses[-1] += "\n" + line
            heading = line
    if key is not None:
        yield key, verses


def _bible_docs() -> Iterator[tuple[str, str]]:
    for key, verses in _parse_diatheke(_diatheke_lines("engWEB2015eb"), "engWEB2015eb"):
        text = " ".join(v.strip() for v in verses if v.strip())
        text = re.sub(r"[ \t]+", " ", text).strip()
        if text:
            yield key, text


# "* Verses 3-5 *", "* Verse 31 *", "* Verse 7 * ,8": the section markers
_SECTION = re.compile(r"\*\s*Verses?\s+[\d\s,\-–]*\*(?:\s*,\s*\d+(?:\s*-\s*\d+)?\b)?")
# outline items "Noah finds grace.(8-11)"
_OUTLINE_ITEM = re.compile(r"\(\d+(?:\s*[-,]\s*\d+)*\)$")


def _commentary_chapters(chapters: Iterable[tuple[str, list[str]]]) -> Iterator[tuple[str, str]]:
    """One document per chapter of MHCC: each comment once, under the chapter it starts in.

    The module links every verse of a commented passage to the same entry, so
    diatheke prints the entry once per verse ("Genesis 1:3", "Genesis 1:4" and
    "Genesis 1:5" all carry "* Verses 3-5 * ...").  An entry is kept the first
    time it is seen; within it, paragraphs (separated by newlines or runs of 3+
    spaces) are kept once across the whole commentary.  Dropped: section
    markers, book titles, "Chapter N" / "Chapter Outline" headings and other
    pieces under 4 words, and outline items ending in a verse range.
    """
    seen_entries: set[str] = set()
    seen_paras: set[str] = set()
    for key, verses in chapters:
        paras = []
        for v in verses:
            if not v.strip() or v in seen_entries:
                continue
            seen_entries.add(v)
            for p in re.split(r"\s{3,}|\n", _SECTION.sub("\n", v)):
                p = re.sub(r"\s+", " ", p).strip().lstrip("-.,;: ")  # "--Text", "* Verse 5 *. Text"
                if len(p.split()) < 4 or _OUTLINE_ITEM.search(p) or p in seen_paras:
                    continue
                seen_paras.add(p)
                paras.append(p)
        if paras:
            yield key, "\n\n".join(paras)


def _commentary_docs() -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory(prefix="sword.") as tmp:
        env = _sword_env(Path(tmp), "MHCC")
        yield from _commentary_chapters(_parse_diatheke(_diatheke_lines("MHCC", env), "MHCC"))


class _ProseExtractor(html.parser.HTMLParser):
    """Text of a Sphinx page's main body, without code blocks, scripts or navigation."""

    _SKIP = {"pre", "script", "style"}
    _BLOCK = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "div", "section", "tr", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth_main = 0  # nesting of divs inside the main body
        self.skip_tag = ""  # the tag that opened the skipped region
        self.skip_depth = 0  # its nesting (only that tag is counted: void tags never close)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if not self.depth_main:
            if tag == "div" and a.get("role") == "main":
                self.depth_main = 1
            return
        if tag == "div":
            self.depth_main += 1
        if self.skip_tag:
            if tag == self.skip_tag:
                self.skip_depth += 1
        elif tag in self._SKIP or (tag == "div" and "highlight" in (a.get("class") or "")):
            self.skip_tag, self.skip_depth = tag, 1
        if tag in self._BLOCK:
            self.parts.append("\x00")

    def handle_endtag(self, tag: str) -> None:
        if not self.depth_main:
            return
        if self.skip_tag and tag == self.skip_tag:
            self.skip_depth -= 1
            if self.skip_depth == 0:
                self.skip_tag = ""
        if tag == "div":
            self.depth_main -= 1
        if tag in self._BLOCK:
            self.parts.append("\x00")

    def handle_data(self, data: str) -> None:
        if self.depth_main and not self.skip_tag:
            self.parts.append(data.replace("\n", " "))


def _pydoc_docs() -> Iterator[tuple[str, str]]:
    skip_names = re.compile(r"^(genindex|py-modindex|search|contents|copyright|license)")
    for path in sorted(PYDOC_HTML.rglob("*.html")):
        rel = path.relative_to(PYDOC_HTML)
        if rel.parts[0].startswith("_") or skip_names.match(path.name):
            continue
        ex = _ProseExtractor()
        ex.feed(path.read_text(encoding="utf-8", errors="replace"))
        lines = [re.sub(r"\s+", " ", ln).strip().replace("¶", "") for ln in "".join(ex.parts).split("\x00")]
        paras = [ln for ln in lines if len(ln.split()) >= 4]
        if paras:
            yield str(rel.with_suffix("")), "\n".join(paras)


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_")


def build_debian_offline(folder: Path) -> Path:
    """Build the offline corpus into a temp folder, then rename it into place."""
    if not _tools_present():
        _install_packages()
        if not _tools_present():
            raise CorpusUnavailable(
                "the Debian packages were installed but diatheke or the Python docs are still missing; "
                "set METASAE_CORPUS to a folder of .txt files")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        sources: dict[str, dict[str, int]] = {}
        for source, docs in (("bible_web", _bible_docs()), ("commentary_mhcc", _commentary_docs()),
                             ("python_docs", _pydoc_docs())):
            n_docs = n_chars = 0
            for i, (key, text) in enumerate(docs):
                out = tmp / source / f"{i:05d}_{_slug(key)[:60]}.txt"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(text + "\n", encoding="utf-8")
                n_docs += 1
                n_chars += len(text)
            if n_docs == 0:
                raise CorpusUnavailable(f"the offline corpus source {source} produced no documents; "
                                        "set METASAE_CORPUS to a folder of .txt files")
            sources[source] = {"documents": n_docs, "chars": n_chars}
        atomic_write_json(tmp / "manifest.json", {
            "name": OFFLINE,
            "version": CORPUS_VERSION,
            "packages": list(DEBIAN_PACKAGES),
            "sources": sources,
            "documents": sum(s["documents"] for s in sources.values()),
            "chars": sum(s["chars"] for s in sources.values()),
            "licences": {"bible_web": "public domain", "commentary_mhcc": "public domain",
                         "python_docs": "PSF licence"},
        })
        os.chmod(tmp, 0o755)
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete earlier build (no manifest), or an older builder's
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def corpus_info(name: str) -> dict[str, Any]:
    folder = ensure_corpus(name)
    man = folder / "manifest.json"
    if man.is_file():
        return read_json(man)
    files = list(folder.rglob("*.txt"))
    return {"name": str(folder), "documents": len(files), "chars": sum(f.stat().st_size for f in files)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build or locate a text corpus.")
    ap.add_argument("--ensure", required=True, metavar="NAME",
                    help=f"{OFFLINE!r}, 'fineweb' or a folder of .txt files")
    args = ap.parse_args(argv)
    try:
        if args.ensure == "fineweb":
            print("corpus fineweb: streamed from the hub (HuggingFaceFW/fineweb, sample-10BT) at harvest time")
            return 0
        folder = ensure_corpus(args.ensure)
        info = corpus_info(args.ensure)
        print(f"corpus {args.ensure}: {info['documents']} documents, {info['chars'] / 1e6:.1f}M characters in {folder}")
        return 0
    except (CorpusUnavailable, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
