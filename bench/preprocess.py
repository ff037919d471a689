r"""Image preprocessing throughput on one CPU core (mmjax.data.images / mmjax.data.augment).

  python bench/preprocess.py [--sizes=64,224] [--seconds=2]

Images/s of stored image bytes -> the model's uint8 [S, S, 3], per input set and mode:
- inputs: 'tuxpaint' (the original PNG stamps of Debian `tuxpaint-stamps-default`, mostly
  RGBA/LA/P with transparency, median 17k px; skipped when not installed), and 640 x 480
  synthetic photos (smooth colour fields plus noise) encoded as JPEG (quality 90) and PNG;
- modes: 'crop' (the default centre crop; also every evaluation), 'letterbox', 'light' (the
  earlier preset), 'custom' (the `data.aug` defaults on a letterbox view: random resized crop,
  flip, brightness/contrast/saturation jitter) and 'custom+hue' (the same with hue=0.05).
The process is pinned to one core and BLAS to one thread, and the rate is per second of its own
CPU time, so other load on the machine changes it little. Decode is included (it dominates).
Prints a Markdown table; paste it with the machine load (`cat /proc/loadavg`) where it is used.
"""

from __future__ import annotations

import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

# pylint: disable=wrong-import-position
import argparse  # noqa: E402
import io  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mmjax.data import augment, images  # noqa: E402

TUXPAINT = pathlib.Path('/usr/share/tuxpaint/stamps')


def photos(n: int, fmt: str, seed: int = 0) -> list[bytes]:
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
  out = []
  for _ in range(n):
    base = [128 + 100 * np.sin(xx / rng.uniform(20, 200) + yy / rng.uniform(20, 200) + p)
            for p in rng.uniform(0, 6, 3)]
    pixels = np.stack(base, -1) + rng.normal(0, 8, (480, 640, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        buf, fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
    out.append(buf.getvalue())
  return out


def inputs() -> dict[str, list[bytes]]:
  sets = {}
  if TUXPAINT.is_dir():
    sets['tuxpaint'] = [p.read_bytes() for p in sorted(TUXPAINT.rglob('*.png'))]
  sets['photo 640x480 JPEG'] = photos(16, 'JPEG')
  sets['photo 640x480 PNG'] = photos(16, 'PNG')
  return sets


def modes(size: int):
  custom, hue = augment.Augment(), augment.Augment(hue=0.05)
  return {
      'crop': lambda b, rng: images.load(b, images.View(size)),
      'letterbox': lambda b, rng: images.load(b, images.View(size, 'letterbox')),
      'light': lambda b, rng: augment.Augment(light=True).image(b, images.View(size), rng),
      'custom': lambda b, rng: custom.image(b, images.View(size, 'letterbox'), rng,
                                            custom.draw_flip(rng)),
      'custom+hue': lambda b, rng: hue.image(b, images.View(size, 'letterbox'), rng,
                                             hue.draw_flip(rng)),
  }


def rate(fn, data: list[bytes], seconds: float) -> float:
  """Images per second of this process's CPU time (a busy machine's other processes do not
  count, as they would in wall time)."""
  rng = np.random.default_rng(0)
  for b in data[:4]:
    fn(b, rng)
  n, start = 0, time.process_time()
  while time.process_time() - start < seconds:
    fn(data[n % len(data)], rng)
    n += 1
  return n / (time.process_time() - start)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='64,224')
  p.add_argument('--seconds', type=float, default=2.0)
  args = p.parse_args(argv)
  if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  sizes = [int(s) for s in args.sizes.split(',')]
  sets = inputs()
  names = list(modes(sizes[0]))
  print(f'load {open("/proc/loadavg").read().split()[:3]}' if os.path.exists('/proc/loadavg')
        else '')
  print('| input | S | ' + ' | '.join(f'{m} (img/s)' for m in names) + ' |')
  print('|---|---|' + '---|' * len(names))
  for name, data in sets.items():
    for size in sizes:
      cells = [f'{rate(fn, data, args.seconds):,.0f}' for fn in modes(size).values()]
      print(f'| {name} | {size} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
