"""Reading ingestion inputs: JSONL/CSV manifests and folders of images with caption side files.

Both give plain rows (dicts with `image` paths made absolute) plus the problems found while
reading (unparsable lines, images without captions), which the ingestion report lists.
"""

from __future__ import annotations

import csv
import json
import pathlib
import re
from typing import Any

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif')
AUDIO_EXTENSIONS = ('.wav', '.flac', '.ogg', '.oga')
# Tux Paint's spoken descriptions in other languages: `name_desc_fr.ogg` (the caption is English).
_OTHER_LANGUAGE_DESC = re.compile(r'_desc_[A-Za-z]{2,3}(_[A-Za-z]+)?$')
# Tux Paint translations: `fr.utf8=Un lori.`, `pt_BR.utf8=...`, `ca@valencia.utf8=...`.
_TRANSLATION = re.compile(r'^[A-Za-z]+([_@][A-Za-z]+)*(\.[\w-]+)?=')
LIST_FIELDS = ('captions', 'neg_images', 'neg_texts')


def read_manifest(path: pathlib.Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(rows, problems): rows of a JSONL or CSV manifest; unparsable lines become problems."""
  rows, problems = [], []
  base = path.parent
  if path.suffix.lower() == '.csv':
    with open(path, newline='', encoding='utf-8') as f:
      for n, row in enumerate(csv.DictReader(f), start=2):
        row = {k: v for k, v in row.items() if k and v not in (None, '')}
        for k in LIST_FIELDS:
          if k in row:
            row[k] = [x for x in row[k].split('|') if x]
        rows.append({**row, '_line': n})
  else:
    with open(path, encoding='utf-8') as f:
      for n, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          if not isinstance(row, dict):
            raise ValueError('not a JSON object')
        except ValueError as e:
          problems.append({'line': n, 'reason': f'bad JSON: {e}'})
          continue
        rows.append({**row, '_line': n})
  for row in rows:
    for k in ('image', 'audio', 'neg_images'):
      if isinstance(row.get(k), str):
        row[k] = str(base / row[k])
      elif isinstance(row.get(k), list):
        row[k] = [str(base / p) for p in row[k] if isinstance(p, str)]
  return rows, problems


def read_side_captions(path: pathlib.Path) -> list[str]:
  """Captions of a side file: its non-empty lines that are not `xx.utf8=` translations."""
  text = path.read_bytes().decode('utf-8', errors='replace')
  return [ln for ln in text.splitlines() if ln.strip() and not _TRANSLATION.match(ln)]


def scan_image_dir(root: pathlib.Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(rows, problems) for every image under `root` with a caption side file, in path order."""
  rows, problems = [], []
  for path in sorted(p for p in root.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS):
    side = path.with_suffix('.txt')
    if not side.is_file() and path.stem.endswith('_mirror'):  # Tux Paint's mirrored variant.
      side = path.with_name(path.stem[:-len('_mirror')] + '.txt')
    rel = str(path.relative_to(root))
    if not side.is_file():
      problems.append({'id': rel, 'reason': 'no caption side file'})
      continue
    try:
      rows.append({'id': rel, 'image': str(path), 'captions': read_side_captions(side)})
    except OSError as e:
      problems.append({'id': rel, 'reason': f'unreadable caption file: {e}'})
  return rows, problems


def scan_audio_dir(root: pathlib.Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(rows, problems) for every audio file under `root` with a caption side file, in path order:
  `name.ogg` (a sound effect) and `name_desc.ogg` (Tux Paint's English spoken description) both
  take `name.txt`; descriptions in other languages (`name_desc_fr.ogg`) are not scanned."""
  rows, problems = [], []
  for path in sorted(p for p in root.rglob('*') if p.suffix.lower() in AUDIO_EXTENSIONS):
    if _OTHER_LANGUAGE_DESC.search(path.stem):
      continue
    stem = path.stem[:-len('_desc')] if path.stem.endswith('_desc') else path.stem
    side = path.with_name(stem + '.txt')
    rel = str(path.relative_to(root))
    if not side.is_file():
      problems.append({'id': rel, 'reason': 'no caption side file'})
      continue
    try:
      rows.append({'id': rel, 'audio': str(path), 'captions': read_side_captions(side)})
    except OSError as e:
      problems.append({'id': rel, 'reason': f'unreadable caption file: {e}'})
  return rows, problems
