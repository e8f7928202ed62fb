#!/usr/bin/env python3
"""Make three folders of real English text from Debian packages, one domain each.

    python examples/make_text_folders.py data        # writes data/scripture, data/quotes, data/manuals

Domains (very different registers, so forgetting between them is visible):

* ``scripture``: the King James Bible (packages ``bible-kjv`` and ``bible-kjv-text``),
  one ``.txt`` per chapter (1,189 documents, about 4.3 MB);
* ``quotes``: the fortune-cookie files of ``fortunes`` and ``fortunes-min`` (quotations,
  literature, jokes, definitions), one ``.jsonl`` per category with one row
  (``{"text", "category"}``) per fortune: several thousand short documents;
* ``manuals``: the Linux man-pages project (``manpages``, ``manpages-dev``), rendered to
  plain text with groff, one ``.txt`` per page (duplicates and ``.so`` aliases dropped).

The packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` in
a temporary folder: nothing is installed. Needs a Debian-like system with a current
package list (``apt-get update``), ``groff`` (package ``groff-base``) to render the man
pages, and ``libreadline8`` for the bundled ``bible`` reader. Writes ``SOURCES.md`` (package
versions, licences, counts) next to the three folders.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = {
    "scripture": ["bible-kjv", "bible-kjv-text"],
    "quotes": ["fortunes", "fortunes-min"],
    "manuals": ["manpages", "manpages-dev"],
}
LICENCES = {
    "scripture": "King James Version (1611): public domain (Crown patent in the United Kingdom); "
                 "the bible-kjv reader is GPL-2+.",
    "quotes": "BSD fortune data files (BSD licence for the collection); each quotation belongs to its author.",
    "manuals": "Linux man-pages project: each page under its own free licence (mostly the 'verbatim' "
               "licence, some GPL, BSD or MIT), see /usr/share/doc/manpages/copyright.",
}
#: fortune files that are pictures rather than text
SKIP_FORTUNES = {"ascii-art"}
KJV_CHAPTERS = 1189
# A chapter heading of the `bible` reader's pretty-printed output: "Genesis 1", "1 Kings 3",
# "Song of Solomon 2". Verse lines start with spaces, so they never match.
CHAPTER = re.compile(r"^((?:[1-3] )?[A-Z][a-z]+(?: of [A-Z][a-z]+)?) (\d+)$")
VERSE = re.compile(r"^\s+\d+ ")


class Failure(Exception):
    """A step failed: printed as one line, exit status 1."""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, **kw)
    except FileNotFoundError:
        raise Failure(f"{cmd[0]} not found: this needs a Debian-like system (apt-get, dpkg-deb, groff)") from None
    except subprocess.CalledProcessError as e:
        err = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        raise Failure(f"{' '.join(cmd[:3])} ... failed: {err[-1] if err else e}") from None


def fetch(packages: list[str], work: Path) -> dict[str, str]:
    """Download and unpack ``packages`` under ``work/root``; returns {package: version}."""
    debs = work / "debs"
    debs.mkdir()
    try:
        run(["apt-get", "download", *packages], cwd=debs)
    except Failure as e:
        raise Failure(f"{e} (run 'apt-get update' first?)") from None
    versions = {}
    for deb in sorted(debs.glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(work / "root")])
        name = run(["dpkg-deb", "-f", str(deb), "Package"]).stdout.decode().strip()
        versions[name] = run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.decode().strip()
    missing = set(packages) - set(versions)
    if missing:
        raise Failure(f"apt-get download did not fetch {', '.join(sorted(missing))}")
    return versions


def make_scripture(root: Path, out: Path) -> int:
    """One file per chapter: the heading, then one verse per line (verse numbers dropped)."""
    text = run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-l10000", "Gen1:1-Rev22:21"],
               stdin=subprocess.DEVNULL).stdout.decode("utf-8")
    chapters: list[tuple[str, int, list[str]]] = []
    for line in text.splitlines():
        m = CHAPTER.match(line)
        if m:
            chapters.append((m.group(1), int(m.group(2)), []))
        elif chapters and line.strip():
            chapters[-1][2].append(VERSE.sub("", line).strip())
    if len(chapters) != KJV_CHAPTERS:
        raise Failure(f"scripture: expected {KJV_CHAPTERS} chapters from the bible reader, got {len(chapters)}")
    books: list[str] = []
    for book, number, verses in chapters:
        if not books or books[-1] != book:
            books.append(book)
        folder = out / f"{len(books):02d}-{book.lower().replace(' ', '-')}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"chapter-{number:03d}.txt").write_text(f"{book} {number}\n\n" + "\n".join(verses) + "\n",
                                                          encoding="utf-8")
    return len(chapters)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def make_quotes(root: Path, out: Path) -> int:
    """One .jsonl per fortune category, one row per fortune."""
    folder = root / "usr/share/games/fortunes"
    out.mkdir(parents=True)
    count = 0
    for f in sorted(folder.iterdir()):
        if f.is_symlink() or not f.is_file() or f.suffix in (".dat", ".u8") or f.name in SKIP_FORTUNES:
            continue
        fortunes = [q.strip("\n") for q in re.split(r"^%$", _decode(f.read_bytes()), flags=re.M)]
        rows = [json.dumps({"text": q, "category": f.name}, ensure_ascii=False) for q in fortunes if q.strip()]
        if rows:
            (out / f"{f.name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
            count += len(rows)
    if not count:
        raise Failure(f"quotes: no fortune files in {folder}")
    return count


def _render_man(page: Path) -> str:
    source = gzip.decompress(page.read_bytes()) if page.suffix == ".gz" else page.read_bytes()
    first = next((ln for ln in source.splitlines() if ln.strip() and not ln.startswith((b'.\\"', b"'\\\""))), b"")
    if first.startswith(b".so "):  # an alias of another page
        return ""
    # -k: input encoding, -t: tables, -rHY=0: no hyphenation, -P-cbou: plain text without
    # escape sequences or overstriking.
    proc = subprocess.run(["groff", "-k", "-t", "-man", "-Tutf8", "-rHY=0", "-P-cbou"], input=source,
                          capture_output=True, check=False)
    lines = [ln.rstrip() for ln in proc.stdout.decode("utf-8", errors="replace").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    body = "\n".join(lines[1:-1])  # drop the running header and footer
    return re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"


def make_manuals(root: Path, out: Path) -> int:
    """One .txt per English man page (sections under usr/share/man/manN), deduplicated."""
    if shutil.which("groff") is None:
        raise Failure("manuals: groff not found (apt-get install groff-base)")
    pages = sorted(p for p in (root / "usr/share/man").glob("man*/*") if p.is_file() and not p.is_symlink())
    seen: set[str] = set()
    count = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for page, text in zip(pages, pool.map(_render_man, pages)):
            if len(text.strip()) < 200:
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            name = page.name.removesuffix(".gz")
            (out / page.parent.name).mkdir(parents=True, exist_ok=True)
            (out / page.parent.name / f"{name}.txt").write_text(text, encoding="utf-8")
            count += 1
    if not count:
        raise Failure("manuals: no man page could be rendered")
    return count


MAKERS = {"scripture": make_scripture, "quotes": make_quotes, "manuals": make_manuals}


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="where the three folders go (e.g. data)")
    parser.add_argument("--force", action="store_true", help="replace the three folders if they exist")
    args = parser.parse_args(argv)
    try:
        for name in MAKERS:
            target = args.dir / name
            if target.exists():
                if not args.force:
                    raise Failure(f"{target} exists (pass --force to replace it)")
                shutil.rmtree(target)
        args.dir.mkdir(parents=True, exist_ok=True)
        rows, versions = [], {}
        for name, make in MAKERS.items():
            with tempfile.TemporaryDirectory(prefix=f"text-{name}-") as tmp:
                versions.update(fetch(PACKAGES[name], Path(tmp)))
                docs = make(Path(tmp) / "root", args.dir / name)
            files, size = folder_size(args.dir / name)
            rows.append((name, docs, files, size))
            print(f"{name:<10} {docs:>6} documents in {files:>5} files, {size / 1e6:6.2f} MB", flush=True)
    except Failure as e:
        print(f"make_text_folders: error: {e}", file=sys.stderr)
        return 1
    lines = ["# Sources of these folders", "", "Made by examples/make_text_folders.py from Debian packages.", "",
             "| folder | documents | files | MB | packages | licence |", "| --- | --- | --- | --- | --- | --- |"]
    for name, docs, files, size in rows:
        pkgs = ", ".join(f"{p} {versions[p]}" for p in PACKAGES[name])
        lines.append(f"| {name} | {docs} | {files} | {size / 1e6:.2f} | {pkgs} | {LICENCES[name]} |")
    (args.dir / "SOURCES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
