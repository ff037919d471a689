r"""The embedding and search service (mmjax.deploy.serve) on uvicorn.

  python -m mmjax.deploy.serve --index=runs/index [--build=current] [--model=SERVING_EXPORT] \
      [--host=127.0.0.1] [--port=8000] [--api_key=KEY] [--max_batch=32] [--max_wait_ms=3]

Binds 127.0.0.1 unless told otherwise; any other address needs --api_key (or the environment
variable MMJAX_SERVE_API_KEY, which keeps the key out of the process list).
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

from mmjax import cli
from mmjax.deploy import serve

flags.DEFINE_string('index', None, 'The index root (builds/, current, previous); none: /embed only.')
flags.DEFINE_string('build', 'current', 'The build or alias of --index to serve.')
flags.DEFINE_string('model', None, 'The serving export (default: the one the build was made with).')
flags.DEFINE_string('host', '127.0.0.1', 'Bind address; non-loopback needs --api_key.')
flags.DEFINE_integer('port', 8000, 'Port.')
flags.DEFINE_string('api_key', None, 'Required on every request but /healthz, /readyz.')
flags.DEFINE_integer('max_batch', serve.Settings.max_batch, 'Items per model call (1: unbatched).')
flags.DEFINE_float('max_wait_ms', serve.Settings.max_wait_ms, 'Micro-batch gathering window.')
flags.DEFINE_list('buckets', [], 'Padded batch sizes (default: powers of 2 up to --max_batch).')
flags.DEFINE_integer('cache_size', serve.Settings.cache_size, 'Query-embedding LRU entries.')
flags.DEFINE_integer('max_request_bytes', serve.Settings.max_request_bytes, 'Body size limit.')
flags.DEFINE_integer('max_items', serve.Settings.max_items, 'Texts + images per /embed.')
flags.DEFINE_integer('max_text_chars', serve.Settings.max_text_chars, 'Longest text accepted.')
flags.DEFINE_integer('max_pixels', serve.Settings.max_pixels, 'Largest image accepted (pixels).')
flags.DEFINE_integer('max_k', serve.Settings.max_k, 'Largest k of /search.')
flags.DEFINE_float('watch_s', serve.Settings.watch_s,
                   'Seconds between checks of --build (an alias) for a newly promoted build to '
                   'switch to while serving; 0: never.')
FLAGS = flags.FLAGS


def main() -> None:
  import uvicorn  # pylint: disable=import-outside-toplevel
  cli.setup_logging()
  api_key = FLAGS.api_key or os.environ.get('MMJAX_SERVE_API_KEY') or None
  try:
    serve.check_bind(FLAGS.host, api_key)
    buckets = tuple(int(b) for b in FLAGS.buckets)
    settings = serve.Settings(
        max_batch=FLAGS.max_batch, max_wait_ms=FLAGS.max_wait_ms, buckets=buckets,
        cache_size=FLAGS.cache_size, max_request_bytes=FLAGS.max_request_bytes,
        max_items=FLAGS.max_items, max_text_chars=FLAGS.max_text_chars,
        max_pixels=FLAGS.max_pixels, max_k=FLAGS.max_k, api_key=api_key,
        watch_s=FLAGS.watch_s)
    service = serve.load_service(FLAGS.index, build=FLAGS.build, model=FLAGS.model,
                                 settings=settings)
  except (ValueError, OSError) as e:  # A bad flag, a missing build, a cross-version model.
    sys.exit(f'Refused: {e}')
  logging.info('Serving %s on %s:%d', serve.describe(service), FLAGS.host, FLAGS.port)
  uvicorn.run(serve.create_app(service), host=FLAGS.host, port=FLAGS.port, log_level='warning',
              access_log=False, timeout_graceful_shutdown=5)


if __name__ == '__main__':
  cli.run(main)
